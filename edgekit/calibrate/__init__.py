"""Calibration inputs for every recipe: from a zoo data set, an .npz/.npy folder or a text file.

``calibration_inputs`` always returns a list of input dicts whose names, ranks, static dims and
dtypes match the model's example inputs, with no NaN or Inf, so a transform never has to check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit import data as datasets
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle

Feeds = dict[str, np.ndarray]


def _to_numpy(inputs: dict) -> Feeds:
    return {
        name: value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        for name, value in inputs.items()
    }


def validate_feeds(bundle: ModelBundle, feeds: Feeds, where: str) -> Feeds:
    """Check one sample against the model's inputs; the error names the offending array."""
    expected = bundle.example_inputs
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise EdgekitError(f"{where}: missing input '{missing[0]}' (model inputs: {', '.join(expected)})")
    checked: Feeds = {}
    for name, example in expected.items():
        array = np.asarray(feeds[name])
        dynamic = bundle.dynamic_axes.get(name, {})
        want = tuple(example.shape)
        if array.ndim != len(want) or any(
            axis not in dynamic and got != size for axis, (got, size) in enumerate(zip(array.shape, want, strict=True))
        ):
            raise EdgekitError(f"{where}: input '{name}' has shape {tuple(array.shape)}, model expects {want}")
        want_dtype = example.detach().numpy().dtype
        if array.dtype != want_dtype:
            if array.dtype.kind != want_dtype.kind:
                raise EdgekitError(f"{where}: input '{name}' is {array.dtype}, model expects {want_dtype}")
            array = array.astype(want_dtype)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise EdgekitError(f"{where}: input '{name}' contains NaN or Inf")
        checked[name] = array
    return checked


def _lm_windows(bundle: ModelBundle, texts: list[str], count: int, seq_len: int) -> list[Feeds]:
    stream: list[int] = []
    for text in texts:
        stream.extend(bundle.tokenizer(text)["input_ids"])
        if len(stream) >= count * seq_len:
            break
    if len(stream) < seq_len:
        raise EdgekitError(f"calibration text has {len(stream)} tokens, need at least {seq_len}")
    windows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:count]
    return [{"input_ids": np.asarray([window], dtype=np.int64)} for window in windows]


def _from_texts(bundle: ModelBundle, texts: list[str], count: int, seq_len: int) -> list[Feeds]:
    if bundle.task == "causal-lm":
        return _lm_windows(bundle, texts, count, seq_len)
    if bundle.preprocess is None:
        raise EdgekitError(f"model {bundle.spec} takes no text input")
    return [_to_numpy(bundle.preprocess(text)) for text in texts[:count]]


def _from_arrays(bundle: ModelBundle, path: Path) -> list[Feeds]:
    files = sorted(path.glob("*.npz")) + sorted(path.glob("*.npy")) if path.is_dir() else [path]
    if not files:
        raise EdgekitError(f"{path}: no .npz or .npy files")
    samples: list[Feeds] = []
    names = bundle.input_names
    for file in files:
        try:
            loaded = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise EdgekitError(f"{file}: not a readable numpy file ({error})") from None
        if isinstance(loaded, np.ndarray):
            if len(names) != 1:
                raise EdgekitError(f"{file}: a .npy holds one array but the model has inputs {', '.join(names)}")
            arrays = {names[0]: loaded}
        else:
            arrays = {key: loaded[key] for key in loaded.files}
        # a file holds either one sample or a stack of samples along a leading axis
        first = bundle.example_inputs[names[0]]
        stacked = names[0] in arrays and arrays[names[0]].ndim == first.ndim + 1
        count = len(arrays[names[0]]) if stacked else 1
        for index in range(count):
            sample = {key: value[index] if stacked else value for key, value in arrays.items()}
            samples.append(validate_feeds(bundle, sample, f"{file.name}[{index}]" if stacked else file.name))
    return samples


def calibration_inputs(
    bundle: ModelBundle, source: str | None, count: int, seq_len: int = 128, split: datasets.Split = "calib"
) -> list[Feeds]:
    """Up to ``count`` validated input dicts for ``bundle`` from ``source``.

    ``source``: None (the model's own data set), a data set name, a folder or file of .npz/.npy,
    or a text file (one sample per non-empty line; for causal LMs, the token stream in windows).
    """
    if count <= 0:
        raise EdgekitError(f"calibration needs at least one sample, got {count}")
    name = source or bundle.dataset
    if name is None:
        raise EdgekitError(f"model {bundle.spec} has no default data set: pass --calib DATA")
    path = Path(name).expanduser()
    if name in datasets.READERS:
        items = datasets.items(name, split, None if bundle.task == "causal-lm" else count)
        raws = [item.raw for item in items]
        if raws and isinstance(raws[0], str):
            samples = _from_texts(bundle, raws, count, seq_len)
        else:
            if bundle.preprocess is None:
                raise EdgekitError(f"model {bundle.spec} has no preprocessing for data set '{name}'")
            samples = [_to_numpy(bundle.preprocess(raw)) for raw in raws[:count]]
    elif not path.exists() and (path.suffix or "/" in name):
        raise EdgekitError(f"no such calibration data: {name}")
    elif path.suffix in (".npz", ".npy") or path.is_dir():
        samples = _from_arrays(bundle, path)[:count]
    elif path.is_file():
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not lines:
            raise EdgekitError(f"{path}: empty text file")
        samples = _from_texts(bundle, lines, count, seq_len)
    else:
        raise EdgekitError(
            f"calibration data '{name}' is not a data set ({', '.join(datasets.READERS)}), a folder or a file"
        )
    return [validate_feeds(bundle, sample, f"calibration sample {i}") for i, sample in enumerate(samples)]
