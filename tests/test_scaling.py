"""Scaling laws: FLOPs arithmetic, sweep planning, the fitter on synthetic power laws, and sweep execution/resume."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, assert_one_line_error, run_cli

from smdm.config import ModelConfig
from smdm.errors import SmdmError
from smdm.scaling import (
    RunResult,
    SweepSpec,
    envelope_gap,
    fit_power_law,
    fit_power_law_irreducible,
    fit_sweep,
    flops_per_token,
    plan_sweep,
    plot_sweep,
    read_manifest,
    write_manifest,
)
from smdm.sweep import LOCK_FILE, RunStatus, collect_results, launch_commands, run_status, run_sweep, slurm_script

# ------------------------------------------------------------------------------------------------ FLOPs arithmetic


def test_flops_per_token_paper_models_by_hand():
    # smdm-170m: 18 layers, width 768, 12 heads, SwiGLU 3072. Per layer: 4·768² attention + 3·768·3072 MLP + 2·768
    # norm gains = 9,438,720; x18 + final norm 768 = 169,897,728 non-embedding parameters.
    big = ModelConfig.from_name("smdm-170m")
    assert flops_per_token(big, 2048, "6n") == 6 * 169_897_728 == 1_019_386_368
    assert flops_per_token(big, 2048, "attention") == 1_019_386_368 + 6 * 18 * 2048 * 768 == 1_189_255_680
    # smdm-6m: 6 x (4·256² + 3·256·1024 + 512) + 256 = 6,294,784; attention term 6·6·2048·256 = 18,874,368.
    small = ModelConfig.from_name("smdm-6m")
    assert flops_per_token(small, 2048, "attention") == 6 * 6_294_784 + 18_874_368
    # The 6N count leaves out ~50% at 6M and ~17% at 170M (relative to 6N), as the issue says.
    assert flops_per_token(small, 2048, "attention") / flops_per_token(small, 2048, "6n") == pytest.approx(1.5, abs=0.01)
    assert flops_per_token(big, 2048, "attention") / flops_per_token(big, 2048, "6n") == pytest.approx(1.167, abs=0.01)
    with pytest.raises(SmdmError, match="unknown FLOPs count"):
        flops_per_token(big, 2048, "palm")  # type: ignore[arg-type]


def _paper_spec(**overrides) -> SweepSpec:
    values = {"name": "paper", "data_dir": "data/slimpajama", "out_dir": "runs/paper", "models": ["smdm-170m"],
              "budgets": [1e19], "batch_size": 256, "micro_batch_size": 8, "lr": 2e-4, "seq_len": 2048}
    values.update(overrides)
    return SweepSpec(**values)


def test_plan_paper_recipe_170m_at_1e19_by_hand():
    # 256 x 2048 = 524,288 tokens per step.
    # 6N count:        1e19 / (1,019,386,368 x 524,288) = 18,710.8 -> 18,710 steps; warmup 1% = 187.
    # attention count: 1e19 / (1,189,255,680 x 524,288) = 16,038.2 -> 16,038 steps; warmup 160.
    (mdm_6n, arm_6n) = plan_sweep(_paper_spec(flops_count="6n"))
    assert (mdm_6n.steps, mdm_6n.warmup_steps, mdm_6n.tokens) == (18_710, 187, 18_710 * 524_288)
    assert mdm_6n.flops == pytest.approx(18_710 * 524_288 * 1_019_386_368) and mdm_6n.flops <= 1e19
    assert (mdm_6n.objective, arm_6n.objective) == ("mdm", "arm") and arm_6n.steps == mdm_6n.steps
    (run, _) = plan_sweep(_paper_spec())
    assert (run.steps, run.warmup_steps) == (16_038, 160)
    # The recipe: cosine to 10% of the peak LR, global batch kept as micro-batch x accumulation.
    assert run.train["min_lr_ratio"] == 0.1 and run.train["max_steps"] == 16_038 and run.train["warmup_steps"] == 160
    assert run.train["batch_size"] * run.train["grad_accum"] == 256


def test_plan_windows_sizes_around_the_guessed_optimum():
    ladder = ["smdm-19m", "smdm-34m", "smdm-85m", "smdm-170m", "smdm-336m", "smdm-831m", "smdm-1233m"]
    runs = plan_sweep(_paper_spec(models=ladder, budgets=[1e18, 1e20], sizes_per_budget=3, objectives=["mdm"]))
    by_budget = {b: [r.model for r in runs if r.budget == b] for b in (1e18, 1e20)}
    # sqrt(1e18 / 120) = 91M -> centred on smdm-85m; sqrt(1e20 / 120) = 913M -> smdm-831m.
    assert by_budget[1e18] == ["smdm-34m", "smdm-85m", "smdm-170m"]
    assert by_budget[1e20] == ["smdm-336m", "smdm-831m", "smdm-1233m"]
    # Per-objective guesses: an MDM asked for 100x the tokens per parameter gets a window 10x smaller.
    runs = plan_sweep(_paper_spec(models=ladder, budgets=[1e20], sizes_per_budget=3,
                                  tokens_per_param={"mdm": 2000, "arm": 20}))
    assert [r.model for r in runs if r.objective == "mdm"] == ["smdm-34m", "smdm-85m", "smdm-170m"]
    assert [r.model for r in runs if r.objective == "arm"] == ["smdm-336m", "smdm-831m", "smdm-1233m"]


def test_each_family_may_have_its_own_learning_rate_and_warmup_fraction():
    """Tuned per family (issue 15): the ARM's lr and warmup fraction, the MDM keeping the spec's."""
    (mdm, arm) = plan_sweep(_paper_spec(train_by_objective={"arm": {"lr": 1e-2, "warmup_fraction": 0.1}}))
    assert (mdm.steps, mdm.warmup_steps, mdm.train["lr"]) == (16_038, 160, 2e-4)
    assert (arm.warmup_steps, arm.train["warmup_steps"], arm.train["lr"]) == (1_603, 1_603, 1e-2)
    assert "warmup_fraction" not in arm.train  # not a TrainConfig field: it became warmup_steps
    with pytest.raises(SmdmError, match="warmup_fraction"):
        plan_sweep(_paper_spec(train_by_objective={"mdm": {"warmup_fraction": 1.5}}))


def test_plan_rejects_bad_input():
    with pytest.raises(SmdmError, match="too small for smdm-170m"):
        plan_sweep(_paper_spec(budgets=[1e14]))
    with pytest.raises(SmdmError, match="unknown config 'smdm-999m'"):
        plan_sweep(_paper_spec(models=["smdm-999m"]))
    with pytest.raises(SmdmError, match="multiple of micro_batch_size"):
        plan_sweep(_paper_spec(micro_batch_size=100))


def test_manifest_round_trip_and_unknown_sizes(tmp_path):
    spec = _paper_spec(budgets=[1e18, 1e19])
    runs = plan_sweep(spec)
    path = write_manifest(spec, runs, tmp_path / "manifest.json")
    spec_back, runs_back = read_manifest(path)
    assert runs_back == runs and spec_back == spec
    data = json.loads(path.read_text())
    data["runs"][1]["model"] = "smdm-7b"
    path.write_text(json.dumps(data))
    with pytest.raises(SmdmError, match=f"run {runs[1].name}: unknown config 'smdm-7b'"):
        read_manifest(path)


# --------------------------------------------------------------------------------------------------------- fitting

# A Chinchilla-shaped loss without an irreducible term, so the compute-optimal frontier is an exact power law:
# L(N, D) = A N^-al + B (D/k)^-be  =>  L*(C) ∝ C^-(al·be/(al+be)), N* ∝ C^(be/(al+be)), D* ∝ C^(al/(al+be)).
# k > 1 makes a model that needs k times the data: L*_k(C) = L*_1(C/k), a compute gap of exactly k.
AL, BE, A_COEF, B_COEF = 0.34, 0.28, 406.4, 410.7
TRUE_ALPHA = AL * BE / (AL + BE)
TRUE_A, TRUE_B = BE / (AL + BE), AL / (AL + BE)


def _synthetic(objective: str, k: float = 1.0, noise: float = 0.003, seed: int = 0, al: float = AL,
               be: float = BE) -> list[RunResult]:
    rng = np.random.default_rng(seed)
    ladder = 1e6 * 2.0 ** np.arange(0, 16)
    results = []
    for budget in (1e17, 1e18, 1e19, 1e20):
        guess = math.sqrt(budget / k / 120)
        centre = int(np.argmin(np.abs(np.log(ladder / guess))))
        for n in ladder[max(0, centre - 2):centre + 3]:
            tokens = budget / (6 * n)
            loss = A_COEF * n ** -al + B_COEF * (tokens / k) ** -be + rng.normal(0, noise)
            results.append(RunResult(f"{objective}-{n:.0f}-{budget:.0e}", objective, budget, float(n), tokens,
                                     {"attention": budget, "6n": budget}, float(loss)))
    return results


def test_fitter_recovers_known_exponents_and_compute_gap():
    results = _synthetic("arm", seed=1) + _synthetic("mdm", k=16.0, seed=2)
    report = fit_sweep(results, bootstrap=200, seed=0)
    for family in ("arm", "mdm"):
        entry = report["families"][family]
        law = entry["loss_vs_flops"]
        assert law["alpha"] == pytest.approx(TRUE_ALPHA, abs=0.01)
        lo, hi = law["alpha_ci95"]
        assert lo < law["alpha"] < hi and hi - lo < 0.05
        assert entry["n_opt_exponent"]["a"] == pytest.approx(TRUE_A, abs=0.04)
        assert entry["d_opt_exponent"]["b"] == pytest.approx(TRUE_B, abs=0.04)
        assert all(o["inside"] for o in entry["optima"])
        assert entry["loss_vs_flops_envelope"]["alpha"] == pytest.approx(TRUE_ALPHA, abs=0.02)
    for label, gap in report["compute_gap"]["attention"].items():
        assert gap["gap"] == pytest.approx(16, rel=0.15), label
        assert gap["ci95"][0] < gap["gap"] < gap["ci95"][1]


def test_envelope_gap_reads_the_best_runs_without_parabolas():
    """The model-free gap: an MDM that needs exactly 16x the ARM's compute gives 16x at every budget, and it is
    still reported when the MDM's IsoFLOP curves are flat (no parabola fit, as on the unigram plateau)."""
    arm = _synthetic("arm", seed=1, noise=0.0)
    law_points = {}
    for r in arm:
        if r.budget not in law_points or r.loss < law_points[r.budget].loss:
            law_points[r.budget] = r
    arm_law = fit_power_law([r.budget for r in law_points.values()], [r.loss for r in law_points.values()])
    mdm = [RunResult(f"mdm-{i}-{b:.0e}", "mdm", b, 1e6 * 2 ** i, b / 6e6, {"attention": b, "6n": b},
                     float(arm_law(b / 16)) + 0.05 * i)  # best (i = 0) exactly on the ARM envelope at C/16
           for b in (1e18, 1e19, 1e20) for i in range(3)]
    gap = envelope_gap(arm + mdm, "attention")
    assert [p["budget"] for p in gap["points"]] == [1e18, 1e19, 1e20]
    for point in gap["points"]:
        assert point["gap"] == pytest.approx(16, rel=1e-6) and point["mdm_run"].startswith("mdm-0-")
        assert point["in_range"] == (point["budget"] >= 16 * 1e17)
        low, high = point["ci95"]  # the envelope of discrete sizes is nearly a power law: a narrow interval
        assert low < 16 < high and high / low < 1.1
    noisy_arm = [RunResult(r.name, r.objective, r.budget, r.n_params, r.tokens, r.flops,
                           r.loss * (1.03 if r.budget == 1e19 else 1.0)) for r in arm]
    for point in envelope_gap(noisy_arm + mdm, "attention")["points"]:  # a scattered envelope widens the interval
        low, high = point["ci95"]
        assert low < point["gap"] < high and high / low > 1.2
    two_budgets = [r for r in arm if r.budget <= 1e18]
    assert all(p["ci95"] is None for p in envelope_gap(two_budgets + mdm, "attention")["points"])
    flat = [RunResult(r.name, r.objective, r.budget, r.n_params, r.tokens, r.flops, 5.0 + 0.01 * (r.name[4] == "1"))
            for r in mdm]  # the middle size is worst at every budget: no IsoFLOP minimum, so no MDM law ...
    report = fit_sweep(arm + flat, bootstrap=10)
    assert "mdm" not in report["families"] and any("mdm: no fit" in n for n in report["notes"])
    points = report["compute_gap_envelope"]["attention"]["points"]  # ... but the best-run gap is still there
    assert [p["mdm_loss"] for p in points] == pytest.approx([5.0] * 3)
    assert envelope_gap(arm, "attention") is None


