"""The data-constrained study (issue 15, part 2): MDMs and ARMs trained for many epochs over U unique tokens.

Planning: U values x epochs x model sizes x families, each an ordinary resumable `smdm train --max-unique-tokens U`
run (executed by `smdm.sweep.run_sweep`, like the IsoFLOP sweeps). Fitting, after Prabhudesai et al. 2025
("Diffusion Beats Autoregressive in Data-Constrained Settings", arXiv 2507.15857) and Ni et al. 2025 ("Diffusion
Language Models are Super Data Learners", arXiv 2511.03276):

- each run's point is (compute, best validation loss over its evaluations): early stopping, as Prabhudesai et al.'s
  Pareto frontier takes "the best validation loss achieved among all models using <= the FLOPs";
- the best-so-far frontier per family and U, and the crossover compute beyond which the MDM frontier stays below
  the ARM's, measured per U (all sizes) and per (U, model size) (Ni et al.: earlier for larger models);
- the paper's closed-form critical compute C_crit(U) = 2.12e15 · U^2.174 FLOPs with U in millions of unique tokens,
  for comparison (checked against the paper's project page, diffusion-scaling.github.io, which writes it with U
  in tokens as 2.12·10^1.956 · U^2.174: the same law, 15 − 6·2.174 = 1.956; at CPU scale it is an extrapolation far
  outside the range it was fitted on);
- the data-reuse half-life R_D* of each family, fitted as they do with Muennighoff et al. 2023's effective data
  D' = U + U·R_D*·(1 - exp(-R_D/R_D*)), R_D = epochs - 1 repetitions, in L = E + B / D'^beta (per family and
  model size, jointly over U). They report R_D* ≈ 500 epochs for diffusion and ≈ 15 for AR.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smdm.config import ModelConfig, non_embedding_params
from smdm.errors import SmdmError
from smdm.flops import FLOPS_COUNTS, flops_per_token
from smdm.objectives import make_objective, objective_names
from smdm.scaling import PlannedRun, family_recipe, read_json_object, read_spec_fields

MANIFEST_FORMAT = "smdm-repeat-manifest-1"
# Prabhudesai et al. 2025: C_crit(U) = 2.12e15 · U^2.174, U in millions of unique tokens; their project page
# (diffusion-scaling.github.io) gives the same law with U in tokens: 2.12·10^1.956 · U^2.174, and R_D* ≈ 500 / 15.
PAPER_CRIT_COEFF, PAPER_CRIT_EXPONENT = 2.12e15, 2.174
PAPER_HALF_LIFE = {"mdm": 500.0, "arm": 15.0}  # R_D* in epochs, as they report


@dataclass
class RepeatSpec:
    """A data-constrained study: every (U, epochs, model, objective) is one run, trained on U tokens only."""

    name: str
    data_dir: str
    out_dir: str  # run directories are OUT_DIR/<run name>
    unique_tokens: list[int]
    epochs: list[float]
    models: list[str]
    objectives: list[str] = field(default_factory=lambda: ["mdm", "arm"])
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    flops_count: str = "attention"
    evals_per_run: int = 8  # validations spread over each run (its best is the run's point)
    eval_blocks: int = 128
    eval_mc_samples: int = 4
    checkpoints_per_run: int = 10
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields for every run
    train_by_objective: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {"mdm": {"init": "smdm"}}
    # a family's own epoch counts, replacing `epochs` for it: an ARM overfits within tens of epochs while an MDM
    # keeps improving for hundreds (Prabhudesai et al. 2025), so one shared list wastes hours on one family
    epochs_by_objective: dict[str, list[float]] = field(default_factory=dict)

    def runs_per_model(self) -> list[tuple[str, float]]:
        """(objective, epochs) for every run of one U and model size: shortest first, families as listed."""
        pairs = [(o, e) for o in self.objectives for e in self.epochs_by_objective.get(o, self.epochs)]
        return sorted(pairs, key=lambda pair: (pair[1], self.objectives.index(pair[0])))

    @classmethod
    def from_file(cls, path: str | Path) -> RepeatSpec:
        """Read a JSON spec; unknown keys are an error."""
        return cls(**read_spec_fields(cls, path, ("name", "data_dir", "out_dir", "unique_tokens", "epochs",
                                                  "models")))


def _check(spec: RepeatSpec) -> None:
    if not spec.unique_tokens or not spec.epochs or not spec.models or not spec.objectives:
        raise SmdmError("a repeat study needs unique_tokens, epochs, models and objectives")
    if any(int(u) != u or u < 1 for u in spec.unique_tokens):
        raise SmdmError(f"unique_tokens must be positive integers, got {spec.unique_tokens}")
    for objective in spec.objectives:
        if objective not in objective_names():
            raise SmdmError(f"unknown objective {objective!r}; use one of {', '.join(objective_names())}")
    for objective in spec.epochs_by_objective:
        if objective not in spec.objectives:
            raise SmdmError(f"epochs_by_objective names {objective!r}, which is not in objectives {spec.objectives}")
    for epochs in [spec.epochs, *spec.epochs_by_objective.values()]:
        if not epochs or any(not (isinstance(e, (int, float)) and e > 0 and math.isfinite(e)) for e in epochs):
            raise SmdmError(f"epochs must be non-empty lists of positive numbers, got {epochs}")
    if spec.flops_count not in FLOPS_COUNTS:
        raise SmdmError(f"unknown flops_count {spec.flops_count!r}; use one of {', '.join(FLOPS_COUNTS)}")
    for name in ("seq_len", "batch_size", "evals_per_run", "eval_blocks", "eval_mc_samples", "checkpoints_per_run"):
        if getattr(spec, name) < 1:
            raise SmdmError(f"{name} must be at least 1")


def plan_repeat(spec: RepeatSpec, available_tokens: int | None = None) -> list[PlannedRun]:
    """The study's runs; `available_tokens` (the training split's size, when known) bounds every U."""
    _check(spec)
    configs = [ModelConfig.from_name(m) for m in dict.fromkeys(spec.models)]
    runs = []
    for unique in sorted(int(u) for u in spec.unique_tokens):
        if available_tokens is not None and unique > available_tokens:
            raise SmdmError(f"U = {unique:,} unique tokens, but the training split has only {available_tokens:,}")
        for config in sorted(configs, key=non_embedding_params):
            if spec.seq_len > config.block_size:
                raise SmdmError(f"seq_len {spec.seq_len} exceeds {config.name}'s block size {config.block_size}")
            per_token = {c: flops_per_token(config, spec.seq_len, c) for c in FLOPS_COUNTS}
            for objective, epochs in spec.runs_per_model():
                rows = unique // make_objective(objective).block_length(spec.seq_len)
                if rows < 1:
                    raise SmdmError(f"U = {unique} tokens is less than one block of {objective}")
                steps = max(1, math.ceil(epochs * rows / spec.batch_size))
                tokens = steps * spec.batch_size * spec.seq_len
                name = f"{objective}-{config.name}-U{unique}-e{epochs:g}"
                warmup, family = family_recipe(spec.train_by_objective, objective, steps, spec.warmup_fraction)
                train = {
                    "seq_len": spec.seq_len, "batch_size": spec.batch_size, "grad_accum": 1, "lr": spec.lr,
                    "min_lr_ratio": spec.min_lr_ratio, "warmup_steps": warmup,
                    "max_steps": steps, "max_unique_tokens": unique,
                    "eval_every": max(1, steps // spec.evals_per_run), "eval_blocks": spec.eval_blocks,
                    "eval_mc_samples": spec.eval_mc_samples,
                    "save_every": max(1, math.ceil(steps / spec.checkpoints_per_run)),
                    "log_every": max(1, steps // 50), "seed": spec.seed, "flops_count": spec.flops_count,
                    **spec.train, **family,
                }
                runs.append(PlannedRun(
                    name=name, objective=objective, model=config.name, budget=tokens * per_token[spec.flops_count],
                    non_embedding_params=non_embedding_params(config), seq_len=spec.seq_len,
                    batch_size=spec.batch_size, micro_batch_size=spec.batch_size, steps=steps,
                    warmup_steps=train["warmup_steps"], tokens=tokens,
                    flops=tokens * per_token[spec.flops_count], flops_per_token=per_token,
                    out_dir=str(Path(spec.out_dir) / name), train=train,
                ))
    return runs


def write_repeat_manifest(spec: RepeatSpec, runs: list[PlannedRun], path: str | Path) -> Path:
    """The manifest `smdm scale repeat run/fit` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "spec": asdict(spec),
                                "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    return path


