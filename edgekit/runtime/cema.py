"""CEMA on the edge: forward-only sample selection and atomically swapped normalization parameters.

The edge never backpropagates. For every prediction it computes the entropy and uploads the
sample only when it is informative and reliable (Chen et al., ICLR'24):

* entropy window ``E_min < E < E_max``: too high is unreliable, too low teaches nothing;
* dynamic ``E_max^t = E_max0 * lambda * (mean_E_t / mean_E_warmup)`` with ``E_max0 = 0.4 ln C`` and
  ``lambda = 0.6`` (``E_max0`` itself during warm-up; ``mean_E_t`` over every prediction so far, as
  the reference code): as the cloud's updates make the model more confident, the bar drops with it;
* redundancy: a sample whose softmax is too close to the moving average of past (uploaded)
  predictions, ``|cos| >= margin``, adds nothing the cloud has not seen. The reference code uses
  0.05 for ImageNet's 1000 classes; the cosine between a confident prediction and a balanced
  average scales as ``1/sqrt(C)``, so the default margin is ``0.05 * sqrt(1000 / C)`` (0.5 at C=10).

:class:`AdaptableModel` runs the bundle's ONNX graph, whose normalization parameters are graph
inputs (listed in ``manifest.extra["adaptable"]``), and swaps a received parameter set in with one
reference assignment, so an inference sees the whole old set or the whole new one.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.session import Session

PARAMS_FILE = "adaptable.safetensors"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row's softmax."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -(np.exp(log_p) * log_p).sum(axis=-1)


@dataclass
class SelectorConfig:
    num_classes: int
    e_max0_factor: float = 0.4  # E_max0 = factor * ln C
    lam: float = 0.6
    e_min_factor: float = 0.02  # E_min = factor * ln C: near-certain predictions carry no signal
    warmup_batches: int = 2
    prob_momentum: float = 0.9  # EMA of the uploaded predictions (redundancy reference)
    margin: float | None = None  # |cos| at or above which a sample is redundant; None: 0.05*sqrt(1000/C)

    @property
    def e_max0(self) -> float:
        return self.e_max0_factor * math.log(self.num_classes)

    @property
    def e_min(self) -> float:
        return self.e_min_factor * math.log(self.num_classes)

    @property
    def cos_margin(self) -> float:
        return self.margin if self.margin is not None else 0.05 * math.sqrt(1000 / self.num_classes)


@dataclass
class Selector:
    """Stateful CEMA upload filter; ``select(logits)`` returns a boolean mask of samples to upload."""

    config: SelectorConfig
    batches: int = 0
    warmup_sum: float = 0.0
    warmup_count: int = 0
    entropy_sum: float = 0.0
    count: int = 0
    mean_probs: np.ndarray | None = None
    seen: int = 0
    selected: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"too_low": 0, "too_high": 0, "redundant": 0})

    @property
    def e_max(self) -> float:
        """The current threshold: ``E_max0`` during warm-up, then ``E_max0 * lambda * mean_E / warm-up mean``.

        As the reference code (``EntropyCriterion``): the mean is over every prediction so far, not
        a moving average, so a model growing confident lowers the bar gradually instead of
        chasing the last few batches into a collapse.
        """
        c = self.config
        if self.batches <= c.warmup_batches or not self.warmup_count or not self.count:
            return c.e_max0
        warmup_mean = self.warmup_sum / self.warmup_count
        return c.e_max0 * c.lam * (self.entropy_sum / self.count) / max(warmup_mean, 1e-8)

    def select(self, logits: np.ndarray) -> np.ndarray:
        c = self.config
        ent = entropy(np.asarray(logits, dtype=np.float64))
        self.batches += 1
        if self.batches <= c.warmup_batches:
            self.warmup_sum += float(ent.sum())
            self.warmup_count += len(ent)
        self.entropy_sum += float(ent.sum())
        self.count += len(ent)
        e_max = self.e_max
        low, high = ent <= c.e_min, ent >= e_max
        keep = ~low & ~high
        probs = softmax(np.asarray(logits, dtype=np.float64))
        redundant = np.zeros_like(keep)
        if self.mean_probs is not None and keep.any():
            cos = probs @ self.mean_probs / (np.linalg.norm(probs, axis=1) * np.linalg.norm(self.mean_probs) + 1e-12)
            redundant = keep & (np.abs(cos) >= c.cos_margin)
            keep &= ~redundant
        if keep.any():
            batch_probs = probs[keep].mean(axis=0)
            self.mean_probs = (
                batch_probs
                if self.mean_probs is None
                else c.prob_momentum * self.mean_probs + (1 - c.prob_momentum) * batch_probs
            )
        self.seen += len(ent)
        self.selected += int(keep.sum())
        self.dropped["too_low"] += int(low.sum())
        self.dropped["too_high"] += int((high & ~low).sum())
        self.dropped["redundant"] += int(redundant.sum())
        return keep


@dataclass(frozen=True)
class ParamSet:
    """One complete, immutable set of adaptable parameters and the cloud version it came from."""

    version: int
    arrays: dict[str, np.ndarray]


def adaptable_spec(session: Session) -> dict[str, dict]:
    """``name -> {"shape", "dtype", "kind"}`` of the bundle's adaptable parameters (manifest extra)."""
    spec = session.manifest.extra.get("adaptable", {}).get("parameters")
    if not spec:
        raise EdgekitError(f"{session.directory} has no adaptable parameters; export it with `edgekit cloud bundle`")
    return spec


