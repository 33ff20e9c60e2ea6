"""CEMA on Fashion-MNIST-C at severity 5: accuracy and upload cost against the usual baselines.

Every method sees the same stream per corruption (the first ``--count`` test images, in order,
batches of 64, pixels in [0, 1]) and starts from the same trained edge model, the zoo's
``fmnist-cnn`` (its input standardisation in front), reset per corruption:

* ``none``: the edge model as trained (running statistics);
* ``bn-adapt``: normalization with the statistics of each test batch (forward only);
* ``tent``: batch statistics plus entropy minimisation of the norm affine parameters by backprop
  on the edge (Adam 1e-3), the reference CEMA compares with;
* ``cema``: the real edge runtime (the exported adaptable ONNX bundle in onnxruntime, the CEMA
  selector) with the cloud half (``fmnist-foundation`` adapted, student distilled, FIFO replay) on
  the reference code's schedule (a cloud step per 32 uploaded samples, replay-only steps between,
  at least two student steps per upload);
  every upload and parameter set goes through the real wire format, whose bytes are counted;
* ``cema-all``: the same, uploading every sample;
* ``cema-random`` (a diagnostic control, not a method): the same cloud, but the edge uploads a
  random subset at CEMA's measured upload rate for that corruption — it separates "how many
  samples" from "which samples" the entropy window picks.

The cloud is in-process and answers before the next batch (no network delay): this measures the
method; the service's own behaviour is measured by bench/cema_reliability.py.

    PYTHONPATH=. python bench/cema.py [--count 2048] [--severity 5] [--corruptions a,b]
        [--selector FIELD=VALUE ...] [--cloud FIELD=VALUE ...]   (settings chosen on severity 4)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.cloud.adapter import (  # noqa: E402
    CemaConfig,
    DeviceAdapter,
    ReplayBuffer,
    configure_for_adaptation,
    pixel_input,
    predict_eval,
    softmax_entropy,
)
from edgekit.cloud.export import export_adaptable, with_batch_statistics  # noqa: E402
from edgekit.data import fmnist_c  # noqa: E402
from edgekit.models.fmnist import load_cnn  # noqa: E402
from edgekit.models.fmnist_cema import load_foundation  # noqa: E402
from edgekit.runtime import wire  # noqa: E402
from edgekit.runtime.cema import (  # noqa: E402
    AdaptableModel,
    Selector,
    SelectorConfig,
    decode_params,
    encode_params,
    entropy,
)

BATCH = 64
METHODS = ("none", "bn-adapt", "tent", "cema", "cema-all", "cema-random")


def batches(x: np.ndarray, y: np.ndarray):
    for start in range(0, len(x), BATCH):
        yield x[start : start + BATCH], y[start : start + BATCH]


def run_bn_adapt(edge: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    model = with_batch_statistics(edge)
    correct = 0
    with torch.no_grad():
        for xb, yb in batches(x, y):
            correct += int((model(torch.from_numpy(xb)).argmax(1).numpy() == yb).sum())
    return {"accuracy": correct / len(y)}


def run_tent(edge: torch.nn.Module, x: np.ndarray, y: np.ndarray, lr: float = 1e-3) -> dict:
    model = copy.deepcopy(edge)
    params = configure_for_adaptation(model, 0.1)
    optimizer = torch.optim.Adam(params, lr=lr)
    correct = 0
    for xb, yb in batches(x, y):
        logits = model(torch.from_numpy(xb))
        correct += int((logits.detach().argmax(1).numpy() == yb).sum())
        loss = softmax_entropy(logits).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"accuracy": correct / len(y)}


def run_cema(
    bundle: Path,
    teacher: torch.nn.Module,
    edge: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    upload_all: bool,
    config: CemaConfig,
    selector_config: SelectorConfig,
    random_rate: float | None = None,
) -> dict:
    """One stream through the edge runtime and the cloud, on the reference code's schedule.

    The cloud keeps the uploads it has not learned from and takes one teacher/student step per
    ``config.cloud_batch`` of them; replay-only student steps make up each upload's
    ``student_steps_per_upload`` (once the buffer holds ``replay_only_after`` samples), as the
    service's worker does. A new
    parameter set goes back after every edge batch that changed the student.
    """
    model = AdaptableModel(bundle)  # fresh: version 0, the trained parameters
    selector = Selector(selector_config)
    adapter = DeviceAdapter(teacher, edge, config)
    replay = ReplayBuffer(config.replay_size)
    rng = np.random.default_rng(0)
    pending: list[np.ndarray] = []
    correct = uploaded = up_bytes = down_bytes = seq0 = 0
    for xb, yb in batches(x, y):
        logits = model.predict(xb)
        correct += int((logits.argmax(1) == yb).sum())
        if random_rate is not None:
            keep = rng.random(len(xb)) < random_rate
        else:
            keep = np.ones(len(xb), bool) if upload_all else selector.select(logits)
        if keep.any():
            seq = np.arange(seq0, seq0 + int(keep.sum()))
            seq0 += len(seq)
            body = wire.encode_samples("bench", seq, xb[keep], entropy(logits[keep]))
            up_bytes += len(body)
            uploaded += len(seq)
            _, _, received, _ = wire.decode_samples(body, xb.shape[1:], 8 << 20)
            pending.extend(received)
            replay.add(received)
        steps = 0
        while len(pending) >= config.cloud_batch:
            adapter.step(np.stack(pending[: config.cloud_batch]), replay.sample)
            del pending[: config.cloud_batch]
            steps += 1
        while keep.any() and steps < config.student_steps_per_upload and len(replay.items) >= config.replay_only_after:
            adapter.replay_step(replay.sample)
            steps += 1
        if steps:
            blob = encode_params(model.version + 1, adapter.student_arrays())
            down_bytes += len(blob)
            version, arrays = decode_params(blob)
            model.apply(version, arrays)
    return {
        "accuracy": correct / len(y),
        "upload_fraction": uploaded / len(y),
        "upload_bytes": up_bytes,
        "download_bytes": down_bytes,
        "updates": model.version,
        "cloud_steps": adapter.steps,
        "selector_dropped": dict(selector.dropped) if random_rate is None and not upload_all else None,
        "final_e_max": round(selector.e_max, 4) if random_rate is None and not upload_all else None,
    }


def overrides(kind: type, items: list[str]) -> dict:
    """``["lam=0.8"]`` -> ``{"lam": 0.8}``, typed by the dataclass field's default."""
    fields = {k: getattr(kind(num_classes=10), k) for k in kind.__dataclass_fields__}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"error: {kind.__name__} has no field '{key}'")
        if isinstance(fields[key], bool):
            if value.lower() not in ("true", "false"):
                raise SystemExit(f"error: {key} takes true or false, not '{value}'")
            out[key] = value.lower() == "true"
        else:
            out[key] = type(fields[key])(value) if fields[key] is not None else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2048, help="stream length per corruption")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--corruptions", default=",".join(fmnist_c.CORRUPTIONS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cema.json"))
    parser.add_argument("--selector", action="append", default=[], metavar="FIELD=VALUE", help="SelectorConfig")
    parser.add_argument("--cloud", action="append", default=[], metavar="FIELD=VALUE", help="CemaConfig")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    edge_bundle = load_cnn()
    edge = pixel_input(edge_bundle)  # the stream is pixels in [0, 1]; the zoo net standardises them first
    teacher = load_foundation().module
    config = CemaConfig(num_classes=10, **overrides(CemaConfig, args.cloud))
    selector_config = SelectorConfig(num_classes=10, **overrides(SelectorConfig, args.selector))
    methods = args.methods.split(",")
    corruptions = args.corruptions.split(",")
    clean_x, clean_y = fmnist_c.raw_split("test")
    clean = {
        "edge": float((predict_eval(edge, clean_x).argmax(1) == clean_y).mean()),
        "foundation": float((predict_eval(teacher, clean_x).argmax(1) == clean_y).mean()),
    }
    results: dict[str, dict[str, dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_adaptable(edge_bundle, Path(tmp) / "edge-bundle")
        for corruption in corruptions:
            x, y = fmnist_c.load(corruption, args.severity, args.count)
            row: dict[str, dict] = {
                "foundation-none": {"accuracy": float((predict_eval(teacher, x).argmax(1) == y).mean())}
            }
            for method in methods:
                t0 = time.time()
                if method == "none":
                    out = {"accuracy": float((predict_eval(edge, x).argmax(1) == y).mean())}
                elif method == "bn-adapt":
                    out = run_bn_adapt(edge, x, y)
                elif method == "tent":
                    out = run_tent(edge, x, y)
                elif method == "cema-random":
                    rate = row["cema"]["upload_fraction"] if "cema" in row else 0.2
                    out = run_cema(bundle, teacher, edge, x, y, False, config, selector_config, random_rate=rate)
                else:
                    out = run_cema(bundle, teacher, edge, x, y, method == "cema-all", config, selector_config)
                out["seconds"] = round(time.time() - t0, 2)
                row[method] = out
            results[corruption] = row
            print(
                f"{corruption:18s} "
                + " ".join(f"{m}={row[m]['accuracy']:.3f}" for m in row)
                + (f" up={row['cema']['upload_fraction']:.2f}" if "cema" in row else ""),
                flush=True,
            )
    mean = {}
    for method in ["foundation-none", *methods]:
        accs = [results[c][method]["accuracy"] for c in corruptions]
        mean[method] = {"accuracy": float(np.mean(accs))}
        if method.startswith("cema"):
            fractions = [results[c][method]["upload_fraction"] for c in corruptions]
            mean[method]["upload_fraction"] = float(np.mean(fractions))
            mean[method]["upload_bytes"] = int(sum(results[c][method]["upload_bytes"] for c in corruptions))
            mean[method]["download_bytes"] = int(sum(results[c][method]["download_bytes"] for c in corruptions))
    goals = {}
    if all(m in mean for m in ("none", "tent", "cema", "cema-all")):
        goals = {
            "cema_ge_tent": mean["cema"]["accuracy"] >= mean["tent"]["accuracy"],
            "cema_5pt_over_none": mean["cema"]["accuracy"] - mean["none"]["accuracy"] >= 0.05,
            "cema_upload_le_40pct": mean["cema"]["upload_fraction"] <= 0.40,
            "cema_within_1pt_of_all": mean["cema-all"]["accuracy"] - mean["cema"]["accuracy"] <= 0.01,
        }
    report = {
        "severity": args.severity,
        "stream_per_corruption": args.count,
        "batch": BATCH,
        "clean_accuracy": clean,
        "cema_config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "selector": {
            **{k: getattr(selector_config, k) for k in selector_config.__dataclass_fields__},
            "e_max0": selector_config.e_max0,
            "e_min": selector_config.e_min,
            "cos_margin": selector_config.cos_margin,
        },
        "per_corruption": results,
        "mean": mean,
        "goals": goals,
        "seconds": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nmean over corruptions (severity {args.severity}, {args.count} samples each)")
    print(f"{'method':16s} {'accuracy':>9s} {'uploaded':>9s} {'MB up':>8s}")
    for method, values in mean.items():
        frac = f"{values['upload_fraction']:.3f}" if "upload_fraction" in values else "-"
        mb = f"{values['upload_bytes'] / 1e6:.2f}" if "upload_bytes" in values else "-"
        print(f"{method:16s} {values['accuracy']:9.4f} {frac:>9s} {mb:>8s}")
    print("goals:", json.dumps(goals))
    plot(results, corruptions, ["none", *methods[1:]] if methods[0] == "none" else methods, Path(args.out))


def plot(results: dict, corruptions: list[str], methods: list[str], out: Path) -> None:
    """Grouped bars of accuracy per corruption and method, next to the JSON (PNG, not in git)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [results[c][method]["accuracy"] for c in corruptions]
        ax.bar(np.arange(len(corruptions)) + i * width, values, width, label=method)
    ax.set_xticks(np.arange(len(corruptions)) + 0.4 - width / 2, corruptions, rotation=30, ha="right")
    ax.set_ylabel("stream accuracy")
    ax.set_title("Fashion-MNIST-C, severity 5: edge adaptation methods")
    ax.legend(ncol=len(methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