def read_repeat_manifest(path: str | Path) -> tuple[RepeatSpec, list[PlannedRun]]:
    """Load a repeat manifest written by `smdm scale repeat plan`."""
    data = read_json_object(Path(path))
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("runs"), list):
        raise SmdmError(f"{path}: not a repeat manifest; write one with `smdm scale repeat plan`")
    try:
        return RepeatSpec(**data["spec"]), [PlannedRun(**r) for r in data["runs"]]
    except TypeError as error:
        raise SmdmError(f"{path}: malformed manifest ({error})") from None


# ------------------------------------------------------------------------------------------------------- results


@dataclass
class RepeatPoint:
    """One finished run as the fits see it."""

    name: str
    objective: str
    model: str
    n_params: int
    unique_tokens: int
    epochs: float
    flops: float
    best_loss: float  # the lowest validation loss the run logged (early stopping)
    final_loss: float
    best_loss_se: float | None = None  # the Monte-Carlo error logged with it (an MDM's ELBO); None: exact or unlogged


def collect_points(runs: list[PlannedRun]) -> tuple[list[RepeatPoint], dict[str, str]]:
    """Finished runs as points, and the unfinished ones with the reason they were left out."""
    from smdm.sweep import finished_runs

    done, missing = finished_runs(runs)
    points = []
    for run, final_loss in done:
        evaluations = []  # (loss, its standard error or None)
        for line in (Path(run.out_dir) / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row.get("val_loss"), (int, float)) and math.isfinite(row["val_loss"]):
                evaluations.append((float(row["val_loss"]), row.get("val_loss_se")))
        best, best_se = min(evaluations, key=lambda e: e[0])
        unique = int(run.train["max_unique_tokens"])
        rows = unique // make_objective(run.objective).block_length(run.seq_len)
        points.append(RepeatPoint(run.name, run.objective, run.model, run.non_embedding_params, unique,
                                  epochs=run.steps * run.batch_size / rows, flops=run.flops,
                                  best_loss=best, final_loss=final_loss, best_loss_se=best_se))
    return points, missing


