"""IIR-SNN on Fashion-MNIST: accuracy vs timesteps, spike rates, op/energy counts, ORT latency.

Measures, in one run: the ANN's test accuracy; conversion alone at T=5 and T=1; IIR at every
ladder stage; per-layer spike rates and synaptic operations (MACs for the ANN, accumulates for
spiking layers) with 45 nm energy; onnxruntime latency of the ANN, the T=1 SNN and the T=5 SNN,
interleaved in the same process; and that the ORT spike maps equal torch's. Writes
bench/results/snn.json and bench/results/snn.png.

Usage: python bench/snn.py [--quick-ann EPOCHS | --ann-weights PATH] [--set key=value ...]
``--quick-ann N`` trains the fmnist-vgg architecture for N epochs here instead of using the zoo
weights (which train for several epochs on first use), for machines where that does not fit;
``--ann-weights`` loads fmnist-vgg weights from a file (the zoo's cache entry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgekit import recipes
from edgekit.models import load as load_model
from edgekit.runtime.backends import open_onnx_session
from edgekit.snn.energy import count_ops
from edgekit.snn.network import UnrolledSNN, named_input
from edgekit.snn.recipe import train_snn

RESULTS = Path(__file__).parent / "results"


def vgg_bundle(model: torch.nn.Module, spec: str, meta: dict):
    """A bundle around a fmnist-vgg-architecture net, fed exactly like the zoo's."""
    from edgekit.data import fashion_mnist
    from edgekit.models import fmnist
    from edgekit.models.bundle import ModelBundle
    from edgekit.models.sources import state_hash

    return ModelBundle(
        spec=spec,
        module=model.eval(),
        example_inputs=fmnist.preprocess(fashion_mnist.arrays("eval")[0][0]),
        task="classifier",
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}},
        preprocess=fmnist.preprocess,
        labels=list(fashion_mnist.CLASSES),
        dataset="fashion-mnist",
        source_hash=state_hash(model),
        meta=meta,
    )


def quick_ann(epochs: int):
    """The zoo's fmnist-vgg architecture and preprocessing, trained for ``epochs`` (cached)."""
    from edgekit.models import fmnist

    recipe = dataclasses.replace(fmnist.VGG_RECIPE, epochs=epochs)
    model, meta = fmnist.trained("fmnist-vgg-bench", fmnist.build_vgg, recipe)
    info = {"epochs": epochs, "train_seconds": meta.get("train_seconds")}
    info["test_accuracy_10k"] = meta.get("test_accuracy")
    return vgg_bundle(model, f"fmnist-vgg architecture, {epochs} epoch(s) (bench)", meta), info


def ann_from_weights(path: Path):
    """fmnist-vgg from a weights file (e.g. the zoo's cache entry), with its meta.json when present."""
    from edgekit.models import fmnist

    model = fmnist.build_vgg()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info = {"weights": str(path), "epochs": meta.get("recipe", {}).get("epochs")}
    info["test_accuracy_10k"] = meta.get("test_accuracy")
    return vgg_bundle(model, f"zoo:fmnist-vgg weights from {path.parent.name}", meta), info


def export_onnx(module: torch.nn.Module, x: torch.Tensor, path: Path, names: list[str]) -> Path:
    torch.onnx.export(
        module, (), kwargs={"x": x}, f=str(path), dynamo=True, opset_version=21, output_names=names,
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False,
    )  # fmt: skip
    return path


