"""The CEMA wire format, shared by the edge uplink and the cloud service.

A sample upload is a zlib-compressed safetensors file with ``x`` (float16 inputs, [N, ...]),
``seq`` (int64, the edge queue's sequence numbers) and ``entropy`` (float32, the edge's entropy),
plus metadata naming the edge queue's ``client`` id. ``(device, client, seq)`` is the idempotency
key: a retried batch that the server already stored is acknowledged again, not stored twice.
Parameter sets go back as plain safetensors (float data barely compresses).
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np

from edgekit.errors import EdgekitError

SAMPLES_FORMAT = "edgekit-cema-samples/1"
CONTENT_TYPE = "application/x-edgekit-samples"
PARAMS_TYPE = "application/x-safetensors"
VERSION_HEADER = "X-Edgekit-Version"
MAX_SAMPLES = 512
CLIENT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def encode_samples(client: str, seq: np.ndarray, x: np.ndarray, entropy: np.ndarray, level: int = 6) -> bytes:
    from safetensors.numpy import save

    raw = save(
        {
            "x": np.ascontiguousarray(x, dtype=np.float16),
            "seq": np.ascontiguousarray(seq, dtype=np.int64),
            "entropy": np.ascontiguousarray(entropy, dtype=np.float32),
        },
        metadata={"format": SAMPLES_FORMAT, "client": client},
    )
    return zlib.compress(raw, level)


def decode_samples(
    body: bytes, input_shape: tuple[int, ...], max_raw: int
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """``(client, seq, x float32, entropy)``; EdgekitError for anything malformed, oversized or non-finite.

    ``input_shape`` is one sample's shape; decompression stops at ``max_raw`` bytes (no zip bombs).
    """
    from safetensors.numpy import load

    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(body, max_raw + 1)
    except zlib.error:
        raise EdgekitError("body is not zlib-compressed") from None
    if len(raw) > max_raw or inflater.unconsumed_tail:
        raise EdgekitError(f"decompressed upload exceeds {max_raw} bytes")
    try:
        arrays = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as error:  # safetensors' own error types
        raise EdgekitError(f"body is not a safetensors sample file ({type(error).__name__})") from None
    if metadata.get("format") != SAMPLES_FORMAT:
        raise EdgekitError(f"unknown upload format {metadata.get('format')!r}")
    client = str(metadata.get("client", ""))
    if not CLIENT_PATTERN.match(client):
        raise EdgekitError("missing or invalid client id")
    if set(arrays) != {"x", "seq", "entropy"}:
        raise EdgekitError(f"upload must hold x, seq, entropy; got {sorted(arrays)}")
    x, seq, ent = arrays["x"], arrays["seq"], arrays["entropy"]
    n = x.shape[0] if x.ndim else 0
    if x.dtype != np.float16 or tuple(x.shape[1:]) != tuple(input_shape):
        raise EdgekitError(f"x must be float16 [N, {', '.join(map(str, input_shape))}], got {x.dtype} {list(x.shape)}")
    if not 1 <= n <= MAX_SAMPLES:
        raise EdgekitError(f"an upload holds 1..{MAX_SAMPLES} samples, got {n}")
    if seq.dtype != np.int64 or seq.shape != (n,) or ent.shape != (n,) or ent.dtype != np.float32:
        raise EdgekitError("seq (int64 [N]) and entropy (float32 [N]) must match x")
    if len(np.unique(seq)) != n or (seq < 0).any():
        raise EdgekitError("seq values must be distinct and non-negative")
    if not np.isfinite(x).all() or not np.isfinite(ent).all():
        raise EdgekitError("upload holds NaN or infinite values")
    return client, seq, x.astype(np.float32), ent
