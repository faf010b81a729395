"""Sampling speed and quality: ARM + KV cache against MDM and block-diffusion (BDM) samplers, one run.

The pair follows the demo's recipe (the embedded Wikipedia corpus, its 384-token byte-level BPE, `tiny-1m`,
lr 3e-3, 900 steps of 4096 tokens, stratified t for the MDM) with one change: sequences of 256 tokens
(batch 16 instead of 32 x 128), so a 256-token sample lies inside the context both models were trained on.
The MDM samples unconditionally (positions 0..255); the ARM starts from EOS (a document boundary) and feeds
positions 0..255. Both models are trained the same way on the same data; finished runs are reused.

Quality: generative perplexity = exp(mean NLL of the sample tokens under the ARM, given a leading EOS),
and the unigram entropy (nats) of each sample's tokens (repetition lowers it), averaged over samples.

    python benchmarks/sampling.py --threads 1               # trains the pair on first use (~20 min, 1 core)
    python benchmarks/sampling.py --threads 1 --samples 8 --json out.json
    python benchmarks/sampling.py --threads 1 --bdm-block-sizes 4 8 16   # also BDMs (BD3-LM), equal training FLOPs

Block-diffusion models are trained by the same recipe at the same training compute as the pair (a BDM token costs
two passes, so half the steps; `--bdm-steps` overrides) and sample unconditionally like the MDM, block by block
with the exact KV cache.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from smdm.checkpoint import load_checkpoint
from smdm.corpus import default_corpus
from smdm.data.prepare import PrepareConfig, prepare_corpus, read_documents
from smdm.demo import RECIPE
from smdm.model import Transformer
from smdm.sample import generate, prepare_prompts
from smdm.tokenizer import Tokenizer, train_bpe
from smdm.train import TrainConfig, train


def prepare_data(work: Path) -> Path:
    """The demo's stages 1-3 (corpus, 384-token BPE, shards with 2% validation), reused when present."""
    tokens = work / "tokens"
    if (tokens / "manifest.json").exists():
        return tokens
    corpus = [default_corpus(work.parent / "cache")]
    tokenizer_path = work / "tokenizer.json"
    if not tokenizer_path.exists():
        train_bpe(read_documents(corpus), 384, tokenizer_path)
    prepare_corpus(corpus, Tokenizer.from_file(tokenizer_path), tokens, PrepareConfig(val_fraction=0.02))
    return tokens


def diffusion_recipe(name: str) -> dict:
    """The diffusion families' training options: "plain" (the 1/t ELBO, t in (0, 1]: the recorded CPU rows) or "demo"
    (simple CE, masking rates clipped to [0.3, 0.8], the winners of issue 15's recipe study)."""
    return dict(RECIPE) if name == "demo" else {}


def run_dir(work: Path, name: str, options: dict) -> Path:
    """A run's directory: a demo-recipe run gets its own, so a reused plain run is never mistaken for it."""
    return work / (f"{name}-demo-recipe" if options else name)


def train_pair(data: Path, work: Path, threads: int | None, max_steps: int, model: str = "tiny-1m",
               batch_size: int = 16, lr: float = 3e-3, seq_len: int = 256,
               recipe: str = "plain") -> tuple[Path, Path]:
    """An MDM and an ARM of the same size trained identically on the same data (resumed/reused when done).

    recipe "demo" trains the MDM by the demo's recipe (`diffusion_recipe`) in its own run directory (`run_dir`)."""
    runs = {}
    for objective in ("mdm", "arm"):
        options = diffusion_recipe(recipe) if objective == "mdm" else {}
        out = run_dir(work, objective, options)
        summary = out / "summary.json"
        if not summary.exists():
            print(f"training the {objective.upper()} -> {out}", flush=True)
            train(TrainConfig(
                data_dir=str(data), out_dir=str(out), model=model, objective=objective, seq_len=seq_len,
                batch_size=batch_size, max_steps=max_steps, lr=lr, low_discrepancy=objective == "mdm", eval_every=150,
                save_every=150, eval_blocks=64, threads=threads, resume=True, progress=False, **options,
            ))
        runs[objective] = out
    return runs["mdm"], runs["arm"]


@dataclass
class Method:
    """One row of the table: a name and the keyword arguments of `generate` (model chosen by `arm`)."""

    name: str
    arm: bool
    options: dict
    bdm: int | None = None  # the block size of the block-diffusion model this row samples, if any


