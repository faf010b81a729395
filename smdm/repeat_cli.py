"""`smdm scale repeat plan|run|status|fit`: the data-constrained study's commands; parse arguments, call smdm.repeat."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from smdm.cli_types import add_study_parsers

if TYPE_CHECKING:
    from smdm.repeat import RepeatSpec
    from smdm.scaling import PlannedRun


def _joining_runs(runs: list[PlannedRun], spec: RepeatSpec, others: list[PlannedRun]) -> list[PlannedRun]:
    """The runs of another study that join a fit: a run already there (the same directory) counts once, and a
    different run under a taken name (the same grid point of another recipe, say) is named after its study."""
    dirs, names = {r.out_dir for r in runs}, {r.name for r in runs}
    return [r if r.name not in names else replace(r, name=f"{r.name}@{spec.name}")
            for r in others if r.out_dir not in dirs]


def cmd_repeat(args: argparse.Namespace) -> None:
    from smdm import repeat, sweep
    from smdm.data.packed import load_manifest

    if args.repeat_command == "plan":
        spec = repeat.RepeatSpec.from_file(args.spec)
        available = None
        if (Path(spec.data_dir) / "manifest.json").is_file():
            available = int(load_manifest(spec.data_dir)["splits"]["train"]["tokens"])
        runs = repeat.plan_repeat(spec, available)
        print(sweep.describe_plan(runs))
        print(f"manifest -> {repeat.write_repeat_manifest(spec, runs, args.out)}")
        return
    spec, runs = repeat.read_repeat_manifest(args.manifest)
    runs = sweep.select_runs(runs, getattr(args, "only", None), args.manifest)
    if args.repeat_command == "status":
        print(sweep.describe_status(runs))
        return
    for other in getattr(args, "also", None) or []:  # fit: further studies' runs join (another U, size or recipe)
        runs += _joining_runs(runs, *repeat.read_repeat_manifest(other))
    if args.repeat_command == "run":
        report = sweep.run_sweep(runs, args.data or spec.data_dir, jobs=args.jobs, threads=args.threads,
                                 stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
        print(report.describe())
        report.raise_for_failures(len(runs))
        return
    points, missing = repeat.collect_points(runs)
    for name, reason in missing.items():
        print(f"left out {name}: {reason}", file=sys.stderr)
    report = repeat.fit_repeat(points)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "repeat.json").write_text(json.dumps({"points": [vars(p) for p in points], **report}, indent=1) + "\n")
    for line in repeat.describe_repeat(report):
        print(line)
    for path in repeat.plot_repeat(points, report, out):
        print(f"wrote {path}")


def add_repeat_parser(scale: argparse._SubParsersAction) -> None:
    """`smdm scale repeat ...`, under the `smdm scale` subcommands."""
    p = scale.add_parser("repeat", help="data-constrained study: U unique tokens x epochs x sizes x families")
    sub = p.add_subparsers(dest="repeat_command", required=True)
    fit = add_study_parsers(sub, "repeat", "configs/repeat-cpu.json",
                            "frontiers, crossovers vs the closed form, data-reuse half-lives, plots",
                            "repeat.json, loss_vs_compute.png, reuse.png")
    fit.add_argument("--also", nargs="+", metavar="MANIFEST",
                     help="further repeat manifests whose runs join the fit (a run in two manifests counts once)")
    p.set_defaults(func=cmd_repeat)
