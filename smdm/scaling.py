"""Scaling laws: FLOPs accounting, IsoFLOP sweep plans (a manifest of ordinary training runs), and the fits.

The paper (Nie et al., ICLR 2025) counts C = 6·N·D with N the non-embedding parameters. That omits the attention
products (QK^T and AV), which at short widths are as large as the 6·N term, so small models are charged too little
compute and the fitted exponents tilt. The default here adds Kaplan et al.'s (2020) attention term 6·L·T·d; "6n"
reproduces the paper's count, and `fit_sweep` reports the frontier under both.

Pipeline: `plan_sweep(spec)` -> manifest (runs with steps, batch, warmup) -> `smdm scale run` -> `fit_sweep(results)`:
per budget a parabola of loss in log N gives the optimal size; across budgets L*(C) = A·C^-α, N* ∝ C^a, D* ∝ C^b,
with intervals from a residual bootstrap; the compute gap is the factor of compute an MDM needs to match an ARM.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from smdm.config import ModelConfig, non_embedding_params
from smdm.errors import SmdmError
from smdm.flops import FLOPS_COUNTS, FlopsCount, flops_per_token, steps_for_budget  # noqa: F401 -- re-exported for sweeps
from smdm.objectives import family_compute_factor, parse_family

MANIFEST_FORMAT = "smdm-sweep-1"


# -------------------------------------------------------------------------------------------------------- planning


@dataclass
class SweepSpec:
    """An IsoFLOP sweep: model sizes x budgets x objectives, trained with the paper's recipe (1% warmup, cosine to 10%)."""

    name: str
    data_dir: str
    out_dir: str  # run directories are OUT_DIR/<run name>
    models: list[str]
    budgets: list[float]
    objectives: list[str] = field(default_factory=lambda: ["mdm", "arm"])
    sizes_per_budget: int | None = None  # take this many ladder models around the guessed optimum; None: all
    # The guess that centres each budget's window, D ≈ tokens_per_param·N (Chinchilla: 20); a dict gives each
    # objective its own, e.g. {"mdm": 200, "arm": 20}: small MDMs want far more data per parameter than ARMs.
    tokens_per_param: float | dict[str, float] = 20.0
    seq_len: int | None = None  # default: each model's block size
    batch_size: int = 256  # sequences per optimizer step, across all devices
    micro_batch_size: int | None = None  # sequences per device per micro-batch; default: batch_size
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.01
    flops_count: str = "attention"
    min_steps: int = 1
    eval_blocks: int = 256
    eval_mc_samples: int = 4
    checkpoints_per_run: int = 10  # a killed run loses at most 1/this of its work
    seed: int = 0
    train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields, e.g. {"weight_decay": 0.1}
    # per-family TrainConfig fields, e.g. {"mdm": {"loss_weighting": "ce", "init": "smdm"}}: each family's own recipe
    # (plus "warmup_fraction", which replaces the spec's for that family)
    train_by_objective: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> SweepSpec:
        """Read a JSON spec; unknown keys are an error (a typo must not silently fall back to a default)."""
        spec = cls(**read_spec_fields(cls, path, ("name", "data_dir", "out_dir", "models", "budgets")))
        spec.budgets = [float(b) for b in spec.budgets]
        return spec


@dataclass
class PlannedRun:
    """One training run of a sweep: everything `smdm train` needs, plus the numbers the fit reads."""

    name: str
    objective: str
    model: str
    budget: float
    non_embedding_params: int
    seq_len: int
    batch_size: int  # global sequences per step
    micro_batch_size: int
    steps: int
    warmup_steps: int
    tokens: int  # steps x batch_size x seq_len
    flops: float  # tokens x flops_per_token under the sweep's count (<= budget)
    flops_per_token: dict[str, float]  # under every count, so the fit can report both
    out_dir: str
    train: dict[str, Any]  # TrainConfig fields except data_dir/out_dir/model/objective/budget


