"""HiRED's selection: exact budget, attention-following allocation, r=1 identity, torch == runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit.errors import EdgekitError
from edgekit.runtime import hired as rt
from edgekit.vlm import hired as th

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.37, 0.4, 0.8, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_allocation_sums_to_budget_and_respects_capacity(ratio: float, alpha: float) -> None:
    rng = np.random.default_rng(7)
    for subs in (0, 1, 4, 6):
        for _ in range(20):
            shares = rng.gamma(0.3, size=subs)
            quotas = rt.allocate(shares, 64, rt.HiredSettings(ratio=ratio, alpha=alpha))
            assert quotas.sum() == rt.budget(ratio, subs + 1, 64) == int(np.floor(ratio * (subs + 1) * 64 + 1e-9))
            assert (quotas >= 0).all() and (quotas <= 64).all()


def test_allocation_follows_the_attention_shares() -> None:
    shares = np.array([0.1, 0.4, 0.2, 0.3])
    quotas = rt.allocate(shares, 64, rt.HiredSettings(ratio=0.2, alpha=0.5))  # N = 64
    assert quotas[0] == 32  # the full image: floor(0.5 * 64)
    ideal = 32 * shares / shares.sum()  # 3.2, 12.8, 6.4, 9.6
    assert list(quotas[1:]) == [3, 13, 6, 10]  # largest remainders round up
    assert np.abs(quotas[1:] - ideal).max() < 1
    # a dominant sub-image is capped at its 64 tokens and the rest flows to the others
    quotas = rt.allocate(np.array([100.0, 1.0, 1.0, 0.0]), 64, rt.HiredSettings(ratio=0.8, alpha=0.2))
    assert quotas.tolist() == [51, 64, 64, 64, 13]  # 205 for the subs: three are full, 13 are left


def test_regions_are_two_dimensional() -> None:
    regions = rt.region_index((4, 4), (2, 2)).reshape(4, 4)
    assert regions.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    # a grid that the layout does not divide still gives every patch exactly one region
    regions = rt.region_index((5, 7), (2, 3))
    assert np.bincount(regions).sum() == 35 and set(regions) == set(range(6))
    early = np.zeros(16, dtype=np.float32)
    early[[2, 3, 6, 7]] = 1.0  # all attention on the top-right quadrant
    assert rt.region_shares(early, (4, 4), (2, 2)).tolist() == [0.0, 4.0, 0.0, 0.0]


def test_late_layer_scales_with_depth() -> None:
    assert rt.scaled_late_layer(24) == 22
    assert rt.scaled_late_layer(12) == 11
    assert rt.HiredSettings().layers(4) == (0, 3)
    with pytest.raises(EdgekitError):
        rt.HiredSettings(late_layer=9).layers(4)
    with pytest.raises(EdgekitError):
        rt.HiredSettings(ratio=0.0)


def test_top_tokens_break_ties_like_torch() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], dtype=np.float32)
    for count in range(7):
        expected = th.top_tokens(torch.from_numpy(scores), count).numpy()
        assert rt.top_tokens(scores, count).tolist() == expected.tolist()
    assert rt.top_tokens(scores, 3).tolist() == [0, 1, 3]


@pytest.fixture(scope="module")
def encoded(make_tiny_vit):
    """A tiny random DINOv2 over a full image + 2x2 sub-images: features and both CLS rows."""
    vit = make_tiny_vit()
    encoder = th.ClsAttentionViT(vit)
    torch.manual_seed(1)
    pixels = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        features, early, late = encoder(pixels)
    return vit, pixels, features, early, late


def test_runtime_selection_equals_torch(encoded) -> None:
    _, _, features, early, late = encoded
    for ratio in (0.1, 0.2, 0.4, 0.6, 1.0):
        settings = rt.HiredSettings(ratio=ratio)
        ours = th.select(early[0], late, (4, 4), (2, 2), settings)
        theirs = rt.select(early[0].numpy(), late.numpy(), (4, 4), (2, 2), settings)
        assert [k.tolist() for k in ours] == [k.tolist() for k in theirs]
        assert sum(len(k) for k in ours) == rt.budget(ratio, 5, 16)
        np.testing.assert_array_equal(th.gather(features, ours).numpy(), rt.gather(features.numpy(), theirs))


def test_selection_keeps_the_late_layers_top_tokens(encoded) -> None:
    _, _, _, early, late = encoded
    kept = th.select(early[0], late, (4, 4), (2, 2), rt.HiredSettings(ratio=0.25))
    for index, keep in enumerate(kept):
        if 0 < len(keep) < 16:
            dropped = torch.ones(16, dtype=torch.bool)
            dropped[keep] = False
            assert late[index, keep].min() >= late[index, dropped].max()


def test_ratio_one_keeps_everything_unchanged(encoded) -> None:
    vit, pixels, features, early, late = encoded
    kept = th.select(early[0], late, (4, 4), (2, 2), rt.HiredSettings(ratio=1.0))
    assert all(k.tolist() == list(range(16)) for k in kept)
    with torch.no_grad():
        plain = vit(pixel_values=pixels).last_hidden_state[:, 1:]
    assert torch.equal(th.gather(features, kept), plain.reshape(-1, plain.shape[-1]))


def test_cls_rows_are_the_attention_of_the_named_layers(encoded) -> None:
    vit, pixels, _, early, late = encoded
    with torch.no_grad():
        attentions = vit(pixel_values=pixels, output_attentions=True).attentions
    assert torch.allclose(early, attentions[0][:, :, 0, 1:].sum(1))
    assert torch.allclose(late, attentions[3][:, :, 0, 1:].sum(1))
    # each head's CLS row is a softmax: patches plus CLS itself sum to one per head
    assert torch.allclose(late.sum(1) + attentions[3][:, :, 0, 0].sum(1), torch.full((5,), 4.0))


def test_runtime_hired_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers') or name.startswith('edgekit.exporters'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "import edgekit.runtime.hired as h\n"
        "kept = h.select(np.ones(16), np.random.rand(5, 16), (4, 4), (2, 2))\n"
        "assert sum(len(k) for k in kept) == 16 and 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