# --------------------------------------------------------------------------------------------------------- fits


def best_so_far(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The frontier: at each compute, the lowest loss of any run that used at most that compute."""
    frontier, best = [], math.inf
    for flops, loss in sorted(points):
        best = min(best, loss)
        frontier.append((flops, best))
    return frontier


def _value_at(frontier: list[tuple[float, float]], flops: float) -> float:
    """A frontier's loss at `flops`: infinite before its first run."""
    value = math.inf
    for c, loss in frontier:
        if c > flops:
            break
        value = loss
    return value


def crossover_compute(mdm: list[tuple[float, float]], arm: list[tuple[float, float]]) -> float | None:
    """The least compute from which on the MDM's best-so-far loss stays below the ARM's; None if it never does."""
    mdm_frontier, arm_frontier = best_so_far(mdm), best_so_far(arm)
    if not mdm_frontier or not arm_frontier:
        return None
    grid = sorted({c for c, _ in mdm_frontier} | {c for c, _ in arm_frontier})
    crossing = None
    for c in grid:
        if _value_at(mdm_frontier, c) < _value_at(arm_frontier, c):
            crossing = c if crossing is None else crossing
        else:
            crossing = None
    return crossing


def paper_critical_compute(unique_tokens: float) -> float:
    """Prabhudesai et al.'s closed form C_crit(U) = 2.12e15 · (U / 1e6)^2.174 FLOPs (U in tokens here)."""
    return PAPER_CRIT_COEFF * (unique_tokens / 1e6) ** PAPER_CRIT_EXPONENT


def effective_data(unique: np.ndarray, epochs: np.ndarray, half_life: float) -> np.ndarray:
    """Muennighoff et al. 2023's D' = U + U·R*·(1 - exp(-R/R*)), R = epochs - 1: repeated tokens are worth less."""
    repeats = np.maximum(np.asarray(epochs, dtype=float) - 1.0, 0.0)
    return np.asarray(unique, dtype=float) * (1.0 + half_life * (1.0 - np.exp(-repeats / half_life)))


@dataclass
class ReuseFit:
    """L = E + B / (D' / U0)^beta with D' the effective data; `half_life` is R_D* in epochs."""

    irreducible: float
    scale: float
    beta: float
    half_life: float
    rmse: float
    at_grid_edge: bool  # R_D* hit the search range: only a bound is known (e.g. no decay seen at all)
    unit: float  # U0, the tokens D' is measured in

    def predict(self, unique: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The fitted loss at (U, epochs)."""
        return self.irreducible + self.scale * (effective_data(unique, epochs, self.half_life) / self.unit) ** -self.beta


def fit_reuse_half_life(unique: list[float], epochs: list[float], losses: list[float],
                        half_lives: np.ndarray | None = None, betas: np.ndarray | None = None) -> ReuseFit:
    """Least squares over a grid of (R_D*, beta), with E and B solved exactly for each; E, B >= 0.

    Prabhudesai et al. fit R_D* (with the rest of Muennighoff's law) to the runs' validation losses; with the few
    runs a CPU affords, one model size is fitted at a time, jointly over its U values.
    """
    u, e, y = (np.asarray(v, dtype=float) for v in (unique, epochs, losses))
    if len(y) < 4 or len(set(e.tolist())) < 2:
        raise SmdmError("the data-reuse fit needs at least 4 runs over at least 2 epoch counts")
    half_lives = np.geomspace(0.1, 1e4, 801) if half_lives is None else half_lives
    betas = np.linspace(0.02, 3.0, 150) if betas is None else betas
    unit = float(u.max())
    best = None
    for half_life in half_lives:
        log_d = np.log(effective_data(u, e, half_life) / unit)
        x = np.exp(-np.outer(betas, log_d))  # (betas, points)
        x_mean = x.mean(1, keepdims=True)
        dx = x - x_mean
        var = (dx ** 2).sum(1)
        slope = np.where(var > 0, (dx * (y - y.mean())).sum(1) / np.where(var > 0, var, 1), 0.0)
        slope = np.maximum(slope, 0.0)
        intercept = y.mean() - slope * x_mean[:, 0]
        below = intercept < 0  # E >= 0: the best fit with E = 0 is B = x.y / x.x (>= 0, as losses are)
        slope = np.where(below, (x * y).sum(1) / (x ** 2).sum(1), slope)
        intercept = np.where(below, 0.0, intercept)
        sse = ((intercept[:, None] + slope[:, None] * x - y) ** 2).sum(1)
        k = int(np.argmin(sse))
        if best is None or sse[k] < best[0] - 1e-15:
            best = (float(sse[k]), float(intercept[k]), float(slope[k]), float(betas[k]), float(half_life))
    sse, intercept, slope, beta, half_life = best
    edge = half_life in (float(half_lives[0]), float(half_lives[-1]))
    return ReuseFit(intercept, slope, beta, half_life, math.sqrt(sse / len(y)), edge, unit)


def best_gap(points: list[RepeatPoint]) -> dict[str, float | bool | None]:
    """The best ARM's loss minus the best MDM's (> 0: the MDM is ahead), the MDM estimate's standard error (the ARM's
    loss is exact) and whether the gap exceeds twice that error; None where a family or the error is missing."""
    best = {f: min((p for p in points if p.objective == f), key=lambda p: p.best_loss, default=None)
            for f in ("mdm", "arm")}
    if best["mdm"] is None or best["arm"] is None:
        return {"gap": None, "gap_se": None, "beyond_2se": None}
    gap, se = best["arm"].best_loss - best["mdm"].best_loss, best["mdm"].best_loss_se
    return {"gap": gap, "gap_se": se, "beyond_2se": None if se is None else abs(gap) > 2 * se}


def fit_repeat(points: list[RepeatPoint]) -> dict[str, Any]:
    """Frontiers, crossovers (per U; per U and model size) against the closed form, and reuse half-lives."""
    report: dict[str, Any] = {"per_unique": [], "per_model": [], "half_lives": []}
    for unique in sorted({p.unique_tokens for p in points}):
        group = [p for p in points if p.unique_tokens == unique]
        frontier = {f: best_so_far([(p.flops, p.best_loss) for p in group if p.objective == f]) for f in ("mdm", "arm")}
        crossing = crossover_compute(*([(p.flops, p.best_loss) for p in group if p.objective == f]
                                       for f in ("mdm", "arm")))
        report["per_unique"].append({
            "unique_tokens": unique, "crossover_flops": crossing, "paper_critical_flops": paper_critical_compute(unique),
            "best": {f: (frontier[f][-1][1] if frontier[f] else None) for f in frontier},
            "frontier": {f: [list(x) for x in frontier[f]] for f in frontier}, **best_gap(group),
        })
        for model in sorted({p.model for p in group}, key=lambda m: min(p.n_params for p in group if p.model == m)):
            pairs = [[(p.flops, p.best_loss) for p in group if p.model == model and p.objective == f]
                     for f in ("mdm", "arm")]
            crossing = crossover_compute(*pairs)
            crossing_epochs = None
            if crossing is not None:
                crossing_epochs = min(p.epochs for p in group
                                      if p.model == model and p.objective == "mdm" and p.flops >= crossing)
            report["per_model"].append({"unique_tokens": unique, "model": model,
                                        "n_params": next(p.n_params for p in group if p.model == model),
                                        "crossover_flops": crossing, "crossover_mdm_epochs": crossing_epochs,
                                        **best_gap([p for p in group if p.model == model])})
    for family in ("mdm", "arm"):
        for model in sorted({p.model for p in points if p.objective == family}):
            group = [p for p in points if p.objective == family and p.model == model]
            entry: dict[str, Any] = {"objective": family, "model": model, "runs": len(group),
                                     "paper_half_life": PAPER_HALF_LIFE[family]}
            try:
                fit = fit_reuse_half_life([p.unique_tokens for p in group], [p.epochs for p in group],
                                          [p.best_loss for p in group])
                entry.update(asdict(fit))
            except SmdmError as error:
                entry["skipped"] = str(error)
            report["half_lives"].append(entry)
    return report


def plot_repeat(points: list[RepeatPoint], report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """loss_vs_compute.png (per U: every run, the best-so-far frontiers, the measured and closed-form crossovers)
    and reuse.png (best loss against epochs per family, with the fitted half-life curves). None without matplotlib."""
    from smdm.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return []
    import matplotlib.ticker
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colour = {"mdm": "tab:blue", "arm": "tab:orange"}
    uniques = [entry["unique_tokens"] for entry in report["per_unique"]]
    models = sorted({p.model for p in points}, key=lambda m: min(p.n_params for p in points if p.model == m))
    markers = dict(zip(models, "osD^v<>p*h", strict=False))
    written = []
    fig, axes = plt.subplots(1, max(1, len(uniques)), figsize=(5 * max(1, len(uniques)), 4), squeeze=False)
    for ax, entry in zip(axes[0], report["per_unique"], strict=False):
        for family in ("mdm", "arm"):
            for p in (p for p in points if p.unique_tokens == entry["unique_tokens"] and p.objective == family):
                ax.plot(p.flops, p.best_loss, markers[p.model], color=colour[family], alpha=0.6, ms=5)
            frontier = entry["frontier"][family]
            if frontier:
                ax.step([c for c, _ in frontier], [v for _, v in frontier], where="post", color=colour[family],
                        label=f"{family.upper()} best so far")
        if entry["crossover_flops"]:
            ax.axvline(entry["crossover_flops"], color="k", ls="--", lw=1, label="measured crossover")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"U = {entry['unique_tokens']:,} tokens (closed form C_crit {entry['paper_critical_flops']:.1e})",
                     fontsize=9)
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best validation loss (nats/token; MDM: ELBO)")
    written.append(save_figure(fig, out_dir / "loss_vs_compute.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, family in zip(axes[0], ("mdm", "arm"), strict=True):
        for model in models:
            group = [p for p in points if p.objective == family and p.model == model]
            fit = next((h for h in report["half_lives"] if h["objective"] == family and h["model"] == model
                        and "half_life" in h), None)
            for unique in sorted({p.unique_tokens for p in group}):
                sub = sorted((p for p in group if p.unique_tokens == unique), key=lambda p: p.epochs)
                line = ax.plot([p.epochs for p in sub], [p.best_loss for p in sub], markers[model], alpha=0.7,
                               label=f"{model}, U={unique:,}")
                if fit is not None:
                    grid = np.geomspace(min(p.epochs for p in sub), max(p.epochs for p in sub), 50)
                    law = ReuseFit(fit["irreducible"], fit["scale"], fit["beta"], fit["half_life"], fit["rmse"],
                                   fit["at_grid_edge"], fit["unit"])
                    ax.plot(grid, law.predict(np.full_like(grid, unique), grid), "-", color=line[0].get_color(), lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("epochs over U")
        ax.set_title(f"{family.upper()}: data reuse (lines: fitted R_D*)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("best validation loss")
    written.append(save_figure(fig, out_dir / "reuse.png"))
    return written


def _describe_gap(entry: dict[str, Any]) -> str:
    if entry.get("gap") is None:
        return "-"
    if entry["gap_se"] is None:
        return f"{entry['gap']:+.3f} (no error logged)"
    verdict = "beyond 2 SE" if entry["beyond_2se"] else "within 2 SE: not resolved"
    return f"{entry['gap']:+.3f} ± {entry['gap_se']:.3f} ({verdict})"


def describe_repeat(report: dict[str, Any]) -> list[str]:
    """The report as text lines for the terminal and the docs."""
    lines = ["U (tokens) | best MDM | best ARM | measured crossover FLOPs | closed-form C_crit FLOPs"]
    for e in report["per_unique"]:
        best = {f: ("-" if e["best"][f] is None else f"{e['best'][f]:.3f}") for f in ("mdm", "arm")}
        crossing = "none" if e["crossover_flops"] is None else f"{e['crossover_flops']:.2e}"
        lines.append(f"{e['unique_tokens']:,} | {best['mdm']} | {best['arm']} | {crossing} | "
                     f"{e['paper_critical_flops']:.2e}")
    lines.append("per model size: U, model, crossover FLOPs, MDM epochs at the crossover; best ARM - best MDM")
    for e in report["per_model"]:
        crossing = "none" if e["crossover_flops"] is None else f"{e['crossover_flops']:.2e}"
        lines.append(f"  {e['unique_tokens']:,} {e['model']}: {crossing}, {e['crossover_mdm_epochs']}; "
                     f"{_describe_gap(e)}")
    lines.append("data-reuse half-life R_D* (epochs; the paper: MDM ~500, ARM ~15)")
    for h in report["half_lives"]:
        if "half_life" in h:
            bound = " (at the search edge: a bound)" if h["at_grid_edge"] else ""
            lines.append(f"  {h['objective']} {h['model']}: R_D* = {h['half_life']:.3g}{bound}, "
                         f"beta {h['beta']:.2f}, E {h['irreducible']:.3f}, rmse {h['rmse']:.3f} ({h['runs']} runs)")
        else:
            lines.append(f"  {h['objective']} {h['model']}: {h['skipped']}")
    return lines
