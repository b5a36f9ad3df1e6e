"""Which of the language model's weights the LoRA adapters adapt, recorded in every checkpoint's twn.json.

By default the adapters cover every `nn.Linear` of the language model (`lora_target_modules: null`). In a
dense backbone that is all of each decoder layer's attention and MLP projections. In Qwen3-VL-MoE the
experts of each MoE block are not linear layers but two fused 3-D tensors per block (`mlp.experts.gate_up_proj`
and `mlp.experts.down_proj`, every expert's weights stacked), and the router (`mlp.gate`) is a bare weight, so
the adapters cover the attention projections only: most of the language model's parameters (the experts) stay
as they are. This module says so in numbers.
"""

from __future__ import annotations

import re

from torch import nn


def adapter_coverage(decoder: nn.Module) -> dict:
    """The adapted module names of `decoder` (the language model, with its LoRA layers) and, by kind of weight,
    the share of its parameters that the adapters cover and that they leave alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted_names, adapted, left = set(), {}, {}
    adapted_weights = set()
    for name, module in decoder.named_modules():
        if isinstance(module, BaseTunerLayer):
            kind = name.rsplit(".", 1)[-1]
            adapted_names.add(kind)
            for parameter in module.get_base_layer().parameters():
                adapted_weights.add(id(parameter))
                adapted[kind] = adapted.get(kind, 0) + parameter.numel()
    for name, parameter in decoder.named_parameters():
        if "lora_" in name or id(parameter) in adapted_weights:
            continue
        kind = re.sub(r"(^|\.)layers\.\d+\.", r"\1", name).removesuffix(".weight").removesuffix(".bias")
        left[kind] = left.get(kind, 0) + parameter.numel()
    total = sum(adapted.values()) + sum(left.values())

    def percent(groups: dict) -> dict:
        return {kind: round(100.0 * count / total, 2) for kind, count in sorted(groups.items(), key=lambda item: -item[1])}

    return {
        "target_modules": sorted(adapted_names),
        "language_model_parameters": total,
        "adapted_percent": round(100.0 * sum(adapted.values()) / total, 2),
        "adapted_percent_by_module": percent(adapted),
        "not_adapted_percent_by_weight": percent(left),
    }
