"""The cloud-edge adaptation daemon behind ``edgekit adapt``.

Runs an adaptable bundle on a stream, selects samples the CEMA way, queues them on disk, lets the
uplink thread upload them and pull parameter updates, and logs accuracy when the stream carries
labels. A stop request (SIGINT/SIGTERM in the CLI, or ``stop`` here) ends after the current batch;
every selected sample is already durable in the queue, and the uplink gets ``flush_s`` to send
what it can before the queue file is closed cleanly.

Streams: ``fmnist-c:CORRUPTION:SEVERITY[:COUNT]`` (the Fashion-MNIST-C test stream), a folder of
``.npy``/``.png`` files (labels from the parent folder's name when it is a label or an index), or
``-`` for back-to-back ``.npy`` frames on stdin.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.cema import AdaptableModel, Selector, SelectorConfig, entropy
from edgekit.runtime.queue import DiskQueue
from edgekit.runtime.uplink import Uplink

Batch = tuple[np.ndarray, np.ndarray | None]


def _chunks(x: np.ndarray, y: np.ndarray | None, batch: int) -> Iterator[Batch]:
    for start in range(0, len(x), batch):
        yield x[start : start + batch], (None if y is None else y[start : start + batch])


def _image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False).astype(np.float32)
    else:
        from PIL import Image

        array = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    if array.size != int(np.prod(shape)):
        raise EdgekitError(f"{path}: {list(array.shape)} does not fit the model input {list(shape)}")
    return array.reshape(shape)


def open_stream(spec: str, sample_shape: tuple[int, ...], labels: list[str] | None, batch: int) -> Iterator[Batch]:
    """Batches ``(x float32 [B, ...], labels int64 [B] or None)`` from a stream spec."""
    if spec == "-":
        return _stdin_frames(sample_shape, batch)
    if spec.startswith("fmnist-c:"):
        from edgekit.data import fmnist_c

        parts = spec.split(":")
        if len(parts) not in (3, 4) or not parts[2].isdigit() or (len(parts) == 4 and not parts[3].isdigit()):
            raise EdgekitError(f"stream '{spec}': use fmnist-c:CORRUPTION:SEVERITY[:COUNT]")
        x, y = fmnist_c.load(parts[1], int(parts[2]), int(parts[3]) if len(parts) == 4 else None)
        return _chunks(x, y, batch)
    folder = Path(spec)
    if not folder.is_dir():
        raise EdgekitError(f"stream '{spec}' is not '-', fmnist-c:..., or a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".npy", ".png", ".jpg", ".jpeg"))
    if not files:
        raise EdgekitError(f"{folder} holds no .npy/.png/.jpg frames")
    names = {name: i for i, name in enumerate(labels or [])}

    def label(path: Path) -> int | None:
        parent = path.parent.name
        if parent in names:
            return names[parent]
        return int(parent) if parent.isdigit() else None

    found = [label(p) for p in files]
    y = np.asarray(found, np.int64) if all(v is not None for v in found) else None
    return _chunks(np.stack([_image(p, sample_shape) for p in files]), y, batch)


def _stdin_frames(shape: tuple[int, ...], batch: int) -> Iterator[Batch]:
    source = sys.stdin.buffer
    pending: list[np.ndarray] = []
    while True:
        try:
            frame = np.load(source, allow_pickle=False)
        except (EOFError, ValueError, OSError):  # end of stream (or a torn last frame)
            break
        frame = np.asarray(frame, np.float32).reshape(-1, *shape)
        pending.extend(frame)
        while len(pending) >= batch:
            yield np.stack(pending[:batch]), None
            pending = pending[batch:]
    if pending:
        yield np.stack(pending), None


@dataclass
class AdaptReport:
    seen: int = 0
    correct: int = 0
    labelled: int = 0
    selected: int = 0
    uploaded: int = 0
    upload_bytes: int = 0
    queued_at_exit: int = 0
    dropped_from_queue: int = 0
    rejected: int = 0
    updates: int = 0
    version: int = 0
    seconds: float = 0.0
    accuracy_log: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def run_adaptation(
    bundle: str | Path,
    server: str,
    token: str,
    device: str,
    stream: str | Iterator[Batch],
    state_dir: str | Path,
    batch: int = 64,
    selector: SelectorConfig | None = None,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
    log_every: int = 20,
    flush_s: float = 5.0,
    rate: float | None = None,
    max_queue: int = 100_000,
) -> AdaptReport:
    """Run the daemon until the stream ends or ``stop`` is set; returns what happened."""
    state_dir = Path(state_dir)
    model = AdaptableModel(bundle, state_dir)
    shape = tuple(int(d) for d in model.session.graph("main").inputs[0].shape[1:])
    labels = model.session.manifest.model.get("labels")
    classes = int(model.session.graph("main").outputs[0].shape[-1])
    chooser = Selector(selector or SelectorConfig(num_classes=classes))
    queue = DiskQueue(state_dir / "queue.sqlite", shape, max_queue)
    uplink = Uplink(server, device, token, queue, model, batch=batch, log=log)
    batches = open_stream(stream, shape, labels, batch) if isinstance(stream, str) else stream
    stop = stop or threading.Event()
    report = AdaptReport()
    window = [0, 0]
    start = time.perf_counter()
    uplink.start()
    try:
        for index, (x, y) in enumerate(batches):
            if stop.is_set():
                break
            logits = model.predict(x)
            keep = chooser.select(logits)
            if keep.any():
                queue.put(x[keep], entropy(logits[keep]))
                uplink.notify()
            report.seen += len(x)
            report.selected += int(keep.sum())
            if y is not None:
                hits = int((logits.argmax(1) == y).sum())
                report.correct += hits
                report.labelled += len(y)
                window[0] += hits
                window[1] += len(y)
            if log_every and (index + 1) % log_every == 0:
                entry = {
                    "seen": report.seen,
                    "version": model.version,
                    "queued": len(queue),
                    "selected_fraction": round(report.selected / report.seen, 4),
                }
                if window[1]:
                    entry["window_accuracy"] = round(window[0] / window[1], 4)
                report.accuracy_log.append(entry)
                log(" ".join(f"{k}={v}" for k, v in entry.items()))
                window = [0, 0]
            if rate:
                time.sleep(len(x) / rate)
    finally:
        uplink.stop(flush_s)
        report.uploaded = uplink.stats.uploaded
        report.upload_bytes = uplink.stats.upload_bytes
        report.rejected = uplink.stats.rejected
        report.updates = uplink.stats.updates
        report.version = model.version
        report.queued_at_exit = len(queue)
        report.dropped_from_queue = queue.dropped
        report.seconds = time.perf_counter() - start
        queue.close()
    return report
