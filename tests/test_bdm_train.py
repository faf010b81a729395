"""Block diffusion as a training objective: `smdm train/sft --objective bdm`, checkpoints that record the block size,
loaders that understand them, and one-line errors for bad block sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from smdm.block_diffusion import bdm_sft_step_loss, bdm_step_loss, sample_block_times
from smdm.checkpoint import load_checkpoint
from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.likelihood import score, sequence_nll
from smdm.model import Transformer
from smdm.objectives import BlockDiffusion, make_objective
from smdm.sample import generate

COMMON = ["--model", "tiny-test", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "1000",
          "--save-every", "1000", "--log-every", "1", "--eval-blocks", "4", "--threads", "1", "--no-progress"]


def test_bdm_trains_records_its_block_size_and_loads_as_block_diffusion(toy_data, tmp_path, capsys):
    out = tmp_path / "bdm"
    code, stdout, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--objective", "bdm",
                                "--diffusion-block-size", "4", "--max-steps", "60", "--random-length-prob", "0.1",
                                *COMMON)
    assert code == 0, err
    summary = json.loads(stdout)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    vocab = json.loads((toy_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert abs(losses[0] - math.log(vocab)) < 1.0  # an untrained model: about log V per token
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5 - 1.0
    assert summary["final_val_loss"] < 0.7 * math.log(vocab)
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["objective"] == "bdm" and meta["objective_options"] == {"diffusion_block_size": 4}
    checkpoint = load_checkpoint(out)
    model = checkpoint.model
    assert model.diffusion_block_size == 4 and not model.causal
    result = generate(model, [[5, 6, 7], [8]], 8, cache="kv")
    assert result.completions == generate(model, [[5, 6, 7], [8]], 8, cache="none").completions
    assert all(len(c) == 8 for c in result.completions)
    nll, stderr = sequence_nll(model, torch.tensor([5, 6, 7, 8, 9, 10]), mc_samples=8)
    assert math.isfinite(nll) and stderr > 0
    assert score(model, [5, 6], [7, 8, 9], mc_samples=8).target_tokens == 3
    # The inference commands: `smdm sample` through the block sampler, `smdm likelihood` through the block ELBO.
    code, stdout, err = run_cli(capsys, "sample", "--checkpoint", str(out), "--prompt", "the cat", "--prompt", "a",
                                "--length", "6", "--steps", "2", "--temperature", "1", "--threads", "1")
    assert code == 0, err
    assert len([json.loads(line) for line in stdout.splitlines()]) == 2
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(out), "--length", "6", "--block-length", "8",
                           "--threads", "1")
    assert_one_line_error(code, err, "trained with block size 4")
    code, stdout, err = run_cli(capsys, "likelihood", "--checkpoint", str(out), "--text", "the dog sat on the log",
                                "--mc-samples", "8", "--threads", "1")
    assert code == 0, err
    assert "nll" in stdout
    # A bdm record whose block size cannot tile the context is refused by the loader, in one line.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(out / "checkpoint", broken)
    record = json.loads((broken / "config.json").read_text())
    record["objective_options"]["diffusion_block_size"] = 5
    (broken / "config.json").write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(broken), "--length", "4", "--threads", "1")
    assert_one_line_error(code, err, "diffusion block size dividing the context")
    # Resuming with another block size is refused; so is starting a run from it with another block size.
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--objective", "bdm",
                           "--diffusion-block-size", "8", "--max-steps", "70", "--resume", *COMMON)
    assert_one_line_error(code, err, "not this run")
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / "b"), "--objective",
                           "bdm", "--diffusion-block-size", "8", "--max-steps", "1", "--init-from", str(out), *COMMON)
    assert_one_line_error(code, err, "block size 4", "--diffusion-block-size 8")


def test_bad_block_sizes_and_misplaced_options_are_one_line_errors(toy_data, tmp_path, capsys):
    cases = [
        (["--objective", "bdm", "--diffusion-block-size", "5"], "must divide"),
        (["--objective", "bdm"], "needs --diffusion-block-size"),
        (["--objective", "mdm", "--diffusion-block-size", "4"], "not an option of the mdm objective"),
        (["--objective", "arm", "--mask-rate-min", "0.3"], "not an option of the arm objective"),
        (["--objective", "bdm", "--diffusion-block-size", "4", "--mask-rate-min", "0.9", "--mask-rate-max", "0.2"],
         "t_min <= t_max"),
    ]
    for index, (options, fragment) in enumerate(cases):
        out = tmp_path / f"run{index}"
        code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--max-steps", "1",
                               *options, *COMMON)
        assert_one_line_error(code, err, fragment)
        assert not out.exists()  # refused before anything is written


def test_bdm_objective_records_its_options_and_clips_training_rates():
    objective = make_objective("bdm", diffusion_block_size=8, mask_rate_min=0.3, mask_rate_max=0.8)
    assert isinstance(objective, BlockDiffusion)
    assert objective.options() == {"diffusion_block_size": 8, "mask_rate_min": 0.3, "mask_rate_max": 0.8}
    assert objective.block_length(32) == 32


def test_a_flops_budget_buys_block_diffusion_half_the_tokens(toy_data, tmp_path, capsys):
    """A training token costs two passes' worth of compute (the noisy and the clean copy)."""
    from smdm.config import ModelConfig
    from smdm.flops import flops_per_token

    budget = 4 * 4 * 32 * flops_per_token(ModelConfig.from_name("tiny-test"), 32)  # 4 MDM steps of 4 x 32 tokens
    steps = {}
    for name, extra in (("mdm", []), ("bdm", ["--diffusion-block-size", "4"])):
        code, stdout, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(tmp_path / name),
                                    "--objective", name, *extra, "--flops", str(budget * 1.0001), *COMMON)
        assert code == 0, err
        steps[name] = json.loads(stdout)["steps"]
    assert steps == {"mdm": 4, "bdm": 2}


