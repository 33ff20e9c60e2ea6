"""Roofline cost model: hand-computed cases, scaling laws, fallback, and a published measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.devices import load_profile
from edgekit.devices.cost import estimate
from edgekit.devices.ops import OpStat

SD = "snapdragon-8gen3-npu"  # int8 45 TOPS, int16 22.5 TOPS, 76.8 GB/s, 0.075 / 0.125 pJ per MAC, 40 pJ/B


def test_hand_computed_example() -> None:
    ops = [
        OpStat("MatMul", 1, True, 8, 8, flops=2e9, bytes_moved=1e6),  # compute-bound
        OpStat("Add", 1, True, 8, None, flops=1e6, bytes_moved=1e8),  # bandwidth-bound
        OpStat("Softmax", 1, True, 16, None, flops=1e7, bytes_moved=1e5),  # int16 peak, bandwidth-bound
    ]
    cost = estimate(ops, SD)
    matmul, add, softmax = cost.ops
    # MatMul: 2e9 / 45e12 s = 0.0444 ms > 1e6 / 76.8e9 s = 0.0130 ms
    assert matmul.bound == "compute" and matmul.latency_ms == pytest.approx(2e9 / 45e12 * 1e3)
    # energy: 1e9 MAC x 0.075 pJ + 1e6 B x 40 pJ = 1.15e8 pJ = 0.115 mJ
    assert matmul.energy_mj == pytest.approx(0.115)
    assert add.bound == "memory" and add.latency_ms == pytest.approx(1e8 / 76.8e9 * 1e3)
    assert add.energy_mj == pytest.approx((5e5 * 0.075 + 1e8 * 40) * 1e-9)
    assert softmax.runs_as == "int16" and softmax.compute_ms == pytest.approx(1e7 / 22.5e12 * 1e3)
    assert softmax.energy_mj == pytest.approx((5e6 * 0.125 + 1e5 * 40) * 1e-9)
    assert cost.latency_ms == pytest.approx(matmul.latency_ms + add.latency_ms + softmax.latency_ms)
    assert cost.energy_mj == pytest.approx(0.115 + add.energy_mj + softmax.energy_mj)


def test_doubling_flops_on_a_compute_bound_op_doubles_its_time() -> None:
    one = estimate([OpStat("Conv", 1, True, 8, 8, flops=4e10, bytes_moved=1e6)], SD)
    two = estimate([OpStat("Conv", 1, True, 8, 8, flops=8e10, bytes_moved=1e6)], SD)
    assert one.ops[0].bound == "compute"
    assert two.latency_ms == pytest.approx(2 * one.latency_ms)


def test_a_bandwidth_bound_op_follows_bytes_over_bandwidth() -> None:
    for nbytes in (1e6, 3e7, 5e8):
        cost = estimate([OpStat("Transpose", 1, True, 8, None, flops=0.0, bytes_moved=nbytes)], SD)
        assert cost.ops[0].bound == "memory"
        assert cost.latency_ms == pytest.approx(nbytes / 76.8e9 * 1e3)
    more_flops = estimate([OpStat("Add", 1, True, 8, None, flops=1e8, bytes_moved=5e8)], SD)
    assert more_flops.latency_ms == pytest.approx(5e8 / 76.8e9 * 1e3)  # flops hidden under traffic


def test_energy_adds_up_per_class() -> None:
    ops = [
        OpStat("MatMul", 4, True, 8, 8, 4e9, 4e6),
        OpStat("Gemm", 1, True, 8, 8, 1e9, 2e6),
        OpStat("LayerNormalization", 2, True, 16, 8, 2e6, 1e6),
        OpStat("Add", 3, True, 8, None, 3e5, 9e5),
        OpStat("Reshape", 5, True, 8, None, 0.0, 5e5),
    ]
    cost = estimate(ops, SD)
    assert set(cost.by_class) == {"matmul", "norm", "elementwise", "data-movement"}
    for name, entry in cost.by_class.items():
        mine = [c for c in cost.ops if c.op_class == name]
        assert entry.energy_mj == pytest.approx(sum(c.energy_mj for c in mine))
        assert entry.latency_ms == pytest.approx(sum(c.latency_ms for c in mine))
        assert entry.count == sum(c.count for c in mine)
    assert cost.energy_mj == pytest.approx(sum(e.energy_mj for e in cost.by_class.values()))
    assert cost.by_class["matmul"].flops == 5e9
    rows = cost.rows()
    assert rows[0][0] == "class" and rows[-1][0] == "total" and len(rows) == len(cost.by_class) + 2
    json.dumps(cost.as_dict())


def test_float_op_on_an_integer_only_device_falls_back_to_the_host() -> None:
    ops = [OpStat("Conv", 1, True, 8, 8, 1e8, 1e5), OpStat("Softmax", 1, False, None, None, 1e6, 4e4)]
    cost = estimate(ops, "arm-ethos-u55")
    conv, softmax = cost.ops
    assert conv.where == "device" and conv.unit == "arm-ethos-u55"
    assert softmax.where == "host" and softmax.unit == "arm-cortex-m55" and softmax.runs_as == "fp32"
    # Cortex-M55 fp32: 1e6 / 1.6e9 s = 0.625 ms; 5e5 MAC x 13.3 pJ + 4e4 B x 7.5 pJ
    assert softmax.latency_ms == pytest.approx(0.625)
    assert softmax.energy_mj == pytest.approx((5e5 * 13.3 + 4e4 * 7.5) * 1e-9)
    assert "rejected on arm-ethos-u55" in softmax.note
    assert cost.on_host == ["Softmax"] and cost.excluded == []

    excluded = estimate(ops, "arm-ethos-u55", fallback=False)
    assert excluded.ops[1].where == "excluded" and excluded.excluded == ["Softmax"]
    assert "no fallback requested" in excluded.ops[1].note
    assert excluded.latency_ms == pytest.approx(conv.latency_ms)
    assert "softmax" not in excluded.by_class


def test_an_op_no_unit_can_run_is_left_out_and_listed() -> None:
    cost = estimate([OpStat("FancyOp", 2, False, None, None, 1e9, 1e6)], "x86-cpu-onnxruntime")
    assert cost.excluded == ["FancyOp"] and cost.latency_ms == 0.0
    assert "no host CPU in the profile" in cost.ops[0].note


def test_per_op_overhead_from_the_profile(tmp_path: Path) -> None:
    text = Path(load_profile(SD).path).read_text()
    text = text.replace(
        "[compute]\n",
        '[compute]\nop_overhead_us = 5.0\nop_overhead_us_source = "test figure"\n',
    )
    path = tmp_path / f"{SD}.toml"
    path.write_text(text)
    op = OpStat("MatMul", 3, True, 8, 8, 2e9, 1e6)
    base, with_overhead = estimate([op], SD), estimate([op], str(path))
    assert with_overhead.latency_ms == pytest.approx(base.latency_ms + 3 * 5e-3)


def _tinyllama_prefill(act_bytes: int) -> list[OpStat]:
    """TinyLlama-1.1B (22 layers, d 2048, MLP 5632, 32 heads / 4 KV heads, vocab 32000), 256 tokens."""
    seq, d, mlp, layers, kv, vocab = 256, 2048, 5632, 22, 256, 32000
    weights = layers * (2 * d * d + 2 * d * kv + 3 * d * mlp) + d * vocab  # = MACs per token
    act_elems = layers * seq * (3 * d + (d + 2 * kv) + 2 * d + 2 * d + 4 * mlp + d) + seq * (d + vocab)
    attn_macs = layers * 2 * 32 * seq * seq * 64
    bits = 8 * act_bytes
    return [
        OpStat("MatMul", layers * 7 + 1, True, bits, 8, 2.0 * seq * weights, weights + act_elems * act_bytes),
        OpStat("MatMul", layers * 2, True, 16, 16, 2.0 * attn_macs, layers * 3 * 32 * seq * seq * 2),
        OpStat("Softmax", layers, True, 16, None, 5.0 * layers * 32 * seq * seq, layers * 2 * 32 * seq * seq * 2),
        OpStat("SimplifiedLayerNormalization", 2 * layers + 1, True, 16, 16, 4.0 * seq * d * 45, seq * d * 45 * 4),
    ]


def test_roofline_stays_below_mobilequants_measurement_on_this_npu() -> None:
    """MobileQuant (EMNLP'24 Findings) measured TinyLlama's 256-token prompt on a Snapdragon 8 Gen 3 NPU:
    W8A8 276 ms / 490 mJ, W8A16 510 ms / 1000 mJ. A roofline with datapath + DRAM energy must come in
    under both, and rank the two the same way."""
    w8a8, w8a16 = estimate(_tinyllama_prefill(1), SD), estimate(_tinyllama_prefill(2), SD)
    assert 0 < w8a8.latency_ms < 276 and 0 < w8a8.energy_mj < 490
    assert 0 < w8a16.latency_ms < 510 and 0 < w8a16.energy_mj < 1000
    assert w8a16.latency_ms > w8a8.latency_ms and w8a16.energy_mj > w8a8.energy_mj