def methods(length: int, temperature: float, thresholds: list[float], block: int) -> list[Method]:
    """ARM + KV cache; MDM low-confidence at steps = L, L/2, L/4; the paper's random sampler; semi-AR blocks alone
    (the uncached twin of the fast rows); then blocks + prefix or dual cache with threshold decoding (steps = L is
    only a cap there) and with fewer steps (fixed parallel decoding)."""
    mdm = {"temperature": temperature}
    rows = [Method("ARM + KV cache", True, {"temperature": temperature})]
    for steps in (length, length // 2, length // 4):
        rows.append(Method(f"MDM low-confidence, {steps} steps", False, {**mdm, "steps": steps}))
    rows.append(Method(f"MDM random (paper), {length} steps", False, {**mdm, "steps": length, "remasking": "random"}))
    rows.append(Method(f"MDM low-confidence, block {block}, {length} steps", False,
                       {**mdm, "steps": length, "block_length": block}))
    fast = [("prefix", thresholds[0], length)] + [("dual", threshold, length) for threshold in thresholds]
    fast += [("dual", None, length // 2), ("dual", None, length // 4)]
    for cache, threshold, steps in fast:
        decoding = f"threshold {threshold}" if threshold is not None else f"{steps} steps"
        rows.append(Method(f"MDM {cache} cache + {decoding}, block {block}", False,
                           {**mdm, "steps": steps, "block_length": block, "cache": cache, "threshold": threshold}))
    return rows


def bdm_methods(block_sizes: list[int], temperature: float, thresholds: list[float]) -> list[Method]:
    """Per block size: one token per step (steps = B), half the steps, and threshold decoding; all KV-cached."""
    rows = []
    for size in block_sizes:
        rows.append(Method(f"BDM B={size} + KV, {size} steps/block", False, {"temperature": temperature}, size))
        if size > 1:
            rows.append(Method(f"BDM B={size} + KV, {size // 2} steps/block", False,
                               {"temperature": temperature, "steps": size // 2}, size))
            rows.append(Method(f"BDM B={size} + KV, threshold {thresholds[0]}", False,
                               {"temperature": temperature, "threshold": thresholds[0]}, size))
    return rows


def train_bdms(data: Path, work: Path, args: argparse.Namespace, arm_dir: Path) -> dict[int, Path]:
    """One block-diffusion model per block size, by the pair's recipe at equal training FLOPs (reused when done);
    with --bdm-from-arm, adapted from the pair's ARM instead (Fast-dLLM v2's route: token shift, --bdm-lr)."""
    runs = {}
    recipe = diffusion_recipe(args.recipe)
    for size in args.bdm_block_sizes:
        out = run_dir(work, f"bdm{size}-from-arm" if args.bdm_from_arm else f"bdm{size}", recipe)
        if not (out / "summary.json").exists():
            print(f"training the BDM B={size} -> {out}", flush=True)
            adapt = {"init_from": str(arm_dir), "lr": args.bdm_lr or args.lr} if args.bdm_from_arm else {
                "model": args.model, "lr": args.lr}
            train(TrainConfig(
                data_dir=str(data), out_dir=str(out), objective="bdm", diffusion_block_size=size,
                seq_len=args.seq_len, batch_size=args.batch_size, low_discrepancy=True,
                max_steps=args.bdm_steps or max(1, args.train_steps // 2), eval_every=150, save_every=150,
                eval_blocks=64, threads=args.threads, resume=True, progress=False, **adapt, **recipe,
            ))
        runs[size] = out
    return runs


@torch.no_grad()
def arm_nll(scorer: Transformer, samples: torch.Tensor, bos: int, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL (nats) of each sample under the ARM, given a leading EOS (a document boundary) and the prompt."""
    device = scorer.lm_head.weight.device
    samples = samples.to(device)
    context = torch.full_like(samples[:, :1], bos)
    if prompts is not None:
        context = torch.cat([context, prompts.to(device)], dim=1)
    inputs = torch.cat([context, samples[:, :-1]], dim=1)
    logits = scorer(inputs).float()[:, context.size(1) - 1:]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), samples, reduction="none")


def unigram_entropy(sample: list[int]) -> float:
    """Entropy (nats) of one sample's token frequencies: repetitive text scores low."""
    counts = Counter(sample)
    total = len(sample)
    return -sum(c / total * math.log(c / total) for c in counts.values())


def quality(scorer: Transformer, samples: torch.Tensor, bos: int,
            prompts: torch.Tensor | None = None) -> dict[str, float]:
    """Generative perplexity under the ARM (all sample tokens, given the prompt; 95% interval over samples) and the
    mean unigram entropy per sample."""
    per_sample = arm_nll(scorer, samples, bos, prompts).mean(dim=1).double()
    mean = float(per_sample.mean())
    half_width = 1.96 * float(per_sample.std()) / math.sqrt(len(per_sample)) if len(per_sample) > 1 else 0.0
    entropy = sum(unigram_entropy(s) for s in samples.tolist()) / samples.size(0)
    return {"gen_ppl": math.exp(mean), "gen_ppl_low": math.exp(mean - half_width),
            "gen_ppl_high": math.exp(mean + half_width), "entropy": entropy}


def timed(run: Callable[[], object], repeats: int, device: torch.device) -> tuple[object, float]:
    """The first result and the fastest wall time of `repeats` runs (shared machines add noise, never remove it)."""
    best, first = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        first = result if first is None else first
    return first, best


def run_benchmark(mdm: Transformer, arm: Transformer, eos: int, args: argparse.Namespace,
                  given: torch.Tensor | None = None, bdms: dict[int, Transformer] | None = None) -> list[dict]:
    """Generate args.samples sequences per method in one batch; time them; score them.

    Unconditional by default (the ARM starts from EOS); with `given` (B, P) real text, both continue it.
    """
    rows = []
    bdms = bdms or {}
    rows_to_run = [] if args.bdm_only else methods(args.length, args.temperature, args.thresholds, args.block_length)
    if args.bdm_only:
        rows_to_run.append(Method("ARM + KV cache", True, {"temperature": args.temperature}))
    for method in rows_to_run + bdm_methods(sorted(bdms), args.temperature, args.thresholds):
        model = bdms[method.bdm] if method.bdm else arm if method.arm else mdm
        if given is not None:
            prompts = given.tolist()
        else:
            prompts = prepare_prompts(model, [[]] * args.samples, eos)  # an ARM (or adapted BDM) starts after EOS

        def run(method: Method = method, model: Transformer = model, prompts: list = prompts):
            generator = torch.Generator(args.device if args.rng_device == "model" else "cpu")
            return generate(model, prompts, args.length, generator=generator.manual_seed(args.seed),
                            **method.options)

        result, seconds = timed(run, args.repeats, mdm.lm_head.weight.device)
        # A BDM row's prompt tail may sit in its first generated block: its completions are the samples.
        samples = torch.tensor(result.completions) if method.bdm else result.tokens[:, result.width:]
        scores = quality(arm, samples, eos, given)
        rows.append({"method": method.name, "forward_passes": result.forward_passes, "seconds": seconds,
                     "tokens_per_s": samples.numel() / seconds, **scores})
        print(f"  {method.name:<45} {result.forward_passes:4d} passes {seconds:7.2f} s  "
              f"gen ppl {scores['gen_ppl']:7.2f}  entropy {scores['entropy']:.3f}", flush=True)
    return rows


def held_out(data: Path, args: argparse.Namespace) -> torch.Tensor:
    """args.samples validation windows of prompt + length tokens: the prompts, and the reference text."""
    from smdm.data.packed import PackedDataset

    return PackedDataset(data, "val", seq_len=args.prompt_tokens + args.length, shuffle=False).blocks(
        args.samples).long()


def reference_row(arm: Transformer, windows: torch.Tensor, given: torch.Tensor | None, eos: int) -> dict:
    """The same quality figures for held-out text: what the real continuations (after the prompts) score."""
    prompt_tokens = 0 if given is None else given.size(1)
    return {"method": "held-out text (reference)", **quality(arm, windows[:, prompt_tokens:], eos, given)}


def markdown(rows: list[dict], baseline: str) -> str:
    """The table for docs/benchmarks.md; speed-up is against plain MDM low-confidence at steps = length."""
    base = next((r for r in rows if r["method"] == baseline), None)
    base = None if base is None else base["seconds"]
    arm = next(r for r in rows if r["method"] == "ARM + KV cache")["seconds"]
    header = ("| method | forward passes | wall s | tokens/s | speed-up vs MDM-L | speed vs ARM + KV | "
              "gen. ppl (ARM), 95% CI | unigram entropy |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ppl = f"{r['gen_ppl']:.1f} ({r['gen_ppl_low']:.1f}-{r['gen_ppl_high']:.1f})"
        if "seconds" not in r:
            lines.append(f"| {r['method']} | | | | | | {ppl} | {r['entropy']:.3f} |")
            continue
        speed_up = "" if base is None else f"{base / r['seconds']:.2f}x"
        lines.append(f"| {r['method']} | {r['forward_passes']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{speed_up} | {arm / r['seconds']:.2f}x | {ppl} | {r['entropy']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, baseline: str | None = None) -> None:
    """Speed against quality, one point per method: the trade-off the table states, at a glance.

    With a baseline, the shaded box is the fast-sampling target: at least 5x its tokens/s, gen. ppl within 10%.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for number, r in enumerate(rows, 1):
        if "seconds" not in r:
            ax.axhline(r["gen_ppl"], color="grey", linestyle=":", label=r["method"])
            continue
        marker, color = (("s", "tab:red") if r["method"].startswith("ARM")
                         else ("^", "tab:purple") if r["method"].startswith("BDM") else ("o", "tab:blue"))
        ax.errorbar(r["tokens_per_s"], r["gen_ppl"], yerr=[[r["gen_ppl"] - r["gen_ppl_low"]],
                    [r["gen_ppl_high"] - r["gen_ppl"]]], fmt=marker, color=color, capsize=2,
                    label=f"{number}: {r['method']}")
        ax.annotate(str(number), (r["tokens_per_s"], r["gen_ppl"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is not None:
        right = 2 * max(r.get("tokens_per_s", 0) for r in rows)
        low = 0.5 * min(r["gen_ppl_low"] for r in rows)
        ax.fill_between([5 * base["tokens_per_s"], right], low, 1.1 * base["gen_ppl"], color="tab:green",
                        alpha=0.12, label="target: >= 5x MDM-L speed, gen. ppl within 10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s (higher is faster)")
    ax.set_ylabel("generative perplexity under the ARM (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="runs/bench-sampling")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=900)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--model", default="tiny-1m", help="config of both models (the demo recipe: tiny-1m)")
    parser.add_argument("--batch-size", type=int, default=16, help="training sequences (of --seq-len tokens) per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--recipe", choices=["plain", "demo"], default="plain",
                        help="the MDM's and the BDMs' training: plain (1/t ELBO, t in (0, 1]: the recorded CPU rows) "
                             "or demo (`make demo`'s simple CE, masking rates clipped to [0.3, 0.8])")
    parser.add_argument("--seq-len", type=int, default=256, help="training sequence length (>= --length)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="continue this many tokens of held-out text (default 0: unconditional samples)")
    parser.add_argument("--samples", type=int, default=8, help="sequences per method, generated as one batch")
    parser.add_argument("--temperature", type=float, default=1.0, help="1.0: the models' own distributions")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.05],
                        help="confidence thresholds of the fast rows (the first also with the prefix cache)")
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rng-device", choices=["cpu", "model"], default="cpu",
                        help="where sampling noise is drawn: cpu (the same draws on every device) or the models' "
                             "device (no per-step copy of float64 noise to a GPU; other draws)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--plot", help="also draw speed against quality into this PNG")
    parser.add_argument("--bdm-block-sizes", type=int, nargs="*", default=[],
                        help="also train and sample block-diffusion models with these block sizes")
    parser.add_argument("--bdm-steps", type=int, default=None,
                        help="BDM training steps (default: half of --train-steps, equal training FLOPs)")
    parser.add_argument("--bdm-only", action="store_true", help="time the ARM and the BDMs only (skip MDM rows)")
    parser.add_argument("--bdm-from-arm", action="store_true",
                        help="adapt the BDMs from the pair's ARM (token shift, Fast-dLLM v2) instead of from scratch")
    parser.add_argument("--bdm-lr", type=float, default=None, help="the BDMs' learning rate (default: --lr)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    mdm_dir, arm_dir = train_pair(data, work, args.threads, args.train_steps, args.model, args.batch_size,
                                args.lr, args.seq_len, args.recipe)
    bdm_dirs = train_bdms(data, work, args, arm_dir)
    if args.train_only:
        return
    mdm, arm = load_checkpoint(mdm_dir, args.device).model, load_checkpoint(arm_dir, args.device).model
    bdms = {size: load_checkpoint(path, args.device).model for size, path in bdm_dirs.items()}
    eos = int(json.loads((data / "manifest.json").read_text())["tokenizer"]["eos_id"])
    for model in bdms.values():
        generate(model, prepare_prompts(model, [[]], eos), 8)  # warm-up
    setting = f"after {args.prompt_tokens}-token prompts" if args.prompt_tokens else "unconditional"
    print(f"{args.model} MDM vs ARM, {args.samples} samples x {args.length} tokens ({setting}), "
          f"temperature {args.temperature}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    generate(mdm, [[]], 8, steps=2)  # warm-up: first-call allocations are not sampling cost
    windows = held_out(data, args)
    given = windows[:, :args.prompt_tokens] if args.prompt_tokens else None
    rows = run_benchmark(mdm, arm, eos, args, given, bdms) + [reference_row(arm, windows, given, eos)]
    baseline = f"MDM low-confidence, {args.length} steps"
    table = markdown(rows, baseline)
    command = "python benchmarks/sampling.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"\n    {command}\n\n{platform.processor() or platform.machine()}, torch {torch.__version__}\n\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, Path(args.plot), f"{args.model} MDM and ARM, {args.samples} samples x {args.length} tokens "
                                    f"({setting}), "
                                    f"{args.train_steps} training steps", baseline)


if __name__ == "__main__":
    main()
