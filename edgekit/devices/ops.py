"""OpStat: the per-op summary of an exported graph that device checks and the cost model read.

Exporters build these from their files (ONNX nodes, ExecuTorch delegated/undelegated nodes);
devices never import exporters, so this type lives here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OpStat:
    op_type: str  # as the exported format names it: "Conv", "MatMul", "aten.add.Tensor", ...
    count: int
    integer: bool  # runs on integer inputs/outputs (between DequantizeLinear/QuantizeLinear)
    activation_bits: int | None = None  # 8 / 16 for integer ops, None for float
    weight_bits: int | None = None
    flops: float = 0.0  # multiply-accumulates count as 2 FLOPs
    bytes_moved: float = 0.0  # weights + activations read and written, at their stored width
    delegated: bool | None = None  # ExecuTorch: inside a backend delegate
