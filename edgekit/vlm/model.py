"""Zoo ``vlm-dinov2-smollm2``: DINOv2-S/14 over AnyRes partitions, a projector, SmolLM2-135M.

An image becomes LLaVA-Next-style partitions: the full image and a 2x2 grid of sub-images, each
resized to ``PARTITION`` px (112 px = 8x8 = 64 DINOv2 patches, so 320 visual tokens: the LLM's
prefill dominates the cost, as in LLaVA-Next). Each partition's patch features go through a
linear projector into SmolLM2's embedding space and into the chat prompt after a short text
label ("Full:", "Top left:", ...), so the language model knows which partition a token came from
even when most tokens are dropped. The encoder and the LLM's weights stay frozen; the projector
and rank-8 LoRA adapters on the LLM's attention (:mod:`edgekit.vlm.lora`, merged after training)
are trained here on 2x2 Fashion-MNIST scenes (:mod:`edgekit.vlm.scenes`), always on *all* tokens:
HiRED and the baselines are applied at inference only.

Training is three stages, all budgeted and cached: a closed-form ridge fit that maps each patch
feature to the mean embedding of its item's class name (cheap, over many scenes); the adapters
alone on scenes described in text (the four names in place of the visual tokens: cheap, short
sequences), which teaches the frozen LLM to read the labelled partitions and answer with a name;
then projector and adapters end to end on the answer loss over the visual tokens (costly on a
CPU: ~7 s per scene, backpropagating through the 30-layer LLM).

Visual-token reductions compared at one budget N = r·5·64 (:meth:`DinoSmolVLM.reduce`):
``hired`` (the method), ``random`` (the same per-partition quotas as an even split, random tokens
inside each partition) and ``pool`` (each partition average-pooled to a smaller grid).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgekit.cache import cached_entry
from edgekit.errors import EdgekitError
from edgekit.models.bundle import ModelBundle
from edgekit.progress import track
from edgekit.runtime.hired import HiredSettings, allocate
from edgekit.vlm import hired, scenes
from edgekit.vlm.lora import add_lora, load_merged, lora_state, merge_lora

CACHE_NAME = "vlm-dinov2-smollm2-v2"
PARTITION = 112  # px per partition: 8x8 patches of 14 px
GRID = (8, 8)
LAYOUT = (2, 2)  # sub-images: rows x cols
TOKENS = GRID[0] * GRID[1]
PARTITIONS = LAYOUT[0] * LAYOUT[1] + 1
LABELS = ("Full", "Top left", "Top right", "Bottom left", "Bottom right")
METHODS = ("hired", "random", "pool")
MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)
STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)


@dataclass(frozen=True)
class TrainBudget:
    """What the cached projector was trained with (part of the cache entry's identity)."""

    ridge_scenes: int = 150  # stage 1: closed-form alignment on every patch of these scenes
    ridge_lambda: float = 10.0
    text_steps: int = 200  # stage 2: adapters only, one scene described in text (4 questions) each
    steps: int = 96  # stage 3: end-to-end steps on the answer loss, one scene (4 questions) each
    # projector, stage 3. Low: the ridge fit already names 77% of held-out sub-images (mean token's
    # nearest class-name embedding); at 2e-3 AdamW scrambled it to 24% and grew the tokens' norm 7x
    learning_rate: float = 1e-4
    lora_rank: int = 8
    lora_learning_rate: float = 1e-3
    seed: int = 0


def partitions(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [5, 3, 112, 112] normalised: the full image, then the 2x2 sub-images.

    The image is first resized (bicubic, aspect ratio not kept) to the 2x2 grid's size, so the
    sub-images tile it exactly; the full image is the same picture at one partition's size.
    """
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise EdgekitError(f"expected an HxWx3 uint8 image, got {array.dtype} {list(array.shape)}")
    picture = Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
    rows, cols = LAYOUT
    grid = np.asarray(picture.resize((cols * PARTITION, rows * PARTITION), Image.Resampling.BICUBIC))
    full = np.asarray(picture.resize((PARTITION, PARTITION), Image.Resampling.BICUBIC))
    parts = [full] + [
        grid[r * PARTITION : (r + 1) * PARTITION, c * PARTITION : (c + 1) * PARTITION]
        for r in range(rows)
        for c in range(cols)
    ]
    stack = (np.stack(parts).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(stack.transpose(0, 3, 1, 2).copy())


def item_patches(image: np.ndarray, brightness: float = 0.1) -> np.ndarray:
    """[5, 64] bool per partition and patch: the 14-px patch shows part of a Fashion-MNIST item
    (mean brightness at least ``brightness``) rather than the scene's black background."""
    pixels = partitions(image)[:, 0] * float(STD[0]) + float(MEAN[0])
    rows, cols = GRID
    patch = pixels.reshape(PARTITIONS, rows, PARTITION // rows, cols, PARTITION // cols).mean(dim=(2, 4))
    return (patch.reshape(PARTITIONS, -1) >= brightness).numpy()


def _pool_grid(count: int) -> tuple[int, int]:
    """The most square (h, w) with h·w ≤ count, h ≤ w, both ≤ the 8x8 grid; largest product first."""
    best = (1, 1)
    for h in range(1, GRID[0] + 1):
        for w in range(h, GRID[1] + 1):
            if h * w <= count and (h * w, -(w - h)) > (best[0] * best[1], -(best[1] - best[0])):
                best = (h, w)
    return best


@dataclass
class Encoded:
    """One image through the frozen encoder: what every reduction starts from."""

    features: torch.Tensor  # [5, 64, 384] final-layer patch features
    early: torch.Tensor  # [5, 64] CLS attention, layer 0, heads summed
    late: torch.Tensor  # [5, 64] CLS attention, late layer, heads summed
    seconds: float = 0.0


@dataclass
class Answer:
    text: str
    visual_tokens: int
    prompt_tokens: int
    ttft_s: float  # encoder + selection + projector + prefill, to the first token
    decode_s: float  # the remaining tokens
    new_tokens: int
    kv_cache_bytes: int
    kept: list[list[int]] = field(default_factory=list)
    choice: str | None = None  # the most likely of the given candidate answers (closed vocabulary)


class DinoSmolVLM(nn.Module):
    def __init__(self, encoder: hired.ClsAttentionViT, lm, tokenizer, settings: HiredSettings) -> None:
        super().__init__()
        self.encoder = encoder
        self.lm = lm  # CausalLMWithCache over SmolLM2
        self.tokenizer = tokenizer
        self.settings = settings
        dim = int(lm.config.hidden_size)
        self.projector = nn.Linear(int(encoder.vit.config.hidden_size), dim)
        self.eos_ids = {int(tokenizer.convert_tokens_to_ids("<|im_end|>")), int(tokenizer.eos_token_id)}
        self._text: dict[str, torch.Tensor] = {}

    # -- encoding and reductions -----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: np.ndarray) -> Encoded:
        start = time.perf_counter()
        features, early, late = self.encoder(partitions(image))
        return Encoded(features, early, late, time.perf_counter() - start)

    def quotas(self, method: str, ratio: float) -> list[int]:
        """Tokens per partition for ``method`` at ratio ``r`` (HiRED's depend on the image)."""
        if method == "pool":
            even = allocate(np.ones(PARTITIONS - 1), TOKENS, HiredSettings(ratio=ratio, alpha=1 / PARTITIONS))
            return [h * w for h, w in (_pool_grid(int(c)) for c in even)]
        return [int(c) for c in allocate(np.ones(PARTITIONS - 1), TOKENS, HiredSettings(ratio, 1 / PARTITIONS))]

    def reduce(
        self, encoded: Encoded, method: str, ratio: float, seed: int = 0
    ) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Per-partition visual features after dropping to budget ``ratio``, and what was kept.

        ``hired``: :func:`edgekit.vlm.hired.select` with this model's settings at ``ratio``.
        ``random``: an even split of the same N, random patches in each partition (seeded).
        ``pool``: each partition average-pooled to the most square grid within its even share
        (N is not always reachable: 6.4 tokens a partition at 10% becomes a 2x3 grid).
        """
        if method not in METHODS:
            raise EdgekitError(f"unknown token reduction '{method}' (known: {', '.join(METHODS)})")
        features = encoded.features
        if ratio >= 1.0:
            return list(features), [list(range(TOKENS))] * PARTITIONS
        if method == "hired":
            settings = HiredSettings(ratio, self.settings.alpha, self.settings.early_layer, self.settings.late_layer)
            kept = hired.select(encoded.early[0], encoded.late, GRID, LAYOUT, settings)
            return [features[i, k] for i, k in enumerate(kept)], [k.tolist() for k in kept]
        if method == "random":
            generator = torch.Generator().manual_seed(seed)
            kept = [
                torch.sort(torch.randperm(TOKENS, generator=generator)[:q]).values for q in self.quotas(method, ratio)
            ]
            return [features[i, k] for i, k in enumerate(kept)], [k.tolist() for k in kept]
        parts = []
        for index, count in enumerate(self.quotas("pool", ratio)):
            h, w = _pool_grid(count)
            grid = features[index].T.reshape(1, -1, *GRID)
            parts.append(F.adaptive_avg_pool2d(grid, (h, w)).reshape(features.shape[-1], -1).T)
        return parts, [[] for _ in range(PARTITIONS)]

    # -- prompts ---------------------------------------------------------------------------------
    def _ids(self, text: str) -> torch.Tensor:
        if text not in self._text:
            self._text[text] = torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        return self._text[text]

    def prompt_pieces(self, question: str) -> list[str]:
        """The text around the six visual segments: [before full, before TL, ..., after BR]."""
        first = f"<|im_start|>user\n{LABELS[0]}:"
        middle = [f"\n{label}:" for label in LABELS[1:]]
        last = f"\n{question}<|im_end|>\n<|im_start|>assistant\n"
        return [first, *middle, last]

    def prompt_embeds(self, visual: list[torch.Tensor], question: str) -> tuple[torch.Tensor, int]:
        """[1, S, 576] chat prompt with the projected visual tokens spliced in; and S."""
        return self._splice([self.projector(part) for part in visual], question)

    def text_prompt_embeds(self, labels: tuple[int, ...], question: str) -> tuple[torch.Tensor, int]:
        """The same prompt with each partition described in words: every name for the full image,
        the item's name for each sub-image (training stage 2's input)."""
        names = [scenes.NAMES[label] for label in labels]
        words = [" ".join(names), *names]
        return self._splice([self.lm.embed_tokens(self._ids(" " + text)) for text in words], question)

    def _splice(self, segments: list[torch.Tensor], question: str) -> tuple[torch.Tensor, int]:
        embed = self.lm.embed_tokens
        pieces = self.prompt_pieces(question)
        chunks: list[torch.Tensor] = []
        for index, segment in enumerate(segments):
            chunks.append(embed(self._ids(pieces[index])))
            chunks.append(segment)
        chunks.append(embed(self._ids(pieces[-1])))
        sequence = torch.cat(chunks, dim=0)[None]
        return sequence, int(sequence.shape[1])

    # -- generation ------------------------------------------------------------------------------
    def _prefill(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """CausalLMWithCache.prefill from embeddings: last-position logits and the KV cache."""
        hidden, cache = self.lm.prefill_hidden(hidden)
        return self.lm._head(hidden[:, -1:]), cache

    @torch.no_grad()
    def answer(
        self,
        image: np.ndarray | Encoded,
        question: str,
        method: str = "hired",
        ratio: float = 1.0,
        max_new_tokens: int = 8,
        stop_at_eos: bool = True,
        seed: int = 0,
        candidates: tuple[str, ...] | None = None,
    ) -> Answer:
        """Greedy answer; times the first token (encoder included) and the decode steps apart."""
        if not 0.0 < ratio <= 1.0:
            raise EdgekitError(f"the kept share of visual tokens must be in (0, 1], got {ratio}")
        start = time.perf_counter()
        encoded = image if isinstance(image, Encoded) else self.encode(image)
        encode_s = encoded.seconds if isinstance(image, Encoded) else 0.0
        visual, kept = self.reduce(encoded, method, ratio, seed)
        embeds, length = self.prompt_embeds(visual, question)
        logits, cache = self._prefill(embeds)
        token = int(logits[0, -1].argmax())
        ttft = time.perf_counter() - start + encode_s
        choice = self._choose(logits, cache, candidates) if candidates else None
        tokens = [token]
        decode_start = time.perf_counter()
        while len(tokens) < max_new_tokens and not (stop_at_eos and token in self.eos_ids):
            out = self.lm.decode(torch.tensor([[token]]), *cache)
            logits, cache = out[0], list(out[1:])
            token = int(logits[0, -1].argmax())
            tokens.append(token)
        decode_s = time.perf_counter() - decode_start
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)
        kv = sum(t.numel() * t.element_size() for t in cache)
        visual_count = sum(int(v.shape[0]) for v in visual)
        return Answer(text.strip(), visual_count, length, ttft, decode_s, len(tokens) - 1, kv, kept, choice)

    @torch.no_grad()
    def choose(self, visual: list[torch.Tensor], question: str, candidates: tuple[str, ...]) -> str:
        """The likeliest of ``candidates`` as the answer, given per-partition visual features
        (what the benches compare token reductions by: no generation, no timing)."""
        embeds, _ = self.prompt_embeds(visual, question)
        return self._choose(*self._prefill(embeds), candidates)

    def _choose(self, logits: torch.Tensor, cache: list[torch.Tensor], candidates: tuple[str, ...]) -> str:
        """The candidate whose tokens (and <|im_end|>) are most likely after the prompt.

        One batched decode over all candidates from the prefill's cache; right padding is never
        attended by the real tokens before it, and padded positions are not scored.
        """
        sequences = [self._ids(text + "<|im_end|>") for text in candidates]
        width = max(len(ids) for ids in sequences)
        batch = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, ids in enumerate(sequences):
            batch[row, : len(ids)] = ids
        past = [t.expand(len(sequences), *t.shape[1:]) for t in cache]
        step_logits = self.lm.decode(batch[:, :-1], *past)[0] if width > 1 else None
        first = torch.log_softmax(logits[0, -1].float(), -1)
        scores = []
        for row, ids in enumerate(sequences):
            score = float(first[ids[0]])
            if len(ids) > 1:
                rest = torch.log_softmax(step_logits[row, : len(ids) - 1].float(), -1)
                score += float(rest.gather(1, ids[1:, None]).sum())
            scores.append(score)
        return candidates[int(np.argmax(scores))]

    # -- training --------------------------------------------------------------------------------
    def training_loss(self, embeds: torch.Tensor, answers: list[tuple[str, str]]) -> torch.Tensor:
        """Cross-entropy of the answers (each with <|im_end|>) after the prompt ``embeds``.

        ``answers`` is a conversation [(question, answer), ...] about one image whose first
        question is the prompt's: one costly pass over the 320 visual tokens supervises every
        turn. The first turn is exactly the evaluation prompt.
        """
        ids: list[int] = []
        supervised: list[bool] = []
        for turn, (_, answer) in enumerate(answers):
            if turn:
                follow = f"\n<|im_start|>user\n{answers[turn][0]}<|im_end|>\n<|im_start|>assistant\n"
                piece = self._ids(follow).tolist()
                ids += piece
                supervised += [False] * len(piece)
            piece = self._ids(answer + "<|im_end|>").tolist()
            ids += piece
            supervised += [True] * len(piece)
        target = torch.tensor(ids)
        hidden = torch.cat([embeds, self.lm.embed_tokens(target[:-1])[None]], dim=1)
        out = self.lm.hf_model(inputs_embeds=hidden, logits_to_keep=len(ids))
        mask = torch.tensor(supervised)
        return F.cross_entropy(out.logits[0].float()[mask], target[mask])


def _encode_scenes(model: DinoSmolVLM, split: str, count: int, description: str) -> list[Encoded]:
    return [model.encode(s.image) for s in track(scenes.scenes(split, count), description)]


def train_vlm(model: DinoSmolVLM, plan: TrainBudget) -> dict:
    """Stage 1 (ridge), 2 (adapters on text), 3 (projector and adapters end to end); a record of it."""
    torch.manual_seed(plan.seed)
    started = time.perf_counter()
    # stage 1: every patch of a partition -> mean embedding of the class name of its item
    train = scenes.scenes("calib", plan.ridge_scenes)
    embed = model.lm.embed_tokens.weight.detach()
    names = torch.stack([embed[model._ids(name)].mean(0) for name in scenes.NAMES])
    regions = torch.from_numpy(hired.region_index(GRID, LAYOUT))  # full-image patch -> corner
    xtx = torch.zeros(385, 385, dtype=torch.float64)
    xty = torch.zeros(385, names.shape[1], dtype=torch.float64)
    for item in track(train, "VLM stage 1: ridge fit of the projector"):
        encoded = model.encode(item.image)
        labels = torch.tensor(item.labels)
        target = torch.cat([names[labels[regions]], names[labels].repeat_interleave(TOKENS, 0)])
        x = torch.cat([encoded.features.reshape(-1, 384), torch.ones(PARTITIONS * TOKENS, 1)], 1).double()
        xtx += x.T @ x
        xty += x.T @ target.double()
    ridge = torch.eye(385, dtype=torch.float64) * plan.ridge_lambda
    ridge[-1, -1] = 0.0
    solution = torch.linalg.solve(xtx + ridge, xty).float()
    with torch.no_grad():
        model.projector.weight.copy_(solution[:-1].T)
        model.projector.bias.copy_(solution[-1])
    stage1_s = time.perf_counter() - started
    # stages 2 and 3: the answer loss; everything frozen but the adapters (and, in 3, the projector)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapters = add_lora(model.lm.hf_model, plan.lora_rank)
    record = {"budget": asdict(plan), "stage1_seconds": round(stage1_s, 1)}
    text_loss = _answer_steps(
        model,
        [{"params": adapters, "lr": plan.lora_learning_rate}],
        plan.text_steps,
        lambda item: model.text_prompt_embeds(item.labels, item.question)[0],
        plan.ridge_scenes,
        "VLM stage 2: LoRA on scenes in text",
    )
    record["stage2_seconds"] = round(time.perf_counter() - started - stage1_s, 1)
    model.projector.requires_grad_(True)
    groups = [
        {"params": list(model.projector.parameters()), "lr": plan.learning_rate},
        {"params": adapters, "lr": plan.lora_learning_rate},
    ]
    visual_loss = _answer_steps(
        model,
        groups,
        plan.steps,
        lambda item: model.prompt_embeds(list(model.encode(item.image).features), item.question)[0],
        plan.ridge_scenes + plan.text_steps,
        "VLM stage 3: projector + LoRA on the visual tokens",
    )
    model.requires_grad_(False)
    record["stage3_seconds"] = round(time.perf_counter() - started - stage1_s - record["stage2_seconds"], 1)
    for name, losses in (("stage2", text_loss), ("stage3", visual_loss)):
        record[f"{name}_loss_first_20"] = float(np.mean(losses[:20])) if losses else None
        record[f"{name}_loss_last_20"] = float(np.mean(losses[-20:])) if losses else None
    return record


def _answer_steps(
    model: DinoSmolVLM, groups: list[dict], steps: int, prompt: Callable, first_scene: int, title: str
) -> list[float]:
    """``steps`` AdamW steps (one-cycle schedule) on the four-question conversation about one
    training scene each, scenes from ``first_scene`` on; ``prompt(scene)`` builds its embeddings."""
    optimiser = torch.optim.AdamW(groups, weight_decay=0.0)
    peaks = [group["lr"] for group in groups]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, peaks, total_steps=max(1, steps))
    losses = []
    for step in track(range(steps), title):
        item = scenes.scene("calib", first_scene + step)
        order = [item.corner] + [c for c in torch.randperm(4).tolist() if c != item.corner]
        turns = [(f"What is in the {scenes.CORNERS[c]}?", scenes.NAMES[item.labels[c]]) for c in order]
        loss = model.training_loss(prompt(item), turns)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def load_model(plan: TrainBudget = TrainBudget(), settings: HiredSettings = HiredSettings()) -> DinoSmolVLM:
    """The VLM with its cached projector, training it (progress bars) on first use."""
    from safetensors.torch import load_file, save_file

    from edgekit.models import dinov2, smollm2
    from edgekit.models.llama import CausalLMWithCache

    vit, _ = dinov2.load_model(PARTITION)
    hf_model, tokenizer, _ = smollm2.load_hf()
    model = DinoSmolVLM(hired.ClsAttentionViT(vit, settings), CausalLMWithCache(hf_model), tokenizer, settings)
    model.eval()
    key = f"{CACHE_NAME}-{_plan_key(plan)}"

    def build(target: Path) -> None:
        record = train_vlm(model, plan)
        save_file(
            {k: v.contiguous() for k, v in model.projector.state_dict().items()}, str(target / "projector.safetensors")
        )
        save_file(lora_state(model.lm.hf_model), str(target / "lora.safetensors"))
        (target / "training.json").write_text(json.dumps(record, indent=1))

    entry = cached_entry(key, build, meta=asdict(plan))
    model.projector.load_state_dict(load_file(str(entry / "projector.safetensors")))
    if lora_state(model.lm.hf_model):  # trained just now: the adapters are in place
        merge_lora(model.lm.hf_model)
    else:
        load_merged(model.lm.hf_model, load_file(str(entry / "lora.safetensors")), plan.lora_rank)
    model.training_record = json.loads((entry / "training.json").read_text())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def _plan_key(plan: TrainBudget) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(asdict(plan), sort_keys=True).encode()).hexdigest()[:10]


class VisualTokens(nn.Module):
    """The zoo bundle's module: partitions [5, 3, 112, 112] -> projected visual tokens [320, 576]."""

    def __init__(self, model: DinoSmolVLM) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.projector = model.projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.encoder(pixel_values)[0]
        return self.projector(features.reshape(-1, features.shape[-1]))


def load() -> ModelBundle:
    """Zoo ``vlm-dinov2-smollm2``: the bundle holds the encoder+projector; ``meta["vlm"]`` the VLM."""
    model = load_model()
    example = partitions(scenes.scene("eval", 0).image)
    return ModelBundle(
        spec="zoo:vlm-dinov2-smollm2",
        module=VisualTokens(model).eval(),
        example_inputs={"pixel_values": example},
        task="generic",
        output_names=["visual_tokens"],
        tokenizer=model.tokenizer,
        dataset="fashion-mnist",
        source_hash=_plan_key(TrainBudget()),
        description="DINOv2-S/14 over AnyRes (full + 2x2 at 112 px) -> projector -> SmolLM2-135M-Instruct",
        meta={
            "vlm": model,
            "partitions": PARTITIONS,
            "tokens_per_partition": TOKENS,
            "partition_px": PARTITION,
            "projector_training": json.dumps(model.training_record["budget"]),
        },
    )


def load_image(source: str) -> np.ndarray:
    """An image for ``edgekit run``: ``photo:NAME``, ``scene:N`` (an eval scene) or a file path."""
    if source.startswith("photo:"):
        from edgekit.data.photos import photo

        return photo(source.removeprefix("photo:"))
    if source.startswith("scene:"):
        index = source.removeprefix("scene:")
        if not index.isdigit():
            raise EdgekitError(f"scene:N needs a number, got '{source}'")
        return scenes.scene("eval", int(index)).image
    path = Path(source)
    if not path.is_file():
        raise EdgekitError(f"no such image file: {source}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError) as error:
        raise EdgekitError(f"{source} is not a readable image ({error})") from None


def accuracy(model: DinoSmolVLM, count: int, method: str, ratio: float) -> float:
    """Share of ``count`` eval scenes answered exactly (greedy)."""
    right = 0
    for item in scenes.scenes("eval", count):
        right += model.answer(item.image, item.question, method, ratio).text == item.answer
    return right / count
