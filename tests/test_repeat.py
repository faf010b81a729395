"""The data-constrained study: planning, frontiers and crossovers, the reuse half-life fit, and one tiny study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from smdm.errors import SmdmError
from smdm.repeat import (
    RepeatSpec,
    best_so_far,
    crossover_compute,
    effective_data,
    fit_reuse_half_life,
    paper_critical_compute,
    plan_repeat,
)


def _synthetic(half_life: float, epochs: list[float], uniques=(1e5, 4e5), e=2.0, b=3.0, beta=0.4):
    u = np.repeat(np.array(uniques), len(epochs))
    ep = np.tile(np.array(epochs, dtype=float), len(uniques))
    loss = e + b * (effective_data(u, ep, half_life) / max(uniques)) ** -beta
    return u.tolist(), ep.tolist(), loss.tolist()


@pytest.mark.parametrize(("half_life", "max_epochs"), [(15.0, 256), (500.0, 8192)])
def test_reuse_fit_recovers_a_known_half_life(half_life, max_epochs):
    epochs = [2.0 ** k for k in range(int(math.log2(max_epochs)) + 1)]
    fit = fit_reuse_half_life(*_synthetic(half_life, epochs))
    assert fit.half_life == pytest.approx(half_life, rel=0.05)
    assert fit.beta == pytest.approx(0.4, abs=0.03)
    assert fit.irreducible == pytest.approx(2.0, abs=0.05)
    assert not fit.at_grid_edge and fit.rmse < 1e-3


def test_reuse_fit_reports_a_bound_when_repetition_never_decays():
    u, ep, _ = _synthetic(15.0, [1, 2, 4, 8, 16])
    loss = [2.0 + 3.0 * (uu * ee / 4e5) ** -0.4 for uu, ee in zip(u, ep, strict=True)]  # every epoch as good as new
    fit = fit_reuse_half_life(u, ep, loss)
    assert fit.at_grid_edge and fit.half_life == pytest.approx(1e4)
    with pytest.raises(SmdmError, match="at least 4 runs"):
        fit_reuse_half_life([1e5] * 3, [1, 2, 4], [3.0, 2.9, 2.8])


def test_reuse_fit_keeps_the_irreducible_loss_non_negative():
    """An ARM that saturates within the epochs run (tiny-1m, U = 25k of the crossover study): unconstrained, the
    least-squares E went to -40 with beta on the grid's floor."""
    fit = fit_reuse_half_life([25_000] * 5, [2, 4, 8, 16, 32], [4.902, 4.554, 4.057, 3.894, 3.904])
    assert fit.irreducible >= 0 and fit.scale >= 0
    predicted = fit.predict(np.full(5, 25_000.0), np.array([2, 4, 8, 16, 32.0]))
    assert np.all(np.isfinite(predicted)) and abs(predicted[-1] - 3.9) < 0.2


def test_best_so_far_and_crossover():
    arm = [(1, 4.0), (2, 3.0), (4, 3.5), (8, 5.0)]  # overfits after its best: the frontier keeps 3.0
    mdm = [(1, 5.0), (2, 4.0), (4, 3.2), (8, 2.9)]
    assert best_so_far(arm) == [(1, 4.0), (2, 3.0), (4, 3.0), (8, 3.0)]
    assert crossover_compute(mdm, arm) == 8
    assert crossover_compute(mdm, [*arm, (16, 2.5)]) is None  # the ARM gets ahead again: no lasting crossover
    assert crossover_compute([(0.5, 1.0)], arm) == 0.5  # below from the start (before any ARM run)
    assert crossover_compute(mdm, []) is None


def test_paper_critical_compute_units():
    assert paper_critical_compute(1e6) == pytest.approx(2.12e15)
    assert paper_critical_compute(100e6) == pytest.approx(2.12e15 * 100 ** 2.174)
    # the project page's form, U in tokens: 2.12 x 10^1.956 x U^2.174 (the same law)
    assert paper_critical_compute(25e6) == pytest.approx(2.12 * 10 ** 1.956 * 25e6 ** 2.174)


def _spec(tmp_path, data_dir, **overrides) -> RepeatSpec:
    settings = {"name": "t", "data_dir": str(data_dir), "out_dir": str(tmp_path / "runs"), "unique_tokens": [330],
                "epochs": [1, 3], "models": ["tiny-test"], "seq_len": 32, "batch_size": 4, "eval_blocks": 2,
                "eval_mc_samples": 1, "evals_per_run": 2, "train": {"random_length_prob": 0.0},
                "train_by_objective": {"mdm": {"loss_weighting": "ce"}}}
    settings.update(overrides)
    return RepeatSpec(**settings)


