"""Training throughput on CPU: smdm's MDM (and ARM) against HF transformers' LlamaForCausalLM of the same shape.

One timed step is a full training step: zero_grad, forward, loss, backward, AdamW step. For our MDM the loss is
`mdm_step_loss` (time draw and masking included, since they are part of a real step); for our ARM `arm_step_loss`;
for HF Llama the standard causal-LM loss (`labels=input_ids`). Tokens per step are batch_size * seq_len for all.

The models are timed interleaved in one process (each round runs every model for --steps steps, in an order
that reverses every round), so background load on a shared machine hits all of them alike; tokens/s is the
median over rounds, and the ours/HF ratio is the median of the per-round ratios, each from back-to-back blocks.

    python benchmarks/train_throughput.py                       # tiny-6m, batch 8 x 256
    python benchmarks/train_throughput.py --config tiny-12m --seq-len 512 --batch-size 4
    python benchmarks/train_throughput.py --compile --json out.json
    python benchmarks/train_throughput.py --threads 1          # on a machine shared with other jobs

Notes. The MDM attends bidirectionally (about twice the attention work of the causal models) and computes its
head and cross-entropy at every position; the ARM sees seq_len - 1 input tokens (it predicts tokens[1:]) but is
credited with seq_len like the others. On a 2-core machine where another process is busy, 2 OpenMP threads
oversubscribe the cores and throughput can drop tenfold at random; --threads 1 keeps rounds comparable there.
--dtype bf16 runs the same fp32 weights under CPU autocast (mixed precision), not bf16 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from smdm.config import ModelConfig
from smdm.convert import hf_llama_config
from smdm.diffusion import arm_step_loss, mdm_step_loss
from smdm.model import Transformer


@dataclass
class Runner:
    """One model with its optimizer and loss; `step` is one full training step."""

    name: str
    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    params: int
    dtype: str
    optimizer: torch.optim.Optimizer = field(init=False)
    tokens_per_s: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)

    def step(self, tokens: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.dtype):
            loss = self.loss_fn(tokens)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hf_llama(cfg: ModelConfig) -> torch.nn.Module:
    """LlamaForCausalLM with our config's shape: untied head, no biases, SDPA attention."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(hf_llama_config(cfg, use_cache=False, attn_implementation="sdpa"))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_runners(cfg: ModelConfig, dtype: str, compile_models: bool, seed: int) -> list[Runner]:
    torch.manual_seed(seed)
    mdm = Transformer(cfg, causal=False).train()
    torch.manual_seed(seed)
    hf = hf_llama(cfg).train()
    torch.manual_seed(seed)
    arm = Transformer(cfg, causal=True).train()
    mask_gen = torch.Generator().manual_seed(seed)

    runners = [
        Runner("smdm MDM", mdm, lambda x: mdm_step_loss(mdm, x, mask_gen), n_params(mdm), dtype),
        Runner("HF Llama", hf, lambda x: hf(input_ids=x, labels=x).loss, n_params(hf), dtype),
        Runner("smdm ARM", arm, lambda x: arm_step_loss(arm, x), n_params(arm), dtype),
    ]
    if not compile_models:
        return runners

    # Compile the modules (our loss is outside the module; HF computes its loss inside forward). The compiled
    # wrappers share parameters with the eager models, so each compiled runner gets its own fresh copy instead.
    try:
        import copy

        mdm_c = copy.deepcopy(mdm)
        hf_c = copy.deepcopy(hf)
        mdm_cc = torch.compile(mdm_c)
        hf_cc = torch.compile(hf_c)
        mdm_c_gen = torch.Generator().manual_seed(seed)
        compiled = [
            Runner("smdm MDM (compile)", mdm_c, lambda x: mdm_step_loss(mdm_cc, x, mdm_c_gen), n_params(mdm_c), dtype),
            Runner("HF Llama (compile)", hf_c, lambda x: hf_cc(input_ids=x, labels=x).loss, n_params(hf_c), dtype),
        ]
    except Exception as exc:  # noqa: BLE001 - any compile setup failure means "skip compile"
        print(f"torch.compile unavailable ({type(exc).__name__}: {exc}); timing eager models only")
        return runners
    # Timing order: each HF baseline sits next to the model compared with it (see time_rounds).
    return runners + [compiled[1], compiled[0]]


def warm_up(runners: list[Runner], batches: list[torch.Tensor], steps: int) -> list[Runner]:
    """Run `steps` untimed steps per model (the first compiled step compiles); drop compiled runners that fail."""
    kept = []
    for runner in runners:
        t0 = time.perf_counter()
        try:
            for i in range(max(steps, 1)):
                runner.step(batches[i % len(batches)])
        except Exception as exc:
            if "compile" not in runner.name:
                raise
            first_line = (str(exc).splitlines() or [""])[0][:200]
            print(f"{runner.name}: torch.compile failed ({type(exc).__name__}: {first_line}); skipped")
            continue
        print(f"  warm-up {runner.name}: {time.perf_counter() - t0:.1f}s")
        kept.append(runner)
    return kept


def time_rounds(runners: list[Runner], batches: list[torch.Tensor], steps: int, rounds: int,
                tokens_per_step: int) -> None:
    # Runners are ordered so each baseline is adjacent to the models compared with it ([MDM, HF, ARM] and, with
    # --compile, [..., HF compiled, MDM compiled]); the order reverses every other round, so each ours/HF ratio
    # comes from back-to-back measurements and neither model is always first.
    for r in range(rounds):
        order = runners if r % 2 == 0 else runners[::-1]
        line = []
        for runner in order:
            t0 = time.perf_counter()
            for i in range(steps):
                runner.step(batches[i % len(batches)])
            elapsed = time.perf_counter() - t0
            runner.tokens_per_s.append(steps * tokens_per_step / elapsed)
            line.append(f"{runner.name} {runner.tokens_per_s[-1]:,.0f}")
        print(f"  round {r + 1}/{rounds}: " + " | ".join(line), flush=True)


