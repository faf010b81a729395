"""The tidied core: every numeric option's one-line error, run configs, objectives, sampler settings, FLOPs and
SMDM's reveal schedule, the plot command and TensorBoard logging."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.flops import flops_per_token
from smdm.model import Transformer
from smdm.objectives import Autoregressive, MaskedDiffusion, make_objective
from smdm.sample import SamplerSettings, generate, smdm_tokens_to_reveal
from smdm.scaling import SweepSpec, plan_sweep
from smdm.train import TrainConfig, total_steps_for

# --- every numeric option refuses nan, inf and out-of-range values in one line ----------------------------------


def _numeric_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(subcommand path, option string, type) of every option parsed by a function (not str) in the whole tree."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, (*path, name))
        elif action.option_strings and callable(action.type) and action.type is not str:
            yield path, action.option_strings[0], action.type


def test_every_numeric_option_gives_a_one_line_error(capsys):
    from smdm.cli import build_parser

    options = list(_numeric_options(build_parser()))
    assert len(options) > 60  # the whole tree is walked, train/sft/task/sample/... included
    checked = 0
    for path, flag, kind in options:
        for bad in ("nan", "inf", "-1", "abc"):
            try:
                kind(bad)
            except argparse.ArgumentTypeError:
                pass
            except ValueError:
                continue
            else:
                continue  # a value this option accepts (e.g. -1 for a signed number)
            code, _, err = run_cli(capsys, *path, flag, bad)
            assert_one_line_error(code, err, f"argument {flag}")
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("argv", [
    ["train", "--data", "d", "--out", "o", "--max-steps", "1", "--lr", "nan"],
    ["train", "--data", "d", "--out", "o", "--max-steps", "1", "--lr", "-3e-4"],
    ["train", "--data", "d", "--out", "o", "--flops", "inf"],
    ["sft", "--data", "x.jsonl", "--out", "o", "--epochs", "1", "--prompt-dropout", "1.5"],
    ["sample", "--checkpoint", "c", "--top-p", "0"],
    ["train", "--data", "d", "--out", "o", "--objective", "diffusion"],
    ["nonsense"],
])
def test_bad_arguments_are_one_line_and_touch_nothing(capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err)
    assert out == "" and not list(tmp_path.iterdir())


def test_train_config_validation_refuses_what_the_cli_would():
    for bad in ({"lr": float("nan")}, {"lr": -1.0}, {"weight_decay": float("inf")}, {"min_lr_ratio": 2.0},
                {"flops_count": "palm"}, {"warmup_steps": -1}, {"seq_len": 0}):
        with pytest.raises(SmdmError):
            TrainConfig(data_dir="d", out_dir="o", max_steps=1, **bad).validate()


# --- run configs as files ---------------------------------------------------------------------------------------

def test_a_recorded_run_reruns_from_its_config_and_flags_override_it(toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(toy_data), "--out", str(out), "--model", "tiny-test",
                           "--max-steps", "4", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
                           "--save-every", "2", "--log-every", "1", "--lr", "0.002", "--no-progress")
    assert code == 0, err
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["lr"] == 0.002 and recorded["max_steps"] == 4 and recorded["seq_len"] == 32
    # Re-run from the file, longer and resumed: the recorded values hold, the flags win.
    code, _, err = run_cli(capsys, "train", "--config", str(out / "train_config.json"), "--max-steps", "6",
                           "--resume", "--no-progress")
    assert code == 0, err
    rerun = json.loads((out / "train_config.json").read_text())
    assert rerun["max_steps"] == 6 and rerun["lr"] == 0.002 and rerun["resume"] is True
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_run_config_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"lr": 0.1, "unknown_knob": 3}')
    (tmp_path / "b.json").write_text("[1, 2]")
    (tmp_path / "c.json").write_text("{not json")
    for name, fragment in (("a.json", "unknown_knob"), ("b.json", "JSON object"), ("c.json", "not a JSON"),
                           ("missing.json", "no such run config")):
        code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / name), "--max-steps", "1")
        assert_one_line_error(code, err, fragment)


def test_sft_reruns_from_its_recorded_settings(tmp_path, capsys, toy_data):
    from conftest import TOY_TEXT

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:10], "response": t[10:]}) + "\n" for t in TOY_TEXT))
    out = tmp_path / "sft"
    code, _, err = run_cli(capsys, "sft", "--data", str(data), "--out", str(out), "--model", "tiny-test",
                           "--tokenizer", str(toy_data.parent / "tokenizer.json"), "--max-steps", "2",
                           "--batch-size", "4", "--template", "plain", "--padding", "batch", "--no-progress")
    assert code == 0, err
    settings = json.loads((out / "sft_config.json").read_text())
    assert settings["padding"] == "batch" and settings["files"] == [str(data.resolve())]
    code, _, err = run_cli(capsys, "sft", "--config", str(out / "train_config.json"), "--max-steps", "3",
                           "--resume", "--no-progress")
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


# --- one objective type -------------------------------------------------------------------------------------------

def test_objectives_say_what_the_loop_needs():
    arm, mdm = make_objective("arm"), make_objective("mdm", low_discrepancy=True)
    assert isinstance(arm, Autoregressive) and isinstance(mdm, MaskedDiffusion)
    assert (arm.causal, mdm.causal) == (True, False)
    assert (arm.block_length(128), mdm.block_length(128)) == (129, 128)
    tokens = torch.zeros(4, 129, dtype=torch.long)
    assert arm.targets(tokens, sft=False) == 4 * 128 and mdm.targets(tokens, sft=False) == 4 * 129
    with pytest.raises(SmdmError, match="low-discrepancy is not an option of the arm"):
        make_objective("arm", low_discrepancy=True)
    with pytest.raises(SmdmError, match="unknown objective"):
        make_objective("bert")


def test_mdm_validation_is_the_true_elbo_whatever_the_training_recipe():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=50)).eval()
    tokens = torch.randint(0, 50, (3, 16))
    plain = [d.item() for d in MaskedDiffusion().validation_draws(model, tokens, None, 3, seed=5)]
    recipe = [d.item() for d in MaskedDiffusion(low_discrepancy=False, prompt_dropout=0.3)
              .validation_draws(model, tokens, None, 3, seed=5)]
    assert plain == recipe and len(set(plain)) == 3  # three different fixed draws, identical across recipes


# --- FLOPs: --flops counts a budget the way the sweep does --------------------------------------------------------

def test_flops_budget_of_train_equals_the_sweep_planner():
    spec = SweepSpec(name="t", data_dir="d", out_dir="o", models=["tiny-1m"], budgets=[3e12], seq_len=128,
                     batch_size=16, lr=1e-3, objectives=["mdm"])
    (run,) = plan_sweep(spec)
    # Non-embedding FLOPs do not depend on the vocabulary, so the data's vocabulary does not matter here.
    per_token = flops_per_token(ModelConfig.from_name(run.model), 128, TrainConfig(data_dir="", out_dir="").flops_count)
    assert per_token == run.flops_per_token[spec.flops_count]
    steps = total_steps_for(TrainConfig(data_dir="", out_dir="", flops=3e12), 16 * 128, per_token)
    assert steps == run.steps


# --- sampler settings and SMDM's reveal schedule -----------------------------------------------------------------

def _smdm_reference_counts(n: int, steps: int) -> list[int]:
    """ML-GSAI/SMDM's diff_sample ("greddy"), its count only: int(masked · (1 - s/t)) on float32 linspace(1, 1e-5)
    and all the rest at the last step — written from the reference, independently of smdm.sample."""
    timesteps = torch.linspace(1, 1e-5, steps + 1)
    counts, masked = [], torch.tensor(n)
    for i in range(steps):
        t, s = timesteps[i], timesteps[i + 1]
        count = int(masked * (1 - s / t)) if i < steps - 1 else int(masked)
        counts.append(count)
        masked = masked - count
    return counts


@pytest.mark.parametrize("n, steps", [(64, 64), (32, 8), (10, 3), (120, 16), (7, 7)])
def test_smdm_schedule_reveals_what_smdm_reveals(n, steps):
    from test_sample import ConfidenceByPosition

    history: list[torch.Tensor] = []
    model = ConfidenceByPosition(length=n + 2).eval()
    generate(model, [3, 4], n, steps, schedule="smdm", on_step=lambda step, x: history.append(x.clone()))
    masked = [int((x == model.mask_id).sum()) for x in history]
    revealed = [n - masked[0]] + [a - b for a, b in itertools.pairwise(masked)]
    assert revealed == _smdm_reference_counts(n, steps)
    assert smdm_tokens_to_reveal(torch.tensor([n]), 0, steps).item() == _smdm_reference_counts(n, steps)[0]


def test_smdm_schedule_differs_from_the_even_split_and_is_refused_for_an_arm():
    assert _smdm_reference_counts(64, 64)[0] == 0 and sum(_smdm_reference_counts(64, 64)) == 64
    arm = Transformer(ModelConfig.from_name("tiny-test", vocab_size=11), causal=True).eval()
    with pytest.raises(SmdmError, match="schedule is an MDM option"):
        generate(arm, [1, 2], 4, schedule="smdm")
    with pytest.raises(SmdmError, match="unknown schedule"):
        SamplerSettings(schedule="cosine").plan(Transformer(ModelConfig.from_name("tiny-test", vocab_size=11)), 4)


def test_settings_and_keywords_sample_the_same_tokens():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny-test", vocab_size=30)).eval()
    settings = SamplerSettings(steps=4, block_length=4, temperature=0.7, top_p=0.9, cfg_scale=0.5)
    a = generate(model, [[1, 2, 3], [4]], 8, generator=torch.Generator().manual_seed(1), settings=settings)
    b = generate(model, [[1, 2, 3], [4]], 8, 4, 0.7, torch.Generator().manual_seed(1), block_length=4, top_p=0.9,
                 cfg_scale=0.5)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(SmdmError, match="either as settings or as keywords"):
        generate(model, [1], 8, 4, settings=settings)


# --- pictures and logs ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(toy_data, tmp_path_factory):
    from smdm.train import train

    root = tmp_path_factory.mktemp("plot")
    for objective in ("mdm", "arm"):
        train(TrainConfig(data_dir=str(toy_data), out_dir=str(root / objective), model="tiny-test", objective=objective,
                          max_steps=6, seq_len=32, batch_size=4, eval_every=3, log_every=1, progress=False,
                          eval_blocks=4))
    return root


@pytest.mark.parametrize("axis", ["steps", "tokens", "flops"])
def test_plot_draws_both_families(two_runs, tmp_path, capsys, axis):
    pytest.importorskip("matplotlib")
    out = tmp_path / f"curves-{axis}.png"
    code, _stdout, err = run_cli(capsys, "plot", str(two_runs / "mdm"), str(two_runs / "arm"), "--out", str(out),
                                "--x", axis)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    code, _, err = run_cli(capsys, "plot", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "no metrics.jsonl")


def test_plot_labels_runs_of_the_same_name_by_their_study(two_runs, tmp_path, capsys, monkeypatch):
    from smdm.plots import run_names

    other = tmp_path / "study-b" / "mdm"
    shutil.copytree(two_runs / "mdm", other)
    assert run_names([two_runs / "mdm", two_runs / "arm"]) == ["mdm", "arm"]
    assert run_names([two_runs / "mdm", other]) == [f"{two_runs.name}/mdm", "study-b/mdm"]
    pytest.importorskip("matplotlib")
    import smdm.plots

    drawn = {}

    def keep_labels(figure, out):
        drawn[out.name] = [line.get_label() for line in figure.axes[0].get_lines()]
        return out

    monkeypatch.setattr(smdm.plots, "save_figure", keep_labels)
    for name, flags in (("both.png", []), ("validation.png", ["--validation-only"])):
        code, _, err = run_cli(capsys, "plot", str(two_runs / "mdm"), str(other), "--out", str(tmp_path / name), *flags)
        assert code == 0, err
    assert drawn["validation.png"] == [f"MDM {two_runs.name}/mdm validation", "MDM study-b/mdm validation"]
    assert len(drawn["both.png"]) == 4 and f"MDM {two_runs.name}/mdm train" in drawn["both.png"]


def test_plot_counts_each_family_s_training_flops_as_its_summary_does(two_runs, toy_data, tmp_path):
    """On the FLOPs axis a run ends where its summary's FLOPs say: a BDM token costs two passes."""
    from smdm.plots import run_curves
    from smdm.train import train

    train(TrainConfig(data_dir=str(toy_data), out_dir=str(tmp_path / "bdm"), model="tiny-test", objective="bdm",
                      diffusion_block_size=8, max_steps=3, seq_len=32, batch_size=4, eval_every=3, log_every=1,
                      progress=False, eval_blocks=4))
    for run in (two_runs / "mdm", two_runs / "arm", tmp_path / "bdm"):
        summary = json.loads((run / "summary.json").read_text())
        assert run_curves(run, "flops")[3][-1] == pytest.approx(summary["flops"], rel=1e-9), run.name


