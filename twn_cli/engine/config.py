"""The settings that define a TWN model beside its backbone, stored in the checkpoint's `twn.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from twn_cli.errors import TWNError
from twn_cli.recipes import POSITIVE, SHARE, Range, check_ranges, check_types

ADAPTERS = ("reasoning", "embedding")
ThinkMode = Literal["never", "always", "auto"]

# Which adapter encodes what (docs/design.md compares them):
# - reasoning-prefill: the reasoning adapter prefills the prompt; the gate reads that prefill; CoTs are decoded
#   over it; the queries read prompt + CoT through the embedding adapter, the whole cache detached.
# - embedding-prefill: the embedding adapter prefills the prompt (InfoNCE trains that pass); the gate reads
#   it; CoTs are decoded by the reasoning adapter over the detached prompt cache; the queries read the prompt
#   cache and the CoT's cache (detached). SFT and RL cannot move a no-think embedding or the gate's input.
# - cot-reencode: as embedding-prefill, but the embedding adapter encodes the decoded CoT itself after its
#   prompt cache (one pass over the CoT's tokens), so the queries read only embedding-adapter states and
#   InfoNCE trains the embedding adapter to read CoTs. The default: reencode's quality at one prefill.
# - reencode: as embedding-prefill for no-think inputs; a thinking input's CoT is decoded by the reasoning
#   adapter over its own prefill of the prompt, then the embedding adapter encodes the CoT itself (one more
#   prefill per thinking input), so the queries read only embedding-adapter states.
INTERFACES = ("reasoning-prefill", "embedding-prefill", "cot-reencode", "reencode")
# Names that checkpoints of earlier versions recorded.
FORMER_INTERFACE_NAMES = {"shared": "reasoning-prefill"}
# The interface of checkpoints saved before it was a setting, and of the TWN authors' release (the paper's design).
FORMER_DEFAULT_INTERFACE = "reasoning-prefill"
# Upper bounds keep a hostile or mistyped twn.json or recipe from allocating without end.
MODEL_SETTING_RANGES = {
    "lora_rank": Range(1, 1024), "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1), "num_queries": Range(1, 1024),
    "gate_hidden_size": Range(1, 65536), "gate_threshold": SHARE, "temperature": POSITIVE, "max_think_tokens": Range(1, 32768),
}


@dataclass
class TWNConfig:
    """Everything that defines a TWN model beside the backbone."""

    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # None: every linear layer of the language model (none in the vision tower).
    lora_target_modules: list[str] | None = None
    num_queries: int = 4
    pooling: Literal["mean", "last"] = "mean"
    # Which adapter encodes what (above; docs/design.md: the study that chose cot-reencode).
    interface: str = "cot-reencode"
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
        self.interface = FORMER_INTERFACE_NAMES.get(self.interface, self.interface)
        if self.pooling not in ("mean", "last"):
            raise TWNError(f"pooling must be 'mean' or 'last', not '{self.pooling}'")
        if self.interface not in INTERFACES:
            raise TWNError(f"interface must be one of {', '.join(INTERFACES)}, not '{self.interface}'")
        check_ranges(self, MODEL_SETTING_RANGES)

    @property
    def prefill_adapter(self) -> str:
        """The adapter that prefills the prompt, whose last state the gate reads."""
        return "reasoning" if self.interface == "reasoning-prefill" else "embedding"

    @property
    def decoding_adapter(self) -> str:
        """The adapter whose prompt cache CoTs are decoded over (and RL's policy scored over)."""
        return "reasoning" if self.interface in ("reasoning-prefill", "reencode") else "embedding"

    @property
    def embedding_reads_cot(self) -> bool:
        """Whether the embedding adapter encodes the CoT itself (else the queries read the reasoning adapter's CoT states)."""
        return self.interface in ("cot-reencode", "reencode")

    @classmethod
    def from_dict(cls, values: dict) -> TWNConfig:
        """Settings as saved; settings saved before the interface was one (twn 0.1.0 and earlier) are the
        reasoning-prefill design, whatever the default is now."""
        check_types(values, cls, "model settings")
        return cls(**{"interface": FORMER_DEFAULT_INTERFACE, **values})

    def to_dict(self) -> dict:
        return asdict(self)
