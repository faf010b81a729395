"""Argument types and shared option groups of the CLI. Every numeric option is checked where it is parsed, so bad
input ends as one line (`smdm: error: argument --lr: ...`, exit 2) instead of a traceback deep in the library."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return int(value)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return int(value)


def port_number(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {value}")
    return int(value)


def positive_float(text: str) -> float:
    """A finite number > 0 (nan, inf and negatives refused)."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return float(value)


def finite_float(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """A finite number in [low, high] (either bound optional)."""

    def parse(text: str) -> float:
        value = _number(text, float)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise argparse.ArgumentTypeError(f"must lie in {bounds}, got {text}")
        return float(value)

    parse.__name__ = "number"
    return parse


def probability(text: str) -> float:
    """A number in (0, 1]."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return float(value)


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return float(value)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """--seed, --device, --threads, --no-progress: what every command that runs a model takes."""
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None,
                   help="weights for inference (default fp32 on CPU; a Hugging Face directory keeps its stored dtype "
                        "with auto)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: see README, Threads)")
    p.add_argument("--no-progress", action="store_true")


def add_length_and_sampler_args(p: argparse.ArgumentParser, length: int | None, help_length: str,
                                skip: Sequence[str] = ()) -> None:
    """--length and every sampler option (smdm.sample.add_sampler_args)."""
    from smdm.sample import add_sampler_args

    p.add_argument("--length", type=positive_int, default=length, help=help_length)
    add_sampler_args(p, skip=skip)


def add_study_parsers(sub: argparse._SubParsersAction, what: str, example: str, fit_help: str,
                      fit_outputs: str) -> argparse.ArgumentParser:
    """`plan SPEC --out MANIFEST`, `run MANIFEST [--jobs ...]`, `status MANIFEST` and `fit MANIFEST --out DIR`
    (returned, for the study's own fit options): shared by IsoFLOP sweeps and repeat studies, whose runs are the
    same ordinary resumable training runs."""
    s = sub.add_parser("plan", help=f"turn a {what} spec (JSON) into a manifest of training runs")
    s.add_argument("spec", help=f"e.g. {example}")
    s.add_argument("--out", required=True, help="manifest to write")
    s = sub.add_parser("run", help="train the manifest's unfinished runs (resumes killed ones)")
    s.add_argument("manifest")
    s.add_argument("--jobs", type=positive_int, default=1, help="training processes at once")
    s.add_argument("--threads", type=positive_int, default=None, help="torch threads per process")
    s.add_argument("--only", nargs="+", help="run names to train (default: all)")
    s.add_argument("--data", help="override the spec's data directory")
    s.add_argument("--stop-after-steps", type=positive_int, help="end each run early with a checkpoint (time slices)")
    s.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("status", help="where each run stands (done, running, partial, new; steps, validation "
                                      "loss); reads the run directories only")
    s.add_argument("manifest")
    s = sub.add_parser("fit", help=fit_help)
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help=f"directory for {fit_outputs}")
    return s
