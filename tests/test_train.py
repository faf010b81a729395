"""The one training loop: both objectives learn, budgets, schedule, exact kill-and-resume."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, shared_file
from safetensors.torch import load_file

from smdm.config import ModelConfig, non_embedding_params
from smdm.errors import SmdmError
from smdm.flops import flops_per_token
from smdm.train import TrainConfig, lr_at, total_steps_for, train


def tiny_run(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    settings = {"data_dir": str(data_dir), "out_dir": str(out_dir), "model": "tiny-test", "seq_len": 32,
                "batch_size": 4, "lr": 3e-3, "eval_every": 1000, "save_every": 1000, "log_every": 1,
                "eval_blocks": 4, "progress": False, "threads": 1}
    settings.update(overrides)
    return TrainConfig(**settings)


def test_lr_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 100, 10, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # monotone decay after warmup
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_budgets_in_steps_tokens_and_flops():
    base = TrainConfig(data_dir="", out_dir="")
    n = non_embedding_params(ModelConfig.from_name("smdm-170m"))
    assert total_steps_for(TrainConfig(data_dir="", out_dir="", max_steps=7), 1000, 6 * n) == 7
    assert total_steps_for(TrainConfig(data_dir="", out_dir="", max_tokens=10_000), 1000, 6 * n) == 10
    # The paper's recipe: 170M (N = 169,897,728) at 10e18 FLOPs with 256 x 2048 tokens per step:
    # D = 1e19 / (6 N) = 9.8098e9 tokens = 18710.5 steps of 524,288 tokens (the paper's 6N count) ...
    assert n == 169_897_728
    config = ModelConfig.from_name("smdm-170m")
    flops_6n = flops_per_token(config, 2048, "6n")
    assert total_steps_for(TrainConfig(data_dir="", out_dir="", flops=10e18), 256 * 2048, flops_6n) == 18710
    # ... and 16,038 with the attention term, the default count that the IsoFLOP sweeps also use.
    flops_attention = flops_per_token(config, 2048, TrainConfig(data_dir="", out_dir="").flops_count)
    assert total_steps_for(TrainConfig(data_dir="", out_dir="", flops=10e18), 256 * 2048, flops_attention) == 16038
    with pytest.raises(SmdmError, match="less than one step"):
        total_steps_for(TrainConfig(data_dir="", out_dir="", flops=1e6), 1000, 6 * n)
    with pytest.raises(SmdmError, match="exactly one budget"):
        TrainConfig(data_dir="", out_dir="", max_steps=1, flops=1.0).validate()
    assert base.objective == "mdm"


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_both_objectives_reduce_validation_loss(toy_data, tmp_path, objective):
    config = tiny_run(toy_data, tmp_path / objective, objective=objective, max_steps=60, eval_every=60,
                      random_length_prob=0.1)
    summary = train(config)
    rows = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vocab = json.loads((toy_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    # An untrained model predicts nearly uniformly: loss ~ log V for both objectives.
    assert abs(losses[0] - math.log(vocab)) < 1.0
    assert sum(losses[-20:]) / 20 < sum(losses[:5]) / 5 - 1.0
    assert summary["final_val_loss"] < 0.7 * math.log(vocab)
    assert (tmp_path / objective / "checkpoint" / "model.safetensors").exists()


def test_gradient_accumulation_equals_large_batch(toy_data, tmp_path):
    big = train(tiny_run(toy_data, tmp_path / "big", objective="arm", batch_size=8, max_steps=3,
                         random_length_prob=0.0))
    acc = train(tiny_run(toy_data, tmp_path / "acc", objective="arm", batch_size=4, grad_accum=2, max_steps=3,
                         random_length_prob=0.0))
    a = load_file(str(tmp_path / "big" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "checkpoint" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert big["tokens"] == acc["tokens"]


def _train_command(data_dir: Path, out_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "smdm", "train", "--data", str(data_dir), "--out", str(out_dir),
            "--model", "tiny-test", "--seq-len", "32", "--batch-size", "4", "--max-steps", str(steps),
            "--save-every", "5", "--eval-every", "1000", "--log-every", "1", "--threads", "1",
            "--random-length-prob", "0.2", "--no-progress", "--resume"]


def test_sigkill_and_resume_gives_identical_weights(toy_data, tmp_path):
    steps = 400
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    reference = subprocess.run(_train_command(toy_data, tmp_path / "ref", steps), env=env, capture_output=True,
                               check=False)
    assert reference.returncode == 0, reference.stderr.decode()[-2000:]

    run_dir = tmp_path / "killed"
    process = subprocess.Popen(_train_command(toy_data, run_dir, steps), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    config_file = run_dir / "checkpoint" / "config.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(config_file.read_text())["step"] >= 50:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads(config_file.read_text())["step"]
    assert killed_at < steps

    resumed = subprocess.run(_train_command(toy_data, run_dir, steps), env=env, capture_output=True, check=False)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a = load_file(str(tmp_path / "ref" / "checkpoint" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(steps_logged) and steps_logged[-1] == steps  # no duplicated rows after resume


def test_resume_refuses_a_different_model(toy_data, tmp_path):
    train(tiny_run(toy_data, tmp_path / "run", max_steps=2))
    with pytest.raises(SmdmError, match="not this run"):
        train(tiny_run(toy_data, tmp_path / "run", max_steps=4, objective="arm", resume=True))


def test_tinyshakespeare_mdm_and_arm_learn(tmp_path):
    text = shared_file("tinyshakespeare/input.txt")
    from smdm.data.prepare import PrepareConfig, prepare_corpus
    from smdm.tokenizer import train_bpe

    sample = text.read_text()[:300_000]
    (tmp_path / "shakespeare.txt").write_text(sample)
    tokenizer = train_bpe([sample], 512, tmp_path / "tokenizer.json")
    prepare_corpus([tmp_path / "shakespeare.txt"], tokenizer, tmp_path / "tokens", PrepareConfig(val_fraction=0.05),
                   progress=False)
    results = {}
    for objective in ("mdm", "arm"):
        config = tiny_run(tmp_path / "tokens", tmp_path / objective, objective=objective, model="tiny-test",
                          seq_len=64, batch_size=8, max_steps=80, eval_every=80, eval_blocks=8, lr=5e-3)
        summary = train(config)
        rows = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
        first = [r["loss"] for r in rows if "loss" in r][:3]
        results[objective] = (sum(first) / 3, summary["final_val_loss"])
    for objective, (start, end) in results.items():
        assert end < start - 1.0, (objective, start, end)


def test_activation_checkpointing_changes_memory_not_results(toy_data, tmp_path):
    plain = train(tiny_run(toy_data, tmp_path / "plain", max_steps=3, random_length_prob=0.0))
    recomputed = train(tiny_run(toy_data, tmp_path / "ckpt", max_steps=3, random_length_prob=0.0,
                                activation_checkpointing=True))
    a = load_file(str(tmp_path / "plain" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()  # the checkpoint wrapper leaves parameter names alone
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    assert plain["final_val_loss"] == pytest.approx(recomputed["final_val_loss"], abs=1e-5)


def test_hardware_flops_per_token_counts_head_and_attention():
    from smdm.flops import hardware_flops_per_token

    config = ModelConfig.from_name("smdm-170m")
    n = non_embedding_params(config)
    expected = 6 * (n + 32000 * 768) + 12 * 18 * 768 * 2048
    assert hardware_flops_per_token(config, 2048) == expected


def test_init_from_starts_with_the_given_weights(toy_data, tmp_path):
    train(tiny_run(toy_data, tmp_path / "base", max_steps=2))
    summary = train(tiny_run(toy_data, tmp_path / "tuned", model="tiny-1m", init_from=str(tmp_path / "base"),
                             max_steps=1, lr=1e-12, warmup_steps=0))
    assert summary["model"] == "tiny-test"  # the checkpoint's architecture wins over --model
    a = load_file(str(tmp_path / "base" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "tuned" / "checkpoint" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_validation_reports_the_standard_error_of_the_mdm_estimate(toy_data, tmp_path):
    """The error logged beside an MDM's validation ELBO is what independent re-estimates (other mask draws) spread
    by; an ARM's loss is exact and logs none. The loss itself is what `evaluate` always returned."""
    import statistics

    from smdm.checkpoint import load_checkpoint
    from smdm.data.packed import PackedDataset
    from smdm.train import evaluate, evaluate_with_error

    train(tiny_run(toy_data, tmp_path / "mdm", max_steps=20, eval_every=10))
    rows = [json.loads(line) for line in (tmp_path / "mdm" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "val_loss" in r]
    assert len(logged) == 2 and all(r["val_loss_se"] > 0 for r in logged)
    model = load_checkpoint(tmp_path / "mdm").model
    blocks = PackedDataset(str(toy_data), "train", seq_len=32, shuffle=False).blocks(96)  # more than val holds
    assert evaluate_with_error(model, blocks, "mdm", 4)[0] == evaluate(model, blocks, "mdm", 4)
    # One error from 4 draws is itself rough (the 1/t weights make the draws heavy-tailed), so compare its typical
    # size over 24 independent estimates with how much those estimates actually spread.
    results = [evaluate_with_error(model, blocks, "mdm", 4, seed=1000 * k) for k in range(24)]
    spread = statistics.stdev(loss for loss, _ in results)
    typical = math.sqrt(statistics.mean(error ** 2 for _, error in results))
    assert 0.6 * spread < typical < 1.6 * spread, (typical, spread)
    train(tiny_run(toy_data, tmp_path / "arm", objective="arm", max_steps=10, eval_every=10))
    arm_rows = [json.loads(line) for line in (tmp_path / "arm" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in arm_rows if "val_loss" in r] and not any("val_loss_se" in r for r in arm_rows)
    assert evaluate_with_error(load_checkpoint(tmp_path / "arm").model,
                               PackedDataset(str(toy_data), "val", seq_len=33, shuffle=False).blocks(8), "arm")[1] == 0
