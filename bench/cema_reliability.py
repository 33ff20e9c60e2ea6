"""CEMA service reliability on 127.0.0.1: crash/restart, late server, auth, bad uploads, load.

Runs the real service (``edgekit cloud serve`` as a child process, foundation teacher and edge
student from the zoo) and real edge clients (the runtime's disk queue and uplink):

1. ``restart``: an edge daemon streams Fashion-MNIST-C while the server is SIGKILLed and restarted;
   every selected sample must end up stored exactly once and updates must resume;
2. ``late_server``: the edge starts while the server is down, queues, and catches up;
3. ``auth``/``bad_uploads``: refused with 401/403/413/422 and nothing stored;
4. ``load``: ``--clients`` concurrent edge clients each upload ``--batches`` batches of 16 samples;
   zero errors expected; p50/p99 upload latency reported.

    PYTHONPATH=. python bench/cema_reliability.py [--clients 32] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.cloud.export import export_adaptable  # noqa: E402
from edgekit.cloud.local import LocalServer, free_port  # noqa: E402
from edgekit.cloud.store import Store  # noqa: E402
from edgekit.models.fmnist import load_cnn  # noqa: E402
from edgekit.models.fmnist_cema import load_foundation  # noqa: E402
from edgekit.runtime import wire  # noqa: E402
from edgekit.runtime.adapt import run_adaptation  # noqa: E402
from edgekit.runtime.queue import DiskQueue  # noqa: E402
from edgekit.runtime.uplink import Uplink  # noqa: E402

TEACHER, STUDENT = "zoo:fmnist-foundation", "zoo:fmnist-cnn"
SHAPE = (1, 28, 28)


def wait_for(predicate, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def restart_scenario(root: Path, bundle: Path) -> dict:
    db = root / "restart.sqlite"
    store = Store(db)
    token = store.issue_token("edge-r")
    port = free_port()
    server = LocalServer(TEACHER, STUDENT, db, port=port, cwd=ROOT, log=root / "server.log").start()
    result: dict = {}

    def edge() -> None:
        report = run_adaptation(
            bundle,
            server.url,
            token,
            "edge-r",
            "fmnist-c:defocus_blur:5:8000",  # 32 s at 250 frames/s: the stream outlives the restart
            root / "edge-r",
            rate=250,
            log=lambda line: None,
            flush_s=60,
        )
        result.update(report.to_dict())

    thread = threading.Thread(target=edge)
    thread.start()
    # updates are flowing before the crash (the first needs 32 uploads and a teacher step on a busy CPU)
    wait_for(lambda: store.last_version("edge-r") > 0, 20.0)
    version_before = store.last_version("edge-r")
    killed_at = time.monotonic()
    server.kill()
    server = LocalServer(TEACHER, STUDENT, db, port=port, cwd=ROOT, log=root / "server.log").start()
    downtime = time.monotonic() - killed_at
    thread.join()
    wait_for(lambda: store.counts("edge-r")["pending"] == 0, 120)
    stored = store.counts("edge-r")["samples"]
    versions = store.last_version("edge-r")
    server.stop()
    store.close()
    return {
        "selected": result["selected"],
        "uploaded": result["uploaded"],
        "stored": stored,
        "queued_at_exit": result["queued_at_exit"],
        "lost": result["selected"] - stored,
        "downtime_s": round(downtime, 2),
        "version_before_kill": version_before,
        "final_version": versions,
        "edge_version": result["version"],
        "stream_accuracy": result["accuracy"],
        "ok": stored == result["selected"]
        and result["queued_at_exit"] == 0
        and versions > version_before
        and result["version"] > version_before,
    }


def late_server_scenario(root: Path) -> dict:
    db = root / "late.sqlite"
    store = Store(db)
    token = store.issue_token("edge-l")
    port = free_port()
    queue = DiskQueue(root / "late-queue.sqlite", SHAPE)
    uplink = Uplink(f"http://127.0.0.1:{port}", "edge-l", token, queue, batch=32, backoff_s=(0.05, 1.0))
    uplink.start()
    rng = np.random.default_rng(0)
    for _ in range(20):
        queue.put(rng.random((10, *SHAPE), dtype=np.float32), np.full(10, 0.3))
        uplink.notify()
    time.sleep(1.0)
    queued = len(queue)
    started = time.monotonic()
    with LocalServer(TEACHER, STUDENT, db, port=port, cwd=ROOT):
        caught_up = wait_for(lambda: len(queue) == 0, 120)
        catch_up_s = time.monotonic() - started
        stored = store.counts("edge-l")["samples"]
    uplink.stop(flush_s=0)
    queue.close()
    store.close()
    return {
        "queued_while_down": queued,
        "failures_while_down": uplink.stats.failures,
        "stored": stored,
        "catch_up_s_including_server_start": round(catch_up_s, 2),
        "ok": caught_up and stored == 200,
    }


def guard_scenarios(root: Path) -> dict:
    db = root / "guard.sqlite"
    store = Store(db)
    tokens = {d: store.issue_token(d) for d in ("dev-a", "dev-b")}
    rng = np.random.default_rng(1)

    def body(x: np.ndarray, client: str = "c") -> bytes:
        return wire.encode_samples(client, np.arange(len(x)), x, np.full(len(x), 0.3, np.float32))

    nan = rng.random((4, *SHAPE), dtype=np.float32)
    nan[0, 0, 0, 0] = np.nan
    with LocalServer(TEACHER, STUDENT, db, cwd=ROOT) as server:

        def post(content: bytes, token: str | None, device: str = "dev-a") -> int:
            headers = {"Content-Type": wire.CONTENT_TYPE}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            url = f"{server.url}/v1/devices/{device}/samples"
            return httpx.post(url, content=content, headers=headers, timeout=30).status_code

        good = body(rng.random((4, *SHAPE), dtype=np.float32))
        auth = {
            "missing_token": post(good, None),
            "wrong_token": post(good, "nope"),
            "other_devices_token": post(good, tokens["dev-b"]),
            "other_devices_token_read": httpx.get(
                f"{server.url}/v1/devices/dev-a/params", headers={"Authorization": f"Bearer {tokens['dev-b']}"}
            ).status_code,
        }
        bad = {
            "nan": post(body(nan), tokens["dev-a"]),
            "not_zlib": post(b"garbage", tokens["dev-a"]),
            "wrong_shape": post(body(np.zeros((2, 1, 10, 10), np.float32)), tokens["dev-a"]),
            "zip_bomb": post(zlib.compress(b"\0" * (64 << 20)), tokens["dev-a"]),
            "oversized": post(np.random.default_rng(2).bytes(5 << 20), tokens["dev-a"]),
        }
        stored_after_bad = store.counts("dev-a")["samples"]
        still_serving = post(good, tokens["dev-a"]) == 200
    store.close()
    return {
        "auth": {
            **auth,
            "stored": stored_after_bad,
            "ok": auth["missing_token"] == 401
            and auth["wrong_token"] == 401
            and auth["other_devices_token"] == 403
            and auth["other_devices_token_read"] == 403,
        },
        "bad_uploads": {
            **bad,
            "stored": stored_after_bad,
            "still_serving": still_serving,
            "ok": all(400 <= v < 500 for v in bad.values()) and stored_after_bad == 0 and still_serving,
        },
    }


def load_scenario(root: Path, clients: int, batches: int, per_batch: int = 16) -> dict:
    db = root / "load.sqlite"
    store = Store(db)
    tokens = [store.issue_token(f"load-{i}") for i in range(clients)]
    with LocalServer(TEACHER, STUDENT, db, cwd=ROOT, log=root / "load-server.log") as server:
        uplinks = []
        for i in range(clients):
            queue = DiskQueue(root / f"load-q{i}.sqlite", SHAPE)
            uplinks.append(Uplink(server.url, f"load-{i}", tokens[i], queue, batch=per_batch, timeout_s=60))
        errors: list[str] = []
        barrier = threading.Barrier(clients)

        def client(index: int) -> None:
            uplink = uplinks[index]
            rng = np.random.default_rng(index)
            count = batches * per_batch
            uplink.queue.put(rng.random((count, *SHAPE), dtype=np.float32), np.full(count, 0.3))
            barrier.wait()
            for _ in range(batches):
                if uplink.post_once() != per_batch:
                    errors.append(f"client {index}: failed upload")

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - started
        latencies = np.concatenate([np.asarray(u.stats.latencies_ms) for u in uplinks])
        stored = store.counts()["samples"]
        failures = sum(u.stats.failures for u in uplinks)
        for uplink in uplinks:
            uplink.client.close()
            uplink.queue.close()
    store.close()
    requests = clients * batches
    return {
        "clients": clients,
        "requests": requests,
        "samples_per_request": per_batch,
        "errors": len(errors) + failures,
        "stored": stored,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "ok": not errors and failures == 0 and stored == requests * per_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cema_reliability.json"))
    args = parser.parse_args()
    load_cnn(), load_foundation()  # trained and cached before any server needs them
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bundle = export_adaptable(load_cnn(), root / "bundle")
        for name, run in (
            ("restart", lambda: restart_scenario(root, bundle)),
            ("late_server", lambda: late_server_scenario(root)),
            ("guards", lambda: guard_scenarios(root)),
            ("load", lambda: load_scenario(root, args.clients, args.batches)),
        ):
            started = time.time()
            out = run()
            if name == "guards":
                results.update(out)
            else:
                results[name] = out
            print(f"{name:12s} {json.dumps(out)}  ({time.time() - started:.1f} s)", flush=True)
    results["all_ok"] = all(v.get("ok") for v in results.values() if isinstance(v, dict))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("all ok:", results["all_ok"])


if __name__ == "__main__":
    main()