def test_smdm_sft_with_block_diffusion(tmp_path, capsys):
    from smdm.tokenizer import train_bpe

    pairs = [{"prompt": f"what is {w} plus {w}?", "completion": f" {w} and {w}."}
             for w in ("one", "two", "four", "paris", "france", "capital")] * 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = train_bpe([p["prompt"] + p["completion"] for p in pairs], 300, tmp_path / "tokenizer.json")
    out = tmp_path / "sft"
    code, _stdout, err = run_cli(capsys, "sft", "--data", str(data), "--tokenizer", str(tokenizer.path), "--out",
                                str(out), "--model", "tiny-test", "--objective", "bdm", "--diffusion-block-size", "4",
                                "--prompt-dropout", "0.1", "--epochs", "30", "--batch-size", "8", "--lr", "3e-3",
                                "--eval-every", "1000", "--log-every", "1", "--val-fraction", "0", "--threads", "1",
                                "--no-progress")
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["sft"] is True and meta["objective_options"]["diffusion_block_size"] == 4


def test_task_reversal_trains_and_evaluates_a_block_diffusion_model(tmp_path, capsys):
    """Tasks train with the objective's options and evaluate through the block sampler and the block ELBO."""
    from test_reversal import _reversal_dir

    data = _reversal_dir(tmp_path / "data")
    out = tmp_path / "bdm"
    code, _, err = run_cli(capsys, "task", "reversal", "--data-dir", str(data), "--out", str(out), "--model",
                           "tiny-test", "--objective", "bdm", "--diffusion-block-size", "4", "--epochs", "2",
                           "--batch-size", "4", "--vocab-size", "300", "--threads", "1", "--no-progress", "--rank", "2")
    assert code == 0, err
    record = json.loads((out / "reversal.json").read_text())
    assert record["model"]["objective"] == "bdm"
    assert record["metrics"]["d2p"]["rank_n"] == 2 and record["metrics"]["p2d"]["n"] == 3
    meta = json.loads((out / "run" / "checkpoint" / "config.json").read_text())
    assert meta["objective_options"] == {"diffusion_block_size": 4}


def test_bdm_ce_weighting_drops_the_one_over_t_of_each_block_and_is_recorded():
    """With one block per row the block ELBO is the plain masked CE over the row's rate t, draw for draw; the
    option is recorded (a resume cannot switch it) and validation stays the same ELBO."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=64)).eval()
    tokens = torch.randint(0, 63, (1, 16), generator=torch.Generator().manual_seed(1))
    t = sample_block_times(1, 1, torch.Generator().manual_seed(5)).item()  # the first draw of both losses
    with torch.no_grad():
        for loss in (lambda w: bdm_step_loss(model, tokens, 16, torch.Generator().manual_seed(5), weighting=w),
                     lambda w: bdm_sft_step_loss(model, tokens, torch.tensor([4]), 16,
                                                 torch.Generator().manual_seed(5), weighting=w)):
            elbo, ce = loss("elbo").item(), loss("ce").item()
            assert ce > 0 and ce == pytest.approx(elbo * t, rel=1e-5)
    plain = make_objective("bdm", diffusion_block_size=4)
    simple = make_objective("bdm", diffusion_block_size=4, loss_weighting="ce")
    assert plain.options() == {"diffusion_block_size": 4}  # the default recipe's checkpoints are unchanged
    assert simple.options() == {"diffusion_block_size": 4, "loss_weighting": "ce"}
    a = list(plain.validation_draws(model, tokens, None, 2, 7))
    b = list(simple.validation_draws(model, tokens, None, 2, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(SmdmError, match="unknown loss weighting"):
        make_objective("bdm", diffusion_block_size=4, loss_weighting="sqrt")