def test_gap_from_laws_is_not_determined_when_the_mdm_alpha_interval_reaches_zero(tmp_path):
    """A flat MDM frontier (the same best loss at every budget, as on the unigram plateau) has an alpha interval
    around 0: inverting its law gives any compute at all, so no law-based gap is printed, only the reason."""
    rng = np.random.default_rng(4)
    flat = []
    for budget in (1e17, 1e18, 1e19, 1e20):
        best = math.sqrt(budget / 120)
        for i, n in enumerate(best * 2.0 ** np.arange(-2, 3)):
            loss = 4.0 + 0.05 * (i - 2) ** 2 + rng.normal(0, 0.02)
            flat.append(RunResult(f"mdm-{i}-{budget:.0e}", "mdm", budget, float(n), budget / (6 * n),
                                  {"attention": budget, "6n": budget}, float(loss)))
    report = fit_sweep(_synthetic("arm", seed=1) + flat, bootstrap=200, seed=0)
    ci = report["families"]["mdm"]["loss_vs_flops"]["alpha_ci95"]
    assert ci[0] <= 0 < ci[1]
    assert set(report["compute_gap_undetermined"]) == {"attention", "6n"}
    assert "MDM alpha's 95% interval" in report["compute_gap_undetermined"]["attention"]
    well_determined = fit_sweep(_synthetic("arm", seed=1) + _synthetic("mdm", k=16.0, seed=2), bootstrap=200)
    assert well_determined["compute_gap_undetermined"] == {}