def _check_spec(spec: SweepSpec) -> None:
    if spec.flops_count not in FLOPS_COUNTS:
        raise SmdmError(f"unknown flops_count {spec.flops_count!r}; use one of {', '.join(FLOPS_COUNTS)}")
    if not spec.models or not spec.budgets or not spec.objectives:
        raise SmdmError("a sweep needs at least one model, one budget and one objective")
    for label in spec.objectives:
        parse_family(label)
    if any(not math.isfinite(b) or b <= 0 for b in spec.budgets):
        raise SmdmError("budgets must be positive FLOPs")
    micro = spec.micro_batch_size or spec.batch_size
    if spec.batch_size < 1 or micro < 1 or spec.batch_size % micro:
        raise SmdmError(f"batch_size {spec.batch_size} must be a positive multiple of micro_batch_size {micro}")
    for fraction in [spec.warmup_fraction] + [r["warmup_fraction"] for r in spec.train_by_objective.values()
                                              if "warmup_fraction" in r]:
        if not 0 <= fraction < 1:
            raise SmdmError("warmup_fraction must lie in [0, 1)")
    if spec.sizes_per_budget is not None and spec.sizes_per_budget < 1:
        raise SmdmError("sizes_per_budget must be at least 1")


def _window(configs: list[ModelConfig], budget: float, spec: SweepSpec, objective: str) -> list[ModelConfig]:
    """The `sizes_per_budget` ladder rungs centred (in log N) on the guess N ≈ sqrt(C / (6·tokens_per_param))."""
    if spec.sizes_per_budget is None or spec.sizes_per_budget >= len(configs):
        return configs
    ratio = spec.tokens_per_param
    if isinstance(ratio, dict):
        if objective not in ratio:
            raise SmdmError(f"tokens_per_param has no entry for {objective}")
        ratio = ratio[objective]
    guess = math.sqrt(budget / (6 * float(ratio)))
    ranked = sorted(configs, key=non_embedding_params)
    centre = min(range(len(ranked)), key=lambda i: abs(math.log(non_embedding_params(ranked[i]) / guess)))
    start = min(max(0, centre - spec.sizes_per_budget // 2), len(ranked) - spec.sizes_per_budget)
    return ranked[start:start + spec.sizes_per_budget]


def family_recipe(by_objective: dict[str, dict[str, Any]], objective: str, steps: int,
                  warmup_fraction: float) -> tuple[int, dict[str, Any]]:
    """A family's warmup steps and its other TrainConfig fields: a study's `train_by_objective` entry may carry its
    own "warmup_fraction" (learning rate and warmup are tuned per family, issue 15)."""
    family = dict(by_objective.get(objective, {}))
    return max(1, int(steps * family.pop("warmup_fraction", warmup_fraction))), family


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """Runs of an IsoFLOP sweep; a budget too small for `min_steps` steps of some model is an error naming both."""
    _check_spec(spec)
    configs = [ModelConfig.from_name(m) for m in dict.fromkeys(spec.models)]  # unknown names raise here
    micro = spec.micro_batch_size or spec.batch_size
    runs: list[PlannedRun] = []
    for budget in sorted(spec.budgets):
        windows = {o: {c.name for c in _window(configs, budget, spec, o)} for o in spec.objectives}
        for config in sorted((c for c in configs if any(c.name in w for w in windows.values())),
                             key=non_embedding_params):
            seq_len = spec.seq_len or config.block_size
            if seq_len > config.block_size:
                raise SmdmError(f"seq_len {seq_len} exceeds {config.name}'s block size {config.block_size}")
            tokens_per_step = spec.batch_size * seq_len
            for objective in (o for o in spec.objectives if config.name in windows[o]):
                # A family's token may cost more than one pass (block diffusion: 2L tokens), as `smdm train` counts.
                factor = family_compute_factor(objective)
                per_token = {c: factor * flops_per_token(config, seq_len, c) for c in FLOPS_COUNTS}
                steps = steps_for_budget(budget, per_token[spec.flops_count], tokens_per_step)
                if steps < max(1, spec.min_steps):
                    one_step = per_token[spec.flops_count] * tokens_per_step
                    raise SmdmError(f"budget {budget:.3g} FLOPs is too small for {config.name} ({objective}): {steps} "
                                    f"steps, need {max(1, spec.min_steps)} (one step of {tokens_per_step:,} tokens "
                                    f"costs {one_step:.3g} FLOPs)")
                warmup, family = family_recipe(spec.train_by_objective, objective, steps, spec.warmup_fraction)
                save_every = max(1, math.ceil(steps / max(1, spec.checkpoints_per_run)))
                name = f"{objective.replace(':', '')}-{config.name}-C{budget:.0e}".replace("+", "")
                train = {
                    "seq_len": seq_len, "batch_size": micro, "grad_accum": spec.batch_size // micro,
                    "lr": spec.lr, "min_lr_ratio": spec.min_lr_ratio, "warmup_steps": warmup, "max_steps": steps,
                    "eval_every": steps, "eval_blocks": spec.eval_blocks, "eval_mc_samples": spec.eval_mc_samples,
                    "save_every": save_every,
                    "log_every": max(1, steps // 50), "seed": spec.seed, **spec.train,
                    **family,
                }
                runs.append(PlannedRun(
                    name=name, objective=objective, model=config.name, budget=budget,
                    non_embedding_params=non_embedding_params(config), seq_len=seq_len, batch_size=spec.batch_size,
                    micro_batch_size=micro, steps=steps, warmup_steps=warmup, tokens=steps * tokens_per_step,
                    flops=steps * tokens_per_step * per_token[spec.flops_count], flops_per_token=per_token,
                    out_dir=str(Path(spec.out_dir) / name), train=train,
                ))
    return runs


def write_manifest(spec: SweepSpec, runs: list[PlannedRun], path: str | Path) -> Path:
    """The manifest `smdm scale run/fit/launch` read: the spec it came from and one entry per run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT, "spec": asdict(spec), "runs": [asdict(r) for r in runs]}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_manifest(path: str | Path) -> tuple[SweepSpec, list[PlannedRun]]:
    """Load and check a manifest: every run's model must be a known config (so no run fails halfway through a sweep)."""
    path = Path(path)
    data = read_json_object(path)
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("runs"), list):
        raise SmdmError(f"{path}: not a sweep manifest (format {MANIFEST_FORMAT}); write one with `smdm scale plan`")
    try:
        spec = SweepSpec(**data["spec"])
        runs = [PlannedRun(**r) for r in data["runs"]]
    except TypeError as error:
        raise SmdmError(f"{path}: malformed manifest ({error})") from None
    for run in runs:
        try:
            ModelConfig.from_name(run.model)
        except SmdmError as error:
            raise SmdmError(f"{path}: run {run.name}: {error}") from None
        if run.steps < 1:
            raise SmdmError(f"{path}: run {run.name} has {run.steps} steps; its budget is too small for one step")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SmdmError(f"{path}: run names are not unique")
    return spec, runs


def read_spec_fields(cls: type, path: str | Path, required: tuple[str, ...]) -> dict[str, Any]:
    """A study spec's JSON object checked against the dataclass `cls`: unknown keys (a typo must not silently fall
    back to a default) and missing required keys are one-line errors."""
    data = read_json_object(Path(path))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SmdmError(f"{path}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    missing = sorted(k for k in required if k not in data)
    if missing:
        raise SmdmError(f"{path}: missing keys {missing}")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file (a spec or a manifest); a missing file, bad JSON or another type is one line."""
    if not path.is_file():
        raise SmdmError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SmdmError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise SmdmError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------------------------------------- fitting


@dataclass
class RunResult:
    """A finished run as the fit sees it: budget group, size, tokens, compute under each count, final val loss."""

    name: str
    objective: str
    budget: float
    n_params: float
    tokens: float
    flops: dict[str, float]  # count -> FLOPs actually spent
    loss: float  # nats/token (MDM: the ELBO bound)


@dataclass
class PowerLaw:
    """y = A·x^-alpha (+ E when fitted with an irreducible term); alpha_se from the log-log regression."""

    A: float
    alpha: float
    E: float = 0.0
    alpha_se: float | None = None

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(x, -self.alpha)

    def inverse(self, y: float) -> float:
        """The x at which the law reaches y (inf when y is at or below the irreducible term)."""
        if y <= self.E:
            return math.inf
        try:
            return float(math.exp((math.log(self.A) - math.log(y - self.E)) / self.alpha))
        except (OverflowError, ZeroDivisionError):  # a flat law (alpha ~ 0) reaches y nowhere in finite compute
            return math.inf if y < self.A else 0.0


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """Least squares of log y on log x: y = A·x^-alpha. Needs two points; the slope's SE needs three."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise SmdmError(f"a power law needs at least 2 positive points, got {len(x)}")
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    se = None
    if len(x) > 2:
        resid = ly - (slope * lx + intercept)
        se = float(math.sqrt(resid @ resid / (len(x) - 2) / np.sum((lx - lx.mean()) ** 2)))
    return PowerLaw(A=float(math.exp(intercept)), alpha=float(-slope), alpha_se=se)


def fit_power_law_irreducible(x: np.ndarray, y: np.ndarray, grid: int = 400) -> PowerLaw:
    """y = E + A·x^-alpha by profiling E on a grid in [0, min y): for each E the rest is a log-log line (stable)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 4:
        raise SmdmError(f"a power law with an irreducible term needs at least 4 points, got {len(x)}")
    best: tuple[float, PowerLaw] | None = None
    for e in np.min(y) * (1 - np.geomspace(1, 1e-4, grid)):  # dense near min y, where the optimum usually is
        law = fit_power_law(x, y - e)
        law = PowerLaw(A=law.A, alpha=law.alpha, E=float(e))
        sse = float(np.sum((law(x) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, law)
    return best[1]


@dataclass
class Optimum:
    """The bottom of one budget's IsoFLOP parabola (loss vs log N)."""

    budget: float
    n_opt: float
    loss_opt: float
    tokens_opt: float
    flops_opt: dict[str, float]  # compute at N* under each count (interpolated from the runs)
    curvature: float
    sizes: int
    inside: bool  # N* lies within the sampled sizes (else it is extrapolated)


def isoflop_optimum(points: list[RunResult]) -> Optimum | str:
    """Parabola in log N through one budget's runs; returns its minimum, or the reason there is none."""
    if len({p.n_params for p in points}) < 3:
        return f"{len({p.n_params for p in points})} sizes (a parabola needs 3)"
    x = np.log([p.n_params for p in points])
    y = np.array([p.loss for p in points])
    a2, a1, a0 = np.polyfit(x, y, 2)
    if a2 <= 0:
        return "no minimum: the loss is not convex in log N over these sizes"
    x_opt = -a1 / (2 * a2)
    span = x.max() - x.min()
    if not x.min() - span <= x_opt <= x.max() + span:  # a nearly flat curve: its vertex says nothing about N*
        return f"minimum far outside the sampled sizes (N* ≈ {math.exp(min(x_opt, 700)):.3g})"
    # Tokens and compute at N*: log-linear in log N within the budget (D ∝ C / flops_per_token(N)).
    tokens = math.exp(np.polyval(np.polyfit(x, np.log([p.tokens for p in points]), 1), x_opt))
    flops = {c: math.exp(np.polyval(np.polyfit(x, np.log([p.flops[c] for p in points]), 1), x_opt))
             for c in points[0].flops}
    return Optimum(budget=points[0].budget, n_opt=float(math.exp(x_opt)), loss_opt=float(a0 - a1 ** 2 / (4 * a2)),
                   tokens_opt=tokens, flops_opt=flops, curvature=float(a2), sizes=len(points),
                   inside=bool(x.min() <= x_opt <= x.max()))


def best_per_budget(results: list[RunResult], objective: str | None = None) -> list[RunResult]:
    """The lower envelope: each budget's best run (of one family when `objective` is given), by budget."""
    best: dict[float, RunResult] = {}
    for r in results:
        if (objective is None or r.objective == objective) and (r.budget not in best or r.loss < best[r.budget].loss):
            best[r.budget] = r
    return [best[b] for b in sorted(best)]


def _frontier(results: list[RunResult], count: str, irreducible: bool) -> dict[str, Any]:
    """Optima per budget, then L*(C), N*(C), D*(C) power laws. Raises SmdmError when too few optima remain."""
    groups: dict[float, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.budget, []).append(r)
    # The lower envelope needs no parabola: the best run of each budget, wherever it sits.
    best = best_per_budget(results)
    envelope = fit_power_law([r.flops[count] for r in best], [r.loss for r in best]) if len(best) >= 2 else None
    optima, skipped = [], {}
    for budget in sorted(groups):
        found = isoflop_optimum(groups[budget])
        if isinstance(found, str):
            skipped[budget] = found
        else:
            optima.append(found)
    if len(optima) < 2:
        raise SmdmError(f"{len(optima)} budget(s) with an IsoFLOP minimum (need at least 2 for L*(C))"
                        + (f"; skipped: {', '.join(f'{b:.3g}: {why}' for b, why in skipped.items())}" if skipped else ""))
    c = np.array([o.flops_opt[count] for o in optima])
    loss = fit_power_law(c, [o.loss_opt for o in optima])
    n_law = fit_power_law(c, [o.n_opt for o in optima])
    d_law = fit_power_law(c, [o.tokens_opt for o in optima])
    out = {"optima": optima, "skipped_budgets": skipped, "loss": loss, "a": -n_law.alpha, "b": -d_law.alpha,
           "n_law": n_law, "d_law": d_law, "envelope": envelope, "envelope_runs": [r.name for r in best]}
    if irreducible and len(optima) >= 4:
        out["loss_irreducible"] = fit_power_law_irreducible(c, [o.loss_opt for o in optima])
    return out


def compute_gap(mdm: PowerLaw, arm: PowerLaw, flops: float) -> float:
    """Compute an MDM needs to reach the loss an ARM reaches with `flops`, as a multiple of `flops`."""
    return mdm.inverse(float(arm(flops))) / flops


def envelope_gap(results: list[RunResult], count: str, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The compute gap without IsoFLOP parabolas: each budget's best MDM run against the ARM's lower envelope.

    The ARM's envelope (its best run per budget) is fitted as L = A·C^-alpha; for the MDM's best run at each budget
    the gap is the compute that run spent over the compute at which the ARM envelope reaches the same loss. It
    exists where the MDM's IsoFLOP curves have no usable minimum (small MDMs on their unigram plateau, where the
    best run sits on the smallest size), and it reads the MDM's measured losses rather than a fitted law. `in_range`
    says whether the ARM's matching compute lies within its measured budgets (else the envelope is extrapolated).
    `ci95`: a residual bootstrap of the envelope's log-log fit (its residuals, inflated for the 2 fitted
    parameters, resampled onto the line and refitted), so it carries the ARM envelope's scatter, not the noise of
    the MDM's own loss; None with fewer than 3 ARM budgets.
    """
    arm_runs, mdm_runs = best_per_budget(results, "arm"), best_per_budget(results, "mdm")
    if len(arm_runs) < 2 or not mdm_runs:
        return None
    envelope_flops, envelope_loss = [r.flops[count] for r in arm_runs], [r.loss for r in arm_runs]
    law = fit_power_law(envelope_flops, envelope_loss)
    low, high = min(envelope_flops), max(envelope_flops)
    replicates: list[PowerLaw] = []
    if len(arm_runs) > 2 and bootstrap > 0:
        rng = np.random.default_rng(seed)
        fitted = np.log(np.asarray(law(np.asarray(envelope_flops))))
        residuals = (np.log(envelope_loss) - fitted) * math.sqrt(len(arm_runs) / (len(arm_runs) - 2))
        for _ in range(bootstrap):
            replicates.append(fit_power_law(envelope_flops, np.exp(fitted + rng.choice(residuals, len(residuals)))))
    points = []
    for run in mdm_runs:
        arm_flops = law.inverse(run.loss)
        gaps = [run.flops[count] / r.inverse(run.loss) for r in replicates]
        points.append({"budget": run.budget, "mdm_run": run.name, "mdm_loss": run.loss, "mdm_flops": run.flops[count],
                       "arm_flops": arm_flops, "gap": run.flops[count] / arm_flops,
                       "ci95": _interval([g for g in gaps if math.isfinite(g) and g > 0]),
                       "in_range": bool(low <= arm_flops <= high)})
    return {"arm_envelope": {"A": law.A, "alpha": law.alpha, "alpha_se": law.alpha_se,
                             "runs": [r.name for r in arm_runs]}, "points": points}


def gap_undetermined(alphas: dict[str, list[float]]) -> str | None:
    """Why the gap from the two fitted laws means nothing, or None when it does.

    The gap inverts the MDM's law, C = (L / A)^(-1/alpha). When the bootstrap interval of a family's alpha reaches 0,
    the data allow a law that hardly falls, and the inverse can give any compute at all. The point estimate is
    then an artefact of the fit (docs/scaling.md saw intervals such as [2.5, 1e12]), so it is reported as not
    determined; the best-run gap (`envelope_gap`) still reads the measured losses.
    """
    for family, values in alphas.items():
        ci = _interval(values)
        if ci is None:
            return f"too few bootstrap fits of the {family.upper()} law for an interval on its alpha"
        if ci[0] <= 0:
            return f"the {family.upper()} alpha's 95% interval [{ci[0]:.3f}, {ci[1]:.3f}] reaches 0"
    return None


def _interval(values: list[float], level: float = 0.95) -> list[float] | None:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 10:
        return None
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def fit_sweep(results: list[RunResult], count: str = "attention", irreducible: bool = False,
              bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The whole analysis as a JSON-ready dict: per-family frontier fits with 95% bootstrap intervals, both FLOPs
    counts, and the MDM-over-ARM compute gap.

    Intervals come from a residual bootstrap: each budget's parabola residuals (inflated for the 3 fitted
    parameters) are pooled per family, resampled onto the fitted curves, and the whole pipeline is refitted; they
    carry the run-to-run noise of the losses, not doubt about the power-law form itself.
    """
    if count not in FLOPS_COUNTS:
        raise SmdmError(f"unknown FLOPs count {count!r}; use one of {', '.join(FLOPS_COUNTS)}")
    families = sorted({r.objective for r in results})
    if not families:
        raise SmdmError("no finished runs to fit")
    other = [c for c in FLOPS_COUNTS if c != count]
    report: dict[str, Any] = {"flops_count": count, "other_counts": other, "families": {}, "notes": []}
    fits: dict[str, dict[str, dict[str, Any]]] = {}
    for family in families:
        family_results = [r for r in results if r.objective == family]
        try:
            fits[family] = {c: _frontier(family_results, c, irreducible) for c in [count, *other]}
        except SmdmError as error:
            report["notes"].append(f"{family}: no fit: {error}")
    if not fits and all(envelope_gap(results, c) is None for c in FLOPS_COUNTS):
        raise SmdmError("; ".join(report["notes"]))

    rng = np.random.default_rng(seed)
    samples: dict[str, dict[str, list[float]]] = {f: {} for f in fits}
    gap_samples: dict[str, list[float]] = {}
    budgets = sorted({r.budget for r in results})
    gap_at = {f"{b:.3g}": b for b in budgets}
    noisy = {f: _residual_model(fits[f][count]["optima"], [r for r in results if r.objective == f]) for f in fits}
    for _ in range(bootstrap):
        replicate: dict[str, dict[str, Any]] = {}
        for family in fits:
            fitted, residuals = noisy[family]
            if residuals.size == 0:
                continue
            resampled = [RunResult(r.name, r.objective, r.budget, r.n_params, r.tokens, r.flops,
                                   value + float(rng.choice(residuals))) for r, value in fitted]
            try:
                replicate[family] = {c: _frontier(resampled, c, False) for c in [count, *other]}
            except SmdmError:
                continue
            for c in [count, *other]:
                fit = replicate[family][c]
                for key, value in (("alpha", fit["loss"].alpha), ("a", fit["a"]), ("b", fit["b"])):
                    samples[family].setdefault(f"{c}:{key}", []).append(value)
        if "mdm" in replicate and "arm" in replicate:
            for c in [count, *other]:
                for label, flops in gap_at.items():
                    value = compute_gap(replicate["mdm"][c]["loss"], replicate["arm"][c]["loss"], flops)
                    gap_samples.setdefault(f"{c}:{label}", []).append(value)

    for family, by_count in fits.items():
        main = by_count[count]
        entry: dict[str, Any] = {
            "optima": [asdict(o) for o in main["optima"]],
            "skipped_budgets": {f"{b:.3g}": why for b, why in main["skipped_budgets"].items()},
            "loss_vs_flops": _law_json(main["loss"], samples[family].get(f"{count}:alpha", [])),
            "n_opt_exponent": {"a": main["a"], "ci95": _interval(samples[family].get(f"{count}:a", []))},
            "d_opt_exponent": {"b": main["b"], "ci95": _interval(samples[family].get(f"{count}:b", []))},
            "residual_sd": float(np.std(noisy[family][1])) if noisy[family][1].size else None,
        }
        if main["envelope"] is not None:
            entry["loss_vs_flops_envelope"] = {**_law_json(main["envelope"], []), "runs": main["envelope_runs"]}
        if "loss_irreducible" in main:
            law = main["loss_irreducible"]
            entry["loss_vs_flops_irreducible"] = {"A": law.A, "alpha": law.alpha, "E": law.E}
        for c in other:
            entry[f"loss_vs_flops_{c}"] = _law_json(by_count[c]["loss"], samples[family].get(f"{c}:alpha", []))
        report["families"][family] = entry
    if "mdm" in fits and "arm" in fits:
        report["compute_gap"], report["compute_gap_undetermined"] = {}, {}
        for c in [count, *other]:
            report["compute_gap"][c] = {
                label: {"gap": compute_gap(fits["mdm"][c]["loss"], fits["arm"][c]["loss"], flops),
                        "ci95": _interval(gap_samples.get(f"{c}:{label}", []))}
                for label, flops in gap_at.items()
            }
            why = gap_undetermined({f: samples[f].get(f"{c}:alpha", []) for f in ("arm", "mdm")})
            if why:
                report["compute_gap_undetermined"][c] = why
    report["compute_gap_envelope"] = {c: envelope_gap(results, c, bootstrap, seed) for c in [count, *other]}
    report["bootstrap"] = {"replicates": bootstrap, "seed": seed, "method": "residual (pooled parabola residuals)"}
    return report


def _residual_model(optima: list[Optimum], results: list[RunResult]) -> tuple[list[tuple[RunResult, float]], np.ndarray]:
    """Each run paired with its budget's parabola value, and the pooled residuals scaled for the lost dof."""
    fitted, residuals = [], []
    by_budget: dict[float, list[RunResult]] = {}
    for r in results:
        by_budget.setdefault(r.budget, []).append(r)
    for points in by_budget.values():
        if len({p.n_params for p in points}) < 3:
            fitted.extend((p, p.loss) for p in points)
            continue
        x = np.log([p.n_params for p in points])
        y = np.array([p.loss for p in points])
        coeffs = np.polyfit(x, y, 2)
        values = np.polyval(coeffs, x)
        fitted.extend((p, float(v)) for p, v in zip(points, values))
        if len(points) > 3:
            residuals.extend((y - values) * math.sqrt(len(points) / (len(points) - 3)))
    return fitted, np.array(residuals)


def _law_json(law: PowerLaw, alphas: list[float]) -> dict[str, Any]:
    return {"A": law.A, "alpha": law.alpha, "alpha_ci95": _interval(alphas), "alpha_se_loglog": law.alpha_se}


# --------------------------------------------------------------------------------------------------------- figures


def plot_sweep(results: list[RunResult], report: dict[str, Any], out_dir: str | Path,
               unigram: float | None = None) -> list[Path]:
    """isoflop.png (loss vs N per budget, with parabolas) and frontier.png (L* vs C for MDM and ARM, the paper's
    Figure 1). `unigram`, the validation text's unigram entropy, is drawn as the bar a model must clear.
    Returns the files written; none when matplotlib is missing."""
    from smdm.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = report["flops_count"]
    families = [f for f in ("mdm", "arm") if any(r.objective == f for r in results)]
    fitted = report["families"]  # families whose IsoFLOP parabolas gave a law (an MDM on its plateau may not)
    budgets = sorted({r.budget for r in results})
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(1, len(budgets))))
    written = []

    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.2), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        optima = {o["budget"]: o for o in fitted[family]["optima"]} if family in fitted else {}
        for colour, budget in zip(colours, budgets):
            points = sorted((r for r in results if r.objective == family and r.budget == budget),
                            key=lambda r: r.n_params)
            if not points:
                continue
            n = np.array([p.n_params for p in points])
            ax.plot(n, [p.loss for p in points], "o", color=colour, label=f"C={budget:.0e}")
            if len(points) >= 3:
                grid = np.geomspace(n.min(), n.max(), 100)
                ax.plot(grid, np.polyval(np.polyfit(np.log(n), [p.loss for p in points], 2), np.log(grid)),
                        "-", color=colour, lw=1)
            if budget in optima:
                ax.plot(optima[budget]["n_opt"], optima[budget]["loss_opt"], "*", color=colour, ms=12, mec="k")
        if unigram is not None:
            ax.axhline(unigram, color="grey", ls=":", lw=1, label="unigram entropy")
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_title(f"{family.upper()} IsoFLOP curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss (nats/token; MDM: ELBO bound)")
    path = save_figure(fig, out_dir / "isoflop.png")
    written.append(path)

    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    style = {"mdm": ("tab:blue", "MDM"), "arm": ("tab:orange", "ARM")}
    spent = [r.flops[count] for r in results]
    grid = np.geomspace(min(spent) / 2, max(spent) * 2, 100)
    for family in families:
        colour, label = style[family]
        family_runs = [r for r in results if r.objective == family]
        ax.plot([r.flops[count] for r in family_runs], [r.loss for r in family_runs], ".", color=colour, alpha=0.25)
        envelope = best_per_budget(family_runs)
        ax.plot([r.flops[count] for r in envelope], [r.loss for r in envelope], "--", color=colour, lw=1,
                label=f"{label}: best run per budget")
        if family not in fitted:
            continue
        optima = fitted[family]["optima"]
        ax.plot([o["flops_opt"][count] for o in optima], [o["loss_opt"] for o in optima], "o", color=colour, mec="k")
        law = fitted[family]["loss_vs_flops"]
        ci = law["alpha_ci95"]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        ax.plot(grid, law["A"] * grid ** -law["alpha"], "-", color=colour,
                label=f"{label}: L = {law['A']:.3g}·C^-{law['alpha']:.3f}{ci_text}")
    if unigram is not None:
        ax.axhline(unigram, color="grey", ls=":", lw=1, label="unigram entropy of the validation text")
    gap = report.get("compute_gap", {}).get(count)
    if count in report.get("compute_gap_undetermined", {}):
        gap = None  # the laws' gap is an artefact there: title the plot with the best runs' gap
    envelope = (report.get("compute_gap_envelope") or {}).get(count)
    if gap:
        values = [g["gap"] for g in gap.values() if math.isfinite(g["gap"])]
        if values:
            ax.set_title(f"compute gap (MDM/ARM) {min(values):.1f}x-{max(values):.1f}x over the sweep", fontsize=10)
    elif envelope:
        values = [p["gap"] for p in envelope["points"] if math.isfinite(p["gap"]) and p["gap"] > 0]
        if values:
            ax.set_title(f"compute gap from the best runs (MDM/ARM) {min(values):.1f}x-{max(values):.1f}x",
                         fontsize=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"training FLOPs ({'6N + 6LTd' if count == 'attention' else '6N'} per token)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    path = save_figure(fig, out_dir / "frontier.png")
    written.append(path)
    return written
