"""Session: a loaded bundle that checks its inputs against the manifest and runs them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.runtime.backends import Backend, OnnxBackend, PteBackend
from edgekit.runtime.manifest import GraphSpec, Manifest

FORMAT_PREFERENCE = ("onnx", "pte")


class Session:
    def __init__(self, directory: Path, fmt: str | None = None, threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        available = [name for name in FORMAT_PREFERENCE if name in self.manifest.formats]
        if fmt is None:
            if not available:
                raise EdgekitError(f"{directory}: the bundle holds no runnable format")
            fmt = available[0]
        if fmt not in self.manifest.formats:
            raise EdgekitError(f"{directory} has no '{fmt}' export (it has: {', '.join(self.manifest.formats)})")
        self.format = fmt
        self.threads = threads
        self.graphs = self.manifest.formats[fmt].graphs
        self._backends: dict[str, Backend] = {}
        self._tokenizer = None

    # -- plain inference -------------------------------------------------------------------------
    def graph(self, name: str = "main") -> GraphSpec:
        if name not in self.graphs:
            raise EdgekitError(f"bundle has no graph '{name}' (it has: {', '.join(self.graphs)})")
        return self.graphs[name]

    def _backend(self, name: str) -> Backend:
        if name not in self._backends:
            spec = self.graph(name)
            path = self.directory / spec.file
            if self.format == "onnx":
                self._backends[name] = OnnxBackend(path, self.threads)
            else:
                self._backends[name] = PteBackend(
                    path, [tensor.name for tensor in spec.inputs], [tensor.name for tensor in spec.outputs]
                )
        return self._backends[name]

    def check_feeds(self, feeds: dict[str, np.ndarray], graph: str = "main") -> dict[str, np.ndarray]:
        spec = self.graph(graph)
        expected = {tensor.name: tensor for tensor in spec.inputs}
        unknown = sorted(set(feeds) - set(expected))
        if unknown:
            raise EdgekitError(f"unknown input '{unknown[0]}'; the model takes: {', '.join(expected)}")
        ordered: dict[str, np.ndarray] = {}
        for name, tensor in expected.items():
            if name not in feeds:
                raise EdgekitError(f"missing input '{name}' ({tensor.dtype} {tensor.shape})")
            array = np.asarray(feeds[name])
            if str(array.dtype) != tensor.dtype:
                raise EdgekitError(f"input '{name}' is {array.dtype}, the model expects {tensor.dtype}")
            if not tensor.matches(array.shape):
                raise EdgekitError(f"input '{name}' has shape {list(array.shape)}, the model expects {tensor.shape}")
            ordered[name] = array
        return ordered

    def run(self, feeds: dict[str, np.ndarray], graph: str | None = None) -> dict[str, np.ndarray]:
        graph = graph or ("prefill" if "prefill" in self.graphs else "main")
        return self._backend(graph).run(self.check_feeds(feeds, graph))

    def latency_ms(self, feeds: dict[str, np.ndarray], repeats: int = 20, warmup: int = 3) -> float:
        """Median wall time of one inference, for ratios measured in the same process."""
        checked = self.check_feeds(feeds, "prefill" if "prefill" in self.graphs else "main")
        backend = self._backend("prefill" if "prefill" in self.graphs else "main")
        for _ in range(warmup):
            backend.run(checked)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.run(checked)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)

    # -- language models -------------------------------------------------------------------------
    @property
    def is_language_model(self) -> bool:
        return self.manifest.language_model is not None

    @property
    def tokenizer(self):  # tokenizers.Tokenizer (HF's Rust tokenizer, no transformers)
        if self._tokenizer is None:
            lm = self.manifest.language_model or {}
            file = lm.get("tokenizer")
            if not file:
                raise EdgekitError("this bundle carries no tokenizer")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.directory / file))
        return self._tokenizer

    @property
    def is_sorted(self) -> bool:
        """True for a many-depth (sorted) bundle: segments + head, see :mod:`edgekit.runtime.sorted`."""
        return bool(self.manifest.depths) and "sorted" in self.manifest.formats[self.format].details

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 32,
        stop_at_eos: bool = True,
        depth: int | str | None = None,
        budget_ms: float | None = None,
    ) -> list[int]:
        """Greedy decoding: one prefill, then one decode-graph step per token with the KV cache.

        Sorted bundles also take ``depth`` (a depth, ``"auto"`` with ``budget_ms``, or ``"dynamic"``).
        """
        if not self.is_language_model:
            raise EdgekitError("generate() needs a causal-LM bundle")
        if self.is_sorted:
            from edgekit.runtime.sorted import SortedModel

            eos = set((self.manifest.language_model or {}).get("eos_token_ids", [])) if stop_at_eos else set()
            runner = SortedModel.from_session(self)
            return runner.generate(prompt_ids, max_new_tokens, depth=depth, budget_ms=budget_ms, eos_ids=eos).tokens
        if depth is not None or budget_ms is not None:
            raise EdgekitError("--depth and --budget-ms need a sorted bundle (edgekit export --recipe sorted)")
        if "decode" not in self.graphs:
            raise EdgekitError(f"the {self.format} export has no decode graph; use the onnx export to generate")
        if not prompt_ids:
            raise EdgekitError("empty prompt")
        eos = set((self.manifest.language_model or {}).get("eos_token_ids", [])) if stop_at_eos else set()
        outputs = self.run({"input_ids": np.asarray([prompt_ids], dtype=np.int64)}, "prefill")
        generated: list[int] = []
        decode_inputs = [tensor.name for tensor in self.graph("decode").inputs if tensor.name != "input_ids"]
        for _ in range(max_new_tokens):
            token = int(np.argmax(outputs["logits"][0, -1]))
            generated.append(token)
            if token in eos:
                break
            feeds = {"input_ids": np.asarray([[token]], dtype=np.int64)}
            for name in decode_inputs:
                feeds[name] = outputs[name.replace("past.", "present.", 1)]
            outputs = self._backend("decode").run(feeds)
        return generated


def load(directory: str | Path, fmt: str | None = None, threads: int | None = None) -> Session:
    """Open a bundle directory written by ``edgekit export``."""
    return Session(Path(directory), fmt, threads)