def test_fitter_tells_different_exponents_apart():
    # An MDM whose loss falls more slowly (exponent 0.25·0.2/0.45 = 0.111) next to the ARM (0.154).
    report = fit_sweep(_synthetic("arm", seed=1) + _synthetic("mdm", seed=3, al=0.25, be=0.2), bootstrap=100)
    mdm, arm = (report["families"][f]["loss_vs_flops"] for f in ("mdm", "arm"))
    assert mdm["alpha"] == pytest.approx(0.25 * 0.2 / 0.45, abs=0.01)
    assert mdm["alpha_ci95"][1] < arm["alpha_ci95"][0]


def test_a_flat_law_is_reached_nowhere_instead_of_overflowing():
    from smdm.scaling import PowerLaw

    flat = PowerLaw(A=5.0, alpha=1e-9)
    assert flat.inverse(4.0) == math.inf and flat.inverse(6.0) == 0.0


def test_power_law_fits_on_exact_data():
    c = np.geomspace(1e17, 1e21, 6)
    law = fit_power_law(c, 30.0 * c ** -0.05)
    assert (law.A, law.alpha) == (pytest.approx(30.0, rel=1e-9), pytest.approx(0.05, rel=1e-9))
    law = fit_power_law_irreducible(c, 1.7 + 400.0 * c ** -0.15)
    assert law.E == pytest.approx(1.7, abs=0.02) and law.alpha == pytest.approx(0.15, abs=0.01)
    with pytest.raises(SmdmError, match="at least 4 points"):
        fit_power_law_irreducible(c[:3], c[:3] ** -0.1)


