"""Pre-training the toy backbone on the toy world, so that it is a small but genuine MLLM before TWN freezes it.

Two phases, as a real MLLM starts from a pre-trained vision encoder. First the vision tower alone learns to
name the shape, colour, size and position of one-shape pictures through a throw-away linear head on its
max-pooled tokens. Captioning alone reaches the tower through a language model whose attention starts out
uniform, which averages the object's tokens into the background's, and the tower then learns shapes very
slowly (BENCHMARKS.md). Position must be in the tower's features too: the language model cannot tell image
tokens apart by place, since M-RoPE gives height and width the lowest rotary frequencies of the toy's small
heads (at most 0.01 and 0.001 radians per row and column), which hardly turn over a 3x3 grid. Then the
language model (and the tower too, if `vision_learning_rate` > 0) trains on a stream of captioning, scene
questions, world knowledge as text (every fact and every clue phrasing, held-out ones included: the
knowledge the reasoning adapter must later write out) and thinking answers between think markers (so that
it can write every word of a CoT: `cot_tokens_unwritable` in the report lists those it cannot). Every step
renders fresh pictures: a tiny vision tower memorises fixed renders but generalises from fresh ones. The
report measures what the backbone learned on pictures it never saw: caption loss before and after, and how
often its greedy caption of a one-shape picture names the right shape, colour and position; and what it
knows as text: how often its greedy explanation of a reference by one or two clues is exactly right.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from twn_cli.engine.backbone import load_backbone
from twn_cli.recipes import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, Range, check_ranges
from twn_cli.toyworld.pretraining_data import PretrainingExample, explanation_examples, pretraining_examples
from twn_cli.toyworld.render import PICTURE_SIZE, Scene, SceneObject, render_scene
from twn_cli.toyworld.vocabulary import COLOURS, POSITIONS, SHAPES, SIZES, THINK_END
from twn_cli.toyworld.world import POSITION_PHRASES, describe_scene, generate_world
from twn_cli.training import warmup_cosine

CAPTION_PROMPT = "describe the picture."


@dataclass(frozen=True)
class PretrainSettings:
    """Knobs of toy-backbone pre-training; the defaults are recipes/toy/pretrain.yaml's."""

    vision_warmup_steps: int = 900
    vision_warmup_batch_size: int = 64
    steps: int = 1100
    batch_size: int = 32
    learning_rate: float = 2e-3
    vision_warmup_learning_rate: float = 2e-3
    # The vision tower's rate while captioning; 0 keeps the warmed-up tower frozen (and its steps cheaper),
    # which named shapes and colours better than training it on (BENCHMARKS.md).
    vision_learning_rate: float = 0.0
    warmup_steps: int = 40
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    image_size: int = PICTURE_SIZE
    eval_pictures: int = 120
    eval_explanations: int = 60
    seed: int = 0

    def __post_init__(self):
        check_ranges(self, {
            "vision_warmup_steps": NOT_NEGATIVE, "vision_warmup_batch_size": AT_LEAST_ONE, "steps": NOT_NEGATIVE,
            "batch_size": AT_LEAST_ONE, "learning_rate": POSITIVE, "vision_warmup_learning_rate": POSITIVE,
            "vision_learning_rate": NOT_NEGATIVE, "warmup_steps": NOT_NEGATIVE, "weight_decay": NOT_NEGATIVE,
            "max_grad_norm": POSITIVE, "image_size": Range(28), "eval_pictures": AT_LEAST_ONE, "eval_explanations": AT_LEAST_ONE,
        })


@dataclass
class PretrainReport:
    vision_warmup_steps: int
    vision_warmup_shape_accuracy: float
    steps: int
    seconds: float
    final_train_loss: float
    caption_loss_before: float
    caption_loss_after: float
    shape_accuracy_before: float
    shape_accuracy_after: float
    colour_accuracy_before: float
    colour_accuracy_after: float
    position_accuracy_before: float
    position_accuracy_after: float
    explanation_accuracy_before: dict[str, float]
    explanation_accuracy_after: dict[str, float]
    # Tokens of the world's teacher CoTs (and the end marker) for which no final hidden state was found that
    # makes them likelier than one half: a reasoning adapter on the frozen backbone cannot write them surely.
    cot_tokens: int
    cot_tokens_unwritable: list[str]
    shape_chance: float
    colour_chance: float
    position_chance: float


