"""`smdm plot`: training and validation loss of several runs in one picture (an MDM beside its ARM).

The horizontal axis is steps, tokens or training FLOPs (counted by `smdm.flops` under each run's own count), so runs
of different sizes or batch shapes compare on the axis that matters: compute.
"""

from __future__ import annotations

import json
from pathlib import Path

from smdm.errors import SmdmError


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), or None where matplotlib is not installed: every
    figure of smdm is optional, its numbers are always written as JSON too."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, write as a 120-dpi PNG and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows) of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SmdmError(f"{run_dir}: no metrics.jsonl (not a run directory of `smdm train`/`smdm sft`)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SmdmError(f"{path}:{number}: not a JSON row") from None
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def _flops_per_token(run_dir: Path) -> float:
    """Training FLOPs per token of a run, from its checkpoint's model config and its run config, times its family's
    compute factor (a BDM token costs two passes), as the run's own summary counts them."""
    from smdm.checkpoint import read_checkpoint_meta
    from smdm.config import ModelConfig
    from smdm.objectives import make_objective
    from smdm.train import budget_flops_per_token

    try:
        model = ModelConfig.from_dict(read_checkpoint_meta(run_dir / "checkpoint")["model"])
        run = json.loads((run_dir / "train_config.json").read_text())
        objective = make_objective(run["objective"], diffusion_block_size=run.get("diffusion_block_size"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise SmdmError(f"{run_dir}: cannot count FLOPs without checkpoint/ and train_config.json ({error})") from None
    return budget_flops_per_token(objective, model, run.get("seq_len") or model.block_size,
                                  run.get("flops_count", "attention"))


def _label(run_dir: Path, name: str | None = None) -> str:
    try:
        objective = json.loads((run_dir / "train_config.json").read_text()).get("objective", "")
    except (OSError, json.JSONDecodeError):
        objective = ""
    return f"{objective.upper()} {name or run_dir.name}".strip()


def run_names(runs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell the runs apart (a study's runs share
    names across studies: crossover-clip-wd1.0/mdm-tiny-1m-U25000-e256 beside crossover-clip/mdm-...)."""
    resolved = [run.resolve() for run in runs]
    for depth in range(1, max(len(run.parts) for run in resolved) + 1):
        names = ["/".join(run.parts[-depth:]) for run in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(run) for run in runs]  # the same folder given twice


def run_curves(run: Path, x: str, name: str | None = None) -> tuple[str, list[float], list[float], list[float],
                                                                  list[float]]:
    """A run's label, training (x, loss) and validation (x, loss) points, x in steps, tokens or training FLOPs."""
    train_rows, val_rows = read_metrics(run)
    if not train_rows and not val_rows:
        raise SmdmError(f"{run}: metrics.jsonl has no rows yet")
    scale = _flops_per_token(run) if x == "flops" else 1.0
    key = "step" if x == "steps" else "tokens"
    return (_label(run, name), [r[key] * scale for r in train_rows], [r["loss"] for r in train_rows],
            [r[key] * scale for r in val_rows], [r["val_loss"] for r in val_rows])


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "steps", training: bool = True) -> Path:
    """Draw every run's training loss (thin; unless `training` is False) and validation loss (markers) against `x`
    into one PNG at `out`."""
    if x not in ("steps", "tokens", "flops"):
        raise SmdmError(f"unknown axis {x!r}; use steps, tokens or flops")
    paths = [Path(run) for run in runs]
    curves = [run_curves(path, x, name) for path, name in zip(paths, run_names(paths), strict=True)]
    plt = pyplot()
    if plt is None:
        raise SmdmError("smdm plot needs matplotlib: pip install 'smdm[plot]'")
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (label, tx, ty, vx, vy) in enumerate(curves):
        color = f"C{index}"
        if training:
            axes.plot(tx, ty, color=color, alpha=0.45, linewidth=1, label=f"{label} train")
        if vx:
            axes.plot(vx, vy, color=color, marker="o", linewidth=2, label=f"{label} validation")
    axes.set_xlabel({"steps": "optimizer steps", "tokens": "training tokens", "flops": "training FLOPs"}[x])
    axes.set_ylabel("loss (nats/token; MDM, BDM: ELBO bound)")
    if x == "flops":
        axes.set_xscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(figure, out)