def test_too_few_points_is_a_clear_error():
    one_budget = [r for r in _synthetic("arm") if r.budget == 1e18]
    with pytest.raises(SmdmError, match="need at least 2 for L"):
        fit_sweep(one_budget, bootstrap=0)
    from smdm.scaling import isoflop_optimum

    flat = [RunResult(f"r{n}", "mdm", 1e12, n, 1e12 / (6 * n), {"6n": 1e12}, 5.0 + 1e-9 * (math.log(n) - 10) ** 2
                      - 1e-6 * math.log(n)) for n in (1e4, 2e4, 4e4, 8e4)]
    assert "far outside the sampled sizes" in isoflop_optimum(flat)
    two_sizes = [r for r in _synthetic("arm") if r.n_params in (8e6, 16e6)]
    with pytest.raises(SmdmError, match="a parabola needs 3"):
        fit_sweep(two_sizes, bootstrap=0)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = _synthetic("arm") + _synthetic("mdm", k=16.0)
    written = plot_sweep(results, fit_sweep(results, bootstrap=20), tmp_path)
    assert [p.name for p in written] == ["isoflop.png", "frontier.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


# ------------------------------------------------------------------------------------------------------- execution


def _toy_manifest(toy_data: Path, root: Path, name: str = "manifest.json") -> Path:
    spec = SweepSpec(name="toy", data_dir=str(toy_data), out_dir=str(root / "runs"), models=["tiny-test"],
                     budgets=[3.3e9], seq_len=32, batch_size=4, lr=3e-3, eval_blocks=8, eval_mc_samples=2,
                     checkpoints_per_run=3)
    return write_manifest(spec, plan_sweep(spec), root / name)


def _losses(runs) -> dict[str, float]:
    return {r.name: r.loss for r in collect_results(runs)[0]}


@pytest.fixture(scope="module")
def reference(toy_data, tmp_path_factory) -> dict[str, float]:
    """Final validation losses of the toy sweep trained without interruption."""
    _, runs = read_manifest(_toy_manifest(toy_data, tmp_path_factory.mktemp("reference")))
    assert [r.steps for r in runs] == [31, 31]
    report = run_sweep(runs, str(toy_data), jobs=2, threads=1, progress=False)
    assert sorted(report.trained) == sorted(r.name for r in runs) and not report.failed
    return _losses(runs)


def _wait_for_unlocked(runs) -> None:
    """A SIGKILLed trainer releases its run's lock when the kernel has torn it down, a moment after the kill."""
    for run in runs:
        path = Path(run.out_dir) / LOCK_FILE
        if not path.exists():
            continue
        with open(path) as handle:
            for _ in range(600):
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    break
                except BlockingIOError:
                    time.sleep(0.1)


def test_two_run_sweep_stops_resumes_and_skips_finished(toy_data, tmp_path, reference, monkeypatch):

    _, runs = read_manifest(_toy_manifest(toy_data, tmp_path / "sliced"))
    run_sweep(runs, str(toy_data), jobs=2, threads=1, stop_after_steps=10, progress=False)
    assert [run_status(r).state for r in runs] == ["partial", "partial"]
    assert collect_results(runs)[0] == [] and all("step 10 of 31" in why for why in collect_results(runs)[1].values())
    report = run_sweep(runs, str(toy_data), jobs=1, threads=1, progress=False)
    assert sorted(report.trained) == sorted(reference) and not report.skipped
    assert _losses(runs) == reference  # resumed runs end bit-exactly where uninterrupted ones do

    summaries = {r.name: (Path(r.out_dir) / "summary.json").stat().st_mtime_ns for r in runs}
    report = run_sweep(runs, str(toy_data), jobs=2, threads=1, progress=False)
    assert sorted(report.skipped) == sorted(reference) and not report.trained
    assert {r.name: (Path(r.out_dir) / "summary.json").stat().st_mtime_ns for r in runs} == summaries

    # A runner beside this one finished the runs after this one had planned them: they are skipped when reached,
    # not restarted (the first look at each run, the planning one, is made to see it unfinished).
    import smdm.sweep

    logs = {r.name: (Path(r.out_dir) / "train.log").read_text() for r in runs}
    looked: set[str] = set()

    def stale_at_planning(run):
        if run.name not in looked:
            looked.add(run.name)
            return RunStatus("partial", step=10)
        return run_status(run)

    monkeypatch.setattr(smdm.sweep, "run_status", stale_at_planning)
    report = run_sweep(runs, str(toy_data), jobs=1, threads=1, progress=False)
    assert sorted(report.skipped) == sorted(reference) and not report.trained and not report.failed
    assert {r.name: (Path(r.out_dir) / "train.log").read_text() for r in runs} == logs  # nothing was launched


def test_killed_sweep_resumes(toy_data, tmp_path, reference):
    manifest = _toy_manifest(toy_data, tmp_path / "killed")
    _, runs = read_manifest(manifest)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "smdm", "scale", "run", str(manifest), "--threads", "1",
                             "--no-progress"], cwd=REPO_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill the whole process group (runner and trainer) once the first run has a checkpoint
        for _ in range(1200):
            if any((Path(r.out_dir) / "checkpoint").exists() for r in runs) or proc.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sum(run_status(r).state == "done" for r in runs) < 2  # the kill landed before the sweep finished
    _wait_for_unlocked(runs)
    report = run_sweep(runs, str(toy_data), jobs=2, threads=1, progress=False)
    assert not report.failed and not report.busy and len(report.trained) + len(report.skipped) == 2
    assert _losses(runs) == reference