class ExampleBatcher:
    """Chat-formatted, tokenised batches with labels on the answer tokens only."""

    def __init__(self, processor, image_size: int, rng: random.Random):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_size = image_size
        self.rng = rng
        self.end_of_turn = self.tokenizer.eos_token

    def prompt(self, example: PretrainingExample) -> str:
        content = ([{"type": "image"}] if example.scene is not None else []) + [{"type": "text", "text": example.prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def images(self, examples: list[PretrainingExample]) -> list:
        return [render_scene(e.scene, self.image_size, random.Random(self.rng.getrandbits(32))) for e in examples if e.scene is not None]

    def __call__(self, examples: list[PretrainingExample]) -> dict:
        texts = [self.prompt(e) + e.answer + self.end_of_turn for e in examples]
        self.tokenizer.padding_side = "right"
        encoded = self.processor(text=texts, images=self.images(examples) or None, padding=True, return_tensors="pt")
        labels = torch.full_like(encoded["input_ids"], -100)
        lengths = encoded["attention_mask"].sum(1).tolist()
        for row, (example, length) in enumerate(zip(examples, lengths)):
            answer = self.tokenizer.encode(example.answer + self.end_of_turn, add_special_tokens=False)
            start = length - len(answer)
            if encoded["input_ids"][row, start:length].tolist() != answer:
                raise ValueError(f"answer {example.answer!r} does not tokenise the same inside its prompt")
            labels[row, start:length] = torch.tensor(answer)
        encoded["labels"] = labels
        return dict(encoded)

    def greedy_answers(self, model, examples: list[PretrainingExample], max_new_tokens: int) -> list[str]:
        """What `model` answers to each example's prompt, decoded greedily (pictures rendered freshly)."""
        self.tokenizer.padding_side = "left"
        prompts = self.processor(
            text=[self.prompt(e) for e in examples], images=self.images(examples) or None, padding=True, return_tensors="pt"
        )
        generated = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.batch_decode(generated[:, prompts["input_ids"].shape[1] :], skip_special_tokens=True)


def one_shape_scenes(count: int, rng: random.Random) -> list[Scene]:
    """One-shape scenes over every shape, colour, size and position."""
    return [
        Scene((SceneObject(rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.choice(SIZES), rng.choice(POSITIONS)),))
        for _ in range(count)
    ]


def evaluation_pictures(count: int, seed: int) -> list[Scene]:
    """One-shape scenes for measuring what the backbone sees."""
    return one_shape_scenes(count, random.Random(f"toyworld/{seed}/pretraining-eval"))


class VisionWarmup:
    """The vision tower with a linear head naming shape, colour, size and position from its max-pooled merged tokens.

    Max pooling lets the tokens that cover the object carry the answer; a mean over all tokens dilutes
    them into the background, and the tower then learns shapes barely faster than under captioning.
    """

    ATTRIBUTES = (list(SHAPES), list(COLOURS), list(SIZES), list(POSITIONS))

    def __init__(self, model, image_processor, image_size: int):
        self.visual = model.model.visual
        self.image_processor = image_processor
        self.image_size = image_size
        self.head = torch.nn.Linear(model.config.vision_config.hidden_size, sum(len(names) for names in self.ATTRIBUTES))

    def logits(self, scenes: list[Scene], rng: random.Random) -> list[torch.Tensor]:
        pictures = [render_scene(scene, self.image_size, random.Random(rng.getrandbits(32))) for scene in scenes]
        encoded = self.image_processor(images=pictures, return_tensors="pt")
        tokens = self.visual(encoded["pixel_values"], grid_thw=encoded["image_grid_thw"]).pooler_output
        pooled = tokens.view(len(scenes), -1, tokens.shape[-1]).amax(1)
        return self.head(pooled).split([len(names) for names in self.ATTRIBUTES], dim=-1)

    @staticmethod
    def targets(scenes: list[Scene]) -> list[torch.Tensor]:
        objects = [scene.objects[0] for scene in scenes]
        shape, colour, size, position = VisionWarmup.ATTRIBUTES
        return [
            torch.tensor([shape.index(o.shape) for o in objects]),
            torch.tensor([colour.index(o.colour) for o in objects]),
            torch.tensor([size.index(o.size) for o in objects]),
            torch.tensor([position.index(o.position) for o in objects]),
        ]

    def loss(self, scenes: list[Scene], rng: random.Random) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(logits, target) for logits, target in zip(self.logits(scenes, rng), self.targets(scenes)))

    @torch.no_grad()
    def shape_accuracy(self, scenes: list[Scene], rng: random.Random) -> float:
        return (self.logits(scenes, rng)[0].argmax(-1) == self.targets(scenes)[0]).float().mean().item()


def warm_up_vision(model, processor, settings: PretrainSettings, on_step: Callable[[int, float], None]) -> float:
    """Train the vision tower alone on naming one-shape pictures; returns its shape accuracy on fresh ones."""
    rng = random.Random(f"{settings.seed}/vision-warmup")
    warmup = VisionWarmup(model, processor.image_processor, settings.image_size)
    parameters = [*warmup.visual.parameters(), *warmup.head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.vision_warmup_learning_rate, weight_decay=settings.weight_decay)
    # No decay: captioning goes on from where the warm-up stops.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup_steps))
    for step in range(1, settings.vision_warmup_steps + 1):
        loss = warmup.loss(one_shape_scenes(settings.vision_warmup_batch_size, rng), rng)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vision warm-up loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        on_step(step, loss.item())
    return warmup.shape_accuracy(one_shape_scenes(settings.eval_pictures, rng), rng)


@torch.no_grad()
def measure(model, batcher: ExampleBatcher, scenes: list[Scene], batch_size: int) -> dict[str, float]:
    """Caption loss and how often greedy captions name the shape, colour and position, on `scenes` rendered freshly."""
    model.eval()
    losses, shapes_right, colours_right, positions_right = [], 0, 0, 0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start : start + batch_size]
        examples = [PretrainingExample(scene, CAPTION_PROMPT, describe_scene(scene)) for scene in chunk]
        batch = batcher(examples)
        losses.append(model(**batch).loss.item() * len(chunk))
        for scene, caption in zip(chunk, batcher.greedy_answers(model, examples, max_new_tokens=12)):
            words = caption.split()
            shapes_right += scene.objects[0].shape in words
            colours_right += scene.objects[0].colour in words
            positions_right += POSITION_PHRASES[scene.objects[0].position] in caption
    model.train()
    return {
        "caption_loss": sum(losses) / len(scenes),
        "shape_accuracy": shapes_right / len(scenes),
        "colour_accuracy": colours_right / len(scenes),
        "position_accuracy": positions_right / len(scenes),
    }


