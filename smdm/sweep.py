"""Executing a sweep manifest: each run is an ordinary `smdm train` in its own directory.

Locally, `run_sweep` keeps N training processes busy, skips finished runs and resumes killed ones from their
checkpoint (train.py resumes bit-exactly). A run's directory is locked by the training process itself
(`smdm.checkpoint.lock_run_dir`, as every `smdm train` is), so two sweep runners never train the same run at once. For a cluster, `launch_commands` gives one `torchrun` command
per run and `slurm_script` an array job over them: the sweep scales with the launcher users already have.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from smdm.checkpoint import RUN_LOCK_FILE, lock_run_dir
from smdm.errors import SmdmError
from smdm.objectives import parse_family
from smdm.scaling import PlannedRun, RunResult, SweepSpec

LOCK_FILE = RUN_LOCK_FILE


@dataclass
class RunStatus:
    """Where a run stands: 'done' (final validation loss logged), 'partial' (a checkpoint), or 'new'; with the
    latest and the best validation loss logged so far (None before the first evaluation)."""

    state: str
    step: int = 0
    loss: float | None = None
    reason: str = ""
    last_val: float | None = None
    best_val: float | None = None


def run_status(run: PlannedRun) -> RunStatus:
    """Read the run directory: done means metrics.jsonl holds a finite val_loss at the planned last step."""
    out = Path(run.out_dir)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return RunStatus("new", reason="no metrics.jsonl")
    last_step, final, validation = 0, None, []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        last_step = max(last_step, int(row.get("step", 0)))
        value = row.get("val_loss")
        if isinstance(value, (int, float)) and math.isfinite(value):
            validation.append(float(value))
        if "val_loss" in row and row.get("step") == run.steps:
            final = value
    last_val, best_val = (validation[-1], min(validation)) if validation else (None, None)
    if final is not None and isinstance(final, (int, float)) and math.isfinite(final):
        return RunStatus("done", step=run.steps, loss=float(final), last_val=last_val, best_val=best_val)
    state = "partial" if (out / "checkpoint").exists() else "new"
    return RunStatus(state, step=last_step, reason=f"unfinished: logged step {last_step} of {run.steps}",
                     last_val=last_val, best_val=best_val)


def lock_holder(run: PlannedRun) -> int | None:
    """The pid of a live process holding the run's lock, read from the lock file without taking the lock: a status
    look must never make a trainer starting at that moment find its run busy (pid reuse aside, which only
    mislabels a row of a status table)."""
    try:
        pid = int((Path(run.out_dir) / LOCK_FILE).read_text().split()[0])
        if pid <= 0:  # kill(0) would signal our own process group
            return None
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return pid
    except (OSError, ValueError, IndexError):
        return None
    return pid


def describe_status(runs: list[PlannedRun]) -> str:
    """Where each run of a study stands, read from the run directories only (`smdm scale status`): state (done,
    running, partial, new), the step reached, the latest and best validation loss, and the share of the planned
    FLOPs done. Nothing is written or started, so it is safe beside a running sweep."""
    rows = [f"{'run':<32} {'state':<16} {'step':>13} {'last val':>9} {'best val':>9}"]
    counts: dict[str, int] = {}
    done_flops = 0.0
    for run in runs:
        status = run_status(run)
        pid = lock_holder(run) if status.state != "done" else None
        kind = "running" if pid is not None else status.state
        state = f"running ({pid})" if pid is not None else kind
        counts[kind] = counts.get(kind, 0) + 1
        done_flops += run.flops * min(status.step, run.steps) / run.steps
        rows.append(f"{run.name:<32} {state:<16} {f'{status.step}/{run.steps}':>13} "
                    + " ".join(f"{v:>9.4f}" if v is not None else f"{'-':>9}" for v in (status.last_val,
                                                                                      status.best_val)))
    total = sum(r.flops for r in runs)
    summary = ", ".join(f"{counts[k]} {k}" for k in ("done", "running", "partial", "new") if k in counts)
    rows.append(f"{len(runs)} runs: {summary}; {done_flops / total:.0%} of the {total:.3g} planned FLOPs done"
                if total else f"{len(runs)} runs")
    return "\n".join(rows)


def train_argv(run: PlannedRun, data_dir: str, world_size: int = 1) -> list[str]:
    """`smdm train` arguments for a run; the global batch is kept by splitting it over world_size x grad_accum."""
    micro = min(run.micro_batch_size, run.batch_size // world_size)  # the plan's micro-batch, or what a device gets
    if micro < 1 or run.batch_size % (micro * world_size):
        raise SmdmError(f"{run.name}: batch {run.batch_size} is not divisible by micro-batch {micro} "
                        f"x {world_size} devices")
    train = {**run.train, "batch_size": micro, "grad_accum": run.batch_size // (micro * world_size)}
    objective, options = parse_family(run.objective)
    argv = ["train", "--data", data_dir, "--out", run.out_dir, "--model", run.model, "--objective", objective]
    argv += [arg for key, value in options.items() for arg in ("--" + key.replace("_", "-"), str(value))]
    for key, value in train.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv + ["--resume", "--no-progress"]


@dataclass
class SweepReport:
    """What `run_sweep` did: runs found finished, trained now, failed (name -> reason), and locked elsewhere."""

    skipped: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: how many runs were trained, found finished, found running elsewhere, failed."""
        return (f"{len(self.trained)} trained, {len(self.skipped)} already finished, {len(self.busy)} running "
                f"elsewhere, {len(self.failed)} failed")

    def raise_for_failures(self, total: int) -> None:
        """A sweep with failed runs ends as an error naming each run and why."""
        if self.failed:
            raise SmdmError(f"{len(self.failed)} of {total} runs failed: "
                            + "; ".join(f"{name} ({why})" for name, why in self.failed.items()))


