"""Shipped profiles load and validate; malformed profiles fail with the file and key named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgekit.devices import list_profiles, load_profile, op_class
from edgekit.devices.classes import normalise, op_classes
from edgekit.devices.profile import DTYPES
from edgekit.errors import EdgekitError

REQUIRED = {
    "snapdragon-8gen3-npu",
    "apple-a17pro-ane",
    "arm-ethos-u55",
    "mediatek-dimensity9300-apu",
    "arm64-cpu-xnnpack",
    "x86-cpu-onnxruntime",
}
SNAPDRAGON = Path(load_profile("snapdragon-8gen3-npu").path).read_text()


def test_required_profiles_ship() -> None:
    assert set(list_profiles()) >= REQUIRED


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_loads_and_every_figure_has_a_source(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.runtime and profile.formats
    assert profile.peak_tops and profile.bandwidth_gbps > 0 and profile.capacity_bytes > 0
    assert 0 < profile.usable_bytes <= profile.capacity_bytes
    rows = {key: source for key, _value, source in profile.rows()}
    for table in ("compute", "memory", "energy"):
        for key, value in profile.raw[table].items():
            if not key.endswith("_source") and not isinstance(value, str):
                assert rows[f"{table}.{key}"].strip(), f"{name}: figure {table}.{key} has no source"
    for class_name, rule in profile.classes.items():
        assert rule.source.strip(), f"{name}: classes.{class_name} has no source"
    if profile.host:
        assert load_profile(profile.host).name == profile.host


@pytest.mark.parametrize("name", list_profiles())
def test_every_compute_dtype_a_profile_allows_is_priced(name: str) -> None:
    profile = load_profile(name)
    for class_name, rule in profile.classes.items():
        if rule.any_dtype or not op_classes()[class_name].compute:
            continue
        for dtype in rule.compute_dtypes():
            assert dtype in DTYPES
            assert dtype in profile.peak_tops and dtype in profile.pj_per_mac, (name, class_name, dtype)


def test_show_rows_carry_the_sources() -> None:
    rows = {key: (value, source) for key, value, source in load_profile("arm-ethos-u55").rows()}
    value, source = rows["compute.peak_tops"]
    assert "int8=0.256" in value and "Vela" in source
    assert rows["memory.weights_capacity_bytes"][0].startswith("33554432")
    assert rows["classes.norm.int_activation_bits"][0] == "8"
    assert "RSQRT" in rows["classes.norm.int_activation_bits"][1]


def test_op_class_table_covers_onnx_and_executorch_names() -> None:
    expected = {
        "Conv": "conv",
        "MatMul": "matmul",
        "Gemm": "matmul",
        "QuantizeLinear": "quant-plumbing",
        "Softmax": "softmax",
        "LayerNormalization": "norm",
        "Add": "elementwise",
        "Relu": "activation",
        "GlobalAveragePool": "pool",
        "Reshape": "data-movement",
        "aten.convolution.default": "conv",
        "aten.linear.default": "matmul",
        "aten.add.Tensor": "elementwise",
        "aten::native_layer_norm": "norm",
        "aten._softmax.default": "softmax",
        "aten.view_copy.default": "data-movement",
        "quantized_decomposed.dequantize_per_tensor.default": "quant-plumbing",
        "dim_order_ops._to_dim_order_copy.default": "data-movement",
        "executorch_call_delegate": "delegate",
        "com.microsoft:QuickGelu": "activation",
        "If": "control-flow",
    }
    assert {op: op_class(op) for op in expected} == expected
    assert op_class("NoSuchOp") == "unknown"
    assert normalise("aten.add.Tensor") == "aten.add"


def test_unknown_device_names_the_known_ones() -> None:
    with pytest.raises(EdgekitError, match=r"unknown device 'pixel-9-tpu'; known: .*snapdragon-8gen3-npu"):
        load_profile("pixel-9-tpu")


def test_a_profile_file_by_path_loads(tmp_path: Path) -> None:
    path = tmp_path / "snapdragon-8gen3-npu.toml"
    path.write_text(SNAPDRAGON.replace("bandwidth_gbps = 76.8", "bandwidth_gbps = 60.0"))
    assert load_profile(str(path)).bandwidth_gbps == 60.0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[compute]\n", "[compute\n", r"snapdragon-8gen3-npu.toml is not valid TOML"),
        ("peak_tops = {", "peak_top = {", r"snapdragon-8gen3-npu.toml: unknown key 'compute.peak_top'"),
        ("bandwidth_gbps = 76.8", 'bandwidth_gbps = "fast"', r"key 'memory.bandwidth_gbps' must be a number"),
        (
            "capacity_bytes = 12_884_901_888",
            "capacity_bytes = 12.5",
            r"'memory.capacity_bytes' must be an integer",
        ),
        (
            "int_activation_bits = [8, 16]\nint_weight_bits = [4",
            "int_activation_bits = 8\nint_weight_bits = [4",
            r"'classes.matmul.int_activation_bits' must be a list of integers",
        ),
        ("bandwidth_gbps_source =", "bandwidth_gbps_note =", r"unknown key 'memory.bandwidth_gbps_note'"),
        ("[classes.softmax]", "[classes.attention]", r"unknown op class 'classes.attention'"),
        (
            "int8 = 45.0, int16 = 22.5",
            "int8 = 45.0",
            r"classes.matmul computes in int16 but 'compute.peak_tops'",
        ),
        ('formats = ["onnx-qdq"]', 'formats = ["onnx-qnn"]', r"unknown format 'onnx-qnn'"),
        ('host = "arm64-cpu-xnnpack"', 'host = "gpu"', r"key 'host' names 'gpu'"),
        (
            'float = []\nsource = "same as matmul',
            'float = ["fp8"]\nsource = "same as matmul',
            r"'classes.conv.float' has 'fp8'",
        ),
    ],
)
def test_malformed_profile_names_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in SNAPDRAGON, old
    path = tmp_path / "snapdragon-8gen3-npu.toml"
    path.write_text(SNAPDRAGON.replace(old, new, 1))
    with pytest.raises(EdgekitError, match=message):
        load_profile(str(path))


def test_a_figure_without_a_source_is_refused(tmp_path: Path) -> None:
    text = "\n".join(line for line in SNAPDRAGON.splitlines() if not line.startswith("pj_per_byte_source"))
    path = tmp_path / "snapdragon-8gen3-npu.toml"
    path.write_text(text)
    with pytest.raises(EdgekitError, match=r"key 'energy.pj_per_byte' has no 'energy.pj_per_byte_source'"):
        load_profile(str(path))


def test_file_name_must_match_profile_name(tmp_path: Path) -> None:
    path = tmp_path / "my-phone.toml"
    path.write_text(SNAPDRAGON)
    with pytest.raises(EdgekitError, match=r"my-phone.toml: key 'name' is 'snapdragon-8gen3-npu'"):
        load_profile(str(path))


def test_no_device_names_in_code() -> None:
    """Checks and costs come from profile data: no module branches on a device's name."""
    code = "".join(p.read_text() for p in Path(load_profile("x86-cpu-onnxruntime").path).parents[1].glob("*.py"))
    for name in list_profiles():
        assert name not in code
    assert not re.search(r"(device|profile\.name|name)\s*==\s*['\"]", code)
