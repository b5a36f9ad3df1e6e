"""The TWN model: one frozen backbone, a reasoning and an embedding LoRA adapter, learnable queries, a gate.

For a batch of inputs:
1. the prompt prefill, by the adapter that `config.interface` names -> KV cache and last prompt state;
2. the gate reads the detached last prompt state -> p_think;
3. rows that think decode a CoT with the reasoning adapter (`thought_embeddings`);
4. K learnable query embeddings run through the embedding adapter over the cached prefix; the embedding is
   the L2-normalised pooling of their final hidden states.
`config.py` describes the four interfaces; the passes of training are in `training_passes.py`, decoding
in `decoding.py`, batching of many inputs in `batching.py`, prompts in `prompts.py`.

Adapter switching follows peft: activating one adapter makes only it trainable. A loss must therefore be
backpropagated while its adapter is active (see `training_passes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twn_cli.engine.backbone import Backbone
from twn_cli.engine.config import ThinkMode, TWNConfig
from twn_cli.engine.decoding import Sampling, Thoughts, decode_thoughts
from twn_cli.engine.gate import RoutingGate, thinks
from twn_cli.engine.kv_cache import Prefix
from twn_cli.engine.positions import PositionScheme
from twn_cli.engine.prompts import Prompts, right_aligned
from twn_cli.errors import TWNError
from twn_cli.types import ModelInput


@dataclass
class EmbedResult:
    embeddings: torch.Tensor
    think: torch.Tensor
    p_think: torch.Tensor
    cot: list[str]
    reasoning_tokens: list[int]

    def take(self, rows: list[int]) -> EmbedResult:
        """The results of `rows`, in that order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.embeddings.device)
        return EmbedResult(
            embeddings=self.embeddings[index],
            think=self.think[index.to(self.think.device)],
            p_think=self.p_think[index.to(self.p_think.device)],
            cot=[self.cot[row] for row in rows],
            reasoning_tokens=[self.reasoning_tokens[row] for row in rows],
        )

    def fill(self, rows: list[int], embeddings: torch.Tensor, thoughts: Thoughts) -> None:
        """Give `rows` the embeddings and CoTs of their thoughts."""
        self.embeddings[rows] = embeddings
        for position, row in enumerate(rows):
            self.cot[row] = thoughts.texts[position]
            self.reasoning_tokens[row] = thoughts.reasoning_tokens[position]

    @classmethod
    def concatenate(cls, parts: list[EmbedResult]) -> EmbedResult:
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
        # The checkpoint this model was loaded from and its manifest (None for a fresh model).
        self.checkpoint_dir: Path | None = None
        self.manifest: dict | None = None
        self.positions = PositionScheme(backbone.model)
        self.prompts = Prompts(backbone, config)
        # A CoT is text: a sampled image or video placeholder would make the next prefill expect a picture.
        placeholders = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        self.never_generated = sorted(
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

    # ----------------------------------------------------------------- passes
    def use_adapter(self, name: str) -> None:
        """Route the LoRA layers through `name`; in training mode it becomes the trainable adapter.

        What peft's `set_adapter` does for a model whose only adapted modules are LoRA layers, without its
        walk over every module of the backbone on each call: that walk cost about 10 ms a switch on a
        28 M-parameter backbone, a fifth of a query pass, and embedding switches twice per batch.
        """
        for layer in self._lora_layers:
            layer.set_adapter(name, inference_mode=not self.training)
        self.peft.base_model.active_adapter = name

    def prefill(self, encoded: dict) -> tuple[Prefix, torch.Tensor]:
        """The interface's prompt prefill: the cached prefix and the last prompt hidden states (the gate's input)."""
        hidden, prefix = self.prefill_with(self.config.prefill_adapter, encoded)
        return prefix, hidden[:, -1]

    def prefill_with(self, adapter: str, encoded: dict) -> tuple[torch.Tensor, Prefix]:
        """One uncached forward of left-padded token rows (with their pictures) through `adapter`."""
        positions, next_position = self.positions.prompt_positions(encoded)
        self.use_adapter(adapter)
        hidden, cache = self._forward(
            input_ids=encoded["input_ids"],
            attention_mask=encoded["attention_mask"],
            position_ids=positions,
            vision=_vision_inputs(encoded),
        )
        return hidden, Prefix(cache, encoded["attention_mask"], next_position)

    def extend(self, prefix: Prefix, blocks: list[list[int]], adapter: str) -> tuple[torch.Tensor, Prefix]:
        """Append each row's token block to `prefix` (whose cache grows in place) through `adapter`.

        Blocks are right-aligned: a shorter one leaves masked slots before it that move no position. Returns
        the blocks' hidden states [rows, longest block] and the extended prefix.
        """
        ids, mask = right_aligned(blocks, self.prompts.pad_id, self.device)
        if ids.shape[1] == 0:
            return torch.empty(prefix.rows, 0, self.embedding_dim, device=self.device), prefix
        attention_mask = torch.cat([prefix.attention_mask, mask], dim=1)
        self.use_adapter(adapter)
        hidden, cache = self._forward(
            input_ids=ids,
            attention_mask=attention_mask,
            position_ids=self.positions.offset_positions(prefix.next_position, (mask.cumsum(-1) - 1).clamp(min=0)),
            cache=prefix.cache,
        )
        return hidden, Prefix(cache, attention_mask, prefix.next_position + mask.sum(-1))

    def feed(self, state: Prefix, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Append `tokens` to the rows of `state` with the active adapter; rows not `attended` get masked slots
        and keep their position."""
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

    def gate_probability(self, last_prompt_state: torch.Tensor) -> torch.Tensor:
        return self.gate(last_prompt_state)

    def think(self, prefix: Prefix, sampling: Sampling = Sampling()) -> Thoughts:
        """Decode a CoT for every row of `prefix` with the reasoning adapter (the prefix grows in place)."""
        return decode_thoughts(self, prefix, sampling)

    def thought_embeddings(self, prefix: Prefix, inputs: list[ModelInput], sampling: Sampling = Sampling()) -> tuple[torch.Tensor, Thoughts]:
        """Decode a CoT for each row of `prefix` (the interface's prefill of `inputs`) and embed the input with it.

        Reasoning- and embedding-prefill decode over `prefix` itself, which grows in place. cot-reencode
        decodes over a detached copy of `prefix`, reencode over the reasoning adapter's own prefill of
        `inputs`; then the embedding adapter encodes the CoT after `prefix` (in place) or a copy of it.
        """
        if not self.config.embedding_reads_cot:
            thoughts = self.think(prefix, sampling)
            return self.query_pass(thoughts.prefix), thoughts
        if self.config.interface == "cot-reencode":
            thoughts = self.think(prefix.copy(detach=True), sampling)
            embedding_prefix = prefix
        else:
            _, reasoning_prefix = self.prefill_with("reasoning", self.prompts.encode(inputs))
            thoughts = self.think(reasoning_prefix, sampling)
            embedding_prefix = prefix.copy(detach=False)
        blocks = [self.prompts.think_block(self.prompts.strip_end_marker(ids)) for ids in thoughts.token_ids]
        _, encoded_thoughts = self.extend(embedding_prefix, blocks, "embedding")
        return self.query_pass(encoded_thoughts), thoughts

    def query_pass(self, prefix: Prefix) -> torch.Tensor:
        """Embeddings of the rows of `prefix`: the queries through the embedding adapter over its cache.

        Under reasoning-prefill the cache is the reasoning adapter's, so the queries read it detached: the
        interface that keeps InfoNCE off the reasoning adapter. Otherwise the prompt part is the embedding
        adapter's own (InfoNCE trains it through this pass) and a CoT part was detached where it was made.
        """
        rows, count = prefix.rows, self.config.num_queries
        queries = self.queries.to(self.backbone.dtype)[None].expand(rows, -1, -1)
        attention_mask = torch.cat([prefix.attention_mask, prefix.attention_mask.new_ones(rows, count)], dim=1)
        own = prefix.copy(detach=self.config.interface == "reasoning-prefill")
        self.use_adapter("embedding")
        hidden, _ = self._forward(
            inputs_embeds=queries,
            attention_mask=attention_mask,
            position_ids=self.positions.text_positions(own.next_position, count),
            cache=own.cache,
        )
        return self._pool(hidden[:, -count:])

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def think_probability(self, inputs: list[ModelInput]) -> torch.Tensor:
        """p_think of each input: the prefill and the gate only, no decoding and no query pass."""
        _, last_state = self.prefill(self.prompts.encode(inputs))
        return self.gate_probability(last_state)

    def decide(self, p_think: torch.Tensor, think: ThinkMode, threshold: float | None = None) -> torch.Tensor:
        """Which inputs think: none, all, or those the gate sends (at `threshold`, by default the model's)."""
        if think == "never":
            return torch.zeros_like(p_think, dtype=torch.bool)
        if think == "always":
            return torch.ones_like(p_think, dtype=torch.bool)
        return thinks(p_think, self.config.gate_threshold if threshold is None else threshold)

    @torch.no_grad()
    def embed(
        self,
        inputs: list[ModelInput],
        think: ThinkMode = "never",
        threshold: float | None = None,
        sampling: Sampling = Sampling(),
    ) -> EmbedResult:
        """Embed a batch: prefill, gate, CoT for the rows that think, then the query pass."""
        prefix, last_state = self.prefill(self.prompts.encode(inputs))
        p_think = self.gate_probability(last_state)
        decision = self.decide(p_think, think, threshold)
        thinking = decision.nonzero().flatten()
        resting = (~decision).nonzero().flatten()
        result = EmbedResult(torch.empty(len(inputs), self.embedding_dim, device=self.device), decision, p_think, [""] * len(inputs), [0] * len(inputs))
        if len(resting):
            result.embeddings[resting] = self.query_pass(prefix if len(resting) == len(inputs) else prefix.select(resting))
        if len(thinking):
            rows = thinking.tolist()
            embeddings, thoughts = self.thought_embeddings(prefix.select(thinking), [inputs[row] for row in rows], sampling)
            result.fill(rows, embeddings, thoughts)
        return result

    # ----------------------------------------------------------------- internals
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

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.model.get_output_embeddings()(hidden)

    def token_block(self, ids: list[int], rows: int) -> torch.Tensor:
        return torch.tensor(ids, device=self.device)[None].expand(rows, -1)

    def _pool(self, query_states: torch.Tensor) -> torch.Tensor:
        pooled = query_states.mean(1) if self.config.pooling == "mean" else query_states[:, -1]
        return F.normalize(pooled.float(), dim=-1)


def _vision_inputs(encoded: dict) -> dict:
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    return {key: encoded[key] for key in keys if key in encoded}