def profile(runners: list[Runner], batches: list[torch.Tensor], steps: int, top: int) -> dict[str, str]:
    """Self-CPU-time table of the top ops over `steps` steps of each model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for runner in runners:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                runner.step(batches[i % len(batches)])
        tables[runner.name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        print(f"\n=== profile: {runner.name} ({steps} steps, top {top} ops by self CPU time) ===")
        print(tables[runner.name])
    return tables


def summarize(runners: list[Runner]) -> tuple[list[dict], list[str]]:
    by_name = {r.name: r for r in runners}
    rows, lines = [], []
    header = f"| {'model':<20} | {'params':>10} | {'tokens/s median':>15} | {'min-max':>17} | {'ours/HF':>17} |"
    lines += [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for runner in runners:
        tps = runner.tokens_per_s
        baseline = by_name.get("HF Llama (compile)" if "compile" in runner.name else "HF Llama")
        row = {
            "model": runner.name, "params": runner.params, "tokens_per_s": tps,
            "median": statistics.median(tps), "min": min(tps), "max": max(tps),
        }
        ratio_text = "baseline" if runner is baseline else "-"
        if baseline is not None and runner is not baseline:
            ratios = [a / b for a, b in zip(tps, baseline.tokens_per_s)]
            row.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
            ratio_text = f"{row['ratio_median']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
        rows.append(row)
        lines.append(
            f"| {runner.name:<20} | {runner.params / 1e6:>9.2f}M | {row['median']:>15,.0f} "
            f"| {row['min']:>7,.0f}-{row['max']:<9,.0f} | {ratio_text:>17} |"
        )
    return rows, lines


def _rss_mb() -> float:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory_child(runners: list[Runner], name: str, batches: list[torch.Tensor], steps: int) -> None:
    """In a fresh process: peak RSS growth while one model trains (activations, gradients, AdamW state).

    The process-lifetime peak (ru_maxrss) is dominated by imports for small models, so a thread samples the RSS
    every millisecond during the training steps instead.
    """
    import threading

    runner = next(r for r in runners if r.name == name)
    baseline = _rss_mb()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for i in range(steps):
        runner.step(batches[i % len(batches)])
    done.set()
    sampler.join()
    print(json.dumps({"model": name, "baseline_rss_mb": baseline, "peak_rss_mb": peak[0],
                      "training_peak_mb": peak[0] - baseline}))


def measure_memory(names: list[str], argv: list[str]) -> dict[str, dict[str, float]]:
    """Run one child per model (peak RSS is per process, so models must not share one) and print a table."""
    results: dict[str, dict[str, float]] = {}
    base_args = [a for a in argv if a not in ("--memory",)]
    for name in names:
        out = subprocess.run([sys.executable, __file__, *base_args, "--memory-child", name],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"memory measurement of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        record = json.loads(out.stdout.strip().splitlines()[-1])
        results[name] = {"training_peak_mb": record["training_peak_mb"], "peak_rss_mb": record["peak_rss_mb"]}
    if results:
        print("\n| model                | peak RSS growth while training (MB) | peak RSS (MB) |")
        print("|----------------------|-------------------------------------|---------------|")
        for name, rec in results.items():
            print(f"| {name:<20} | {rec['training_peak_mb']:>35,.0f} | {rec['peak_rss_mb']:>13,.0f} |")
        print("(each model in its own process; growth = peak RSS minus RSS after building the models: activations,"
              " gradients and AdamW state)")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny-6m", help="smdm config name (default tiny-6m)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights (default fp32)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd MDM and HF Llama")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile 2 steps of each model and print the top N ops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    parser.add_argument("--memory", action="store_true",
                        help="also measure each model's peak training memory, one fresh process per model")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/train_throughput.py", *argv])])
    cfg = ModelConfig.from_name(args.config, vocab_size=args.vocab_size)
    if args.seq_len > cfg.block_size:
        cfg = ModelConfig.from_name(args.config, vocab_size=args.vocab_size, block_size=args.seq_len)

    import transformers

    print(f"command: {command}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"config {cfg.name}: {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_query_groups} kv), width {cfg.n_embd}, "
          f"SwiGLU {cfg.intermediate_size}, vocab {cfg.vocab_size}; batch {args.batch_size} x {args.seq_len}, "
          f"{args.dtype}; {args.rounds} rounds x {args.steps} steps, {args.warmup} warm-up steps")

    runners = build_runners(cfg, args.dtype, args.compile, args.seed)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=data_gen) for _ in range(4)]
    tokens_per_step = args.batch_size * args.seq_len
    if args.memory_child is not None:
        measure_memory_child(runners, args.memory_child, batches, max(args.warmup, 1) + args.steps)
        return

    print("warming up")
    runners = warm_up(runners, batches, args.warmup)
    print("timing (interleaved rounds)")
    time_rounds(runners, batches, args.steps, args.rounds, tokens_per_step)

    rows, lines = summarize(runners)
    print()
    print("\n".join(lines))
    print("tokens/s = batch*seq_len per full training step (fwd + loss + bwd + AdamW), median over rounds; "
          "ours/HF = median (min-max) of per-round ratios")

    tables = profile(runners, batches, 2, args.profile) if args.profile else {}
    memory = measure_memory([r.name for r in runners], argv if argv is not None else sys.argv[1:]) if args.memory else {}
    for row in rows:
        row.update(memory.get(row["model"], {}))

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": command, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "config": cfg.to_dict(), "batch_size": args.batch_size,
            "seq_len": args.seq_len, "dtype": args.dtype, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "results": rows, "profiles": tables,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
