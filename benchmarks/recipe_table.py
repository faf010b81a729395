"""Summarise the recipe pilot and tuning runs (benchmarks/recipe_pilot.sh, benchmarks/recipe_tune.sh): per setting,
over its seeds, the final and best validation loss (the MDM's true ELBO, the ARM's NLL) and the first evaluation
below the unigram entropy of the validation text minus 0.3 nats (leaving the unigram plateau), as a Markdown table;
optionally a plot of every run's validation curve against tokens, one panel per family.

    python benchmarks/recipe_table.py runs/recipe --plot docs/recipe/pilot.png --json docs/recipe/pilot.json
    python benchmarks/recipe_table.py runs/tune --data runs/recipe/tokens --plot docs/recipe/tune.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from smdm.data.packed import corpus_unigram_entropy

MARGIN = 0.3  # nats below the unigram entropy that count as "off the plateau" (issue 15)


def read_run(run_dir: Path) -> dict:
    """Validation rows of one run, its planned steps and its settings."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    tokens = {r["step"]: r["tokens"] for r in rows if "val_loss" in r}
    config = json.loads((run_dir / "train_config.json").read_text())
    return {"val": val, "tokens": tokens, "max_steps": config["max_steps"], "seed": config["seed"],
            "objective": config["objective"], "lr": config["lr"], "batch_size": config["batch_size"],
            "warmup_steps": config.get("warmup_steps"), "init": config.get("init", "gpt2"),
            "loss_weighting": config.get("loss_weighting", "elbo"), "low_discrepancy": config["low_discrepancy"]}


def summarise(work: Path, unigram: float) -> list[dict]:
    """One row per setting (the run directory name without its -sSEED suffix)."""
    settings: dict[str, list[dict]] = {}
    for metrics in sorted(work.glob("*-s[0-9]*/metrics.jsonl")):
        run = read_run(metrics.parent)
        if not run["val"] or run["val"][-1][0] != run["max_steps"]:
            continue  # unfinished
        settings.setdefault(metrics.parent.name.rsplit("-s", 1)[0], []).append(run)
    table = []
    for name, runs in settings.items():
        finals = [r["val"][-1][1] for r in runs]
        bests = [min(v for _, v in r["val"]) for r in runs]
        leave = [next((s for s, v in r["val"] if v < unigram - MARGIN), None) for r in runs]
        leave_tokens = [None if s is None else r["tokens"][s] for s, r in zip(leave, runs)]
        table.append({"setting": name, "objective": runs[0]["objective"], "seeds": sorted(r["seed"] for r in runs),
                      "steps": runs[0]["max_steps"], "final": finals, "best": bests, "plateau_exit_step": leave,
                      "plateau_exit_tokens": leave_tokens})
    return table


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(table: list[dict], unigram: float) -> str:
    """The table as it goes into docs/scaling.md."""
    lines = [(f"unigram entropy of the validation text {unigram:.3f} nats/token; plateau exit: first evaluation "
              f"below {unigram - MARGIN:.3f}"), "",
             "| setting | seeds | steps | final val loss | best val loss | steps (tokens) to leave the plateau |",
             "|---|---|---|---|---|---|"]
    for row in table:
        exits = ", ".join(f">{row['steps']}" if s is None else f"{s} ({t / 1e6:.2f}M)"
                          for s, t in zip(row["plateau_exit_step"], row["plateau_exit_tokens"]))
        lines.append(f"| {row['setting']} | {', '.join(map(str, row['seeds']))} | {row['steps']} | "
                     f"{_mean_sd(row['final'])} | {_mean_sd(row['best'])} | {exits} |")
    return "\n".join(lines)


def plot(work: Path, unigram: float, out: Path) -> None:
    """Every finished run's validation curve against training tokens, one colour per setting, a panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(metrics.parent.name.rsplit("-s", 1), read_run(metrics.parent))
            for metrics in sorted(work.glob("*-s[0-9]*/metrics.jsonl"))]
    families = sorted({run["objective"] for _, run in runs}, reverse=True)  # mdm first
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.2), squeeze=False)
    colours: dict[str, str] = {}
    for ax, family in zip(axes[0], families):
        for (name, seed), run in runs:
            if run["objective"] != family:
                continue
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            ax.plot([run["tokens"][s] / 1e6 for s, _ in run["val"]], [v for _, v in run["val"]],
                    "-" if seed == "0" else "--", color=colour, label=f"{name} seed {seed}")
        ax.axhline(unigram, color="grey", ls=":", label="unigram entropy")
        ax.axhline(unigram - MARGIN, color="grey", ls="-.", lw=0.8, label="unigram - 0.3")
        low, high = ax.get_ylim()
        ax.set_ylim(min(low, unigram - MARGIN - 0.02), max(high, unigram + 0.02))
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation ELBO (nats/token)" if family != "arm" else "validation NLL (nats/token)")
        ax.set_title(family.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="the runs' WORK directory (runs/recipe, runs/tune)")
    parser.add_argument("--data", type=Path, help="the token shards (default: WORK/tokens)")
    parser.add_argument("--plot", type=Path, help="write the validation curves here (PNG)")
    parser.add_argument("--json", type=Path, help="write the table here (JSON)")
    args = parser.parse_args(argv)
    unigram = corpus_unigram_entropy(args.data or args.work / "tokens", "val")
    table = summarise(args.work, unigram)
    print(markdown(table, unigram))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"unigram_entropy": unigram, "margin": MARGIN, "rows": table}, indent=1))
    if args.plot:
        plot(args.work, unigram, args.plot)


if __name__ == "__main__":
    main()