def test_fit_skips_runs_without_logs(toy_data, tmp_path, capsys):
    manifest = _toy_manifest(toy_data, tmp_path)
    code, _, err = run_cli(capsys, "scale", "fit", str(manifest), "--out", str(tmp_path / "fit"))
    assert_one_line_error(code, err.splitlines()[-1] + "\n", "no finished runs")
    assert "skipped mdm-tiny-test-C3e09: no metrics.jsonl" in err


def test_launch_commands_and_slurm_script():
    runs = plan_sweep(_paper_spec(budgets=[1e18, 1e19]))
    commands = launch_commands(runs, "/data/slimpajama", nproc_per_node=8)
    assert len(commands) == 4
    assert commands[0].startswith("torchrun --standalone --nproc-per-node=8 -m smdm train --data /data/slimpajama")
    # 256 sequences = 8 per device x 8 devices x 4 accumulation steps.
    assert "--batch-size 8 --grad-accum 4" in commands[0] and "--resume" in commands[0]
    assert f"--max-steps {runs[0].steps} " in commands[0]
    two_nodes = launch_commands(runs, "/data", nproc_per_node=8, nnodes=2)
    assert "--grad-accum 2" in two_nodes[0] and "--rdzv-endpoint=$MASTER_ADDR:29500" in two_nodes[0]
    script = slurm_script(runs, "/data/slimpajama", max_parallel=2, partition="gpu")
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --partition=gpu" in script
    assert script.count("srun torchrun") == 4 and 'eval "${RUNS[$SLURM_ARRAY_TASK_ID]}"' in script
    with pytest.raises(SmdmError, match="not divisible"):
        launch_commands(runs, "/data", nproc_per_node=3)


