"""The TWN model: one frozen backbone, a reasoning and an embedding LoRA adapter, learnable queries, a gate.

For a batch of inputs (METHOD section 2):
1. shared prefill of the prompts with the reasoning adapter -> KV cache and last prompt state;
2. the gate reads the detached last prompt state -> p_think;
3. rows that think continue decoding from that cache with the reasoning adapter (CoT between markers);
4. K learnable query embeddings run through the embedding adapter over a *detached* copy of the cache; the
   embedding is the L2-normalised pooling of their final hidden states.
With `interface="reencode"` (the UME-R1-style ablation) step 4 instead re-encodes prompt + CoT + queries from
scratch with the embedding adapter.

Adapter switching follows peft: `set_adapter(name)` activates one adapter and makes only it trainable. A loss
must therefore be backpropagated while its adapter is active (see `teacher_forced` and `query_pass`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from twn_cli.engine.backbone import Backbone
from twn_cli.engine.gate import RoutingGate
from twn_cli.engine.kv_cache import concatenate_left_padded, detached_copy, select_rows
from twn_cli.engine.positions import PositionScheme
from twn_cli.engine.processors import process, vision_token_count
from twn_cli.engine.video import Video
from twn_cli.errors import TWNError

ADAPTERS = ("reasoning", "embedding")
ThinkMode = Literal["never", "always", "auto"]
# Inputs are embedded this many batches at a time (`TWNModel.embed_block`): room to batch inputs of like
# length together and, when the gate decides, to decode the thinking ones in full batches.
BLOCK_BATCHES = 8


@dataclass
class TWNConfig:
    """Everything that defines a TWN model beside the backbone; stored in the checkpoint's `twn.json`."""

    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # None: every linear layer of the language model (none in the vision tower).
    lora_target_modules: list[str] | None = None
    num_queries: int = 4
    pooling: Literal["mean", "last"] = "mean"
    interface: Literal["shared", "reencode"] = "shared"
    gate_hidden_size: int = 256
    gate_threshold: float = 0.5
    temperature: float = 0.02
    # None keeps the system prompt of the backbone's chat template.
    system_prompt: str | None = None
    default_instruction: str = "Represent the given input for retrieval."
    think_start: str = "<think>"
    think_end: str = "</think>"
    max_think_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.pooling not in ("mean", "last"):
            raise TWNError(f"pooling must be 'mean' or 'last', not '{self.pooling}'")
        if self.interface not in ("shared", "reencode"):
            raise TWNError(f"interface must be 'shared' or 'reencode', not '{self.interface}'")
        if self.num_queries < 1:
            raise TWNError(f"num_queries must be at least 1, not {self.num_queries}")

    @classmethod
    def from_dict(cls, values: dict) -> "TWNConfig":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TWNError(f"unknown model settings: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelInput:
    """One input: an optional task instruction, text, images, and a video (encoded by the backbone's video path)."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    instruction: str | None = None
    video: Video | None = None


@dataclass
class Sampling:
    """How CoTs are decoded: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    generator: torch.Generator | None = None
    # False: run all max_new_tokens decode steps even once every row has ended (the same CoTs), so that
    # processes sharing a sharded backbone run the same layer calls whatever their rows decode.
    stop_early: bool = True


@dataclass
class Prefix:
    """A cached prefix per row: KV cache, which cached positions are attended, and the next position."""

    cache: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor

    def select(self, rows: torch.Tensor) -> "Prefix":
        return Prefix(
            select_rows(self.cache, rows),
            self.attention_mask.index_select(0, rows),
            self.next_position.index_select(0, rows),
        )

    @staticmethod
    def concatenate(prefixes: list["Prefix"]) -> "Prefix":
        """The rows of several prefixes in one batch; shorter ones are left-padded and the padding masked
        (positions are explicit, so padding moves none)."""
        if len(prefixes) == 1:
            return prefixes[0]
        length = max(prefix.attention_mask.shape[1] for prefix in prefixes)
        masks = [F.pad(prefix.attention_mask, (length - prefix.attention_mask.shape[1], 0)) for prefix in prefixes]
        return Prefix(
            concatenate_left_padded([prefix.cache for prefix in prefixes]),
            torch.cat(masks),
            torch.cat([prefix.next_position for prefix in prefixes]),
        )


@dataclass
class Thoughts:
    """Decoded CoTs of the rows that thought: their extended prefix, token ids and text."""

    prefix: Prefix
    token_ids: list[list[int]]
    texts: list[str]
    reasoning_tokens: list[int]


@dataclass
class TeacherForced:
    """A teacher-forced prefill over prompt + CoT: SFT cross-entropy and both views of the shared cache.

    The cross-entropy is kept as a sum over labelled tokens with their count, so that a batch split into
    chunks (gradient cache, several processes) can be normalised by the whole batch's token count.
    """

    sft_loss_sum: torch.Tensor
    sft_tokens: int
    think_view: Prefix
    no_think_view: Prefix

    @property
    def sft_loss(self) -> torch.Tensor:
        """Mean cross-entropy per CoT token."""
        return self.sft_loss_sum / max(self.sft_tokens, 1)


@dataclass
class EmbedResult:
    embeddings: torch.Tensor
    think: torch.Tensor
    p_think: torch.Tensor
    cot: list[str]
    reasoning_tokens: list[int]

    def take(self, rows: list[int]) -> "EmbedResult":
        """The results of `rows`, in that order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.embeddings.device)
        return EmbedResult(
            embeddings=self.embeddings[index],
            think=self.think[index.to(self.think.device)],
            p_think=self.p_think[index.to(self.p_think.device)],
            cot=[self.cot[row] for row in rows],
            reasoning_tokens=[self.reasoning_tokens[row] for row in rows],
        )

    @classmethod
    def concatenate(cls, parts: list["EmbedResult"]) -> "EmbedResult":
        if len(parts) == 1:
            return parts[0]
        return cls(
            embeddings=torch.cat([part.embeddings for part in parts]),
            think=torch.cat([part.think for part in parts]),
            p_think=torch.cat([part.p_think for part in parts]),
            cot=[cot for part in parts for cot in part.cot],
            reasoning_tokens=[tokens for part in parts for tokens in part.reasoning_tokens],
        )


def _language_model_targets(model: nn.Module) -> str:
    """A peft regex naming every linear layer inside the language model, so the vision tower keeps none."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaf_names = sorted(
        {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, nn.Linear)}
    )
    if not leaf_names:
        raise TWNError("the backbone's language model has no linear layers to adapt")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaf_names))})"


