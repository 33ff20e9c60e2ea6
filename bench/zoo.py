"""One measured figure per zoo model on its real data (the README's zoo table).

smollm2-135m: perplexity on the Wikipedia evaluation split (first N tokens, window 256, stride 128);
mobilenetv2: top-1 on the labelled photos; dinov2-s14: max |torch − onnxruntime| of the rebuilt
backbone on every photo; minilm-l6: Lee-corpus retrieval (an article's first half finds its own
second half among all evaluation articles); fmnist-*: Fashion-MNIST test accuracy (10,000 images).
Usage: python bench/zoo.py [--models a,b] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from edgekit import data
from edgekit.data.fashion_mnist import arrays
from edgekit.data.photos import is_correct
from edgekit.data.wikipedia import token_stream
from edgekit.evaluate import perplexity, top1_accuracy
from edgekit.models import dinov2
from edgekit.models import load as load_model
from edgekit.models.fmnist import MEAN, STD

RESULTS = Path(__file__).parent / "results" / "zoo.json"


@torch.no_grad()
def smollm2(tokens: int) -> dict:
    bundle = load_model("zoo:smollm2-135m")
    ids = token_stream(bundle.tokenizer, "eval", tokens, separator_id=bundle.meta.get("document_separator_id"))
    ppl = perplexity(lambda x: bundle.module(torch.from_numpy(x)).numpy(), ids, 256, 128)
    return {"metric": "wikipedia eval perplexity", "value": ppl, "tokens": int(len(ids)), "window": 256, "stride": 128}


@torch.no_grad()
def mobilenetv2() -> dict:
    bundle = load_model("zoo:mobilenetv2")
    items = data.items("photos", "eval")
    hits = {
        item.name: is_correct(bundle.module(**bundle.preprocess(item.raw))[0].numpy(), item.target) for item in items
    }
    return {"metric": "top-1 on labelled photos", "value": float(np.mean(list(hits.values()))), "per_photo": hits}


@torch.no_grad()
def dinov2_s14() -> dict:
    bundle = load_model("zoo:dinov2-s14")
    model = onnx.load(str(dinov2.onnx_path()))
    node = next(n for n in model.graph.node if n.name == dinov2.BACKBONE_OUTPUT_NODE)
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    errors = []
    for item in data.items("photos", "eval") + data.items("photos", "calib", 4):
        pixels = bundle.preprocess(item.raw)["pixel_values"]
        (reference,) = session.run([node.output[0]], {"input_image": pixels.numpy()})
        errors.append(float(np.abs(bundle.module(pixels).numpy() - reference).max()))
    return {"metric": "max |torch - onnxruntime| over photos", "value": max(errors), "photos": len(errors)}


@torch.no_grad()
def minilm() -> dict:
    bundle = load_model("zoo:minilm-l6")
    articles = [item.raw for item in data.items("lee", "eval")]

    def embed(text: str) -> np.ndarray:
        return bundle.module(**bundle.preprocess(text))[0].numpy()

    firsts, seconds = [], []
    for text in articles:
        words = text.split()
        firsts.append(embed(" ".join(words[: len(words) // 2])))
        seconds.append(embed(" ".join(words[len(words) // 2 :])))
    similarity = np.stack(firsts) @ np.stack(seconds).T
    hits = float(np.mean(similarity.argmax(axis=1) == np.arange(len(articles))))
    return {"metric": "Lee half-article retrieval top-1", "value": hits, "articles": len(articles)}


@torch.no_grad()
def fmnist(name: str) -> dict:
    bundle = load_model(f"zoo:{name}")
    images, labels = arrays("eval")
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    logits = torch.cat([bundle.module(x=x[i : i + 500, None]) for i in range(0, len(x), 500)]).numpy()
    return {"metric": "Fashion-MNIST test accuracy", "value": top1_accuracy(logits, labels), "images": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2-135m,mobilenetv2,dinov2-s14,minilm-l6,fmnist-cnn,fmnist-vgg")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    runs = {
        "smollm2-135m": lambda: smollm2(args.tokens),
        "mobilenetv2": mobilenetv2,
        "dinov2-s14": dinov2_s14,
        "minilm-l6": minilm,
        "fmnist-cnn": lambda: fmnist("fmnist-cnn"),
        "fmnist-vgg": lambda: fmnist("fmnist-vgg"),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.models.split(","):
        started = time.perf_counter()
        results[name] = {**runs[name](), "seconds": round(time.perf_counter() - started, 1)}
        print(f"{name:14s} {results[name]['metric']}: {results[name]['value']:.4g}", flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
