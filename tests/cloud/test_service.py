"""The CEMA service for real: uvicorn child processes on 127.0.0.1, real HTTP, real SQLite files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgekit.cloud.local import LocalServer, free_port
from edgekit.cloud.store import Store
from edgekit.runtime import wire
from edgekit.runtime.cema import AdaptableModel, decode_params
from edgekit.runtime.queue import DiskQueue
from edgekit.runtime.uplink import Uplink

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.cloud.tinymodels import student  # noqa: E402

TEACHER, STUDENT = "tests.cloud.tinymodels:teacher", "tests.cloud.tinymodels:student"
SHAPE = (1, 28, 28)


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def body(n: int = 8, client: str = "c1", start: int = 0, x: np.ndarray | None = None) -> bytes:
    x = samples(n) if x is None else x
    return wire.encode_samples(client, np.arange(start, start + len(x)), x, np.full(len(x), 0.3, np.float32))


def wait_for(predicate, timeout_s: float = 60.0, every: float = 0.1) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud")
    store = Store(root / "state.sqlite")
    tokens = {device: store.issue_token(device) for device in ("dev-a", "dev-b")}
    server = LocalServer(TEACHER, STUDENT, root / "state.sqlite", cwd=REPO, log=root / "server.log").start()
    yield server, store, tokens
    server.stop()
    store.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from edgekit.cloud.export import export_adaptable

    return export_adaptable(student(), tmp_path_factory.mktemp("bundle") / "edge")


def post(server: LocalServer, device: str, content: bytes, token: str | None) -> httpx.Response:
    headers = {"Content-Type": wire.CONTENT_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{server.url}/v1/devices/{device}/samples", content=content, headers=headers, timeout=30)


def test_tokens_guard_every_device_endpoint(service) -> None:
    server, store, tokens = service
    before = store.counts("dev-a")["samples"]
    assert post(server, "dev-a", body(), None).status_code == 401
    assert post(server, "dev-a", body(), "not-a-token").status_code == 401
    assert post(server, "dev-a", body(), tokens["dev-b"]).status_code == 403  # another device's token
    params = f"{server.url}/v1/devices/dev-a/params"
    assert httpx.get(params).status_code == 401
    assert httpx.get(params, headers={"Authorization": f"Bearer {tokens['dev-b']}"}).status_code == 403
    assert store.counts("dev-a")["samples"] == before
    revoked = store.issue_token("dev-c")
    assert post(server, "dev-c", body(client="rv"), revoked).status_code == 200
    store.revoke("dev-c")
    assert post(server, "dev-c", body(client="rv", start=100), revoked).status_code == 401


def test_bad_uploads_are_refused_and_nothing_is_stored(service) -> None:
    server, store, tokens = service
    token = tokens["dev-b"]
    before = store.counts("dev-b")["samples"]
    nan = samples(4)
    nan[2, 0, 5, 5] = np.nan
    wrong_shape = wire.encode_samples("c1", np.arange(4), np.zeros((4, 1, 14, 14)), np.zeros(4))
    bomb = zlib.compress(b"\0" * (64 << 20))  # inflates past the decompressed limit
    cases = {
        "not zlib": b"hello",
        "zlib of junk": zlib.compress(b"junk" * 100),
        "NaN": body(x=nan),
        "wrong shape": wrong_shape,
        "zip bomb": bomb,
        "too many": body(n=wire.MAX_SAMPLES + 1),
        "bad client": wire.encode_samples("../etc", np.arange(2), samples(2), np.zeros(2)),
    }
    for name, content in cases.items():
        response = post(server, "dev-b", content, token)
        assert 400 <= response.status_code < 500, name
    oversized = post(server, "dev-b", os.urandom(5 << 20), token)
    assert oversized.status_code == 413
    assert store.counts("dev-b")["samples"] == before
    assert httpx.get(f"{server.url}/healthz").json()["ok"]  # still serving
    assert post(server, "dev-b", body(client="ok"), token).status_code == 200


def test_upload_update_roundtrip_and_idempotent_retries(service, bundle: Path) -> None:
    server, store, tokens = service
    token = tokens["dev-a"]
    first = post(server, "dev-a", body(16, client="rt"), token)
    assert first.json() == {"stored": 16, "duplicates": 0}
    again = post(server, "dev-a", body(16, client="rt"), token)  # a retry of the same batch
    assert again.json() == {"stored": 0, "duplicates": 16}
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{server.url}/v1/devices/dev-a/params"
    assert wait_for(lambda: httpx.get(url, params={"since": 0}, headers=headers).status_code == 200)
    response = httpx.get(url, params={"since": 0}, headers=headers)
    version, arrays = decode_params(response.content)
    assert int(response.headers[wire.VERSION_HEADER]) == version >= 1
    model = AdaptableModel(bundle)
    assert model.apply(version, arrays)  # the service's set fits the edge bundle exactly
    assert httpx.get(url, params={"since": version}, headers=headers).status_code == 204


def test_server_killed_mid_stream_loses_no_acknowledged_sample(tmp_path: Path, bundle: Path) -> None:
    db = tmp_path / "state.sqlite"
    store = Store(db)
    token = store.issue_token("edge-1")
    port = free_port()
    server = LocalServer(TEACHER, STUDENT, db, port=port, cwd=REPO, log=tmp_path / "server.log").start()
    queue = DiskQueue(tmp_path / "queue.sqlite", SHAPE)
    model = AdaptableModel(bundle, tmp_path / "edge")
    uplink = Uplink(server.url, "edge-1", token, queue, model, batch=16, backoff_s=(0.05, 0.5))
    uplink.start()
    put: list[int] = []
    try:
        for i in range(40):
            put += queue.put(samples(4, seed=i), np.full(4, 0.3))
            uplink.notify()
            if i == 15:
                assert wait_for(lambda: uplink.stats.uploaded > 0, 30)
                server.kill()  # SIGKILL while the edge keeps producing
            if i == 25:
                server = LocalServer(TEACHER, STUDENT, db, port=port, cwd=REPO, log=tmp_path / "server.log").start()
            time.sleep(0.05)
        assert wait_for(lambda: len(queue) == 0, 60)
        assert uplink.stats.failures > 0  # it did see the outage
        keys = store.sample_keys("edge-1")
        assert {(queue.client, s) for s in put} <= keys  # every sample arrived, none twice (unique key)
        assert store.counts("edge-1")["samples"] == len(put)
        assert wait_for(lambda: model.version > 0, 60)  # updates keep flowing after the restart
    finally:
        uplink.stop(flush_s=0)
        server.stop()
        queue.close()
        store.close()


def test_edge_started_with_server_down_queues_and_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    store = Store(db)
    token = store.issue_token("edge-2")
    port = free_port()
    queue = DiskQueue(tmp_path / "queue.sqlite", SHAPE)
    uplink = Uplink(f"http://127.0.0.1:{port}", "edge-2", token, queue, batch=32, backoff_s=(0.05, 0.3))
    uplink.start()
    try:
        for i in range(10):
            queue.put(samples(5, seed=i), np.full(5, 0.3))
            uplink.notify()
        time.sleep(0.5)
        assert len(queue) == 50 and uplink.stats.failures > 0 and uplink.stats.uploaded == 0
        with LocalServer(TEACHER, STUDENT, db, port=port, cwd=REPO):
            assert wait_for(lambda: len(queue) == 0, 60)
            assert store.counts("edge-2")["samples"] == 50
    finally:
        uplink.stop(flush_s=0)
        queue.close()
        store.close()


def test_adapt_daemon_stops_cleanly_on_sigterm(service, bundle: Path, tmp_path: Path) -> None:
    server, store, _ = service
    token = store.issue_token("edge-3")
    command = [
        sys.executable,
        "-c",
        "from edgekit.cli import main; main()",
        "adapt",
        str(bundle),
        "--server",
        server.url,
        "--token",
        token,
        "--device",
        "edge-3",
        "--stream",
        "fmnist-c:gaussian_noise:5:4000",
        "--state",
        str(tmp_path / "edge"),
        "--rate",
        "800",
        "--flush-seconds",
        "2",
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"},
    )
    try:
        queue_file = tmp_path / "edge" / "queue.sqlite"
        assert wait_for(lambda: queue_file.exists(), 60)
        time.sleep(2.0)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert 0 < summary["seen"] < 4000  # stopped mid-stream
    assert summary["accuracy"] is not None
    assert summary["selected"] > 0
    assert summary["uploaded"] + summary["queued_at_exit"] == summary["selected"]  # nothing lost
    assert store.counts("edge-3")["samples"] == summary["uploaded"]
    assert len(DiskQueue(queue_file, SHAPE)) == summary["queued_at_exit"]


def test_worker_steps_per_cloud_batch_and_replays_between(tmp_path: Path) -> None:
    """The reference schedule: a full step per 32 new samples; replay-only steps make up each
    upload's two student steps; a partial batch waits until it is older than ``max_wait_s``."""
    import torch

    from edgekit.cloud.server import ServiceConfig, Worker
    from tests.cloud.tinymodels import teacher

    torch.set_num_threads(1)
    store = Store(tmp_path / "state.sqlite")
    worker = Worker(store, teacher().module, student().module, SHAPE, ServiceConfig(max_wait_s=3600))
    assert worker.adapter("d").config.student_steps_per_upload == 2
    store.add_samples("d", "c", np.arange(40), samples(40), np.full(40, 0.3))
    worker.notify("d")
    assert worker.step("d")  # 32 of the 40 learned from
    assert store.counts("d")["pending"] == 8 and store.last_version("d") == 1
    assert worker.step("d")  # the upload's second step: replay only
    assert store.counts("d")["pending"] == 8 and store.last_version("d") == 2
    assert not worker.step("d")  # nothing new arrived, and the 8 are not old enough
    store.add_samples("d", "c", np.arange(40, 44), samples(4, seed=1), np.full(4, 0.3))
    worker.notify("d")
    assert worker.step("d") and worker.step("d")  # 12 pending < 32: two replay-only steps
    assert not worker.step("d")
    assert store.counts("d")["pending"] == 12 and store.last_version("d") == 4
    worker.config.max_wait_s = 0.0
    assert worker.step("d")  # the partial batch has waited long enough
    assert store.counts("d")["pending"] == 0 and store.last_version("d") == 5
    store.close()
