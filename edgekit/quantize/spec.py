"""QuantSpec: the export plan a quantizing transform hands to the exporters.

Kept free of any exporter so that transforms build it and every exporter (onnxruntime QDQ,
ExecuTorch XNNPACK) reads the same plan: bits and granularity per tensor class, and, for methods
that learn their ranges (MobileQuant), fixed per-tensor scales that must not be recalibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TensorOverride:
    """A fixed quantization for one activation tensor: written as is, never observed again."""

    bits: Literal[8, 16]
    scale: float
    zero_point: int
    signed: bool = False


@dataclass
class QuantSpec:
    weight_bits: Literal[4, 8] = 8
    weight_per_channel: bool = True
    activation_bits: Literal[8, 16] = 8
    activation_symmetric: bool = False
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"
    # ops whose *outputs* use 16-bit activations (e.g. {"Softmax", "LayerNormalization"})
    sixteen_bit_ops: frozenset[str] = frozenset()
    # op types left in float: fine on CPU/GPU runtimes, a reported float island on integer NPUs
    float_ops: frozenset[str] = frozenset()
    # activation tensor name -> fixed quantization (names are the exported graph's)
    overrides: dict[str, TensorOverride] = field(default_factory=dict)
    # module name patterns that keep per-channel weights even when weight_per_channel is False
    per_channel_modules: tuple[str, ...] = ()
    # module name patterns whose weights stay 8-bit (per channel) when weight_bits is 4: an LM head
    # and the lookup table it shares, which 4 bits cost most (MobileQuant W4A8)
    eight_bit_weight_modules: tuple[str, ...] = ()
    samples: int = 64
    # run each RMSNorm as one op (its statistics internal, as NPUs do)
    fuse_rms_norm: bool = False
    # norm weights (fused RMSNorm, LayerNormalization) symmetric per tensor at these bits; None: the
    # quantizer's weight type (a fused RMSNorm then takes 16)
    norm_weight_bits: Literal[8, 16] | None = None
