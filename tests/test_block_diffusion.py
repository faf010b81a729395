"""Block diffusion (BD3-LM): the mask's structure, its limits (block size = L is the MDM loss, block size 1 is an
autoregressive chain rule), the vectorised pass against a block-by-block computation, exact KV-cached sampling,
and the block ELBO."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from smdm.block_diffusion import (
    BlockSampler,
    bdm_sft_step_loss,
    bdm_step_loss,
    block_causal_mask,
    block_diffusion_ce,
    block_score,
    check_block_size,
    mask_blocks,
    sample_block_times,
    training_attention,
    training_mask,
    vectorised_logits,
)
from smdm.config import ModelConfig
from smdm.diffusion import masked_weighted_ce
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import generate

VOCAB = 23
EOS = 0


def bd_model(block_size: int, seed: int = 0, context: int = 64) -> Transformer:
    """A tiny bidirectional Transformer in float64 (parity tests compare argmaxes) marked as block diffusion."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=VOCAB, block_size=context),
                        diffusion_block_size=block_size).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the logits: distinct argmaxes, confident and unsure tokens
    return model


def shifted_bd_model(block_size: int, seed: int = 0) -> Transformer:
    """bd_model with the `shifted` knob: logit i comes from the hidden state at i-1, as in the ARM it came from."""
    torch.manual_seed(seed)
    config = ModelConfig.from_name("tiny-test", vocab_size=VOCAB, block_size=64, shifted=True)
    model = Transformer(config, diffusion_block_size=block_size).double().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def mdm_twin(model: Transformer) -> Transformer:
    """The same weights as a plain MDM (no block structure)."""
    twin = Transformer(model.config).to(model.lm_head.weight.dtype).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def causal_twin(model: Transformer) -> Transformer:
    """The same weights as a causal Transformer."""
    twin = Transformer(model.config, causal=True).double().eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_training_mask_structure():
    mask = training_mask(4, 2)
    n, c = [1, 1, 0, 0], [0, 0, 0, 0]
    expected = torch.tensor([
        # noisy 0..3                     clean 0..3
        [1, 1, 0, 0] + c, [1, 1, 0, 0] + c,  # noisy block 0: itself only
        [0, 0, 1, 1] + n, [0, 0, 1, 1] + n,  # noisy block 1: itself and clean block 0
        c + [1, 1, 0, 0], c + [1, 1, 0, 0],  # clean block 0: itself
        c + [1, 1, 1, 1], c + [1, 1, 1, 1],  # clean block 1: clean blocks <= 1
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # Block size L: the noisy half is one bidirectional block that sees nothing clean.
    full = training_mask(6, 6)
    assert full[:6, :6].all() and not full[:6, 6:].any() and not full[6:, :6].any()


def test_block_causal_mask_hides_pads_but_keeps_the_diagonal():
    key_real = torch.tensor([[False, False, True, True, True, True]])
    mask = block_causal_mask(torch.arange(6), 6, 2, key_real)[0, 0]
    assert mask[0].tolist() == [True, False, False, False, False, False]  # a pad sees only itself
    assert mask[3].tolist() == [False, False, True, True, False, False]
    assert mask[5].tolist() == [False, False, True, True, True, True]


def test_block_size_equal_to_length_is_the_mdm_loss_on_the_same_masks():
    model = bd_model(8)
    tokens = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    times = torch.tensor([[0.3], [0.7], [0.95]])
    noisy, masked, mask_prob = mask_blocks(tokens, times, 8, model.mask_id, torch.Generator().manual_seed(2))
    assert masked.any()
    ours = block_diffusion_ce(model, tokens, noisy, masked, mask_prob, 8).sum() / tokens.numel()
    reference = masked_weighted_ce(model(noisy)[masked], tokens, masked, times[:, 0]) / tokens.numel()
    torch.testing.assert_close(ours.double(), reference.double(), rtol=1e-5, atol=1e-6)


def test_block_size_one_fully_masked_is_the_autoregressive_chain_rule():
    """What holds at block size 1: x_i is predicted from [MASK] at position i after the clean x_<i, i.e. by the
    causal network with the same weights fed x_<i followed by [MASK]; with every token masked (t = 1) the loss is
    that model's exact next-token cross-entropy, averaged over positions."""
    model = bd_model(1)
    twin = causal_twin(model)
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    loss = bdm_step_loss(model, tokens, 1, torch.Generator().manual_seed(0), t_min=1.0, t_max=1.0)
    expected = []
    for i in range(tokens.size(1)):
        query = torch.cat([tokens[:, :i], torch.full((2, 1), model.mask_id)], dim=1)
        expected.append(F.cross_entropy(twin(query)[:, -1].float(), tokens[:, i], reduction="none"))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shifted", [False, True])
def test_vectorised_pass_equals_each_block_computed_on_its_own(shifted):
    """The 2L-token pass gives noisy block b the logits of one left-to-right pass over [clean blocks < b, noisy
    block b]. For a shifted model (an adapted ARM) that pass's own un-shift predicts a block's first token from the
    clean token before it, which is what the 2L pass must reproduce (`shifted_sources`)."""
    model = shifted_bd_model(3) if shifted else bd_model(3)
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=generator)
    noisy, masked, _ = mask_blocks(tokens, torch.full((2, 3), 0.6), 3, model.mask_id, generator)
    logits = vectorised_logits(model, noisy, tokens, 3)
    for block in range(3):
        start, end = 3 * block, 3 * block + 3
        x = torch.cat([tokens[:, :start], noisy[:, start:end]], dim=1)
        alone = model(x, attn_mask=block_causal_mask(torch.arange(end), end, 3))[:, start:]
        first = 1 if shifted and block == 0 else 0  # a shifted model has no prediction at position 0
        torch.testing.assert_close(logits[:, start + first:end], alone[:, first:])
    selected = vectorised_logits(model, noisy, tokens, 3, select=masked)
    torch.testing.assert_close(selected, logits[masked])
    if shifted:  # the shift reached the block starts
        unshifted = Transformer(replace(model.config, shifted=False), diffusion_block_size=3).double().eval()
        unshifted.load_state_dict(model.state_dict())
        assert not torch.allclose(vectorised_logits(unshifted, noisy, tokens, 3)[:, 3], logits[:, 3])


@pytest.mark.parametrize("groups", [None, 2])
def test_flex_attention_kernel_computes_what_the_boolean_sdpa_mask_does(groups):
    """The BlockMask path (BD3-LM's FlexAttention kernel, used on CUDA) gives the SDPA path's logits, with
    grouped-query attention too. Run eagerly and forward only (torch has no FlexAttention backward on CPU), so it
    checks the mask and the plumbing, not the fused GPU kernel."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny-test", vocab_size=VOCAB, block_size=64, n_query_groups=groups)
    model = Transformer(config, diffusion_block_size=4).double().eval()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    noisy, masked, _ = mask_blocks(tokens, torch.full((2, 6), 0.5), 4, model.mask_id, torch.Generator())
    with torch.no_grad():
        sdpa = vectorised_logits(model, noisy, tokens, 4, select=masked, kernel="sdpa")
        flex = vectorised_logits(model, noisy, tokens, 4, select=masked, kernel="flex")
    torch.testing.assert_close(flex, sdpa)
    assert isinstance(training_attention(24, 4, torch.device("cpu")), torch.Tensor)  # auto on CPU: boolean SDPA
    with pytest.raises(SmdmError, match="unknown attention kernel"):
        training_attention(24, 4, torch.device("cpu"), "fused")


def test_block_times_are_clipped_and_stratified():
    times = sample_block_times(4, 8, torch.Generator().manual_seed(0), 0.3, 0.8, low_discrepancy=True)
    assert times.shape == (4, 8) and times.min() >= 0.3 and times.max() <= 0.8
    strata = ((times.flatten() - 0.3) / 0.5 * 32).floor().long().sort().values
    assert torch.equal(strata, torch.arange(32))


def test_training_loss_has_gradients_and_sft_ignores_the_prompt():
    model = bd_model(4)
    model.float().train()
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    loss = bdm_step_loss(model, tokens, 4, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad.abs().sum() > 0
    prompt_lengths = torch.tensor([3, 5])
    sft = bdm_sft_step_loss(model, tokens, prompt_lengths, 4, torch.Generator().manual_seed(0), t_min=1.0)
    changed = tokens.clone()
    changed[1, 5:] = (changed[1, 5:] + 1) % VOCAB  # a different response changes the loss ...
    assert not torch.isclose(sft, bdm_sft_step_loss(model, changed, prompt_lengths, 4,
                                                    torch.Generator().manual_seed(0), t_min=1.0))
    # ... and with every response token masked it is the mean over rows of the per-row response CE.
    logits = vectorised_logits(model, torch.where(torch.arange(8) >= prompt_lengths[:, None], model.mask_id, tokens),
                               tokens, 4)
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view(2, 8)
    expected = torch.stack([ce[0, 3:].mean(), ce[1, 5:].mean()]).mean()
    torch.testing.assert_close(sft, expected, rtol=1e-5, atol=1e-6)


def test_block_size_must_divide_the_context():
    with pytest.raises(SmdmError, match="must divide"):
        check_block_size(3, 8)


def test_a_short_last_block_is_scored_like_a_block_of_its_own():
    """A random-length batch may end inside a block: its tokens form a shorter last block."""
    model = bd_model(3)
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    loss = bdm_step_loss(model, tokens, 3, t_min=1.0, t_max=1.0)
    pieces = []
    for start in (0, 3, 6):
        end = min(start + 3, 7)
        x = torch.cat([tokens[:, :start], torch.full((2, end - start), model.mask_id)], dim=1)
        pieces.append(model(x, attn_mask=block_causal_mask(torch.arange(end), end, 3))[:, start:])
    expected = F.cross_entropy(torch.cat(pieces, dim=1).flatten(0, 1).float(), tokens.flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --- Sampling ------------------------------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9], [3], [4, 11, 12, 13, 14, 15, 16, 17, 18]]


@pytest.mark.parametrize("options", [
    {},
    {"steps": 2, "remasking": "random", "temperature": 1.0},
    {"steps": 2, "temperature": 0.7, "top_p": 0.9, "threshold": 0.5},
    {"steps": 4, "cfg_scale": 1.5},
])
def test_cached_sampling_equals_uncached(options):
    model = bd_model(4)
    results = [generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(7), cache=cache, **options)
               for cache in ("kv", "none")]
    assert results[0].completions == results[1].completions
    assert torch.equal(results[0].tokens, results[1].tokens)
    assert results[0].forward_passes == results[1].forward_passes
    assert all(len(c) == 10 for c in results[0].completions)


def test_a_padded_row_generates_what_it_generates_alone():
    model = bd_model(4)
    together = generate(model, PROMPTS, 9).completions
    assert together == [generate(model, [p], 9).completions[0] for p in PROMPTS]


def test_block_size_one_with_one_step_is_greedy_autoregressive_decoding():
    model = bd_model(1)
    twin = causal_twin(model)
    result = generate(model, PROMPTS, 6, steps=1)
    for prompt, completion in zip(PROMPTS, result.completions, strict=True):
        context = list(prompt)
        for _ in range(6):
            query = torch.tensor([context + [model.mask_id]])
            context.append(int(twin(query)[0, -1].argmax()))
        assert completion == context[len(prompt):]
    assert result.forward_passes == 6  # the prompt rides along with the first token, each token after with the next


def test_generation_stops_after_the_block_where_every_row_ended():
    model = bd_model(2)
    full = generate(model, PROMPTS, 16)
    # Pretend a token that every row produces before the end is EOS, the latest such one (so rows end at different
    # blocks and generation still stops early).
    shared = set.intersection(*(set(c[:12]) for c in full.completions))
    eos = max(shared, key=lambda token: max(c.index(token) for c in full.completions))
    stopped = generate(model, PROMPTS, 16, eos_id=eos, stop_at_eos=True)
    assert stopped.completions == [c[: c.index(eos)] for c in full.completions]
    assert any(stopped.completions) and stopped.forward_passes < full.forward_passes


def test_bad_sampler_settings_are_one_line_errors():
    model = bd_model(4)
    with pytest.raises(SmdmError, match="steps per block"):
        generate(model, PROMPTS, 8, steps=5)
    with pytest.raises(SmdmError, match="trained with block size 4"):
        generate(model, PROMPTS, 8, block_length=8)
    with pytest.raises(SmdmError, match="context"):
        generate(model, PROMPTS, 60)
    with pytest.raises(SmdmError, match="remasking"):
        BlockSampler(4, 2, remasking="sideways")


# --- Likelihood ----------------------------------------------------------------------------------------------------

def test_block_size_one_scores_the_exact_chain_rule():
    model = bd_model(1)
    twin = causal_twin(model)
    prefix, target = [4, 5, 6], [7, 8, 9, 10]
    result = block_score(model, prefix, target, 1)
    expected = 0.0
    for i in range(len(target)):
        query = torch.tensor([prefix + target[:i] + [model.mask_id]])
        expected -= twin(query)[0, -1].log_softmax(-1)[target[i]].item()
    assert result.stderr == 0.0 and result.forward_passes == 1
    assert result.nll == pytest.approx(expected, rel=1e-6)


def test_block_elbo_with_one_block_estimates_the_mdm_elbo():
    """With one block the block ELBO and the MDM's Bernoulli estimator draw masks from the same law (rate uniform
    on [1e-3, 1], weight 1/rate): two independent estimates of one number, equal within their standard errors."""
    from smdm.likelihood import mc_score

    model = bd_model(9)
    model.float()
    prefix, target = [4, 5, 6], [7, 8, 9, 10, 11, 12]
    ours = block_score(model, prefix, target, 9, mc_samples=256, batch_size=64)
    theirs = mc_score(mdm_twin(model), prefix, target, mc_samples=256, batch_size=64, estimator="bernoulli", seed=1)
    assert ours.forward_passes == 4 and 0 < ours.stderr < ours.nll
    assert abs(ours.nll - theirs.nll) < 4 * (ours.stderr ** 2 + theirs.stderr ** 2) ** 0.5
    assert block_score(model, prefix, target, 9, mc_samples=256, batch_size=64).nll == ours.nll  # seeded
    # A different block size is a different bound (more clean context per block).
    assert block_score(model, prefix, target, 3, mc_samples=256, batch_size=64).nll != ours.nll


def test_greedy_continuation_check_uses_the_block_sampler():
    from smdm.likelihood import is_greedy_continuation

    model = bd_model(4)
    prefix = [4, 5, 6]
    target = generate(model, [prefix], 6).completions[0]
    assert is_greedy_continuation(model, prefix, target)
    wrong = target[:-1] + [(target[-1] + 1) % VOCAB]
    assert not is_greedy_continuation(model, prefix, wrong)


def test_chain_rule_scoring_runs_left_to_right_inside_blocks():
    """Block size 1: the exact autoregressive NLL (as the block ELBO at size 1); one block: the MDM's chain rule;
    in between, the scorers agree with the block ELBO's family: `score(method="chain")` dispatches here."""
    from smdm.likelihood import chain_rule_score, score

    prefix, target = [4, 5, 6], [7, 8, 9, 10, 11]
    one = bd_model(1)
    assert score(one, prefix, target, method="chain").nll == pytest.approx(block_score(one, prefix, target, 1).nll,
                                                                           rel=1e-6)
    whole = bd_model(8)
    expected = chain_rule_score(mdm_twin(whole), prefix, target).nll
    assert score(whole, prefix, target, method="chain").nll == pytest.approx(expected, rel=1e-9)
    blocks = bd_model(3)
    by_hand = 0.0
    full = prefix + target
    for k in range(len(prefix), len(full)):
        end = (k // 3 + 1) * 3  # the rest of k's block is masked; later blocks are not part of the input at all
        x = torch.tensor([full[:k] + [blocks.mask_id] * (min(end, len(full)) - k)])
        n = x.size(1)
        by_hand -= blocks(x, attn_mask=block_causal_mask(torch.arange(n), n, 3))[0, k].log_softmax(-1)[full[k]].item()
    assert score(blocks, prefix, target, method="chain", batch_size=2).nll == pytest.approx(by_hand, rel=1e-6)


# --- A shifted BDM (an ARM adapted into block diffusion, Fast-dLLM v2's token shift) -------------------------------


def test_a_shifted_bdm_of_block_size_one_is_the_arm_it_came_from():
    """Block size 1, every token masked: each token is predicted from the clean token before it under causal
    attention, which is the ARM's next-token cross-entropy with the same weights (position 0 is never masked)."""
    model = shifted_bd_model(1)
    arm = Transformer(replace(model.config, shifted=False), causal=True).double().eval()
    arm.load_state_dict(model.state_dict())
    tokens = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    loss = bdm_step_loss(model, tokens, 1, torch.Generator().manual_seed(0), t_min=1.0, t_max=1.0)
    expected = F.cross_entropy(arm(tokens)[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss * 7 / 6, expected, rtol=1e-5, atol=1e-6)
    prefix, target = [4, 5, 6], [7, 8, 9, 10]
    exact = -arm(torch.tensor([prefix + target]))[0, 2:-1].log_softmax(-1)[torch.arange(4), torch.tensor(target)].sum()
    assert block_score(model, prefix, target, 1).nll == pytest.approx(exact.item(), rel=1e-6)  # fp32 CE
    from smdm.likelihood import score
    assert score(model, prefix, target, method="chain").nll == pytest.approx(exact.item(), rel=1e-6)
    result = generate(model, PROMPTS, 5, steps=1)  # greedy decoding: the ARM's own argmax, token by token
    for prompt, completion in zip(PROMPTS, result.completions, strict=True):
        context = list(prompt)
        for _ in range(5):
            context.append(int(arm(torch.tensor([context]))[0, -1].argmax()))
        assert completion == context[len(prompt):]


@pytest.mark.parametrize("options", [{}, {"steps": 2, "temperature": 0.8, "threshold": 0.6}])
def test_shifted_cached_sampling_equals_uncached(options):
    model = shifted_bd_model(4)
    results = [generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(7), cache=cache, **options)
               for cache in ("kv", "none")]
    assert results[0].completions == results[1].completions
    assert results[0].forward_passes == results[1].forward_passes


def test_a_shifted_bdm_needs_a_prompt_and_a_prefix():
    model = shifted_bd_model(4)
    with pytest.raises(SmdmError, match="at least one token"):
        generate(model, [[]], 4)
    with pytest.raises(SmdmError, match="non-empty prefix"):
        block_score(model, [], [1, 2], 4)
    # t = 1 masks every position but 0, which has no prediction: the loss scores positions 1..7 only.
    tokens = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
    loss = bdm_step_loss(model, tokens, 4, torch.Generator().manual_seed(0), t_min=1.0, t_max=1.0)
    noisy = tokens.clone()
    noisy[:, 1:] = model.mask_id
    logits = vectorised_logits(model, noisy, tokens, 4)[:, 1:]
    expected = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum") / tokens.numel()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
