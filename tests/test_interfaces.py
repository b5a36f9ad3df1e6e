"""The four adapter interfaces, checked against hand computations with two different non-zero adapters.

The hand computation is one uncached forward over prompt + CoT + queries in which every LoRA layer applies,
at each position, the adapter that the interface assigns there (reasoning or embedding), written here from
the LoRA weights themselves. The engine instead prefills, decodes into a cache, extends caches and runs the
queries over them; the two must agree. Detachment is checked with every parameter forced trainable after
each adapter switch, so that peft's freezing of the inactive adapter cannot hide a gradient that leaks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from parameter_checks import distinct_adapters, force_every_parameter_trainable, gradient_parts

from twn_cli.data.images import load_image
from twn_cli.engine.config import INTERFACES, TWNConfig
from twn_cli.engine.training_passes import cot_log_probs, training_views
from twn_cli.types import ModelInput

ATOL = 2e-5
# Which adapter each interface runs at the prompt, the CoT and the queries.
LAYOUT = {
    "reasoning-prefill": ("reasoning", "reasoning", "embedding"),
    "embedding-prefill": ("embedding", "reasoning", "embedding"),
    "cot-reencode": ("embedding", "embedding", "embedding"),
    "reencode": ("embedding", "embedding", "embedding"),
}
# The adapter of the prompt that CoTs are decoded over (and RL scores them over): only reencode prefills twice.
DECODING_PROMPT = {"reasoning-prefill": "reasoning", "embedding-prefill": "embedding", "cot-reencode": "embedding", "reencode": "reasoning"}
TEACHER_COTS = ["a cat sits on a chair; so a cat", "one more side than a square is a pentagon; so a green pentagon"]


@pytest.fixture(scope="module")
def inputs(request) -> list[ModelInput]:
    cat = load_image(request.getfixturevalue("real_image_paths")[1])
    return [ModelInput(text="a cat on a chair", images=[cat]), ModelInput(text="the shape with one more side than a square")]


@pytest.fixture
def model_of(make_model):
    def build(interface: str):
        model = make_model(interface=interface)
        distinct_adapters(model)
        return model

    return build


def mixed_forward(model, item: ModelInput, block: list[int], layout: tuple[str, str, str], with_queries: bool = True) -> torch.Tensor:
    """Final hidden states of one uncached forward over prompt + `block` (+ the K queries), each LoRA layer
    applying at every position the adapter that `layout` (prompt, CoT, queries) assigns there."""
    encoded = model.prompts.encode([item])
    prompt_length, count = encoded["input_ids"].shape[1], model.config.num_queries if with_queries else 0
    suffix = torch.tensor([block + [model.prompts.pad_id] * count], dtype=torch.long)
    ids = torch.cat([encoded["input_ids"], suffix], 1)
    full = {**encoded, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in encoded:
        full["mm_token_type_ids"] = torch.cat([encoded["mm_token_type_ids"], torch.zeros_like(suffix)], 1)
    positions, _ = model.positions.prompt_positions(full)
    embeds = model.backbone.model.get_input_embeddings()(ids)
    if count:
        embeds = torch.cat([embeds[:, :-count], model.queries[None]], 1)
    spans = (prompt_length, len(block), count)
    region = [adapter for adapter, length in zip(layout, spans) for _ in range(length)]
    reasoning_at = torch.tensor([[adapter == "reasoning" for adapter in region]])

    def lora_forward(layer, x, *args, **kwargs):
        deltas = {
            name: layer.lora_B[name](layer.lora_A[name](layer.lora_dropout[name](x))) * layer.scaling[name]
            for name in ("reasoning", "embedding")
        }
        return layer.base_layer(x) + torch.where(reasoning_at[..., None], deltas["reasoning"], deltas["embedding"])

    saved = {}
    try:
        for layer in model._lora_layers:
            saved[layer] = layer.forward
            layer.forward = lambda x, *args, _layer=layer, **kwargs: lora_forward(_layer, x)
        vision = {key: full[key] for key in ("pixel_values", "image_grid_thw") if key in full}
        output = model.backbone.model.base_model(
            input_ids=ids, inputs_embeds=embeds, attention_mask=full["attention_mask"], position_ids=positions, use_cache=False, **vision
        )
    finally:
        for layer, forward in saved.items():
            layer.forward = forward
    return output.last_hidden_state[0]


def pooled(model, hidden: torch.Tensor) -> torch.Tensor:
    return F.normalize(hidden[-model.config.num_queries :].mean(0).float(), dim=-1)


@pytest.mark.parametrize("interface", INTERFACES)
@torch.no_grad()
def test_inference_equals_the_hand_computation(model_of, inputs, interface):
    model = model_of(interface)
    layout = LAYOUT[interface]
    prefix, last_state = model.prefill(model.prompts.encode(inputs))
    p_think = model.gate_probability(last_state)
    never = model.query_pass(prefix)
    think, thoughts = model.thought_embeddings(prefix, inputs)
    assert any(thoughts.reasoning_tokens)
    for row, item in enumerate(inputs):
        prompt_only = mixed_forward(model, item, [], layout, with_queries=False)
        assert torch.allclose(p_think[row], model.gate(prompt_only[-1]), atol=1e-5)
        assert torch.allclose(never[row], pooled(model, mixed_forward(model, item, [], layout)), atol=ATOL)
        block = model.prompts.think_block(model.prompts.strip_end_marker(thoughts.token_ids[row]))
        assert torch.allclose(think[row], pooled(model, mixed_forward(model, item, block, layout)), atol=ATOL)


@pytest.mark.parametrize("interface", INTERFACES)
@torch.no_grad()
def test_the_decoded_thought_is_the_reasoning_adapters_greedy_choice(model_of, inputs, interface):
    """Each CoT token is the argmax of the reasoning adapter's logits after the prompt (as the interface
    encodes it for decoding: its own prefill under reencode) and the tokens before it."""
    model = model_of(interface)
    prompt_adapter = DECODING_PROMPT[interface]
    prefix, _ = model.prefill(model.prompts.encode(inputs))
    _, thoughts = model.thought_embeddings(prefix, inputs)
    for row, item in enumerate(inputs):
        written = thoughts.token_ids[row]
        hidden = mixed_forward(model, item, model.prompts.think_start_ids + written, (prompt_adapter, "reasoning", "embedding"), with_queries=False)
        logits = model.lm_head(hidden[-len(written) - 1 : -1])  # each state predicts the token after it
        logits[:, model.never_generated] = float("-inf")
        assert logits.argmax(-1).tolist() == written


@pytest.mark.parametrize("interface", INTERFACES)
def test_training_views_and_policy_log_probabilities_equal_the_hand_computation(model_of, inputs, interface):
    model = model_of(interface)
    layout = LAYOUT[interface]
    # The SFT and RL passes read the prompt as the CoT is decoded over it (reencode: the reasoning adapter's own).
    decoding_layout = (DECODING_PROMPT[interface], "reasoning", "embedding")
    cot_ids = model.prompts.cot_token_ids(TEACHER_COTS)
    encoded = model.prompts.encode(inputs)
    with torch.no_grad():
        views = training_views(model, encoded, cot_ids)
        think, no_think = model.query_pass(views.think_view), model.query_pass(views.no_think_view)
        log_probs, mask = cot_log_probs(model, encoded, cot_ids)
    start = len(model.prompts.think_start_ids)
    expected_loss, expected_tokens = 0.0, 0
    for row, item in enumerate(inputs):
        block = model.prompts.think_block(cot_ids[row])
        assert torch.allclose(think[row], pooled(model, mixed_forward(model, item, block, layout)), atol=ATOL)
        assert torch.allclose(no_think[row], pooled(model, mixed_forward(model, item, [], layout)), atol=ATOL)
        with torch.no_grad():
            hidden = mixed_forward(model, item, block, decoding_layout, with_queries=False)
            targets = torch.tensor(block[start:])
            row_log_probs = torch.log_softmax(model.lm_head(hidden[-len(targets) - 1 : -1]).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        expected_loss += float(-row_log_probs.sum())
        expected_tokens += len(targets)
        assert torch.allclose(log_probs[row][mask[row]], row_log_probs, atol=1e-4)
    assert views.sft_tokens == expected_tokens
    assert float(views.sft_loss_sum) == pytest.approx(expected_loss, rel=1e-4)


# ------------------------------------------------------------------------------------------- detachment
@pytest.mark.parametrize("interface", INTERFACES)
def test_each_loss_reaches_only_its_own_side_whatever_requires_grad_says(model_of, inputs, interface, monkeypatch):
    model = model_of(interface)
    model.train()
    force_every_parameter_trainable(model, monkeypatch)
    encoded = model.prompts.encode(inputs)
    cot_ids = model.prompts.cot_token_ids(TEACHER_COTS)
    direction = torch.randn(model.embedding_dim, generator=torch.Generator().manual_seed(0))

    training_views(model, encoded, cot_ids).sft_loss.backward()
    assert gradient_parts(model) - {"backbone"} == {"reasoning"}, "SFT"
    model.zero_grad(set_to_none=True)

    views = training_views(model, encoded, cot_ids)
    ((model.query_pass(views.think_view) + model.query_pass(views.no_think_view)) @ direction).sum().backward()
    assert gradient_parts(model) - {"backbone"} == {"embedding"}, "InfoNCE"
    model.zero_grad(set_to_none=True)

    log_probs, mask = cot_log_probs(model, encoded, cot_ids)
    (log_probs * mask).sum().backward()
    assert gradient_parts(model) - {"backbone"} == {"reasoning"}, "RL"
    model.zero_grad(set_to_none=True)

    prefix, last_state = model.prefill(encoded)
    model.gate_probability(last_state).sum().backward()
    assert gradient_parts(model) == {"gate"}, "gate"


def test_unless_the_reasoning_adapter_prefills_it_moves_no_never_think_embedding_and_no_p_think(model_of, inputs):
    """What makes RL safe under the other interfaces: the no-think path never runs the reasoning adapter.
    Under reasoning-prefill the same change moves both (so the check can fail)."""
    moved = {}
    for interface in INTERFACES:
        model = model_of(interface)
        before = model.embed(inputs)
        with torch.no_grad():
            for parameter in model.adapter_parameters("reasoning").values():
                parameter.add_(0.05)
        after = model.embed(inputs)
        moved[interface] = (not torch.equal(before.embeddings, after.embeddings), not torch.equal(before.p_think, after.p_think))
    assert moved == {"reasoning-prefill": (True, True), "embedding-prefill": (False, False), "cot-reencode": (False, False), "reencode": (False, False)}


def test_checkpoints_of_earlier_versions_are_reasoning_prefill_whatever_the_default():
    assert TWNConfig().interface == "cot-reencode"
    assert TWNConfig.from_dict({"interface": "shared"}).interface == "reasoning-prefill"
    assert TWNConfig.from_dict({"lora_rank": 4}).interface == "reasoning-prefill"  # saved before it was a setting
    assert TWNConfig.from_dict({"interface": "reencode"}).interface == "reencode"
    with pytest.raises(Exception, match="interface must be one of reasoning-prefill, embedding-prefill, cot-reencode, reencode"):
        TWNConfig(interface="both")