def interleaved_latency(paths: dict[str, Path], x: np.ndarray, rounds: int = 15, repeats: int = 20) -> dict:
    """Median ms per inference (batch 1), models measured in turn so load changes hit all alike."""
    sessions = {name: open_onnx_session(p, threads=1) for name, p in paths.items()}
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        for _ in range(5):
            session.run(None, {"x": x})
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(repeats):
                session.run(None, {"x": x})
            samples[name].append((time.perf_counter() - start) / repeats * 1e3)
    return {name: float(np.median(values)) for name, values in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick-ann", type=int, default=0)
    parser.add_argument("--ann-weights", type=Path, default=None, help="fmnist-vgg weights.pt (zoo cache entry)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--energy-samples", type=int, default=500)
    args = parser.parse_args()
    config = recipes.load("snn-iir", recipes.parse_overrides(args.overrides)).settings
    started = time.perf_counter()
    ann_note: dict = {"source": "zoo:fmnist-vgg"}
    if args.ann_weights:
        bundle, trained_info = ann_from_weights(args.ann_weights)
        ann_note = {"source": "zoo fmnist-vgg weights", **trained_info}
    elif args.quick_ann:
        bundle, trained_info = quick_ann(args.quick_ann)
        ann_note = {"source": "fmnist-vgg architecture trained by this bench", **trained_info}
    else:
        bundle = load_model("zoo:fmnist-vgg")
        ann_note["test_accuracy_10k"] = bundle.meta.get("test_accuracy")
    ann_seconds = time.perf_counter() - started

    start = time.perf_counter()
    trained = train_snn(bundle, config)
    snn_seconds = time.perf_counter() - start
    record = trained["record"]
    eval_x, eval_y = trained["eval"]
    energy_x = eval_x[: args.energy_samples]

    energy = {}
    for timesteps, net in trained["nets"].items():
        energy[f"iir_T{timesteps}"] = count_ops(net, energy_x).as_dict()
    converted = trained["converted"]
    for timesteps in sorted({config.ladder[0], 1}, reverse=True):
        converted.timesteps = timesteps
        energy[f"conversion_T{timesteps}"] = count_ops(converted, energy_x).as_dict()

    final_t, first_t = config.ladder[-1], config.ladder[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        one = eval_x[:1]
        paths = {
            "ann": export_onnx(named_input(bundle.module, "x").eval(), one, work / "ann.onnx", ["logits"]),
            f"snn_T{final_t}": export_onnx(
                named_input(UnrolledSNN(trained["nets"][final_t]), "x").eval(), one, work / "t1.onnx", ["logits"]
            ),
            f"snn_T{first_t}": export_onnx(
                named_input(UnrolledSNN(trained["nets"][first_t]), "x").eval(), one, work / "t5.onnx", ["logits"]
            ),
        }
        latency = interleaved_latency(paths, one.numpy())
        # spike maps and predictions of the exported T=final SNN against torch
        spiking = named_input(UnrolledSNN(trained["nets"][final_t], return_spikes=True), "x").eval()
        spikes_path = export_onnx(spiking, one, work / "spikes.onnx", None)
        check_x = eval_x[:256]
        runtime = open_onnx_session(spikes_path).run(None, {"x": check_x.numpy()})
        with torch.no_grad():
            reference = spiking(x=check_x)
        same = sum(int((a == b.numpy()).sum()) for a, b in zip(runtime[1:], reference[1:], strict=True))
        total = sum(b.numel() for b in reference[1:])
        verification = {
            "images": len(check_x),
            "spike_agreement": same / total,
            "prediction_agreement": float((runtime[0].argmax(-1) == reference[0].numpy().argmax(-1)).mean()),
            "max_logit_diff": float(np.abs(runtime[0] - reference[0].numpy()).max()),
        }

    ann_acc = record["ann_accuracy"]
    stage_acc = {str(s.timesteps): s.accuracy for s in trained["stages"]}
    final = energy[f"iir_T{final_t}"]
    goals = {
        "iir_T1_within_1pt_of_ann": {
            "value": (ann_acc - stage_acc[str(final_t)]) * 100,
            "met": ann_acc - stage_acc[str(final_t)] <= 0.01,
        },
        "energy_10x_below_ann": {"value": final["energy_ratio"], "met": final["energy_ratio"] >= 10},
        "t1_latency_le_1.3x_ann": {
            "value": latency[f"snn_T{final_t}"] / latency["ann"],
            "met": latency[f"snn_T{final_t}"] <= 1.3 * latency["ann"],
        },
        "t1_latency_3x_below_t5": {
            "value": latency[f"snn_T{first_t}"] / latency[f"snn_T{final_t}"],
            "met": latency[f"snn_T{first_t}"] >= 3 * latency[f"snn_T{final_t}"],
        },
        "spike_maps_match": {"value": verification["spike_agreement"], "met": verification["spike_agreement"] >= 0.999},
    }
    result = {
        "ann": ann_note,
        "settings": dataclasses.asdict(config),
        "test_images": len(eval_x),
        "accuracy": {
            "ann": ann_acc,
            "conversion": record["conversion_accuracy"],
            "iir": stage_acc,
        },
        "stages": [dataclasses.asdict(s) for s in trained["stages"]],
        "energy": energy,
        "latency_ms_batch1_onnxruntime_1thread": latency,
        "verification_onnxruntime": verification,
        "goals": goals,
        "seconds": {"ann": ann_seconds, "snn_train_or_cache": snn_seconds, "iir_training": record["train_seconds"]},
        "torch_threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "snn.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "snn.png")

    print(f"Fashion-MNIST test accuracy ({len(eval_x)} images)")
    print(f"  ANN                      {ann_acc:.2%}")
    for t, value in record["conversion_accuracy"].items():
        print(f"  conversion only, T={t:<3}  {value:.2%}")
    for t, value in stage_acc.items():
        e = energy[f"iir_T{t}"]
        print(f"  IIR T={t:<3}                {value:.2%}   energy {e['energy_ratio']:.1f}x below ANN, "
              f"spike rates {', '.join(f'{r:.3f}' for r in e['spike_rates'])}")  # fmt: skip
    print("latency (onnxruntime, batch 1, 1 thread): " + ", ".join(f"{k} {v:.3f} ms" for k, v in latency.items()))
    print(f"ORT vs torch spike maps: {verification['spike_agreement']:.5f} identical")
    for name, goal in goals.items():
        print(f"  goal {name}: {goal['value']:.3f} -> {'met' if goal['met'] else 'MISSED'}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["accuracy"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ts = sorted(int(t) for t in acc["iir"])
    ax.plot(ts, [acc["iir"][str(t)] * 100 for t in ts], "o-", label="IIR-SNN (retrained)")
    cs = sorted(int(t) for t in acc["conversion"])
    ax.plot(cs, [acc["conversion"][str(t)] * 100 for t in cs], "s--", label="conversion only")
    ax.axhline(acc["ann"] * 100, color="gray", ls=":", label=f"ANN {acc['ann']:.1%}")
    ax.set_xlabel("timesteps T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sorted(set(ts) | set(cs)))
    ax.set_title(f"fmnist-vgg -> IIR-SNN ({result['test_images']} test images)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