class TWNModel(nn.Module):
    def __init__(self, backbone: Backbone, config: TWNConfig, adapter_dirs: dict | None = None):
        """Attach fresh adapters, queries and gate to `backbone`, or the adapters saved in `adapter_dirs`."""
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model

        self.backbone = backbone
        self.config = config
        # The manifest of the checkpoint this model was loaded from (None for a fresh model).
        self.manifest: dict | None = None
        self.positions = PositionScheme(backbone.model)
        self.tokenizer = backbone.tokenizer
        self.tokenizer.padding_side = "left"
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.think_start_ids = self.tokenizer.encode(config.think_start, add_special_tokens=False)
        self.think_end_ids = self.tokenizer.encode(config.think_end, add_special_tokens=False)
        eos = backbone.model.config.get_text_config(decoder=True).eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # A CoT is text: a sampled image or video placeholder would make the next prefill expect a picture.
        placeholders = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        self._never_generated = sorted(
            {getattr(backbone.model.config, name) for name in placeholders if getattr(backbone.model.config, name, None) is not None}
        )

        hidden = backbone.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if adapter_dirs is None:
                lora = LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules or _language_model_targets(backbone.model),
                )
                self.peft = get_peft_model(backbone.model, lora, adapter_name="reasoning")
                self.peft.add_adapter("embedding", lora)
            else:
                self.peft = PeftModel.from_pretrained(
                    backbone.model, adapter_dirs["reasoning"], adapter_name="reasoning", is_trainable=True
                )
                self.peft.load_adapter(adapter_dirs["embedding"], adapter_name="embedding", is_trainable=True)
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            modules = list(self.peft.modules())
            if any(isinstance(module, AuxiliaryTrainingWrapper) for module in modules):
                raise TWNError("adapters with modules_to_save or trainable tokens are not supported: only LoRA layers")
            self._lora_layers = [module for module in modules if isinstance(module, BaseTunerLayer)]
            embedding_table = backbone.model.get_input_embeddings().weight.detach().float()
            self.queries = nn.Parameter(
                embedding_table.mean(0) + embedding_table.std() * torch.randn(config.num_queries, hidden)
            )
            self.gate = RoutingGate(hidden, config.gate_hidden_size)
        self.queries.data = self.queries.data.to(backbone.device)
        self.gate.to(backbone.device)
        self.eval()

    # ----------------------------------------------------------------- parameters
    def adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        """The LoRA parameters of one adapter, found by name (peft toggles `requires_grad` on switches)."""
        marker = f".{adapter}."
        return {name: p for name, p in self.peft.named_parameters() if "lora_" in name and marker in name}

    def trainable_parameters(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter TWN trains, by part: reasoning adapter, embedding side (adapter + queries), gate."""
        return {
            "reasoning": self.adapter_parameters("reasoning"),
            "embedding": {**self.adapter_parameters("embedding"), "queries": self.queries},
            "gate": {f"gate.{name}": p for name, p in self.gate.named_parameters()},
        }

    def backbone_parameters(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.peft.named_parameters() if "lora_" not in name}

    def parameter_overhead(self) -> dict[str, float]:
        """Parameters TWN adds, per part and as a percentage of the backbone's."""
        counts = {
            "reasoning_adapter": sum(p.numel() for p in self.adapter_parameters("reasoning").values()),
            "embedding_adapter": sum(p.numel() for p in self.adapter_parameters("embedding").values()),
            "queries": self.queries.numel(),
            "gate": sum(p.numel() for p in self.gate.parameters()),
        }
        backbone = sum(p.numel() for p in self.backbone_parameters().values())
        added = sum(counts.values())
        return {**counts, "added": added, "backbone": backbone, "added_percent": 100.0 * added / backbone}

    @property
    def embedding_dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # ----------------------------------------------------------------- building blocks
    def use_adapter(self, name: str) -> None:
        """Route the LoRA layers through `name`; in training mode it becomes the trainable adapter.

        What peft's `set_adapter` does for a model whose only adapted modules are LoRA layers, without its
        walk over every module of the backbone on each call: that walk cost about 10 ms a switch on a
        28 M-parameter backbone, a fifth of a query pass, and embedding switches twice per batch.
        """
        for layer in self._lora_layers:
            layer.set_adapter(name, inference_mode=not self.training)
        self.peft.base_model.active_adapter = name

    def encode(self, inputs: list[ModelInput]) -> dict:
        """Tokenise a batch of inputs into left-padded prompts (with image and video placeholders) on the device."""
        prompts = [self._prompt(item) for item in inputs]
        images = [image for item in inputs for image in item.images]
        videos = [item.video for item in inputs if item.video is not None]
        encoded = process(self.backbone.processor, prompts, images, videos)
        encoded = {key: value.to(self.device) for key, value in encoded.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in encoded:
                encoded[key] = encoded[key].to(self.backbone.dtype)
        return encoded

    def prefill(self, encoded: dict) -> tuple[Prefix, torch.Tensor]:
        """Reasoning-adapter prefill of the prompts: their cached prefix and last prompt hidden states."""
        hidden, prefix = self._reasoning_pass(encoded)
        return prefix, hidden[:, -1]

    def _reasoning_pass(self, encoded: dict) -> tuple[torch.Tensor, Prefix]:
        """One uncached forward of left-padded token rows (with their pictures) through the reasoning adapter."""
        positions, next_position = self.positions.prompt_positions(encoded)
        self.use_adapter("reasoning")
        hidden, cache = self._forward(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            position_ids=positions,
            vision=_vision_inputs(encoded),
        )
        return hidden, Prefix(cache, encoded["attention_mask"], next_position)

    def gate_probability(self, last_prompt_state: torch.Tensor) -> torch.Tensor:
        return self.gate(last_prompt_state)

    @torch.no_grad()
    def think(self, prefix: Prefix, sampling: Sampling = Sampling()) -> Thoughts:
        """Decode a CoT for every row of `prefix` (which it extends in place), batched and bounded.

        Each CoT starts with the start marker (fed, not generated) and ends at the end marker; a row that hits
        the token budget or emits end-of-sequence gets the end marker appended, so every thinking prefix ends
        the same way. Finished rows keep decoding padding that is masked out (holes the queries never see).
        """
        self.use_adapter("reasoning")
        rows = prefix.attention_mask.shape[0]
        state = Prefix(prefix.cache, prefix.attention_mask, prefix.next_position.clone())
        every_row = torch.ones(rows, dtype=torch.bool, device=self.device)
        hidden = self._feed(state, self._token_block(self.think_start_ids, rows), every_row)
        generated: list[list[int]] = [[] for _ in range(rows)]
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        needs_end = torch.zeros_like(finished)
        budget = sampling.max_new_tokens or self.config.max_think_tokens
        end = self.think_end_ids
        for _ in range(budget):
            tokens = self._pick(self._lm_head(hidden[:, -1]), sampling)
            is_eos = torch.tensor([token in self._eos_ids for token in tokens.tolist()], device=self.device)
            for row in (~finished).nonzero().flatten().tolist():
                generated[row].append(int(tokens[row]))
            reached_end = torch.tensor([ids[-len(end):] == end for ids in generated], device=self.device)
            feeding = ~finished & ~is_eos
            needs_end |= ~finished & is_eos
            finished |= is_eos | reached_end
            hidden = self._feed(state, torch.where(feeding, tokens, self._pad_id)[:, None], feeding)
            if sampling.stop_early and bool(finished.all()):
                break
        needs_end |= ~finished
        if bool(needs_end.any()) or not sampling.stop_early:
            self._feed(state, self._token_block(end, rows), needs_end)
        texts = [self._cot_text(ids) for ids in generated]
        return Thoughts(state, generated, texts, [len(ids) for ids in generated])

    def query_pass(self, prefix: Prefix) -> torch.Tensor:
        """Embeddings of the rows of `prefix`: the queries through the embedding adapter over the detached cache."""
        rows, count = prefix.attention_mask.shape[0], self.config.num_queries
        queries = self.queries.to(self.backbone.dtype)[None].expand(rows, -1, -1)
        attention_mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(rows, count)], dim=1)
        self.use_adapter("embedding")
        hidden, _ = self._forward(
            inputs_embeds=queries,
            attention_mask=attention_mask,
            position_ids=self.positions.text_positions(prefix.next_position, count),
            cache=detached_copy(prefix.cache),
        )
        return self._pool(hidden[:, -count:])

    def teacher_forced(self, encoded: dict, cot_ids: list[list[int] | None]) -> TeacherForced:
        """One reasoning-adapter prefill over prompt + teacher CoT, as in training.

        Returns the SFT cross-entropy on the CoT and end-marker tokens (zero if no row has a CoT) and two
        views of the one cache: with the CoT (think) and with the CoT masked out (no-think). Backpropagate
        the SFT loss before switching adapters.
        """
        suffixes = [self._think_block(ids) if ids is not None else [] for ids in cot_ids]
        full = _append_tokens(encoded, suffixes, self._pad_id)
        hidden, think_view = self._reasoning_pass(full)
        suffix_lengths = torch.tensor([len(s) for s in suffixes], device=self.device)
        columns = torch.arange(full["input_ids"].shape[1], device=self.device)
        in_suffix = columns[None] >= full["input_ids"].shape[1] - suffix_lengths[:, None]
        # Labels: the CoT and end-marker tokens; the start marker is fed at inference, never generated.
        labelled = in_suffix.clone()
        for row, length in enumerate(suffix_lengths.tolist()):
            if length:
                start = full["input_ids"].shape[1] - length
                labelled[row, start : start + len(self.think_start_ids)] = False
        predictors = hidden[:, :-1][labelled[:, 1:]]
        targets = full["input_ids"][:, 1:][labelled[:, 1:]]
        sft_loss_sum = F.cross_entropy(self._lm_head(predictors).float(), targets, reduction="sum")
        no_think_view = Prefix(
            think_view.cache, full["attention_mask"] * (~in_suffix).long(), think_view.next_position - suffix_lengths
        )
        return TeacherForced(sft_loss_sum, len(targets), think_view, no_think_view)

    def cot_log_probs(self, encoded: dict, cot_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probabilities of each row's CoT + end marker under the reasoning adapter (RL's policy).

        Returns [rows, T] log-probabilities and a mask of the real tokens, right-aligned (a shorter CoT is
        padded on the left). Backpropagate before switching adapters, as for `teacher_forced`.
        """
        suffixes = [self._think_block(ids) for ids in cot_ids]
        full = _append_tokens(encoded, suffixes, self._pad_id)
        hidden, _ = self._reasoning_pass(full)
        scored = torch.tensor([len(s) - len(self.think_start_ids) for s in suffixes], device=self.device)
        width, longest = full["input_ids"].shape[1], int(scored.max())
        # Position p predicts token p + 1: the last `longest` tokens are predicted by the states just before them.
        logits = self._lm_head(hidden[:, width - longest - 1 : width - 1]).float()
        targets = full["input_ids"][:, width - longest :]
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        mask = torch.arange(longest, device=self.device)[None] >= longest - scored[:, None]
        return log_probs * mask, mask

    def cot_token_ids(self, cots: list[str]) -> list[list[int]]:
        """Token ids of CoT texts, as the reasoning adapter writes them (between the think markers)."""
        return [self.tokenizer.encode(cot, add_special_tokens=False) for cot in cots]

    @torch.no_grad()
    def embed_with_thoughts(self, inputs: list[ModelInput], cots: list[str]) -> torch.Tensor:
        """Embeddings of inputs that think the given CoTs (a teacher's, say) instead of decoding their own."""
        views = self.teacher_forced(self.encode(inputs), self.cot_token_ids(cots))
        return self.query_pass(views.think_view)

    def reencode(self, encoded: dict, thoughts: list[list[int] | None]) -> torch.Tensor:
        """The `interface=reencode` ablation: prompt + CoT + queries encoded from scratch by the embedding adapter."""
        count = self.config.num_queries
        suffixes = [(self._think_block(ids) if ids is not None else []) + [self._pad_id] * count for ids in thoughts]
        full = _append_tokens(encoded, suffixes, self._pad_id)
        positions, _ = self.positions.prompt_positions(full)
        embeds = self.backbone.model.get_input_embeddings()(full["input_ids"])
        embeds = torch.cat([embeds[:, :-count], self.queries.to(embeds.dtype)[None].expand(len(suffixes), -1, -1)], 1)
        self.use_adapter("embedding")
        hidden, _ = self._forward(
            input_ids=full["input_ids"],
            inputs_embeds=embeds,
            attention_mask=full["attention_mask"],
            position_ids=positions,
            vision=_vision_inputs(full),
            use_cache=False,
        )
        return self._pool(hidden[:, -count:])

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def think_probability(self, inputs: list[ModelInput]) -> torch.Tensor:
        """p_think of each input: the prefill and the gate only, no decoding and no query pass."""
        _, last_state = self.prefill(self.encode(inputs))
        return self.gate_probability(last_state)

    @torch.no_grad()
    def embed(
        self,
        inputs: list[ModelInput],
        think: ThinkMode = "never",
        threshold: float | None = None,
        sampling: Sampling = Sampling(),
    ) -> EmbedResult:
        """Embed a batch: prefill, gate, CoT for the rows that think, then the query pass."""
        encoded = self.encode(inputs)
        prefix, last_state = self.prefill(encoded)
        p_think = self.gate_probability(last_state)
        decision = {
            "never": torch.zeros_like(p_think, dtype=torch.bool),
            "always": torch.ones_like(p_think, dtype=torch.bool),
            "auto": p_think >= (self.config.gate_threshold if threshold is None else threshold),
        }[think]
        thinking = decision.nonzero().flatten()
        resting = (~decision).nonzero().flatten()
        cot = [""] * len(inputs)
        reasoning_tokens = [0] * len(inputs)
        thought_ids: list[list[int] | None] = [None] * len(inputs)
        embeddings = torch.empty(len(inputs), self.embedding_dim, device=self.device)
        if len(thinking):
            thoughts = self.think(prefix.select(thinking), sampling)
            for position, row in enumerate(thinking.tolist()):
                cot[row] = thoughts.texts[position]
                reasoning_tokens[row] = thoughts.reasoning_tokens[position]
                thought_ids[row] = self.strip_end_marker(thoughts.token_ids[position])
        if self.config.interface == "reencode":
            embeddings = self.reencode(encoded, thought_ids)
        else:
            if len(thinking):
                embeddings[thinking] = self.query_pass(thoughts.prefix)
            if len(resting):
                rest = prefix if len(resting) == len(inputs) else prefix.select(resting)
                embeddings[resting] = self.query_pass(rest)
        return EmbedResult(embeddings, decision, p_think, cot, reasoning_tokens)

    @staticmethod
    def block_size(batch_size: int) -> int:
        """How many inputs to hand `embed_block` at once."""
        return batch_size * BLOCK_BATCHES

    def prompt_length(self, item: ModelInput) -> int:
        """About how many tokens `item`'s prompt holds: its text and instruction, and its images' and video's placeholders.

        Counted without building the prompt or processing the pictures (`processors.vision_token_count`, from
        their sizes); the chat template's few tokens are left out.
        """
        instruction = item.instruction if item.instruction is not None else self.config.default_instruction
        length = len(self.tokenizer(f"{instruction} {item.text}", add_special_tokens=False)["input_ids"])
        return length + vision_token_count(self.backbone.processor, item.images, item.video)

    @torch.no_grad()
    def embed_block(
        self,
        inputs: list[ModelInput],
        think: ThinkMode,
        batch_size: int,
        threshold: float | None = None,
        sampling: Sampling = Sampling(),
    ) -> EmbedResult:
        """`embed` over many inputs, `batch_size` at a time, in batches of like prompt length; results in input order.

        Every row of a batch is padded to its longest prompt, and the model computes the padding too: a short
        text batched with pictures of hundreds of tokens costs what they cost. So the inputs are sorted by
        `prompt_length` before they are cut into batches.
        """
        order = sorted(range(len(inputs)), key=lambda row: self.prompt_length(inputs[row]))
        result = self._embed_in_batches([inputs[row] for row in order], think, batch_size, threshold, sampling)
        in_input_order = [0] * len(order)
        for position, row in enumerate(order):
            in_input_order[row] = position
        return result.take(in_input_order)

    def _embed_in_batches(
        self, inputs: list[ModelInput], think: ThinkMode, batch_size: int, threshold: float | None, sampling: Sampling
    ) -> EmbedResult:
        """`embed` over `inputs`, `batch_size` at a time; when the gate decides, in full decode batches.

        A decode step costs about as much for a few rows as for a whole batch, so deciding batch by batch
        makes a think rate r cost nearly what thinking always costs. So with think="auto" the inputs are
        prefilled and routed `batch_size` at a time, which also gives their no-think embeddings; the cached
        prefixes of those that think are gathered across the batches (left-padded to one length) and decoded
        as soon as `batch_size` of them are waiting. With interface=reencode they are simply embedded again,
        together.
        """
        batches = [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]
        if think != "auto":
            return EmbedResult.concatenate([self.embed(batch, think, threshold, sampling) for batch in batches])
        tau = self.config.gate_threshold if threshold is None else threshold
        if self.config.interface == "reencode":
            # Re-encoding needs no cache: the inputs that think are simply embedded again, together.
            routed = EmbedResult.concatenate([self.embed(batch) for batch in batches])
            routed.think = routed.p_think >= tau
            thinking = routed.think.nonzero().flatten().tolist()
            for start in range(0, len(thinking), batch_size):
                rows = thinking[start : start + batch_size]
                self._fill_thoughts(routed, rows, self.embed([inputs[row] for row in rows], "always", sampling=sampling))
            return routed
        parts, decoded = [], []
        waiting_rows, waiting = [], None  # the inputs that think, not yet decoded, and their prefixes as one batch
        for first, batch in zip(range(0, len(inputs), batch_size), batches):
            prefix, last_state = self.prefill(self.encode(batch))
            p_think = self.gate_probability(last_state)
            decision = p_think >= tau
            parts.append(EmbedResult(self.query_pass(prefix), decision, p_think, [""] * len(batch), [0] * len(batch)))
            thinking = decision.nonzero().flatten()
            if len(thinking):
                waiting_rows += (thinking + first).tolist()
                waiting = prefix.select(thinking) if waiting is None else Prefix.concatenate([waiting, prefix.select(thinking)])
            # Decode as soon as a batch is full, so that at most two batches of thinking prefixes are held.
            is_last = first + batch_size >= len(inputs)
            while len(waiting_rows) >= batch_size or (waiting_rows and is_last):
                count = min(batch_size, len(waiting_rows))
                thoughts = self.think(waiting.select(torch.arange(count, device=self.device)), sampling)
                embeddings = self.query_pass(thoughts.prefix)
                decoded.append((waiting_rows[:count], EmbedResult(embeddings, None, None, thoughts.texts, thoughts.reasoning_tokens)))
                waiting = waiting.select(torch.arange(count, len(waiting_rows), device=self.device)) if count < len(waiting_rows) else None
                waiting_rows = waiting_rows[count:]
        routed = EmbedResult.concatenate(parts)
        for rows, thought in decoded:
            self._fill_thoughts(routed, rows, thought)
        return routed

    @staticmethod
    def _fill_thoughts(result: EmbedResult, rows: list[int], thought: EmbedResult) -> None:
        result.embeddings[rows] = thought.embeddings
        for position, row in enumerate(rows):
            result.cot[row] = thought.cot[position]
            result.reasoning_tokens[row] = thought.reasoning_tokens[position]

    # ----------------------------------------------------------------- internals
    def _prompt(self, item: ModelInput) -> str:
        instruction = item.instruction if item.instruction is not None else self.config.default_instruction
        text = "\n".join(part for part in (instruction, item.text) if part)
        content = [{"type": "image"} for _ in item.images] + [{"type": "video"}] * (item.video is not None)
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return self.backbone.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _forward(self, *, attention_mask, position_ids, input_ids=None, inputs_embeds=None, cache=None, vision=None, use_cache=True):
        output = self.backbone.model.base_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **(vision or {}),
        )
        return output.last_hidden_state, output.cache

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.model.get_output_embeddings()(hidden)

    def _feed(self, state: Prefix, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Append `tokens` to the rows of `state`; rows not `attended` get masked slots and keep their position."""
        length = tokens.shape[1]
        slot_mask = attended.long()[:, None].expand(-1, length)
        state.attention_mask = torch.cat([state.attention_mask, slot_mask], dim=1)
        hidden, state.cache = self._forward(
            input_ids=tokens,
            attention_mask=state.attention_mask,
            position_ids=self.positions.text_positions(state.next_position, length),
            cache=state.cache,
        )
        state.next_position = state.next_position + length * attended.long()
        return hidden

    def _token_block(self, ids: list[int], rows: int) -> torch.Tensor:
        return torch.tensor(ids, device=self.device)[None].expand(rows, -1)

    def _pick(self, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        logits = logits.clone()
        logits[:, self._never_generated] = float("-inf")
        if sampling.temperature <= 0:
            return logits.argmax(-1)
        probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
            outside = sorted_probabilities.cumsum(-1) - sorted_probabilities > sampling.top_p
            sorted_probabilities[outside] = 0
            probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
        return torch.multinomial(probabilities, 1, generator=sampling.generator).squeeze(-1)

    def _pool(self, query_states: torch.Tensor) -> torch.Tensor:
        pooled = query_states.mean(1) if self.config.pooling == "mean" else query_states[:, -1]
        return F.normalize(pooled.float(), dim=-1)

    def _think_block(self, cot_ids: list[int]) -> list[int]:
        return self.think_start_ids + list(cot_ids) + self.think_end_ids

    def strip_end_marker(self, ids: list[int]) -> list[int]:
        """The CoT tokens of a decoded thought, without end marker or end-of-sequence."""
        end = self.think_end_ids
        if ids[-len(end):] == end:
            ids = ids[: -len(end)]
        return [token for token in ids if token not in self._eos_ids]

    def _cot_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.strip_end_marker(ids), skip_special_tokens=True).strip()


def _vision_inputs(encoded: dict) -> dict:
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    return {key: encoded[key] for key in keys if key in encoded}


def _append_tokens(encoded: dict, suffixes: list[list[int]], pad_id: int) -> dict:
    """`encoded` with each row's prompt followed by its own suffix tokens, left-padded again."""
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    token_types = encoded.get("mm_token_type_ids")
    lengths = mask.sum(1).tolist()
    width = max(length + len(suffix) for length, suffix in zip(lengths, suffixes))
    new_ids = ids.new_full((len(suffixes), width), pad_id)
    new_mask = mask.new_zeros((len(suffixes), width))
    new_types = token_types.new_zeros((len(suffixes), width)) if token_types is not None else None
    for row, (length, suffix) in enumerate(zip(lengths, suffixes)):
        prompt = mask[row].bool()
        start = width - length - len(suffix)
        new_ids[row, start : start + length] = ids[row, prompt]
        new_ids[row, start + length :] = torch.tensor(suffix, dtype=ids.dtype, device=ids.device)
        new_mask[row, start:] = 1
        if new_types is not None:
            new_types[row, start : start + length] = token_types[row, prompt]
    appended = {**encoded, "input_ids": new_ids, "attention_mask": new_mask}
    if new_types is not None:
        appended["mm_token_type_ids"] = new_types
    return appended
