"""Session-wide exports of the tiny models: each graph is exported once and checked by many tests."""

from __future__ import annotations

import pytest
from onnx_tiny_models import block_bundle, calibration, conv_bundle, mlp_bundle

from edgekit.exporters.onnx import OnnxExport, export_onnx
from edgekit.models.bundle import ModelBundle
from edgekit.quantize import ptq
from edgekit.quantize.spec import QuantSpec

BUNDLES = {"conv": conv_bundle, "mlp": mlp_bundle, "block": block_bundle}
PLANS = {
    "fp32": None,
    "q8": QuantSpec(),
    "q16": QuantSpec(activation_bits=16),
}


@pytest.fixture(scope="session")
def bundles() -> dict[str, ModelBundle]:
    return {name: make() for name, make in BUNDLES.items()}


@pytest.fixture(scope="session")
def exported(tmp_path_factory, bundles):
    """``exported(model, plan)`` -> (bundle, OnnxExport), exported on first use and kept."""
    done: dict[tuple[str, str], tuple[ModelBundle, OnnxExport]] = {}

    def get(model: str, plan: str) -> tuple[ModelBundle, OnnxExport]:
        if (model, plan) not in done:
            bundle = bundles[model].replace(quant=PLANS[plan])
            out = tmp_path_factory.mktemp(f"{model}-{plan}")
            calib = calibration(bundle) if PLANS[plan] is not None else None
            done[(model, plan)] = (bundle, export_onnx(bundle, out, calib))
        return done[(model, plan)]

    return get


@pytest.fixture(scope="session")
def ptq_conv(tmp_path_factory) -> tuple[ModelBundle, OnnxExport]:
    """The conv model through the ``ptq`` transform (pt2e program, simulated model) and its QDQ export."""
    bundle = conv_bundle()
    calib = calibration(bundle, count=8)
    quantized = ptq.apply(bundle, calib, ptq.Config(samples=8))
    return quantized, export_onnx(quantized, tmp_path_factory.mktemp("ptq-conv"), calib)
