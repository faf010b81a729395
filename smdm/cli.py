"""The `smdm` command: parses arguments and calls library functions; nothing else.

Errors become one line (`smdm: error: ...`) and exit 2: bad arguments (argparse, with every number range-checked
by `smdm.cli_types`) and every SmdmError the library raises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from smdm import chat
from smdm.cli_types import (
    add_common_args,
    add_length_and_sampler_args,
    finite_float,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from smdm.config import ROPE_CACHE_DTYPES
from smdm.errors import SmdmError
from smdm.interop.cli import add_parser as add_export_parser
from smdm.lora_cli import add_lora_args
from smdm.serve import cli as serve_cli
from smdm.sweep_cli import add_scale_parser
from smdm.tasks.cli import add_eval_parser, add_task_parsers


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SmdmError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------------ training commands

# TrainConfig fields set by flags: (type, help). Flags default to "unset", so `--config FILE` values survive them.
_TRAIN_OPTIONS = {
    "seq_len": (positive_int, "tokens per row (default: the model's context length)"),
    "batch_size": (positive_int, "sequences per micro-batch"),
    "grad_accum": (positive_int, "micro-batches per optimizer step"),
    "lr": (positive_float, "peak learning rate"),
    "min_lr_ratio": (finite_float(0, 1), "cosine decay ends at lr x this"),
    "warmup_steps": (non_negative_int, "linear warmup (default: 1%% of the run)"),
    "weight_decay": (finite_float(0), "AdamW decay of matrices"),
    "dropout": (fraction, "residual dropout while training, for repeated data; 0: none"),
    "grad_clip": (positive_float, "gradient-norm clip"),
    "random_length_prob": (finite_float(0, 1), "fraction of batches cut to a random length (the paper: 1%%)"),
    "eval_every": (positive_int, "steps between validations"),
    "eval_blocks": (positive_int, "validation rows"),
    "eval_mc_samples": (positive_int, "MDM: mask draws per validation row"),
    "save_every": (positive_int, "steps between checkpoints"),
    "log_every": (positive_int, "steps between metrics rows"),
    "seed": (non_negative_int, "seed of the data order, masks and initial weights"),
    "max_unique_tokens": (positive_int, "train on the split's first N tokens only, repeated (data-constrained)"),
}


def _add_train_args(parser: argparse.ArgumentParser, sft: bool = False) -> None:
    from smdm.diffusion import LOSS_WEIGHTINGS
    from smdm.flops import FLOPS_COUNTS
    from smdm.model import INITS
    from smdm.objectives import objective_names
    from smdm.train import TrainConfig

    defaults = TrainConfig(data_dir="", out_dir="")
    unset = argparse.SUPPRESS
    parser.add_argument("--config", help="a run config (e.g. RUN/train_config.json); flags override its values")
    if sft:
        parser.add_argument("--data", nargs="+", default=unset,
                            help="jsonl: prompt/completion, prompt/response, question/answer, or chat messages")
    else:
        parser.add_argument("--data", dest="data_dir", default=unset, help="directory written by `smdm prepare`")
    parser.add_argument("--out", dest="out_dir", default=unset, help="run directory (metrics, checkpoint, summary)")
    parser.add_argument("--model", default=unset, help=f"named config, see `smdm configs` ({defaults.model})")
    parser.add_argument("--objective", choices=objective_names(), default=unset, help=f"({defaults.objective})")
    parser.add_argument("--diffusion-block-size", type=positive_int, default=unset,
                        help="bdm: tokens per diffusion block (BD3-LM); must divide the context")
    parser.add_argument("--mask-rate-min", type=finite_float(0, 1), default=unset,
                        help="mdm, bdm: clip the training masking rates (each block's, for bdm) to [min, max] "
                             "(BD3-LM's clipped schedule); validation stays unclipped")
    parser.add_argument("--mask-rate-max", type=finite_float(0, 1), default=unset,
                        help="mdm, bdm: upper end of the clipped range")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=positive_int, default=unset)
    budget.add_argument("--max-tokens", type=positive_int, default=unset)
    budget.add_argument("--flops", type=positive_float, default=unset,
                        help="compute budget, counted as --flops-count says (the IsoFLOP sweeps count the same way)")
    budget.add_argument("--epochs", type=positive_float, default=unset, help="passes over the training rows")
    parser.add_argument("--flops-count", choices=FLOPS_COUNTS, default=unset,
                        help="attention: 6N + 6·L·T·d (default, as the sweeps); 6n: the paper's code")
    for name, (kind, text) in _TRAIN_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=unset,
                            help=f"{text} ({getattr(defaults, name)})")
    parser.add_argument("--threads", type=positive_int, default=unset, help="torch CPU threads")
    parser.add_argument("--low-discrepancy", action="store_true", default=unset, help="MDM: stratified t per batch")
    parser.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default=unset,
                        help="mdm, bdm training loss: 1/t-weighted ELBO, or Sahoo et al.'s unweighted CE (validation: ELBO)")
    parser.add_argument("--init", choices=INITS, default=unset,
                        help="initial weights: GPT-2 style, or SMDM's (std sqrt(2/5d), outputs 1/sqrt(d)/L)")
    parser.add_argument("--stop-after-steps", type=positive_int, default=unset,
                        help="stop early with a checkpoint (time-sliced jobs)")
    parser.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default=unset,
                        help="under torchrun: DDP (auto) or FSDP2 sharding")
    parser.add_argument("--compile", action="store_true", default=unset, help="torch.compile each block")
    parser.add_argument("--activation-checkpointing", action="store_true", default=unset,
                        help="recompute activations in backward")
    parser.add_argument("--peak-flops", type=positive_float, default=unset,
                        help="per-device peak FLOP/s for MFU (known GPUs are detected)")
    parser.add_argument("--tensorboard", action="store_true", default=unset, help="also log to OUT/tensorboard")
    parser.add_argument("--device", default=unset)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=unset)
    parser.add_argument("--resume", action="store_true", default=unset, help="continue from OUT/checkpoint")
    parser.add_argument("--init-from", default=unset, help="start from the weights of this checkpoint (of the same "
                        "family; an ARM is adapted into an mdm/bdm run, an MDM may start a bdm run as BD3-LM does)")
    parser.add_argument("--adapt-shift", action=argparse.BooleanOptionalAction, default=unset,
                        help="ARM -> MDM or BDM (--objective mdm|bdm --init-from ARM): keep the AR head's i -> i+1 "
                             "alignment (default on, as DiffuLLaMA, Dream and Fast-dLLM v2)")
    parser.add_argument("--attention-anneal-steps", type=non_negative_int, default=unset,
                        help="ARM -> MDM: anneal attention from causal to bidirectional over the first K steps "
                             "(DiffuLLaMA; default 0: bidirectional at once, as Dream)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=unset)


def _train_config(args: argparse.Namespace):
    """TrainConfig from --config (if any), then every flag given on the command line."""
    from smdm.train import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.config:
        return TrainConfig.from_file(args.config, **given)
    return TrainConfig(**{"data_dir": "", "out_dir": "", **given})


def cmd_train(args: argparse.Namespace) -> None:
    from smdm.train import train

    config = _train_config(args)
    if not config.data_dir or not config.out_dir:
        raise SmdmError("smdm train needs --data and --out (or a --config that names them)")
    print(json.dumps(train(config), indent=2))


def cmd_sft(args: argparse.Namespace) -> None:
    from smdm.finetune import finetune, read_sft_settings

    config = _train_config(args)
    if not config.out_dir:
        raise SmdmError("smdm sft needs --out (or a --config that names it)")
    recorded = read_sft_settings(Path(args.config).parent) if args.config else {}
    files = getattr(args, "data", None) or recorded.get("files")
    if not files:
        raise SmdmError("smdm sft needs --data (jsonl files)")
    tokenizer = args.tokenizer or recorded.get("tokenizer")
    sft_config = _sft_config(args, recorded, config.seq_len, config.seed)
    summary = finetune(files, replace(config, seq_len=None), sft_config, tokenizer=tokenizer)
    print(json.dumps(summary, indent=2))


_SFT_FIELDS = ("template", "mode", "prompt_field", "response_field", "val_fraction", "skip_bad_lines", "bos",
               "padding")


def _sft_config(args: argparse.Namespace, recorded: dict, seq_len: int | None, seed: int):
    from smdm.data.sft import SFTConfig

    values = {**{k: v for k, v in recorded.items() if k in _SFT_FIELDS},
              **{k: getattr(args, k) for k in _SFT_FIELDS if getattr(args, k, None) is not None}}
    return SFTConfig(**values, seed=seed, seq_len=seq_len)


def _add_sft_args(p: argparse.ArgumentParser) -> None:
    from smdm.data.sft import PADDINGS

    p.add_argument("--tokenizer", help="default: the tokenizer stored with --init-from")
    p.add_argument("--prompt-dropout", type=fraction, default=argparse.SUPPRESS,
                   help="MDM: mask each example's whole prompt with this probability (trains standard CFG)")
    p.add_argument("--template", choices=["plain", "chat"], help="plain (default): prompt + response text; chat: "
                                                                "role-tagged turns (the tokenizer's template first)")
    p.add_argument("--mode", choices=["response", "text"],
                   help="text: train on prompt+response as one text (the reversal-curse recipe); default response")
    p.add_argument("--prompt-field")
    p.add_argument("--response-field")
    p.add_argument("--val-fraction", type=fraction)
    p.add_argument("--skip-bad-lines", action="store_true", default=None, help="skip malformed jsonl lines")
    p.add_argument("--bos", action="store_true", default=None, help="prepend BOS to every prompt")
    p.add_argument("--padding", choices=PADDINGS, help="longest (default): every row padded to the longest example; "
                                                       "batch: each batch to its own longest (LLaDA)")


# -------------------------------------------------------------------------------------------------------- inference

def cmd_sample(args: argparse.Namespace) -> None:
    from smdm.checkpoint import load_for_inference
    from smdm.sample import SamplerSettings, generate_texts, read_prompts_file

    if args.infill is not None:
        return _sample_infill(args)
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype)

    def show(first: int, step: int, tokens, width: int) -> None:  # [MASK] shows where tokens are still hidden
        for row in range(tokens.size(0)):
            text = tokenizer.decode(tokens[row, width:].tolist())
            print(f"[prompt {first + row + 1} step {step + 1:>3}] {text!r}", file=sys.stderr, flush=True)

    records = generate_texts(checkpoint.model, tokenizer, prompts or [""], args.length,
                             SamplerSettings.from_namespace(args), args.batch_size, args.seed, args.bos,
                             show if args.show_steps else None)
    if args.out is None:
        for record in records:
            print(json.dumps(record, ensure_ascii=False), flush=True)
        return
    from smdm.data.jsonl import write_jsonl

    records = list(records)  # all generated before anything is written: no half-written file
    print(f"{len(records)} samples -> {write_jsonl(args.out, records)}", file=sys.stderr)


def _sample_infill(args: argparse.Namespace) -> None:
    """`smdm sample --infill TEXT`: fill the <|mask:N|> spans of TEXT (MDM only); one JSON line."""
    import torch

    from smdm.checkpoint import load_for_inference
    from smdm.infill import fill_text
    from smdm.sample import SamplerSettings

    if args.prompt or args.prompts_file:
        raise SmdmError("--infill takes the whole text (given parts and <|mask:N|> spans); drop --prompt")
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype)
    settings = SamplerSettings.from_namespace(args)
    record = fill_text(checkpoint.model, tokenizer, args.infill, bos=args.bos,
                       generator=torch.Generator().manual_seed(args.seed), steps=settings.steps,
                       temperature=settings.temperature, **settings.options())
    print(json.dumps(record, ensure_ascii=False), flush=True)


def cmd_likelihood(args: argparse.Namespace) -> None:
    from smdm.checkpoint import load_for_inference
    from smdm.likelihood import score_text

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype)
    print(json.dumps(score_text(checkpoint.model, tokenizer, args.text, args.prefix, method=args.method,
                                cfg_scale=args.cfg_scale, mc_samples=args.mc_samples, seed=args.seed,
                                suffix=args.suffix)))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from smdm.tasks.temporal import load_checkpoints, parse_corpus_spec, temporal_study, write_report

    checkpoints, tokenizer = load_checkpoints(args.checkpoint, args.tokenizer, args.device, args.dtype)
    corpora = dict(parse_corpus_spec(spec) for spec in args.corpus)
    rows = temporal_study(checkpoints, tokenizer, corpora, args.seq_len, args.max_blocks, args.mc_samples,
                          progress=not args.no_progress)
    for path in write_report(rows, Path(args.out)):
        print(f"wrote {path}")
    print((Path(args.out) / "temporal.md").read_text(), end="")


# ---------------------------------------------------------------------------------------------------------- the rest

def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from smdm.data.prepare import read_documents
    from smdm.tokenizer import train_bpe

    tokenizer = train_bpe(read_documents([Path(p) for p in args.input], text_field=args.text_field),
                          args.vocab_size, args.out)
    print(f"trained byte-level BPE with {tokenizer.vocab_size} tokens -> {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from smdm.data.prepare import PrepareConfig, prepare_corpus
    from smdm.tokenizer import Tokenizer

    config = PrepareConfig(val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field)
    manifest = prepare_corpus([Path(p) for p in args.input], Tokenizer.from_file(args.tokenizer), Path(args.out),
                              config)
    splits = manifest["splits"]
    print(f"{args.out}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
          f"({manifest['dtype']})")


def cmd_configs(args: argparse.Namespace) -> None:
    from smdm.config import config_table

    print(config_table())


def cmd_import_smdm(args: argparse.Namespace) -> None:
    from smdm.checkpoint import read_checkpoint_meta
    from smdm.convert import import_smdm_checkpoint

    path = import_smdm_checkpoint(args.weights, args.config, args.tokenizer, args.objective, args.out,
                                  rope_cache_dtype=args.rope_cache_dtype)
    meta = read_checkpoint_meta(path)
    print(f"imported {args.weights} ({args.config}, {meta['objective'].upper()}, RoPE tables in "
          f"{meta['model']['rope_cache_dtype']}) -> {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from smdm.demo import DemoConfig, run_demo

    run_demo(DemoConfig(work_dir=Path(args.work_dir), corpus=[Path(p) for p in args.corpus] or None,
                        max_steps=args.max_steps, model=args.model, threads=args.threads))


def cmd_plot(args: argparse.Namespace) -> None:
    from smdm.plots import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, x=args.x, training=not args.validation_only)}")


# ----------------------------------------------------------------------------------------------------------- parser

def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint (MDM samplers or ARM decoding)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", help="repeatable; default: one unconditional sample")
    p.add_argument("--prompts-file", help="jsonl with a \"prompt\" field per line (added after --prompt)")
    p.add_argument("--out", help="write the samples as jsonl here (default: print them)")
    add_length_and_sampler_args(p, 64, "tokens to generate per prompt")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts sampled together (any lengths)")
    p.add_argument("--tokenizer")
    p.add_argument("--bos", action="store_true", help="prepend BOS to prompts")
    p.add_argument("--show-steps", action="store_true", help="print the sequence after every step (stderr)")
    p.add_argument("--infill", metavar="TEXT",
                   help="MDM: fill the spans marked <|mask:N|> (N hidden tokens) in TEXT, given text on both sides")
    add_common_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("likelihood", help="NLL of a text (MDM: Monte-Carlo ELBO bound; ARM: exact)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True, help="the text to score (the target when --prefix is given)")
    p.add_argument("--prefix", help="score --text as a continuation of this prefix: -log p(text | prefix)")
    p.add_argument("--suffix", help="MDM: also condition on this text after --text (a span between two sides)")
    p.add_argument("--method", choices=["mc", "chain"], default="mc",
                   help="MDM with --prefix: Monte-Carlo bound or exact left-to-right chain rule")
    p.add_argument("--cfg-scale", type=finite_float(), help="MDM with --prefix: unsupervised CFG weight")
    p.add_argument("--mc-samples", type=positive_int, default=128)
    p.add_argument("--tokenizer")
    add_common_args(p)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("perplexity", help="score corpora (e.g. text from different years) with MDMs and ARMs")
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable: MDM and/or ARM checkpoints")
    p.add_argument("--corpus", action="append", required=True, help="repeatable LABEL=GLOB, e.g. 1990s='sotu/199*'")
    p.add_argument("--out", required=True, help="directory for temporal.json / .md / .png")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--max-blocks", type=positive_int, default=32, help="blocks scored per corpus")
    p.add_argument("--mc-samples", type=positive_int, default=64, help="MDM draws per block")
    p.add_argument("--tokenizer")
    add_common_args(p)
    p.set_defaults(func=cmd_perplexity)

def build_parser() -> argparse.ArgumentParser:
    """The argument parser; exposed for tests and documentation."""
    parser = _Parser(prog="smdm", description="Masked diffusion language models (and matched ARMs).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small MDM on the embedded corpus, then sample and score text")
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--corpus", nargs="*", default=[], help="text/jsonl files to use instead of the embedded corpus")
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    t = p.add_subparsers(dest="tokenizer_command", required=True).add_parser(
        "train", help="train a byte-level BPE on a corpus")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=positive_int, default=4096)
    t.add_argument("--text-field", default="text")
    t.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize text/jsonl into token shards with a train/val split")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, SentencePiece .model, or a directory")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=fraction, default=0.01)
    p.add_argument("--text-field", default="text")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pre-train an MDM or an ARM")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="fine-tune on prompt/response pairs (loss on the response only)")
    _add_train_args(p, sft=True)
    _add_sft_args(p)
    add_lora_args(p)
    p.set_defaults(func=cmd_sft)

    add_task_parsers(sub)
    _inference_parsers(sub)
    add_eval_parser(sub)

    p = sub.add_parser("plot", help="training and validation loss of runs (an MDM beside its ARM) in one PNG")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--x", choices=["steps", "tokens", "flops"], default="steps", help="the horizontal axis")
    p.add_argument("--validation-only", action="store_true",
                   help="leave out the training losses (an MDM trained with --loss-weighting ce or clipped rates "
                        "logs a training loss that is not its ELBO)")
    p.set_defaults(func=cmd_plot)

    add_export_parser(sub)
    serve_cli.add_parser(sub)  # smdm serve (smdm/serve/cli.py)
    chat.add_parser(sub)  # smdm chat (smdm/chat.py)

    p = sub.add_parser("configs", help="list the named model configs")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("import-smdm", help="convert an ML-GSAI/SMDM checkpoint into an smdm checkpoint")
    p.add_argument("--weights", required=True, help=".safetensors or .pth in lit-gpt layout")
    p.add_argument("--config", required=True, help="e.g. smdm-1028m")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    p.add_argument("--objective", choices=["mdm", "arm"], default=None,
                   help="default: read from the weights (an MDM's embedding has the extra [MASK] row); "
                        "if given, it must agree")
    p.add_argument("--rope-cache-dtype", choices=ROPE_CACHE_DTYPES, default="fp32",
                   help="bf16: SMDM's own RoPE cos/sin tables, to reproduce its logits exactly (fp32 differs by ~1e-3)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_smdm)

    add_scale_parser(sub)
    return parser


def _apply_threads(args: argparse.Namespace) -> None:
    """One place for --threads: every command that runs a model honours it, not only the training loop."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `smdm` console script."""
    try:
        args = build_parser().parse_args(argv)
        _apply_threads(args)
        args.func(args)
    except SmdmError as error:
        print(f"smdm: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"smdm: error: {error.filename or error}: no such file or directory", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `smdm configs | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no error at exit
    except KeyboardInterrupt:
        print("smdm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
