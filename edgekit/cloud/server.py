"""The CEMA cloud service: FastAPI on uvicorn, SQLite state, one adaptation worker thread.

Endpoints::

    POST /v1/devices/{device}/samples        zlib(safetensors) upload -> {"stored": n, "duplicates": d}
    GET  /v1/devices/{device}/params?since=V  200 safetensors of the newest version > V, or 204
    GET  /healthz                             liveness plus queue depth

Every device endpoint needs ``Authorization: Bearer TOKEN``: no or unknown token -> 401, a live
token of another device -> 403, and nothing is read or stored. Bodies over ``max_body`` -> 413;
anything malformed, the wrong shape or non-finite -> 422; both before anything is stored.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from edgekit.cloud.store import Store
from edgekit.errors import EdgekitError
from edgekit.runtime import wire

LOG = logging.getLogger("edgekit.cloud")
DEVICE_PATTERN = wire.CLIENT_PATTERN


@dataclass
class ServiceConfig:
    max_body: int = 4 << 20  # compressed upload bytes
    max_raw: int = 8 << 20  # decompressed upload bytes
    max_wait_s: float = 2.0  # a partial batch of new samples older than this is learned from anyway
    idle_s: float = 0.05


class Worker:
    """Adapts each device's teacher/student from its pending samples; one new version per step."""

    def __init__(
        self,
        store: Store,
        teacher,
        student,
        input_shape: tuple[int, ...],
        config: ServiceConfig,
        cema_config=None,
    ) -> None:
        self.store = store
        self.teacher = teacher
        self.student = student
        self.input_shape = input_shape
        self.config = config
        self.cema_config = cema_config
        self.adapters: dict = {}
        self.arrivals: dict[str, int] = {}  # uploads per device since its last scheduled update
        self.owed: dict[str, int] = {}  # student steps still due to a device's uploads (worker thread only)
        self._arrivals_lock = threading.Lock()
        self.stop = threading.Event()
        self.steps = 0
        self.errors = 0
        self.thread = threading.Thread(target=self.run, name="cema-worker", daemon=True)

    def _decode(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.zeros((0, *self.input_shape), np.float32)
        return np.stack([np.frombuffer(b, np.float16).reshape(self.input_shape) for b in blobs]).astype(np.float32)

    def adapter(self, device: str):
        from edgekit.cloud.adapter import CemaConfig, DeviceAdapter
        from edgekit.runtime.cema import decode_params

        if device not in self.adapters:
            adapter = DeviceAdapter(self.teacher, self.student, self.cema_config or CemaConfig())
            saved = self.store.adapter_state(device)
            if saved is not None:
                adapter.load_state(decode_params(saved)[1])
            self.adapters[device] = adapter
        return self.adapters[device]

    def notify(self, device: str) -> None:
        """An upload from ``device`` was stored (called by the request handler)."""
        with self._arrivals_lock:
            self.arrivals[device] = self.arrivals.get(device, 0) + 1

    def step(self, device: str) -> bool:
        """One scheduled update for ``device``, as the reference code schedules them.

        A full batch of ``cloud_batch`` new samples (or a partial one older than ``max_wait_s``)
        gives a teacher step and a student step on it plus replay; replay-only student steps make
        up each upload's ``student_steps_per_upload`` once the replay buffer holds
        ``replay_only_after`` samples, so the student learns at the pace of the edge's uploads
        however few samples each carries. Each update is a new parameter version.
        """
        from edgekit.runtime.cema import encode_params

        adapter = self.adapter(device)
        batch = adapter.config.cloud_batch
        ids, blobs, oldest = self.store.pending(device, batch)
        with self._arrivals_lock:
            arrived = self.arrivals.pop(device, 0)
        owed = self.owed.pop(device, 0) + arrived * adapter.config.student_steps_per_upload
        replay = lambda n: self._decode(self.store.replay(device, n))  # noqa: E731
        if ids and (len(ids) >= batch or time.time() - (oldest or 0.0) >= self.config.max_wait_s):
            adapter.step(self._decode(blobs), replay)
        elif owed and self.store.replay_size(device) >= adapter.config.replay_only_after:
            adapter.replay_step(replay)
            ids = []
        else:  # nothing to learn from yet: an upload's steps are not carried past a cold replay buffer
            return False
        if owed > 1:
            self.owed[device] = owed - 1
        version = self.store.last_version(device) + 1
        self.store.commit_update(
            device,
            version,
            ids,
            encode_params(version, adapter.student_arrays()),
            encode_params(version, adapter.state()),
            adapter.config.replay_size,
        )
        self.steps += 1
        return True

    def run(self) -> None:
        import torch

        torch.set_num_threads(1)
        while not self.stop.is_set():
            worked = False
            for device in {*self.store.pending_devices(), *self.owed}:
                try:
                    worked |= self.step(device)
                except Exception:  # keep serving other devices; the samples stay pending
                    self.errors += 1
                    LOG.exception("adaptation step failed for %s", device)
                    self.stop.wait(1.0)
            if not worked:
                self.stop.wait(self.config.idle_s)


def create_app(
    store: Store,
    input_shape: tuple[int, ...],
    worker: Worker | None = None,
    config: ServiceConfig | None = None,
) -> FastAPI:
    config = config or ServiceConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if worker is not None:
            worker.thread.start()
        yield
        if worker is not None:
            worker.stop.set()
            worker.thread.join(timeout=30)

    app = FastAPI(title="edgekit CEMA cloud", lifespan=lifespan)

    def authorise(request: Request, device: str) -> JSONResponse | None:
        if not DEVICE_PATTERN.match(device):
            return JSONResponse({"error": "invalid device id"}, status_code=404)
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            return JSONResponse(
                {"error": "missing bearer token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        owner = store.token_device(header[7:].strip())
        if owner is None:
            return JSONResponse(
                {"error": "unknown or revoked token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        if owner != device:
            return JSONResponse({"error": "token does not belong to this device"}, status_code=403)
        return None

    @app.get("/healthz")
    def healthz() -> dict:
        counts = store.counts()
        return {
            "ok": True,
            "pending": counts["pending"],
            "samples": counts["samples"],
            "worker_steps": worker.steps if worker else 0,
            "worker_errors": worker.errors if worker else 0,
        }

    @app.post("/v1/devices/{device}/samples")
    async def upload(device: str, request: Request) -> Response:
        if (denied := authorise(request, device)) is not None:
            return denied
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > config.max_body):
            return JSONResponse({"error": f"body over {config.max_body} bytes"}, status_code=413)
        buffer = io.BytesIO()
        async for chunk in request.stream():
            buffer.write(chunk)
            if buffer.tell() > config.max_body:
                return JSONResponse({"error": f"body over {config.max_body} bytes"}, status_code=413)

        def decode_and_store() -> tuple[int, int]:  # off the event loop: inflating and fsync block
            client, seq, x, ent = wire.decode_samples(buffer.getvalue(), input_shape, config.max_raw)
            stored = store.add_samples(device, client, seq, x, ent)  # committed before the 200
            if worker is not None and stored:
                worker.notify(device)
            return stored, len(seq)

        try:
            stored, count = await run_in_threadpool(decode_and_store)
        except EdgekitError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        return JSONResponse({"stored": stored, "duplicates": count - stored})

    @app.get("/v1/devices/{device}/params")
    def params(device: str, request: Request, since: int = 0) -> Response:
        if (denied := authorise(request, device)) is not None:
            return denied
        latest = store.latest(device, since)
        if latest is None:
            return Response(status_code=204)
        version, blob = latest
        return Response(blob, media_type=wire.PARAMS_TYPE, headers={wire.VERSION_HEADER: str(version)})

    return app


def build_service(teacher_spec: str, student_spec: str, db: str, config: ServiceConfig | None = None):
    """Load both models, open the store and wire the app; returns ``(app, store, worker)``."""
    from edgekit.cloud.adapter import CemaConfig, norm_parameter_names, pixel_input
    from edgekit.models.sources import load

    teacher, student = load(teacher_spec), load(student_spec)
    for bundle in (teacher, student):
        if bundle.task != "classifier" or len(bundle.example_inputs) != 1:
            raise EdgekitError(f"{bundle.spec}: CEMA needs one-input classifiers")
        if not norm_parameter_names(bundle.module):
            raise EdgekitError(f"{bundle.spec} has no normalization layers to adapt")
    shape = tuple(next(iter(student.example_inputs.values())).shape[1:])
    teacher_shape = tuple(next(iter(teacher.example_inputs.values())).shape[1:])
    if shape != teacher_shape:
        raise EdgekitError(f"teacher input {list(teacher_shape)} != student input {list(shape)}")
    config = config or ServiceConfig()
    store = Store(db)
    classes = len(student.labels) if student.labels else 10
    # both models take the edge's raw pixels, exactly as the adaptable edge graph does
    worker = Worker(store, pixel_input(teacher), pixel_input(student), shape, config, CemaConfig(num_classes=classes))
    return create_app(store, shape, worker, config), store, worker


def serve(
    teacher_spec: str,
    student_spec: str,
    db: str,
    host: str = "127.0.0.1",
    port: int = 8470,
    log_level: str = "warning",
) -> None:
    import uvicorn

    app, store, _ = build_service(teacher_spec, student_spec, db)
    print(f"edgekit cloud listening on http://{host}:{port} (db {db})", flush=True)
    started = time.time()
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        store.close()
        LOG.info("served for %.0f s", time.time() - started)