def test_cli_plan_and_bad_manifests(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "x", "data_dir": "d", "out_dir": str(tmp_path / "runs"),
                                "models": ["smdm-19m", "smdm-34m"], "budgets": [1e18], "seq_len": 2048}))
    code, out, _ = run_cli(capsys, "scale", "plan", str(spec), "--out", str(tmp_path / "m.json"))
    assert code == 0 and "4 runs" in out and (tmp_path / "m.json").is_file()
    code, out, _ = run_cli(capsys, "scale", "launch", str(tmp_path / "m.json"), "--format", "slurm")
    assert code == 0 and out.startswith("#!/bin/bash") and "#SBATCH --array=0-3" in out

    spec.write_text(json.dumps({"name": "x", "data_dir": "d", "out_dir": "o", "models": ["smdm-5m"],
                                "budgets": [1e18]}))
    assert_one_line_error(*run_cli(capsys, "scale", "plan", str(spec), "--out", str(tmp_path / "n.json"))[::2],
                          "unknown config 'smdm-5m'")
    spec.write_text(json.dumps({"name": "x", "data_dir": "d", "out_dir": "o", "models": ["smdm-1233m"],
                                "budgets": [1e15], "seq_len": 2048}))
    assert_one_line_error(*run_cli(capsys, "scale", "plan", str(spec), "--out", str(tmp_path / "n.json"))[::2],
                          "too small for smdm-1233m")
    spec.write_text(json.dumps({"name": "x", "data_dir": "d", "out_dir": "o", "model": ["smdm-19m"]}))
    assert_one_line_error(*run_cli(capsys, "scale", "plan", str(spec), "--out", str(tmp_path / "n.json"))[::2],
                          "unknown keys ['model']")
    data = json.loads((tmp_path / "m.json").read_text())
    data["runs"][0]["model"] = "nope"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    for command in ("run", "fit", "launch"):
        extra = ["--out", str(tmp_path / "fit")] if command == "fit" else []
        assert_one_line_error(*run_cli(capsys, "scale", command, str(tmp_path / "bad.json"), *extra)[::2],
                              "unknown config 'nope'")


