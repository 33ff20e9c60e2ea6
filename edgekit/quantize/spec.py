"""QuantSpec: the export plan a quantizing transform hands to the exporters.

Kept free of any exporter so that transforms build it and every exporter (onnxruntime QDQ,
ExecuTorch XNNPACK) reads the same plan: bits and granularity per tensor class, and, for methods
that learn their ranges (MobileQuant), fixed per-tensor scales that must not be recalibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Literal


@dataclass(frozen=True)
class TensorOverride:
    """A fixed quantization for one activation tensor: written as is, never observed again."""

    bits: Literal[8, 16]
    scale: float
    zero_point: int
    signed: bool = False


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(module, pattern) for pattern in patterns)


@dataclass(frozen=True)
class FamilyPlan:
    """What a simulated model family quantizes apart from the rest, by the exported module names.

    One statement read twice: the simulated model builds its weight quantizers from it, and the
    MobileQuant export plan (:class:`QuantSpec`) is written from it, so the file cannot drift from
    the simulation (it did once: BERT's word table was exported at 4 bits, simulated at 8).
    """

    # module name patterns whose weights are per channel even where the others are per tensor (W8)
    per_channel: tuple[str, ...] = ()
    # module name patterns whose weights are 8-bit (per channel) even at W4
    eight_bit: tuple[str, ...] = ()
    every_weight_per_channel: bool = False
    # op types whose outputs stay 16-bit in the mixed-precision recipes
    sixteen_bit_ops: frozenset[str] = frozenset()
    fuse_rms_norm: bool = False
    has_norms: bool = True

    def is_per_channel(self, module: str) -> bool:
        return self.every_weight_per_channel or _matches(module, self.per_channel + self.eight_bit)

    def weight_bits(self, module: str, bits: int) -> int:
        return 8 if _matches(module, self.eight_bit) else bits


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
    # module name patterns whose weights stay 8-bit, per channel, when weight_bits is 4: an LM head
    # and the lookup table it shares, which 4 bits cost most (MobileQuant W4A8)
    eight_bit_weight_modules: tuple[str, ...] = ()
    samples: int = 64
    # run each RMSNorm as one op (its statistics internal, as NPUs do)
    fuse_rms_norm: bool = False
    # norm weights (fused RMSNorm, LayerNormalization) symmetric per tensor at these bits; None: the
    # quantizer's weight type (a fused RMSNorm then takes 16)
    norm_weight_bits: Literal[8, 16] | None = None

    def named_per_channel(self, module: str) -> bool:
        """Whether a module's weights are per channel by name, whatever ``weight_per_channel`` says."""
        return _matches(module, self.per_channel_modules + self.eight_bit_weight_modules)

    def weight_bits_of(self, module: str) -> int:
        return 8 if _matches(module, self.eight_bit_weight_modules) else self.weight_bits
