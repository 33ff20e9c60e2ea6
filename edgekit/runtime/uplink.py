"""The edge's link to the CEMA cloud: batched, compressed uploads from the disk queue, retried with
backoff, and parameter pulls applied to the running model.

A background thread drains the queue: it posts the oldest batch, acknowledges it locally only
after the server's 200 (so a crash between the two re-sends, and the server's idempotency key
drops the duplicate), then asks for a newer parameter version. Connection errors, 5xx and 429 back
off exponentially with jitter; 401/403 keep the data and back off (a token can be re-issued); any
other 4xx means the batch itself can never be accepted, so it is dropped and counted.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from edgekit.runtime import wire
from edgekit.runtime.cema import AdaptableModel, decode_params
from edgekit.runtime.queue import DiskQueue


@dataclass
class UplinkStats:
    uploaded: int = 0
    upload_bytes: int = 0
    batches: int = 0
    failures: int = 0
    rejected: int = 0
    auth_failures: int = 0
    updates: int = 0
    download_bytes: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class Uplink:
    def __init__(
        self,
        server: str,
        device: str,
        token: str,
        queue: DiskQueue,
        model: AdaptableModel | None = None,
        batch: int = 64,
        timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.1, 5.0),
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.base = server.rstrip("/")
        self.device = device
        self.queue = queue
        self.model = model
        self.batch = min(batch, wire.MAX_SAMPLES)
        self.backoff_s = backoff_s
        self.log = log or (lambda message: None)
        self.client = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {token}"})
        self.stats = UplinkStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_in_row = 0

    # -- one step each, usable synchronously -------------------------------------------------------
    def post_once(self) -> int | None:
        """Upload the oldest queued batch. Returns samples acknowledged (0 when empty), None on failure."""
        seq, x, ent = self.queue.peek(self.batch)
        if not len(seq):
            return 0
        body = wire.encode_samples(self.queue.client, seq, x, ent)
        start = time.perf_counter()
        try:
            response = self.client.post(
                f"{self.base}/v1/devices/{self.device}/samples",
                content=body,
                headers={"Content-Type": wire.CONTENT_TYPE},
            )
        except httpx.HTTPError as error:
            self._failed(f"upload failed: {type(error).__name__}")
            return None
        if response.status_code == 200:
            self.stats.latencies_ms.append((time.perf_counter() - start) * 1e3)
            self.queue.ack(seq)
            self.stats.uploaded += len(seq)
            self.stats.upload_bytes += len(body)
            self.stats.batches += 1
            self._failures_in_row = 0
            return len(seq)
        if response.status_code in (401, 403):
            self.stats.auth_failures += 1
            self._failed(f"server refused the token ({response.status_code}); samples stay queued")
            return None
        if response.status_code == 429 or response.status_code >= 500:
            self._failed(f"server busy or failing ({response.status_code})")
            return None
        self.queue.ack(seq)  # a 4xx for the batch itself: it can never succeed, do not block the queue
        self.stats.rejected += len(seq)
        self.log(f"server rejected {len(seq)} samples ({response.status_code}): {response.text[:120]}")
        return 0

    def pull_once(self) -> bool:
        """Fetch and apply a newer parameter version, if the server has one. True when applied."""
        if self.model is None:
            return False
        try:
            response = self.client.get(
                f"{self.base}/v1/devices/{self.device}/params", params={"since": self.model.version}
            )
        except httpx.HTTPError as error:
            self._failed(f"pull failed: {type(error).__name__}")
            return False
        if response.status_code != 200:
            if response.status_code != 204:
                self._failed(f"pull refused ({response.status_code})")
            return False
        version, arrays = decode_params(response.content)
        self.stats.download_bytes += len(response.content)
        if self.model.apply(version, arrays):
            self.stats.updates += 1
            self.log(f"applied parameter version {version}")
            return True
        return False

    def _failed(self, message: str) -> None:
        self.stats.failures += 1
        self._failures_in_row += 1
        self.log(message)

    def backoff(self) -> float:
        low, high = self.backoff_s
        delay = min(high, low * 2 ** max(0, self._failures_in_row - 1))
        return delay * (0.5 + random.random() / 2)

    def drain(self, deadline_s: float = 30.0) -> bool:
        """Upload until the queue is empty (True) or the deadline passes (False), then pull once."""
        end = time.monotonic() + deadline_s
        while len(self.queue) and time.monotonic() < end:
            if self.post_once() is None:
                time.sleep(min(self.backoff(), max(0.0, end - time.monotonic())))
        self.pull_once()
        return not len(self.queue)

    # -- background thread ------------------------------------------------------------------------
    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cema-uplink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = self.post_once()
            if sent is None:
                self._stop.wait(self.backoff())
                continue
            pulled = self.pull_once() if sent else False
            if not sent and not pulled:
                self._wake.wait(0.5)  # idle: wake on new samples, or poll for updates twice a second
                self._wake.clear()
                if not len(self.queue):
                    self.pull_once()

    def stop(self, flush_s: float = 5.0) -> None:
        """Stop the thread; try to upload what is left for ``flush_s`` (the rest stays on disk)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        if flush_s > 0:
            self.drain(flush_s)
        self.client.close()

    def latency_percentiles(self) -> dict[str, float]:
        if not self.stats.latencies_ms:
            return {}
        lat = np.asarray(self.stats.latencies_ms)
        return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