def validate_params(spec: dict[str, dict], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The full set, each array the manifest's shape and float32, all finite — else EdgekitError."""
    missing = sorted(set(spec) - set(arrays))
    unknown = sorted(set(arrays) - set(spec))
    if missing or unknown:
        raise EdgekitError(f"parameter set mismatch: missing {missing[:3]}, unknown {unknown[:3]}")
    checked = {}
    for name, entry in spec.items():
        array = np.ascontiguousarray(arrays[name], dtype=np.float32)
        if list(array.shape) != list(entry["shape"]):
            raise EdgekitError(f"parameter '{name}' has shape {list(array.shape)}, the bundle wants {entry['shape']}")
        if not np.isfinite(array).all():
            raise EdgekitError(f"parameter '{name}' holds NaN or infinite values")
        array.setflags(write=False)
        checked[name] = array
    return checked


class AdaptableModel:
    """An ONNX classifier bundle whose normalization parameters can be replaced while it serves.

    ``state_dir`` (optional) keeps the last applied set on disk (written to a temp file, fsynced,
    renamed), so a restarted edge resumes with the version it had.
    """

    def __init__(self, bundle: str | Path, state_dir: str | Path | None = None, threads: int | None = None) -> None:
        from edgekit.runtime.backends import OnnxBackend

        self.session = Session(Path(bundle), "onnx", threads)
        self.spec = adaptable_spec(self.session)
        graph = self.session.graph("main")
        self.input_name = graph.inputs[0].name
        self.backend = OnnxBackend(self.session.directory / graph.file, threads)
        self.output_name = graph.outputs[0].name
        self._lock = threading.Lock()  # serialises writers; readers take one reference, no lock
        self.state_dir = Path(state_dir) if state_dir else None
        base = load_params_file(self.session.directory / PARAMS_FILE)
        self._current = ParamSet(0, validate_params(self.spec, base))
        if self.state_dir and (self.state_dir / PARAMS_FILE).is_file():
            saved = (self.state_dir / PARAMS_FILE).read_bytes()
            version, arrays = decode_params(saved)
            self._current = ParamSet(version, validate_params(self.spec, arrays))

    @property
    def version(self) -> int:
        return self._current.version

    @property
    def params(self) -> ParamSet:
        return self._current

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch; the whole batch uses one parameter set (read once, below)."""
        current = self._current
        feeds = self.session.check_feeds({self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        feeds.update(current.arrays)
        return self.backend.session.run([self.output_name], feeds)[0]

    def apply(self, version: int, arrays: dict[str, np.ndarray]) -> bool:
        """Swap in a newer complete set; older or equal versions are ignored (returns False)."""
        checked = validate_params(self.spec, arrays)
        with self._lock:
            if version <= self._current.version:
                return False
            if self.state_dir:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self.state_dir / PARAMS_FILE, encode_params(version, checked))
            self._current = ParamSet(version, checked)
        return True


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def encode_params(version: int, arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        metadata={"format": "edgekit-cema-params/1", "version": str(int(version))},
    )


def decode_params(data: bytes) -> tuple[int, dict[str, np.ndarray]]:
    """``(version, arrays)`` from safetensors bytes; EdgekitError when they are not a parameter set."""
    import json

    from safetensors.numpy import load

    try:
        arrays = load(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        version = int(metadata["version"])
    except Exception as error:  # safetensors raises its own error types for truncated or bad headers
        raise EdgekitError(f"not a CEMA parameter set ({type(error).__name__})") from None
    return version, arrays


def load_params_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EdgekitError(f"missing {path}: the bundle was not exported as adaptable")
    return decode_params(path.read_bytes())[1]
