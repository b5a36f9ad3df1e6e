"""The routing gate: a small MLP that reads the last prompt state and says how likely thinking helps."""

from __future__ import annotations

import torch
from torch import nn


def thinks(p_think: torch.Tensor, threshold: float) -> torch.Tensor:
    """The routing rule: an input thinks iff its p_think reaches the threshold τ."""
    return p_think >= threshold


class RoutingGate(nn.Module):
    """p_think = sigmoid(MLP(h)) on the detached last hidden state of the prompt prefill."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def logits(self, last_prompt_state: torch.Tensor) -> torch.Tensor:
        return self.mlp(last_prompt_state.detach().float()).squeeze(-1)

    def forward(self, last_prompt_state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(last_prompt_state))

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """Start afresh from `seed`, as a new gate would, whatever this one learnt before (on any device)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = RoutingGate(self.mlp[0].in_features, self.mlp[0].out_features)
        self.load_state_dict(fresh.state_dict())

    @torch.no_grad()
    def absorb_input_scaling(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Make a gate trained on (h - mean) / scale read h itself: fold the standardisation into layer one."""
        first = self.mlp[0]
        first.weight.div_(scale.to(first.weight)[None])
        first.bias.sub_(first.weight @ mean.to(first.weight))