def test_tensorboard_logs_the_same_numbers_as_metrics(toy_data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from smdm.train import train

    out = tmp_path / "tb"
    train(TrainConfig(data_dir=str(toy_data), out_dir=str(out), model="tiny-test", max_steps=4, seq_len=32,
                      batch_size=4, eval_every=2, log_every=1, progress=False, eval_blocks=4, tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    scalars = {e.step: e.value for e in events.Scalars("loss")}
    assert scalars.keys() == losses.keys()
    assert all(math.isclose(scalars[s], losses[s], rel_tol=1e-6) for s in losses)
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_sweeps_hold_block_diffusion_families_at_their_own_compute():
    from smdm.cli import _train_config, build_parser
    from smdm.sweep import train_argv

    spec = SweepSpec(name="t", data_dir="d", out_dir="o", models=["tiny-1m"], budgets=[3e12], seq_len=128,
                     batch_size=16, lr=1e-3, objectives=["mdm", "arm", "bdm:8"])
    runs = {r.objective: r for r in plan_sweep(spec)}
    assert runs["bdm:8"].steps == runs["mdm"].steps // 2  # a BDM token is a 2L-token pass: half the tokens
    assert runs["bdm:8"].flops == pytest.approx(runs["mdm"].flops, rel=0.01) and runs["bdm:8"].name.startswith("bdm8-")
    config = _train_config(build_parser().parse_args(train_argv(runs["bdm:8"], "d")))
    assert (config.objective, config.diffusion_block_size, config.max_steps) == ("bdm", 8, runs["bdm:8"].steps)
    for bad in ("bdm", "bdm:0", "mdm:8", "ddpm"):
        with pytest.raises(SmdmError):
            plan_sweep(SweepSpec(name="t", data_dir="d", out_dir="o", models=["tiny-1m"], budgets=[3e12],
                                 seq_len=128, batch_size=16, lr=1e-3, objectives=[bad]))