def test_plan_covers_every_combination_with_epoch_budgets(tmp_path):
    spec = _spec(tmp_path, tmp_path, unique_tokens=[330, 660], epochs=[1, 2.5, 4], models=["tiny-test", "tiny-1m"])
    runs = plan_repeat(spec, available_tokens=1000)
    assert len(runs) == 2 * 3 * 2 * 2
    by_name = {r.name: r for r in runs}
    mdm, arm = by_name["mdm-tiny-test-U660-e2.5"], by_name["arm-tiny-test-U660-e2.5"]
    assert mdm.steps == math.ceil(2.5 * (660 // 32) / 4) and arm.steps == math.ceil(2.5 * (660 // 33) / 4)
    assert mdm.train["max_unique_tokens"] == 660 and mdm.train["max_steps"] == mdm.steps
    assert mdm.train["loss_weighting"] == "ce" and "loss_weighting" not in arm.train
    assert mdm.flops == mdm.tokens * mdm.flops_per_token["attention"]
    with pytest.raises(SmdmError, match="has only 500"):
        plan_repeat(spec, available_tokens=500)
    with pytest.raises(SmdmError, match="unknown objective"):
        plan_repeat(_spec(tmp_path, tmp_path, objectives=["gpt"]))


def test_each_family_can_have_its_own_epochs(tmp_path):
    spec = _spec(tmp_path, tmp_path, epochs=[1, 2], epochs_by_objective={"mdm": [2, 8]})
    runs = plan_repeat(spec)
    assert [r.name for r in runs] == ["arm-tiny-test-U330-e1", "mdm-tiny-test-U330-e2", "arm-tiny-test-U330-e2",
                                      "mdm-tiny-test-U330-e8"]
    by_name = {r.name: r for r in runs}
    assert by_name["mdm-tiny-test-U330-e8"].steps == math.ceil(8 * (330 // 32) / 4)
    with pytest.raises(SmdmError, match="not in objectives"):
        plan_repeat(_spec(tmp_path, tmp_path, objectives=["arm"], epochs_by_objective={"mdm": [2]}))
    with pytest.raises(SmdmError, match="positive numbers"):
        plan_repeat(_spec(tmp_path, tmp_path, epochs_by_objective={"mdm": [0]}))
    with pytest.raises(SmdmError, match="positive numbers"):
        plan_repeat(_spec(tmp_path, tmp_path, epochs_by_objective={"mdm": []}))


def test_tiny_study_end_to_end(toy_data, tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(vars(_spec(tmp_path, toy_data, eval_mc_samples=2))))
    manifest = tmp_path / "manifest.json"
    code, out, err = run_cli(capsys, "scale", "repeat", "plan", str(spec_file), "--out", str(manifest))
    assert code == 0, err
    assert "4 runs" in out
    code, out, err = run_cli(capsys, "scale", "repeat", "run", str(manifest), "--threads", "1", "--jobs", "2",
                             "--no-progress")
    assert code == 0, err
    code, out, err = run_cli(capsys, "scale", "repeat", "status", str(manifest))
    assert code == 0 and out.splitlines()[-1].startswith("4 runs: 4 done; 100% of the"), err
    config = json.loads((tmp_path / "runs" / "mdm-tiny-test-U330-e3" / "train_config.json").read_text())
    assert config["max_unique_tokens"] == 330 and config["loss_weighting"] == "ce"
    code, out, err = run_cli(capsys, "scale", "repeat", "fit", str(manifest), "--out", str(tmp_path / "fit"))
    assert code == 0, err
    report = json.loads((tmp_path / "fit" / "repeat.json").read_text())
    assert len(report["points"]) == 4 and report["per_unique"][0]["unique_tokens"] == 330
    assert all(p["best_loss"] <= p["final_loss"] for p in report["points"])
    # the MDM's ELBO comes with its Monte-Carlo error, the ARM's exact loss without; the gap is read against it
    assert all((p["best_loss_se"] > 0) == (p["objective"] == "mdm") for p in report["points"]
               if p["best_loss_se"] is not None) and any(p["best_loss_se"] for p in report["points"])
    gap = report["per_model"][0]
    mdm_best = min(p["best_loss"] for p in report["points"] if p["objective"] == "mdm")
    arm_best = min(p["best_loss"] for p in report["points"] if p["objective"] == "arm")
    assert gap["gap"] == pytest.approx(arm_best - mdm_best) and gap["gap_se"] > 0
    assert gap["beyond_2se"] == (abs(gap["gap"]) > 2 * gap["gap_se"]) and "2 SE" in out
    assert (tmp_path / "fit" / "loss_vs_compute.png").is_file() and (tmp_path / "fit" / "reuse.png").is_file()
    assert "closed-form C_crit" in out
    # a rerun skips the finished runs
    code, out, err = run_cli(capsys, "scale", "repeat", "run", str(manifest), "--no-progress")
    assert code == 0 and "0 trained, 4 already finished" in out, out
    # another study (a second U) joins the fit with --also
    other_spec, other = tmp_path / "other.json", tmp_path / "other-manifest.json"
    other_spec.write_text(json.dumps(vars(_spec(tmp_path, toy_data, unique_tokens=[200], epochs=[1]))))
    assert run_cli(capsys, "scale", "repeat", "plan", str(other_spec), "--out", str(other))[0] == 0
    assert run_cli(capsys, "scale", "repeat", "run", str(other), "--threads", "1", "--jobs", "2", "--no-progress")[0] == 0
    code, out, err = run_cli(capsys, "scale", "repeat", "fit", str(manifest), "--also", str(other), str(manifest),
                             "--out", str(tmp_path / "fit2"))
    assert code == 0, err
    report = json.loads((tmp_path / "fit2" / "repeat.json").read_text())
    assert len(report["points"]) == 6 and [u["unique_tokens"] for u in report["per_unique"]] == [200, 330]
    # the same grid point of another recipe (its own directory) joins under its study's name, not dropped
    variant_spec, variant = tmp_path / "variant.json", tmp_path / "variant-manifest.json"
    variant_spec.write_text(json.dumps(vars(_spec(tmp_path, toy_data, name="clip", out_dir=str(tmp_path / "runs-clip"),
                                                  unique_tokens=[200], epochs=[1]))))
    assert run_cli(capsys, "scale", "repeat", "plan", str(variant_spec), "--out", str(variant))[0] == 0
    assert run_cli(capsys, "scale", "repeat", "run", str(variant), "--threads", "1", "--jobs", "2", "--no-progress")[0] == 0
    code, out, err = run_cli(capsys, "scale", "repeat", "fit", str(manifest), "--also", str(other), str(variant),
                             "--out", str(tmp_path / "fit3"))
    assert code == 0, err
    names = [p["name"] for p in json.loads((tmp_path / "fit3" / "repeat.json").read_text())["points"]]
    assert len(names) == 8 and sum(name.endswith("@clip") for name in names) == 2


def test_spec_errors_are_one_line(tmp_path, capsys):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": "t", "data_dir": "d", "out_dir": "o", "unique_tokens": [10],
                                     "epochs": [1], "models": ["tiny-test"], "epoch": 3}))
    code, _, err = run_cli(capsys, "scale", "repeat", "plan", str(spec_file), "--out", str(tmp_path / "m.json"))
    assert_one_line_error(code, err, "unknown keys ['epoch']")
    code, _, err = run_cli(capsys, "scale", "repeat", "fit", str(spec_file), "--out", str(tmp_path))
    assert_one_line_error(code, err, "not a repeat manifest")


def test_isoflop_sweep_takes_a_recipe_per_family(tmp_path):
    from smdm.scaling import SweepSpec, plan_sweep

    spec = SweepSpec(name="s", data_dir="d", out_dir=str(tmp_path), models=["scale-18k", "scale-33k", "scale-74k"],
                     budgets=[1e11], batch_size=16, seq_len=128,
                     train_by_objective={"mdm": {"loss_weighting": "ce", "init": "smdm"}})
    runs = plan_sweep(spec)
    mdm = [r for r in runs if r.objective == "mdm"]
    arm = [r for r in runs if r.objective == "arm"]
    assert mdm and arm
    assert all(r.train["loss_weighting"] == "ce" and r.train["init"] == "smdm" for r in mdm)
    assert all("loss_weighting" not in r.train and "init" not in r.train for r in arm)
    # The repeat study takes a family's own warmup fraction too (tuned per family), as the IsoFLOP sweep does.
    from smdm.repeat import RepeatSpec, plan_repeat

    repeat = RepeatSpec(name="r", data_dir="d", out_dir=str(tmp_path), unique_tokens=[4096], epochs=[64],
                        models=["scale-18k"], seq_len=128, batch_size=4,
                        train_by_objective={"arm": {"warmup_fraction": 0.1, "lr": 1e-2}})
    by_family = {r.objective: r for r in plan_repeat(repeat)}
    # ARM rows are 129 tokens: 31 rows, 64 epochs of batches of 4 = 496 steps; MDM: 32 rows, 512 steps.
    assert (by_family["arm"].steps, by_family["arm"].warmup_steps, by_family["arm"].train["lr"]) == (496, 49, 1e-2)
    assert (by_family["mdm"].steps, by_family["mdm"].warmup_steps) == (512, 5) and "warmup_fraction" not in by_family["arm"].train


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.json")))
def test_every_committed_study_spec_plans(name):
    """The specs the docs' commands run: each parses and plans (unknown keys, bad epochs or sizes fail here)."""
    from smdm.scaling import SweepSpec, plan_sweep

    path = Path(__file__).parents[1] / "configs" / name
    runs = plan_repeat(RepeatSpec.from_file(path)) if name.startswith("repeat") else plan_sweep(SweepSpec.from_file(path))
    assert runs and len({r.name for r in runs}) == len(runs)
