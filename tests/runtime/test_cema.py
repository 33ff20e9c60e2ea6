"""CEMA's edge half: selection, the adaptable ONNX bundle, atomic parameter swaps, the disk queue."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.runtime.cema import AdaptableModel, Selector, SelectorConfig, entropy
from edgekit.runtime.queue import DiskQueue

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.cloud.tinymodels import student  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from edgekit.cloud.export import export_adaptable

    return export_adaptable(student(), tmp_path_factory.mktemp("cema") / "bundle")


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'torchvision'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edgekit.runtime.cema, edgekit.runtime.uplink, edgekit.runtime.queue, edgekit.runtime.adapt\n"
        "import edgekit.runtime.wire\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_entropy_matches_definition() -> None:
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
    ent = entropy(logits)
    assert ent[0] == pytest.approx(math.log(4))
    assert 0 < ent[1] < 0.01


def test_selector_window_and_dynamic_threshold() -> None:
    config = SelectorConfig(num_classes=10, margin=1.01)  # no redundancy filter here
    selector = Selector(config)
    assert config.e_max0 == pytest.approx(0.4 * math.log(10))
    rng = np.random.default_rng(0)

    def logits_with_entropy_scale(scale: float) -> np.ndarray:
        return rng.normal(size=(64, 10)) * scale

    confident = np.full((4, 10), -20.0)
    confident[:, 0] = 20.0  # entropy ~ 0: below E_min
    uniform = np.zeros((4, 10))  # entropy ln 10: above E_max
    first = np.concatenate([confident, uniform, logits_with_entropy_scale(3.0)])
    mask = selector.select(first)
    assert not mask[:8].any() and mask[8:].any()
    assert selector.e_max == pytest.approx(config.e_max0)  # warm-up: the fixed E_max0
    second = logits_with_entropy_scale(3.0)
    selector.select(second)  # end of warm-up (2 batches)
    warmup = np.concatenate([entropy(first), entropy(second)])
    seen = [warmup]
    for _ in range(20):  # the stream grows more confident: the bar drops with it
        later = logits_with_entropy_scale(8.0)
        selector.select(later)
        seen.append(entropy(later))
    # E_max0 * lambda * (mean entropy of everything seen) / (mean entropy of the warm-up)
    expected = config.e_max0 * config.lam * np.concatenate(seen).mean() / warmup.mean()
    assert selector.e_max == pytest.approx(expected)
    assert selector.e_max < config.e_max0 * config.lam * 0.8
    assert 0 < selector.selected < selector.seen


def test_selector_drops_redundant_predictions() -> None:
    selector = Selector(SelectorConfig(num_classes=10, e_min_factor=0.0, margin=0.5))
    logits = np.full((64, 10), 0.0)
    logits[:, 3] = 5.0  # all the same fairly confident prediction (entropy ~0.3)
    first = selector.select(logits)
    assert first.all()  # nothing to compare with yet
    second = selector.select(logits)
    assert not second.any()  # identical to the moving average: redundant
    assert selector.dropped["redundant"] == 64


def test_adaptable_bundle_matches_torch_and_swaps(bundle: Path) -> None:
    model = AdaptableModel(bundle)
    reference = copy.deepcopy(student().module).train()  # batch statistics, as the edge graph
    x = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-5)
    assert model.version == 0
    changed = {name: value * 1.5 + 0.1 for name, value in model.params.arrays.items()}
    assert model.apply(3, changed)
    assert model.version == 3
    assert not np.allclose(model.predict(x), expected, atol=1e-3)
    assert not model.apply(2, model.params.arrays)  # older versions are ignored
    with pytest.raises(EdgekitError):
        model.apply(4, {name: np.full_like(value, np.nan) for name, value in changed.items()})
    with pytest.raises(EdgekitError):
        model.apply(4, dict(list(changed.items())[:1]))  # an incomplete set is never applied
    assert model.version == 3


def test_standardised_model_exports_a_pixel_graph(tmp_path: Path) -> None:
    """A model trained on standardised inputs (as the zoo's fmnist-cnn) gets its normalization in
    the graph, so the edge feeds and uploads raw pixels; the parameter names stay comparable."""
    from edgekit.cloud.adapter import pixel_input
    from edgekit.cloud.export import export_adaptable

    standardised = student().replace(meta={"input_mean": 0.3, "input_std": 0.4})
    model = AdaptableModel(export_adaptable(standardised, tmp_path / "bundle"))
    assert model.session.manifest.extra["adaptable"]["input_normalization_in_graph"]
    assert set(model.params.arrays) == set(pixel_input(standardised).state_dict()) & set(model.spec)
    x = np.random.default_rng(3).random((8, 1, 28, 28), dtype=np.float32)
    reference = copy.deepcopy(standardised.module).train()
    with torch.no_grad():
        expected = reference(torch.from_numpy((x - 0.3) / 0.4)).numpy()
    np.testing.assert_allclose(model.predict(x), expected, atol=1e-4)


def test_apply_is_atomic_under_concurrent_inference(bundle: Path) -> None:
    model = AdaptableModel(bundle)
    x = np.random.default_rng(2).random((4, 1, 28, 28), dtype=np.float32)
    set_a = {name: value.copy() for name, value in model.params.arrays.items()}
    set_b = {name: value * -2.0 + 0.5 for name, value in set_a.items()}
    expected = []
    for version, arrays in ((1, set_a), (2, set_b)):
        probe = AdaptableModel(bundle)
        probe.apply(version, arrays)
        expected.append(probe.predict(x))
    model.apply(1, set_a)
    stop = threading.Event()
    bad: list[float] = []

    def infer() -> None:
        while not stop.is_set():
            out = model.predict(x)
            if not any(np.allclose(out, e, atol=1e-5) for e in expected):
                bad.append(float(np.abs(out - expected[0]).max()))

    threads = [threading.Thread(target=infer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for version in range(2, 60):
        model.apply(version, set_b if version % 2 == 0 else set_a)
    stop.set()
    for thread in threads:
        thread.join()
    assert not bad


def test_applied_version_survives_restart(bundle: Path, tmp_path: Path) -> None:
    model = AdaptableModel(bundle, tmp_path)
    changed = {name: value + 0.25 for name, value in model.params.arrays.items()}
    model.apply(7, changed)
    again = AdaptableModel(bundle, tmp_path)
    assert again.version == 7
    for name, value in changed.items():
        np.testing.assert_array_equal(again.params.arrays[name], value)


def test_disk_queue_is_durable_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    queue = DiskQueue(path, (1, 2, 2), max_items=10)
    seqs = queue.put(np.ones((6, 1, 2, 2)), np.arange(6))
    client = queue.client
    queue.ack(seqs[:2])
    del queue  # no close: as after a crash, the WAL holds the commits
    reopened = DiskQueue(path, (1, 2, 2), max_items=10)
    assert reopened.client == client
    seq, x, ent = reopened.peek(100)
    assert list(seq) == seqs[2:]
    assert x.shape == (4, 1, 2, 2) and ent.tolist() == [2, 3, 4, 5]
    more = reopened.put(np.zeros((8, 1, 2, 2)), np.zeros(8))
    assert len(reopened) == 10 and reopened.dropped == 2  # the oldest two made room
    assert reopened.peek(1)[0][0] == seqs[4]
    assert more[0] > seqs[-1]  # sequence numbers never repeat
    reopened.close()
