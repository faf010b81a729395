"""MDM recipe options (issue 15): SMDM's initialisation, Sahoo et al.'s simple CE, a cap on the unique training tokens.

Each option must change what it says and nothing else; validation stays the true ELBO whatever the recipe.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from test_train import tiny_run

from smdm.config import ModelConfig
from smdm.data.packed import PackedDataset
from smdm.diffusion import mask_probability, mdm_sft_step_loss, mdm_step_loss, sample_times
from smdm.distributed import DistInfo
from smdm.errors import SmdmError
from smdm.model import Transformer, set_dropout, smdm_init_
from smdm.objectives import make_objective
from smdm.train import build_run, train


def _info() -> DistInfo:
    return DistInfo()


# ------------------------------------------------------------------------------------------------ initialisation

def test_smdm_init_draws_the_paper_codes_standard_deviations():
    config = ModelConfig(name="t", block_size=16, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = Transformer(config)
    smdm_init_(model)
    d, layers = config.n_embd, config.n_layer
    small, output = math.sqrt(2 / (5 * d)), 1 / math.sqrt(d) / layers
    expected = {"embed.weight": small, "lm_head.weight": small}
    for i in range(layers):
        expected |= {f"blocks.{i}.attn.qkv.weight": small, f"blocks.{i}.mlp.gate_up.weight": small,
                     f"blocks.{i}.attn.proj.weight": output, f"blocks.{i}.mlp.down.weight": output}
    params = dict(model.named_parameters())
    for name, std in expected.items():
        assert params[name].std().item() == pytest.approx(std, rel=0.03), name
        assert abs(params[name].mean().item()) < 0.1 * std, name
    for name, value in params.items():
        if value.dim() == 1:  # RMSNorm gains stay 1
            assert torch.equal(value, torch.ones_like(value)), name


def test_init_option_changes_the_initial_weights_only(toy_data, tmp_path):
    runs = {init: build_run(tiny_run(toy_data, tmp_path / init, max_steps=3, init=init), _info())
            for init in ("gpt2", "smdm")}
    base, smdm = runs["gpt2"], runs["smdm"]
    torch.manual_seed(0)
    assert torch.equal(base.model.embed.weight, Transformer(base.model_config).embed.weight)  # default untouched
    assert not torch.equal(base.model.embed.weight, smdm.model.embed.weight)
    assert base.model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert smdm.model.lm_head.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * 64)), rel=0.05)
    # same data order, same schedule
    assert torch.equal(base.data.train.next_batch(4), smdm.data.train.next_batch(4))
    assert (base.total_steps, base.warmup) == (smdm.total_steps, smdm.warmup)


def test_init_is_refused_with_init_from_and_unknown_names(toy_data, tmp_path):
    with pytest.raises(SmdmError, match="unknown init"):
        tiny_run(toy_data, tmp_path, max_steps=1, init="xavier").validate()
    with pytest.raises(SmdmError, match="init-from"):
        tiny_run(toy_data, tmp_path, max_steps=1, init="smdm", init_from=str(tmp_path)).validate()


# ------------------------------------------------------------------------------------------------ loss weighting

class _Uniform(torch.nn.Module):
    """Logits all zero: every masked token costs exactly log V, so the two weightings are known in closed form."""

    mask_id = 16

    def forward(self, idx: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, 16)
        return logits[select] if select is not None else logits


def test_ce_weighting_drops_the_one_over_t_factor_and_keeps_the_masks():
    tokens = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    elbo = mdm_step_loss(_Uniform(), tokens, torch.Generator().manual_seed(3))
    ce = mdm_step_loss(_Uniform(), tokens, torch.Generator().manual_seed(3), weighting="ce")
    # Replay the same draws: t, then the masks.
    generator = torch.Generator().manual_seed(3)
    p = mask_probability(sample_times(8, generator))
    masked = torch.rand(tokens.shape, generator=generator) < p[:, None]
    log_v = math.log(16)
    assert ce.item() == pytest.approx(log_v * masked.sum().item() / tokens.numel(), rel=1e-6)
    assert elbo.item() == pytest.approx(log_v * (masked / p[:, None]).sum().item() / tokens.numel(), rel=1e-6)


def test_ce_weighting_in_sft_keeps_the_response_normaliser():
    tokens = torch.randint(0, 16, (4, 20), generator=torch.Generator().manual_seed(1))
    prompts = torch.tensor([3, 5, 0, 10])
    ce = mdm_sft_step_loss(_Uniform(), tokens, prompts, torch.Generator().manual_seed(2), weighting="ce")
    generator = torch.Generator().manual_seed(2)
    p = mask_probability(sample_times(4, generator))
    masked = (torch.rand(tokens.shape, generator=generator) < p[:, None]) & (torch.arange(20)[None] >= prompts[:, None])
    expected = sum(masked[i].sum().item() / (20 - prompts[i].item()) for i in range(4)) * math.log(16) / 4
    assert ce.item() == pytest.approx(expected, rel=1e-6)


def test_clipped_mask_rates_draw_from_the_range_and_keep_the_draw_order():
    """--mask-rate-min/max on an MDM: each row's rate is lo + (hi - lo)·t with the same t (and then the same uniform
    draws for the masks) as the unclipped path, whose p(t) = (1 - eps)·t + eps is untouched."""
    tokens = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0))
    clipped = mdm_step_loss(_Uniform(), tokens, torch.Generator().manual_seed(3), low_discrepancy=True,
                            weighting="ce", rate_range=(0.3, 0.8))
    generator = torch.Generator().manual_seed(3)
    t = sample_times(8, generator, low_discrepancy=True)
    rate = 0.3 + 0.5 * t
    assert bool(((rate >= 0.3) & (rate <= 0.8)).all())
    masked = torch.rand(tokens.shape, generator=generator) < rate[:, None]
    assert clipped.item() == pytest.approx(math.log(16) * masked.sum().item() / tokens.numel(), rel=1e-6)
    plain = mdm_step_loss(_Uniform(), tokens, torch.Generator().manual_seed(3), low_discrepancy=True, weighting="ce")
    assert plain.item() == mdm_step_loss(_Uniform(), tokens, torch.Generator().manual_seed(3), low_discrepancy=True,
                                         weighting="ce", rate_range=None).item()
    assert plain.item() != clipped.item()


def test_clipped_rates_are_an_mdm_option_recorded_and_validation_stays_unclipped(toy_data, tmp_path):
    objective = make_objective("mdm", mask_rate_min=0.3, mask_rate_max=0.8)
    assert objective.options() == {"mask_rate_min": 0.3, "mask_rate_max": 0.8}
    assert make_objective("mdm", mask_rate_min=0.2).rate_range() == (0.2, 1.0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (2, 16))
    a = list(make_objective("mdm").validation_draws(model, tokens, None, 3, 7))
    b = list(objective.validation_draws(model, tokens, None, 3, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(SmdmError, match="0 < t_min <= t_max <= 1"):
        make_objective("mdm", mask_rate_min=0.9, mask_rate_max=0.2)
    train(tiny_run(toy_data, tmp_path / "run", max_steps=2, mask_rate_min=0.3, mask_rate_max=0.8))
    with pytest.raises(SmdmError, match="not this run"):  # a resume cannot silently drop the clipping
        train(tiny_run(toy_data, tmp_path / "run", max_steps=4, resume=True))


def test_validation_is_the_elbo_whatever_the_training_weighting():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=64)).eval()
    tokens = torch.randint(0, 64, (2, 16))
    elbo, ce = make_objective("mdm"), make_objective("mdm", loss_weighting="ce")
    a = list(elbo.validation_draws(model, tokens, None, 3, 7))
    b = list(ce.validation_draws(model, tokens, None, 3, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    generator = torch.Generator().manual_seed(5)
    assert ce.loss(model, tokens, generator, 64) < elbo.loss(model, tokens, torch.Generator().manual_seed(5), 64)


def test_loss_weighting_is_an_mdm_option_recorded_in_the_checkpoint(toy_data, tmp_path):
    with pytest.raises(SmdmError, match="loss-weighting is not an option of the arm"):
        tiny_run(toy_data, tmp_path, max_steps=1, objective="arm", loss_weighting="ce").validate()
    with pytest.raises(SmdmError, match="unknown loss weighting"):
        tiny_run(toy_data, tmp_path, max_steps=1, loss_weighting="sqrt").validate()
    assert make_objective("mdm").options() == {}  # the default recipe writes the same checkpoint metadata as before
    train(tiny_run(toy_data, tmp_path / "run", max_steps=2, loss_weighting="ce"))
    with pytest.raises(SmdmError, match="not this run"):  # a resume cannot silently switch the training loss
        train(tiny_run(toy_data, tmp_path / "run", max_steps=4, resume=True))


def test_ce_run_differs_from_elbo_run_only_through_the_loss(toy_data, tmp_path):
    for weighting in ("elbo", "ce"):
        train(tiny_run(toy_data, tmp_path / weighting, max_steps=2, loss_weighting=weighting))
    a = load_file(tmp_path / "elbo" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "ce" / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    summary_keys = ("steps", "tokens")
    sa = json.loads((tmp_path / "elbo" / "summary.json").read_text())
    sb = json.loads((tmp_path / "ce" / "summary.json").read_text())
    assert [sa[k] for k in summary_keys] == [sb[k] for k in summary_keys]


# ------------------------------------------------------------------------------------------------ dropout

def test_dropout_acts_in_training_only_and_keeps_the_expected_branch():
    config = ModelConfig(name="t", block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = Transformer(config)
    tokens = torch.randint(0, 64, (2, 16))
    model.eval()
    clean = model(tokens)
    set_dropout(model, 0.3)
    assert torch.equal(model(tokens), clean)  # evaluation and sampling never drop
    model.train()
    noisy = model(tokens)
    assert not torch.allclose(noisy, clean)
    block = model.blocks[0]
    branch = torch.ones(4096, 32)
    dropped = block._drop(branch)
    kept = dropped != 0
    assert 0.25 < 1 - kept.float().mean().item() < 0.35  # p = 0.3 of the entries zeroed ...
    assert torch.allclose(dropped[kept], torch.full_like(dropped[kept], 1 / 0.7))  # ... the rest rescaled
    set_dropout(model, 0.0)
    assert torch.equal(model(tokens), model(tokens))  # off again: deterministic in training mode too
    with pytest.raises(SmdmError, match="dropout"):
        set_dropout(model, 1.0)


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_dropout_run_keeps_data_masks_and_schedule_and_resumes_bit_exactly(toy_data, tmp_path, objective):
    options = {"objective": objective, "save_every": 2, "max_steps": 5}
    train(tiny_run(toy_data, tmp_path / "base", **options))
    train(tiny_run(toy_data, tmp_path / "ref", dropout=0.2, **options))
    train(tiny_run(toy_data, tmp_path / "cut", dropout=0.2, stop_after_steps=3, **options))
    train(tiny_run(toy_data, tmp_path / "cut", dropout=0.2, resume=True, **options))
    base, ref, cut = (load_file(tmp_path / name / "checkpoint" / "model.safetensors") for name in ("base", "ref", "cut"))
    assert all(torch.equal(ref[k], cut[k]) for k in ref)  # the dropout masks are replayed by the resume
    assert any(not torch.equal(base[k], ref[k]) for k in base)
    meta = json.loads((tmp_path / "ref" / "checkpoint" / "config.json").read_text())
    assert meta["dropout"] == 0.2 and "dropout" not in json.loads(
        (tmp_path / "base" / "checkpoint" / "config.json").read_text())
    a, b = build_run(tiny_run(toy_data, tmp_path / "a", **options), _info()), build_run(
        tiny_run(toy_data, tmp_path / "b", dropout=0.2, **options), _info())
    assert torch.equal(a.data.train.next_batch(4), b.data.train.next_batch(4))  # same data order and schedule
    assert (a.total_steps, a.warmup) == (b.total_steps, b.warmup)
    assert all(block.dropout == 0.2 for block in b.model.blocks) and all(block.dropout == 0 for block in a.model.blocks)


def test_dropout_flag_reaches_the_config_and_bad_values_are_one_line_errors(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--model", "tiny-test",
                           "--seq-len", "32", "--batch-size", "4", "--max-steps", "1", "--eval-blocks", "2",
                           "--dropout", "0.1", "--no-progress")
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["dropout"] == 0.1
    for bad in ("1", "-0.1", "nan"):
        code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / "x"),
                               "--dropout", bad, "--max-steps", "1")
        assert_one_line_error(code, err, "--dropout")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SmdmError, match="dropout must lie"):
        tiny_run(toy_data, tmp_path, max_steps=1, dropout=1.0).validate()


# ------------------------------------------------------------------------------------------------ unique tokens

def test_max_tokens_serves_only_the_first_unique_tokens_for_many_epochs(toy_data):
    full = PackedDataset(toy_data, "train", seq_len=8, seed=0)
    capped = PackedDataset(toy_data, "train", seq_len=8, seed=0, max_tokens=8 * 5 + 3)
    assert len(capped) == 5 and capped.total_tokens == 43
    allowed = {tuple(row.tolist()) for row in full.blocks(5)}
    seen = [tuple(row.tolist()) for _ in range(6) for row in capped.next_batch(5)]
    assert set(seen) == allowed  # every epoch is a permutation of the same 5 blocks
    assert capped.epoch == 6
    again = PackedDataset(toy_data, "train", seq_len=8, seed=0, max_tokens=43)
    assert [tuple(row.tolist()) for _ in range(6) for row in again.next_batch(5)] == seen  # deterministic order


def test_max_tokens_state_refuses_a_different_cap(toy_data):
    capped = PackedDataset(toy_data, "train", seq_len=8, max_tokens=40)
    capped.next_batch(3)
    other = PackedDataset(toy_data, "train", seq_len=8, max_tokens=80)
    with pytest.raises(SmdmError, match="n_blocks"):
        other.load_state_dict(capped.state_dict())
    with pytest.raises(SmdmError, match="cannot keep"):
        PackedDataset(toy_data, "train", seq_len=8, max_tokens=10**9)


def test_max_unique_tokens_sets_the_epoch_length_and_leaves_the_default_alone(toy_data, tmp_path):
    capped = build_run(tiny_run(toy_data, tmp_path / "a", epochs=4, max_unique_tokens=32 * 6 + 5), _info())
    assert len(capped.data.train) == 6 and capped.total_steps == math.ceil(4 * 6 / 4)
    default = build_run(tiny_run(toy_data, tmp_path / "b", epochs=1), _info())
    assert len(default.data.train) == PackedDataset(toy_data, "train", seq_len=32).n_blocks


def test_cli_recipe_flags_reach_the_config(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--model", "tiny-test",
                           "--seq-len", "32", "--batch-size", "4", "--max-steps", "1", "--eval-blocks", "2",
                           "--init", "smdm", "--loss-weighting", "ce", "--max-unique-tokens", "330", "--no-progress")
    assert code == 0, err
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["init"], recorded["loss_weighting"], recorded["max_unique_tokens"]) == ("smdm", "ce", 330)
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--loss-weighting", "sqrt",
                           "--max-steps", "1")
    assert_one_line_error(code, err, "--loss-weighting")
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--max-unique-tokens", "0",
                           "--max-steps", "1")
    assert_one_line_error(code, err, "--max-unique-tokens")
