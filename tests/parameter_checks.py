"""Helpers for tests of what a loss or stage trains: every parameter made trainable, and which parts got a gradient."""

from __future__ import annotations

import torch


def force_every_parameter_trainable(model, monkeypatch) -> None:
    """After each adapter switch, every parameter requires a gradient again: only the graph decides what gets
    one, so that peft's freezing of the inactive adapter cannot hide a gradient that leaks across."""
    switch = model.use_adapter

    def switch_and_unfreeze(name: str) -> None:
        switch(name)
        for parameter in model.parameters():
            parameter.requires_grad_(True)

    monkeypatch.setattr(model, "use_adapter", switch_and_unfreeze)
    switch_and_unfreeze("reasoning")


def gradient_parts(model) -> set[str]:
    """The parts of the model (reasoning, embedding, gate, backbone) with a non-zero gradient somewhere."""
    parts = {part: parameters.values() for part, parameters in model.trainable_parameters().items()}
    parts["backbone"] = model.backbone_parameters().values()
    return {part for part, parameters in parts.items() if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in parameters)}


def distinct_adapters(model, scale: float = 0.1) -> None:
    """Give both adapters random, different, non-zero LoRA weights (fresh ones have B = 0: both the identity)."""
    for seed, adapter in enumerate(("reasoning", "embedding")):
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for parameter in model.adapter_parameters(adapter).values():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
