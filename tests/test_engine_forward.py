"""The shared-prefill forward: cache correctness, padding, mixed think/no-think batches, the reencode ablation."""

from __future__ import annotations

import pytest
import torch

from twn_cli.data.images import load_image
from twn_cli.engine.batching import embed_block
from twn_cli.engine.config import INTERFACES
from twn_cli.engine.model import EmbedResult, TWNModel
from twn_cli.engine.training_passes import training_views
from twn_cli.types import ModelInput

ATOL = 1e-5


@pytest.fixture(scope="module")
def inputs(request) -> list[ModelInput]:
    paths = request.getfixturevalue("real_image_paths")
    astronaut, cat, coffee, rocket = (load_image(path) for path in paths[:4])
    return [
        ModelInput(text="a cat on a chair", images=[cat]),
        ModelInput(text="the shape with one more side than a square, coloured like grass"),
        ModelInput(images=[astronaut, rocket]),
        ModelInput(text="a cup", images=[coffee], instruction="Find the matching caption."),
    ]


def teach_short_thoughts(model: TWNModel, inputs: list[ModelInput], steps: int = 100) -> None:
    """SFT the reasoning adapter on CoTs of different lengths, so greedy CoTs end early and unevenly."""
    cots = ["cat", "one more side than a square is a pentagon; grass is green; so a green pentagon", "rocket", "cup"]
    cot_ids = [model.prompts.tokenizer.encode(cot, add_special_tokens=False) for cot in cots]
    encoded = model.prompts.encode(inputs)
    optimizer = torch.optim.Adam(model.adapter_parameters("reasoning").values(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = training_views(model, encoded, cot_ids).sft_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def one_at_a_time(model: TWNModel, inputs: list[ModelInput], think: str) -> torch.Tensor:
    return torch.cat([model.embed([item], think=think).embeddings for item in inputs])


@pytest.mark.parametrize("think", ["never", "always"])
def test_padded_batch_equals_one_input_at_a_time(make_model, inputs, think):
    model = make_model()
    batch = model.embed(inputs, think=think)
    assert batch.embeddings.shape == (len(inputs), model.embedding_dim)
    assert torch.allclose(batch.embeddings.norm(dim=-1), torch.ones(len(inputs)), atol=1e-5)
    assert torch.allclose(batch.embeddings, one_at_a_time(model, inputs, think), atol=ATOL)


@pytest.mark.parametrize("think", ["never", "always"])
def test_cached_path_equals_full_recompute_in_one_pass(make_model, inputs, think):
    """Fresh LoRA adapters are the identity (B = 0), so the shared-prefill embedding (prefill, decode step by
    step into the cache, queries over the cache) must equal one uncached forward over prompt + CoT + queries."""
    shared = make_model()
    reencode = make_model(interface="reencode")
    result = shared.embed(inputs, think=think)
    assert torch.allclose(result.embeddings, reencode.embed(inputs, think=think).embeddings, atol=ATOL)
    assert result.reasoning_tokens == ([12] * 4 if think == "always" else [0] * 4)


def test_decoded_thoughts_equal_teacher_forced_prefix(make_model, inputs):
    """After SFT the CoTs end at different steps (masked holes in the batch cache); each row's embedding still
    equals the one from re-running its prompt + CoT from scratch in a single prefill."""
    model = make_model()
    teach_short_thoughts(model, inputs)
    result = model.embed(inputs, think="always")
    lengths = result.reasoning_tokens
    assert min(lengths) < model.config.max_think_tokens and len(set(lengths)) > 1, lengths
    with torch.no_grad():
        for row, item in enumerate(inputs):
            cot_ids = model.prompts.tokenizer.encode(result.cot[row], add_special_tokens=False)
            views = training_views(model, model.prompts.encode([item]), [cot_ids])
            assert torch.allclose(model.query_pass(views.think_view)[0], result.embeddings[row], atol=ATOL)
            assert torch.allclose(
                model.query_pass(views.no_think_view)[0], model.embed([item]).embeddings[0], atol=ATOL
            )


def test_mixed_think_batch_equals_forced_modes(make_model, inputs):
    model = make_model()
    teach_short_thoughts(model, inputs)
    probabilities = model.embed(inputs).p_think
    threshold = float(probabilities.median())
    mixed = model.embed(inputs, think="auto", threshold=threshold)
    assert 0 < int(mixed.think.sum()) < len(inputs)
    for row, item in enumerate(inputs):
        mode = "always" if mixed.think[row] else "never"
        single = model.embed([item], think=mode)
        assert torch.allclose(mixed.embeddings[row], single.embeddings[0], atol=ATOL)
        assert mixed.cot[row] == single.cot[0]
        assert mixed.reasoning_tokens[row] == single.reasoning_tokens[0]
    assert all(tokens == 0 for tokens, thinks in zip(mixed.reasoning_tokens, mixed.think) if not thinks)


@pytest.mark.parametrize("interface", INTERFACES)
def test_adaptive_blocks_decode_the_thinking_inputs_of_several_batches_together(make_model, inputs, monkeypatch, interface):
    model = make_model(interface=interface)
    teach_short_thoughts(model, inputs)
    many = inputs * 3  # 12 inputs: six batches of 2
    low, high = model.embed(inputs).p_think.sort().values[1:3].tolist()
    threshold = (low + high) / 2  # halfway between two inputs' p_think: no batching's rounding can flip a decision
    per_batch = EmbedResult.concatenate([model.embed(many[start : start + 2], "auto", threshold) for start in range(0, 12, 2)])
    decoded_rows = []
    think = model.think
    monkeypatch.setattr(model, "think", lambda prefix, sampling: decoded_rows.append(prefix.attention_mask.shape[0]) or think(prefix, sampling))
    block = embed_block(model, many, "auto", batch_size=2, threshold=threshold)
    assert block.think.tolist() == per_batch.think.tolist() and 0 < int(block.think.sum()) < 12
    assert torch.allclose(block.embeddings, per_batch.embeddings, atol=ATOL)
    assert block.cot == per_batch.cot and block.reasoning_tokens == per_batch.reasoning_tokens
    assert decoded_rows == [2] * (int(block.think.sum()) // 2) + [1] * (int(block.think.sum()) % 2)  # full batches


def test_blocks_batch_inputs_of_like_length_and_keep_input_order(make_model, inputs, monkeypatch):
    model = make_model()
    prompt_lengths = [model.prompts.encode([item])["input_ids"].shape[1] for item in inputs]
    # The estimate leaves out only the chat template's tokens (a few per prompt and per image).
    template = [real - model.prompts.prompt_length(item) for real, item in zip(prompt_lengths, inputs)]
    assert all(0 < extra <= template[1] + 2 * len(item.images) for extra, item in zip(template, inputs)), template
    many = inputs * 2  # 8 inputs of interleaved lengths: four batches of 2
    batches = []
    encode = model.prompts.encode
    monkeypatch.setattr(model.prompts, "encode", lambda batch: batches.append([model.prompts.prompt_length(item) for item in batch]) or encode(batch))
    block = embed_block(model, many, "never", batch_size=2)
    assert [length for batch in batches for length in batch] == sorted(model.prompts.prompt_length(item) for item in many)
    assert torch.allclose(block.embeddings, one_at_a_time(model, many, "never"), atol=ATOL)


def test_decoding_the_whole_budget_gives_what_stopping_early_gives(make_model, inputs, monkeypatch):
    """Processes sharing a sharded backbone decode every step of the budget (stop_early=False): the CoTs and
    embeddings are those of stopping once every row has ended, only the number of steps differs."""
    from twn_cli.engine.decoding import Sampling

    model = make_model(max_think_tokens=48)  # room for every taught CoT to end before the budget
    teach_short_thoughts(model, inputs)
    steps = []
    feed = model.feed
    monkeypatch.setattr(model, "feed", lambda *arguments: steps.append(1) or feed(*arguments))
    early = model.embed(inputs, think="always")
    early_steps, steps[:] = len(steps), []
    whole = model.embed(inputs, think="always", sampling=Sampling(stop_early=False))
    assert whole.cot == early.cot and whole.reasoning_tokens == early.reasoning_tokens
    assert torch.allclose(whole.embeddings, early.embeddings, atol=ATOL)
    assert early_steps < len(steps) == 1 + model.config.max_think_tokens + 1  # start marker, budget, end marker


def test_sampled_thoughts_are_reproducible_for_a_seed(make_model, inputs):
    from twn_cli.engine.decoding import Sampling

    model = make_model()

    def sample(seed: int) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        return model.embed(inputs, think="always", sampling=Sampling(temperature=1.0, top_p=0.9, generator=generator)).cot

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_adapters_cover_language_model_only(make_model):
    model = make_model()
    adapted = {name.split(".lora_")[0] for name in model.adapter_parameters("reasoning")}
    assert adapted and all(".language_model." in name for name in adapted)
    assert not any("visual" in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    overhead = model.parameter_overhead()
    assert overhead["reasoning_adapter"] == overhead["embedding_adapter"] > 0
    assert overhead["added_percent"] == pytest.approx(100 * overhead["added"] / overhead["backbone"])


def test_decoding_never_writes_image_or_video_placeholders(make_model):
    from twn_cli.engine.decoding import Sampling, pick_tokens

    model = make_model()
    config = model.backbone.model.config
    banned = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]
    logits = torch.zeros(len(banned), config.get_text_config(decoder=True).vocab_size)
    for row, token in enumerate(banned):
        logits[row, token] = 100.0  # the placeholder is by far the most likely token
    for sampling in (Sampling(), Sampling(temperature=1.0, generator=torch.Generator().manual_seed(0))):
        picked = pick_tokens(logits, sampling, model.never_generated).tolist()
        assert not set(picked) & set(banned)