def test_status_reads_where_each_run_stands_and_writes_nothing(toy_data, tmp_path, capsys):
    manifest = _toy_manifest(toy_data, tmp_path)
    first, second = read_manifest(manifest)[1]
    out = Path(first.out_dir)
    (out / "checkpoint").mkdir(parents=True)
    rows = [{"step": 5, "val_loss": 4.5}, {"step": 10, "val_loss": 4.25}, {"step": 12, "loss": 3.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 13, "lo')  # cut by a kill
    (out / LOCK_FILE).write_text(f"{os.getpid()}\n")  # held by a live process: running
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def status() -> dict[str, str]:
        code, text, err = run_cli(capsys, "scale", "status", str(manifest))
        assert code == 0, err
        return {line.split()[0]: line for line in text.splitlines()[1:-1]} | {"total": text.splitlines()[-1]}

    table = status()
    assert f"running ({os.getpid()})" in table[first.name] and f"12/{first.steps}" in table[first.name]
    assert table[first.name].split()[-2:] == ["4.2500", "4.2500"]  # latest and best validation loss
    assert table[second.name].split()[1:] == ["new", f"0/{second.steps}", "-", "-"]
    assert "1 running, 1 new" in table["total"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created or locked
    assert (out / LOCK_FILE).read_text() == f"{os.getpid()}\n"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid}\n")  # its trainer is gone: partial
    assert status()[first.name].split()[1:3] == ["partial", f"12/{first.steps}"]
    with open(out / "metrics.jsonl", "a") as log:
        log.write("\n" + json.dumps({"step": first.steps, "val_loss": 4.375}) + "\n")
    table = status()
    assert table[first.name].split()[1:] == ["done", f"{first.steps}/{first.steps}", "4.3750", "4.2500"]
    assert "1 done, 1 new" in table["total"] and "50% of the" in table["total"]