@torch.no_grad()
def explanation_accuracy(model, batcher: ExampleBatcher, examples: list[PretrainingExample], batch_size: int) -> dict[str, float]:
    """Share of "explain:" prompts whose greedy answer is exactly the explanation (the knowledge a CoT writes
    out), for references by one clue and by two."""
    model.eval()
    right: dict[str, list[bool]] = {"one_clue": [], "two_clues": []}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        for answer, example in zip(batcher.greedy_answers(model, chunk, max_new_tokens=48), chunk):
            right["two_clues" if "; " in example.answer else "one_clue"].append(answer.strip() == example.answer)
    model.train()
    return {kind: sum(values) / len(values) for kind, values in right.items() if values}


def unwritable_tokens(model, tokenizer, token_ids: list[int], threshold: float = 0.5, steps: int = 300) -> list[str]:
    """The tokens of `token_ids` for which gradient ascent finds no final hidden state that makes them likelier
    than `threshold`. The last RMSNorm bounds that state (its weight times a vector of norm at most √d), so
    a token whose output embedding lies among the others' (one never trained as a target, with tied
    embeddings) stays improbable however the layers below are adapted. The search runs over directions only:
    above one half a token's probability grows with the state's norm, so `threshold` must be at least that."""
    if threshold < 0.5:
        raise ValueError("threshold must be at least 0.5: below it the best hidden state need not have the largest norm")
    weights = model.get_output_embeddings().weight.detach().float()
    scale = model.get_decoder().norm.weight.detach().float() * weights.shape[1] ** 0.5
    targets = torch.tensor(token_ids, device=weights.device)
    with torch.enable_grad():
        directions = weights[targets].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([directions], lr=0.05)
        for _ in range(steps):
            hidden = scale * F.normalize(directions, dim=-1)
            loss = F.cross_entropy(hidden @ weights.T, targets, reduction="sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        hidden = scale * F.normalize(directions.detach(), dim=-1)
    best = (hidden @ weights.T).softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return [tokenizer.decode([token]) for token, probability in zip(token_ids, best.tolist()) if probability < threshold]


def cot_token_ids(tokenizer, world_seed: int) -> list[int]:
    """Every token of a small world's teacher CoTs, and the end marker (the start marker is fed, never written)."""
    world = generate_world(n=400, seed=world_seed)
    texts = [record.cot for split in world.splits.values() for record in split.records] + [THINK_END]
    return sorted({token for text in texts for token in tokenizer.encode(text, add_special_tokens=False)})


def pretrain_toy_backbone(
    backbone_dir: str | Path,
    settings: PretrainSettings = PretrainSettings(),
    world_seed: int = 0,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> PretrainReport:
    """Pre-train the toy backbone in `backbone_dir` and save it back there.

    `on_step` sees the vision warm-up's steps, then the captioning steps numbered on from them.
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    backbone = load_backbone(str(backbone_dir), device="cpu")
    model, processor = backbone.model, backbone.processor
    batcher = ExampleBatcher(processor, settings.image_size, random.Random(settings.seed))
    held_out_scenes = evaluation_pictures(settings.eval_pictures, settings.seed)
    before = measure(model, batcher, held_out_scenes, settings.batch_size)
    explanations = explanation_examples(settings.eval_explanations, settings.seed)
    explained_before = explanation_accuracy(model, batcher, explanations, settings.batch_size)

    model.requires_grad_(True)
    model.train()
    vision_warmup_shape_accuracy = warm_up_vision(model, processor, settings, on_step)
    vision = model.model.visual
    vision_ids = {id(p) for p in vision.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in vision_ids], "lr": settings.learning_rate}]
    if settings.vision_learning_rate > 0:
        groups.append({"params": list(vision.parameters()), "lr": settings.vision_learning_rate})
    else:
        vision.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(settings.warmup_steps, settings.steps))
    stream = pretraining_examples(seed=world_seed)
    loss = torch.tensor(float("nan"))
    for step in range(1, settings.steps + 1):
        batch = batcher([next(stream) for _ in range(settings.batch_size)])
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in groups for p in group["params"]], settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        on_step(settings.vision_warmup_steps + step, loss.item())

    after = measure(model, batcher, held_out_scenes, settings.batch_size)
    explained_after = explanation_accuracy(model, batcher, explanations, settings.batch_size)
    cot_tokens = cot_token_ids(processor.tokenizer, world_seed)
    report = PretrainReport(
        vision_warmup_steps=settings.vision_warmup_steps,
        vision_warmup_shape_accuracy=vision_warmup_shape_accuracy,
        steps=settings.steps,
        seconds=time.perf_counter() - started,
        final_train_loss=loss.item(),
        caption_loss_before=before["caption_loss"],
        caption_loss_after=after["caption_loss"],
        shape_accuracy_before=before["shape_accuracy"],
        shape_accuracy_after=after["shape_accuracy"],
        colour_accuracy_before=before["colour_accuracy"],
        colour_accuracy_after=after["colour_accuracy"],
        position_accuracy_before=before["position_accuracy"],
        position_accuracy_after=after["position_accuracy"],
        explanation_accuracy_before=explained_before,
        explanation_accuracy_after=explained_after,
        cot_tokens=len(cot_tokens),
        cot_tokens_unwritable=unwritable_tokens(model, processor.tokenizer, cot_tokens),
        shape_chance=1 / len(SHAPES),
        colour_chance=1 / len(COLOURS),
        position_chance=1 / len(POSITIONS),
    )
    # Recorded in the config, so the pre-trained backbone's fingerprint differs from the random one's.
    model.config.twn_toy_backbone = {
        **model.config.twn_toy_backbone,
        "pretraining": {"settings": asdict(settings), "world_seed": world_seed, "report": asdict(report)},
    }
    model.requires_grad_(False)
    model.eval()
    model.save_pretrained(backbone_dir)
    return report

