"""A tiny Qwen2-VL built from a config: the offline backbone of the toy world and of the tests.

Same architecture, processor and file layout as a real Qwen2-VL checkpoint, so it loads through the very
code that loads `Qwen/Qwen2-VL-2B-Instruct`; only its size (and, until pre-trained, its weights) differ. Its
image processor is the Pillow one (`Qwen2VLImageProcessorPil`), as the toy world's pictures were rendered for.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from twn_cli.recipes import AT_LEAST_ONE, check_ranges
from twn_cli.toyworld.pretraining_data import corpus_sentences
from twn_cli.toyworld.render import PICTURE_SIZE
from twn_cli.toyworld.vocabulary import COLOURS, EVERYDAY_WORDS, POSITIONS, SHAPES, SIDES, SIZES, THINK_END, THINK_START

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Think markers are ordinary added tokens (not special) so that decoding a CoT keeps them visible.
THINK_TOKENS = [THINK_START, THINK_END]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



def tokenizer_corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    """Sentences covering the toy world's vocabulary (every clue phrasing, query, CoT and caption form), for
    training a small byte-level BPE."""
    rng = random.Random(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    lines = [f"a {size} {colour} {shape} on the {position}" for size, colour, shape, position in itertools.product(SIZES, colours, shapes, POSITIONS)]
    for _ in range(sentences):
        words = rng.sample(EVERYDAY_WORDS, k=8) + [rng.choice(colours), rng.choice(shapes)]
        rng.shuffle(words)
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    lines += [f"{shape} has {sides} sides" for shape, sides in SIDES.items()]
    lines += [str(number) for number in range(100)]
    return lines + corpus_sentences(seed)


@dataclass(frozen=True)
class ToyBackboneSpec:
    """Sizes of the toy backbone. The defaults are the toy recipe's; tests pass smaller ones."""

    # The trained vocabulary is smaller when the corpus has fewer distinct merges.
    max_vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 3
    vision_embed_dim: int = 128
    vision_num_heads: int = 4
    patch_size: int = 14
    spatial_merge_size: int = 2
    # Pictures are resized to between min_pixels and max_pixels (keeping their aspect), so real photos of
    # different sizes give different numbers of image tokens, as on a real backbone.
    min_pixels: int = 28 * 28
    max_pixels: int = PICTURE_SIZE * PICTURE_SIZE
    max_position_embeddings: int = 4096

    def __post_init__(self):
        check_ranges(self, {item.name: AT_LEAST_ONE for item in fields(self)})


def train_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE trained on the toy world's text, in a Qwen2 tokenizer with Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = tokenizer_corpus(seed=seed)
    # The chat template's own words ("system", "user", "assistant", ...) are in every prompt.
    corpus += ["system\nYou are a helpful assistant.\nuser\n" + line + "\nassistant\n" for line in corpus[:200]]
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    # As in Qwen2-VL-Instruct: a turn (and so an answer) ends with <|im_end|>, padding is <|endoftext|>.
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(THINK_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_toy_backbone(output_dir: str | Path, seed: int = 0, spec: ToyBackboneSpec = ToyBackboneSpec()) -> Path:
    """Write a randomly initialised tiny Qwen2-VL with its tokenizer and processor to `output_dir`.

    Deterministic for a seed: the same seed gives byte-identical weights.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = train_tokenizer(spec.max_vocab_size, seed)
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_attention_heads
    # M-RoPE splits each head's rotary frequencies into temporal, height and width sections.
    quarter = head_dim // 2 // 4
    mrope_section = [head_dim // 2 - 2 * quarter, quarter, quarter]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=None,
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_embed_dim,
            hidden_size=spec.hidden_size,
            num_heads=spec.vision_num_heads,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.spatial_merge_size,
            temporal_patch_size=2,
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    # Recorded in the config so that two toy backbones of different seeds or sizes have different fingerprints.
    config.twn_toy_backbone = {"seed": seed, **asdict(spec)}

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    # Frames of a video are bounded as pictures are, and resized as they are (with Pillow).
    processing = {"patch_size": spec.patch_size, "temporal_patch_size": 2, "merge_size": spec.spatial_merge_size,
                  "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    write_processor_files(
        output_dir, tokenizer, "Qwen2VLProcessor",
        {**processing, "image_processor_type": "Qwen2VLImageProcessorPil"},
        {**processing, "video_processor_type": "Qwen2VLVideoProcessor"},
    )
    return output_dir


def write_processor_files(output_dir: Path, tokenizer, processor_class: str, image: dict, video: dict) -> None:
    """A backbone folder's processor files as the hub has them: the tokenizer, preprocessor_config.json (the image
    processor), video_preprocessor_config.json and chat_template.json, each config naming `processor_class`."""
    tokenizer.save_pretrained(output_dir)
    for name, settings in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
        (output_dir / name).write_text(json.dumps({**settings, "processor_class": processor_class}, indent=2) + "\n")
    (output_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