def select_runs(runs: list[PlannedRun], only: list[str] | None, manifest: str) -> list[PlannedRun]:
    """The runs named by --only (all by default); an unknown name is an error."""
    if not only:
        return runs
    unknown = sorted(set(only) - {r.name for r in runs})
    if unknown:
        raise SmdmError(f"{manifest}: no runs named {', '.join(unknown)}")
    return [r for r in runs if r.name in only]


def _busy(run: PlannedRun) -> bool:
    """Whether another process (a trainer of another runner, or a user's `smdm train`) holds the run's lock now."""
    try:
        with lock_run_dir(run.out_dir):
            return False
    except SmdmError:
        return True


def run_sweep(runs: list[PlannedRun], data_dir: str, jobs: int = 1, threads: int | None = None,
              stop_after_steps: int | None = None, progress: bool = True) -> SweepReport:
    """Train every unfinished run, `jobs` processes at a time (largest budgets first, for balance).

    Each training process holds its run's lock itself, so the lock lives exactly as long as the training does, even
    if this runner is killed. A run locked when it is reached, or whose trainer lost the race for the lock to another
    process, is reported busy; one found finished when reached (by a runner beside this one) is skipped. Output
    goes to RUN_DIR/train.log. A failed run is reported, not fatal to the others.
    """
    if jobs < 1:
        raise SmdmError("--jobs must be at least 1")
    report = SweepReport()
    pending = []
    for run in runs:
        if run_status(run).state == "done":
            report.skipped.append(run.name)
        else:
            pending.append(run)
    pending.sort(key=lambda r: (-r.budget, -r.non_embedding_params))
    total = sum(r.flops for r in pending)
    bar = tqdm(total=total, disable=not progress or not pending, unit="FLOP", unit_scale=True, dynamic_ncols=True,
               desc=f"{len(pending)} runs ({len(report.skipped)} done)")
    active: dict[subprocess.Popen, tuple[PlannedRun, int]] = {}
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill RUNNER` stops the children too
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                if run_status(run).state == "done":  # finished meanwhile, by a runner beside this one
                    report.skipped.append(run.name)
                    bar.update(run.flops)
                    continue
                if _busy(run):
                    report.busy.append(run.name)
                    bar.update(run.flops)
                    continue
                argv = [sys.executable, "-m", "smdm", *train_argv(run, data_dir)]
                if threads:
                    argv += ["--threads", str(threads)]
                if stop_after_steps:
                    argv += ["--stop-after-steps", str(stop_after_steps)]
                with open(Path(run.out_dir) / "train.log", "a") as log:
                    log.write(f"$ {shlex.join(argv)}\n")
                    log.flush()
                    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
                active[proc] = run
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                run = active.pop(proc)
                bar.update(run.flops)
                status = run_status(run)
                if proc.returncode == 2 and _busy(run):  # another process took the lock after our check
                    report.busy.append(run.name)
                elif proc.returncode != 0:
                    report.failed[run.name] = f"exit {proc.returncode}; see {Path(run.out_dir) / 'train.log'}"
                elif status.state == "done" or stop_after_steps:
                    report.trained.append(run.name)
                else:
                    report.failed[run.name] = f"{status.reason}; see {Path(run.out_dir) / 'train.log'}"
                bar.write(f"{run.name}: " + (f"val loss {status.loss:.4f}" if status.loss is not None
                                             else report.failed.get(run.name, status.reason)))
    finally:
        for proc in active:  # interrupted: stop our children; their checkpoints remain
            proc.terminate()
            proc.wait()
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    return report


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def finished_runs(runs: list[PlannedRun]) -> tuple[list[tuple[PlannedRun, float]], dict[str, str]]:
    """Each finished run with its final validation loss, and the others with the reason they are left out of a fit
    (not an error). Shared by the IsoFLOP and the repeated-data fits."""
    done, missing = [], {}
    for run in runs:
        status = run_status(run)
        if status.state == "done":
            done.append((run, float(status.loss)))
        else:
            missing[run.name] = status.reason
    return done, missing


def collect_results(runs: list[PlannedRun]) -> tuple[list[RunResult], dict[str, str]]:
    """Finished runs as fit inputs, and the others with the reason they were left out (not an error)."""
    done, missing = finished_runs(runs)
    results = [RunResult(name=run.name, objective=run.objective, budget=run.budget,
                         n_params=run.non_embedding_params, tokens=run.tokens,
                         flops={c: run.tokens * f for c, f in run.flops_per_token.items()}, loss=loss)
               for run, loss in done]
    return results, missing


# ------------------------------------------------------------------------------------------------------ clusters


def launch_commands(runs: list[PlannedRun], data_dir: str, nproc_per_node: int = 8, nnodes: int = 1,
                    slurm: bool = False) -> list[str]:
    """One `torchrun` command per run. With slurm=True, multi-node rendezvous comes from the SLURM environment."""
    if nproc_per_node < 1 or nnodes < 1:
        raise SmdmError("--nproc-per-node and --nnodes must be at least 1")
    if slurm:
        head = ["srun", "torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
                "--rdzv-id=$SLURM_JOB_ID", "--rdzv-backend=c10d", "--rdzv-endpoint=$MASTER_ADDR:29500"]
    elif nnodes == 1:
        head = ["torchrun", "--standalone", f"--nproc-per-node={nproc_per_node}"]
    else:
        head = ["torchrun", f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
                "--rdzv-endpoint=$MASTER_ADDR:29500"]
    commands = []
    for run in runs:
        argv = train_argv(run, data_dir, world_size=nproc_per_node * nnodes)
        # $VARS stay unquoted so the shell expands them on the node.
        commands.append(" ".join(head + ["-m", "smdm"] + [shlex.quote(a) for a in argv]))
    return commands


def slurm_script(runs: list[PlannedRun], data_dir: str, nproc_per_node: int = 8, nnodes: int = 1,
                 max_parallel: int | None = None, time_limit: str = "24:00:00", partition: str | None = None,
                 job_name: str = "smdm-sweep") -> str:
    """A SLURM array job, one task per run. Every command resumes, so resubmitting after a timeout continues the
    sweep (a finished run then only re-evaluates); `smdm scale run --jobs` does the same on one machine."""
    commands = launch_commands(runs, data_dir, nproc_per_node, nnodes, slurm=True)
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={nproc_per_node}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --output=slurm-%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "set -euo pipefail",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        f"# {len(runs)} runs; the run names, in array order:",
        *[f"#   {i}: {run.name}" for i, run in enumerate(runs)],
        "RUNS=(",
        *[f"  {shlex.quote(c)}" for c in commands],
        ")",
        'eval "${RUNS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ]
    return "\n".join(lines)


def describe_plan(runs: list[PlannedRun]) -> str:
    """A table of the runs: what `smdm scale plan` prints."""
    rows = [f"{'run':<32} {'N':>10} {'budget':>9} {'steps':>8} {'tokens':>12} {'warmup':>6} {'attn/6N':>7}"]
    for r in runs:
        ratio = r.flops_per_token["attention"] / r.flops_per_token["6n"]
        rows.append(f"{r.name:<32} {r.non_embedding_params:>10,} {r.budget:>9.2g} {r.steps:>8,} {r.tokens:>12,} "
                    f"{r.warmup_steps:>6} {ratio:>7.2f}")
    total = sum(r.flops for r in runs)
    rows.append(f"{len(runs)} runs, {total:.3g} FLOPs in all")
    return "\n".join(rows)


def fit_report(spec: SweepSpec, runs: list[PlannedRun], out: str | Path, data_dir: str | None = None,
               irreducible: bool = False, bootstrap: int = 1000, seed: int = 0,
               warn: Callable[[str], None] | None = None) -> list[str]:
    """Fit a sweep's finished runs: writes OUT/scaling.json and the plots; returns the report's lines.

    Runs still missing are skipped, each named through `warn` (before any error); the unigram entropy of the
    validation split is drawn as a reference line when the data directory can be read.
    """
    from dataclasses import asdict

    from smdm.data.packed import corpus_unigram_entropy
    from smdm.scaling import fit_sweep, plot_sweep

    results, missing = collect_results(runs)
    for name, why in missing.items():
        (warn or print)(f"skipped {name}: {why}")
    lines: list[str] = []
    if not results:
        raise SmdmError(f"no finished runs to fit; run `smdm scale run MANIFEST` first ({len(missing)} missing)")
    report = fit_sweep(results, count=spec.flops_count, irreducible=irreducible, bootstrap=bootstrap, seed=seed)
    try:  # context for the reader: the loss of a model that ignores context
        unigram = corpus_unigram_entropy(data_dir or spec.data_dir, "val")
    except (SmdmError, OSError):
        unigram = None
    report.update(sweep=spec.name, unigram_entropy_val=unigram, skipped_runs=missing,
                  runs=[asdict(r) for r in results])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    lines += report["notes"]
    for family, entry in report["families"].items():
        for count in [report["flops_count"], *report["other_counts"]]:
            law = entry["loss_vs_flops" if count == report["flops_count"] else f"loss_vs_flops_{count}"]
            ci = law["alpha_ci95"]
            lines.append(f"{family.upper()} ({count}): L* = {law['A']:.4g} * C^-{law['alpha']:.4f}"
                         + (f"  alpha 95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        lines.append(f"{family.upper()}: N* ~ C^{entry['n_opt_exponent']['a']:.3f}, "
                     f"D* ~ C^{entry['d_opt_exponent']['b']:.3f}")
    for count, gaps in report.get("compute_gap", {}).items():
        why = report.get("compute_gap_undetermined", {}).get(count)
        if why:
            lines.append(f"compute gap MDM/ARM from the fitted laws ({count}): not determined ({why}); "
                         "read the gap from the best runs below")
            continue
        lines.append(f"compute gap MDM/ARM ({count}): " + ", ".join(
            f"{g['gap']:.1f}x at {label}" + (f" [{g['ci95'][0]:.1f}, {g['ci95'][1]:.1f}]" if g["ci95"] else "")
            for label, g in gaps.items()))
    for count, envelope in report["compute_gap_envelope"].items():
        if envelope is not None:
            lines.append(f"compute gap MDM/ARM from the best runs ({count}; ARM lower envelope "
                         f"L = {envelope['arm_envelope']['A']:.4g} * C^-{envelope['arm_envelope']['alpha']:.4f}): "
                         + ", ".join(f"{p['gap']:.1f}x" + (f" [{p['ci95'][0]:.1f}, {p['ci95'][1]:.1f}]"
                                                            if p.get("ci95") else "")
                                     + f" at {p['budget']:.3g} (MDM {p['mdm_loss']:.3f}"
                                     + ("" if p["in_range"] else ", ARM extrapolated") + ")"
                                     for p in envelope["points"]))
    lines += [f"wrote {path}" for path in [out / "scaling.json", *plot_sweep(results, report, out, unigram)]]
    return lines
