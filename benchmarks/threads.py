"""Threads under load: a fixed short `smdm train` run timed with each OpenMP setting, on an idle and a busy machine.

Why: torch's CPU wheel uses libgomp, whose idle worker threads spin (GOMP_SPINCOUNT 300000) before sleeping. When
another process holds a core, a spinning worker steals the time slices the other thread needs, and a 2-thread step
on 2 cores slows down by ~45% (issue 12). Settings compared, each in its own fresh process:

  spin     libgomp's default (OMP_WAIT_POLICY unset, torch imported before smdm): the named baseline
  passive  OMP_WAIT_POLICY=PASSIVE (spin count 0: idle workers sleep at once)
  smdm     plain `python -m smdm` with OMP_WAIT_POLICY unset: whatever smdm's own default is (now PASSIVE)
  1thread  --threads 1

"busy" runs the same with one background process in a pure-Python busy loop (a user's other job). Every setting is
run `--repeats` times, interleaved, and the median wall time is reported with its ratio to `spin` in the same
condition. Timings include process start, data loading, the final evaluation and checkpoint: what a user waits for.

    python benchmarks/threads.py                       # tiny-1m, 40 steps, 1 repeat: about 2-3 minutes on 2 cores
    python benchmarks/threads.py --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from synthetic_tokens import write_random_tokens

# `import torch` first: libgomp reads OMP_WAIT_POLICY when torch loads it, before smdm could set a default.
SPIN_LAUNCHER = "import runpy, sys, torch; sys.argv[0] = 'smdm'; runpy.run_module('smdm', run_name='__main__')"
SETTINGS = {
    "spin": ([sys.executable, "-c", SPIN_LAUNCHER], {}, []),
    "passive": ([sys.executable, "-m", "smdm"], {"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "smdm": ([sys.executable, "-m", "smdm"], {}, []),
    "1thread": ([sys.executable, "-m", "smdm"], {}, ["--threads", "1"]),
}
BUSY_LOOP = "while True:\n    pass\n"


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def time_run(setting: str, data: Path, out: Path, model: str, steps: int, batch_size: int) -> float:
    """Wall seconds of one fresh `smdm train` process with the setting."""
    launcher, extra_env, extra_args = SETTINGS[setting]
    argv = [*launcher, "train", "--data", str(data), "--out", str(out), "--model", model, "--max-steps", str(steps),
            "--batch-size", str(batch_size), "--no-progress", "--eval-blocks", "4", "--eval-mc-samples", "1",
            *extra_args]
    start = time.perf_counter()
    subprocess.run(argv, env=_env(extra_env), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def spin_count(setting: str) -> str:
    """GOMP_SPINCOUNT libgomp actually uses under a setting (from OMP_DISPLAY_ENV), to show the setting took effect."""
    launcher, extra_env, _ = SETTINGS[setting]
    argv = [*launcher, "configs"] if setting != "spin" else [sys.executable, "-c", "import torch; import smdm"]
    result = subprocess.run(argv, env=_env({**extra_env, "OMP_DISPLAY_ENV": "verbose"}), capture_output=True,
                            text=True, check=False)
    line = next((x for x in result.stderr.splitlines() if "GOMP_SPINCOUNT" in x), "")
    return line.split("=")[-1].strip().strip("'") or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-1m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16, help="16: smdm train's default")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=["spin", "passive", "1thread"], choices=list(SETTINGS))
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    print("GOMP_SPINCOUNT in effect: " + ", ".join(f"{s}={spin_count(s)}" for s in SETTINGS))
    times: dict[str, dict[str, list[float]]] = {"idle": {}, "busy": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_random_tokens(data, vocab_size=4096, train_tokens=2_000_000, val_tokens=20_000)
        for condition in ("idle", "busy"):
            hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if condition == "busy" else None
            try:
                for repeat in range(args.repeats):
                    order = args.settings if repeat % 2 == 0 else args.settings[::-1]
                    for setting in order:
                        seconds = time_run(setting, data, Path(tmp) / f"run-{condition}-{setting}-{repeat}",
                                           args.model, args.steps, args.batch_size)
                        times[condition].setdefault(setting, []).append(seconds)
                        print(f"  {condition:>4} {setting:>8}: {seconds:6.1f} s", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    print(f"\n{args.model}, {args.steps} steps of batch {args.batch_size}, median of {args.repeats}; "
          "ratio = time / time of 'spin' (same condition)")
    print(f"{'setting':>8} {'idle s':>8} {'ratio':>6} {'busy s':>8} {'ratio':>6}")
    for setting in args.settings:
        cells = []
        for condition in ("idle", "busy"):
            median = statistics.median(times[condition][setting])
            base = statistics.median(times[condition]["spin"]) if "spin" in times[condition] else float("nan")
            cells += [f"{median:8.1f}", f"{median / base:6.2f}"]
        print(f"{setting:>8} " + " ".join(cells))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "steps": args.steps, "times": times}, indent=2))


if __name__ == "__main__":
    main()
