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

from smdm.cli_types import finite_float, fraction, non_negative_int, positive_float, positive_int
from smdm.errors import SmdmError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the same one line as every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SmdmError(f"{message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------------------------------------ training commands

# TrainConfig fields set by flags: (type, help). Flags default to "unset", so `--config FILE` values survive them.
_TRAIN_OPTIONS = {
    "seq_len": (positive_int, "tokens per row (default: the model's block size)"),
    "batch_size": (positive_int, "sequences per micro-batch"),
    "grad_accum": (positive_int, "micro-batches per optimizer step"),
    "lr": (positive_float, "peak learning rate"),
    "min_lr_ratio": (finite_float(0, 1), "cosine decay ends at lr x this"),
    "warmup_steps": (non_negative_int, "linear warmup (default: 1%% of the run)"),
    "weight_decay": (finite_float(0), "AdamW decay of matrices"),
    "grad_clip": (positive_float, "gradient-norm clip"),
    "random_length_prob": (finite_float(0, 1), "fraction of batches cut to a random length (the paper: 1%%)"),
    "eval_every": (positive_int, "steps between validations"),
    "eval_blocks": (positive_int, "validation rows"),
    "eval_mc_samples": (positive_int, "MDM: mask draws per validation row"),
    "save_every": (positive_int, "steps between checkpoints"),
    "log_every": (positive_int, "steps between metrics rows"),
    "seed": (non_negative_int, "seed of the data order, masks and initial weights"),
}


def _add_train_args(parser: argparse.ArgumentParser, sft: bool = False) -> None:
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
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=positive_int, default=unset)
    budget.add_argument("--max-tokens", type=positive_int, default=unset)
    budget.add_argument("--flops", type=positive_float, default=unset,
                        help="compute budget, counted as --flops-count says (the IsoFLOP sweeps count the same way)")
    budget.add_argument("--epochs", type=positive_float, default=unset, help="passes over the training rows")
    parser.add_argument("--flops-count", choices=["attention", "6n"], default=unset,
                        help="attention: 6N + 6·L·T·d (default, as the sweeps); 6n: the paper's code")
    for name, (kind, text) in _TRAIN_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=unset,
                            help=f"{text} ({getattr(defaults, name)})")
    parser.add_argument("--threads", type=positive_int, default=unset, help="torch CPU threads")
    parser.add_argument("--low-discrepancy", action="store_true", default=unset, help="MDM: stratified t per batch")
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
    parser.add_argument("--init-from", default=unset, help="start from the weights of this checkpoint")
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
    files = getattr(args, "data", None) or recorded.pop("files", None)
    if not files:
        raise SmdmError("smdm sft needs --data (jsonl files)")
    recorded.pop("files", None)
    tokenizer = args.tokenizer or recorded.pop("tokenizer", None)
    recorded.pop("tokenizer", None)
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


# ------------------------------------------------------------------------------------------------------------ tasks

def _add_task_model_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    from smdm.data.sft import PADDINGS
    from smdm.objectives import objective_names

    p.add_argument("--checkpoint", help="evaluate this model; without it a model is trained first (in OUT/run)")
    p.add_argument("--init-from", help="fine-tune this checkpoint (default: train from scratch)")
    p.add_argument("--model", default="tiny-1m", help="config when training from scratch")
    p.add_argument("--objective", choices=objective_names(), default="mdm")
    p.add_argument("--epochs", type=positive_float, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--save-every", type=positive_int, default=500)
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="BPE size when training from scratch")
    p.add_argument("--padding", choices=PADDINGS, default="longest")
    p.add_argument("--tokenizer")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run in OUT/run")
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: see README, Threads)")
    p.add_argument("--no-progress", action="store_true")


def _task_model(args: argparse.Namespace):
    from smdm.tasks.training import TaskModel

    names = {f.name for f in fields(TaskModel)} - {"progress"}
    return TaskModel(**{k: getattr(args, k) for k in names if hasattr(args, k)}, progress=not args.no_progress)


def cmd_task_reversal(args: argparse.Namespace) -> None:
    from smdm.sample import SamplerSettings
    from smdm.tasks.reversal import TRAIN_FILE, ReversalConfig, check_data_dir, evaluate_reversal, report

    check_data_dir(args.data_dir)
    sampler = SamplerSettings.from_namespace(args)
    task_model = _task_model(args)
    task_model.refuse_arm_options(sampler)  # before an hour of training, not after
    config = ReversalConfig(data_dir=args.data_dir, length=args.length, sampler=sampler,
                            batch_size=args.eval_batch_size, limit=args.limit, rank=args.rank)
    checkpoint, tokenizer = task_model.load([Path(args.data_dir) / TRAIN_FILE], text_mode=True)
    results = evaluate_reversal(checkpoint.model, tokenizer, config, progress=not args.no_progress)
    print(report(results, config, checkpoint, Path(args.out)))


def cmd_task_gsm8k(args: argparse.Namespace) -> None:
    from smdm.sample import SamplerSettings
    from smdm.tasks.gsm8k import GSM8KConfig, run_gsm8k

    sampler = SamplerSettings.from_namespace(args)
    task_model = _task_model(args)
    task_model.refuse_arm_options(sampler, {"--answer-cfg-scale": args.answer_cfg_scale})
    config = GSM8KConfig(test_file=args.test, length=args.length, sampler=sampler, two_stage=args.two_stage,
                         answer_cfg_scale=args.answer_cfg_scale, answer_length=args.answer_length,
                         batch_size=args.eval_batch_size, limit=args.limit, skip_bad_lines=args.skip_bad_lines,
                         seed=args.seed)
    print(run_gsm8k(config, task_model, args.train, train_limit=args.train_limit,
                    strip_calculator=not args.keep_calculator, prepare_only=args.prepare_only))


def cmd_task_mtbench(args: argparse.Namespace) -> None:
    from smdm.checkpoint import load_for_inference
    from smdm.sample import SamplerSettings
    from smdm.tasks.mtbench import MTBenchConfig, run_mtbench

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    model_id = args.model_id or f"{checkpoint.config.name}-{checkpoint.meta.get('objective', 'model')}"
    config = MTBenchConfig(questions_file=args.questions, model_id=model_id, length=args.length,
                           sampler=SamplerSettings.from_namespace(args), batch_size=args.batch_size,
                           limit=args.limit, skip_bad_lines=args.skip_bad_lines, seed=args.seed)
    print(run_mtbench(checkpoint, tokenizer, config, Path(args.out), progress=not args.no_progress))


# -------------------------------------------------------------------------------------------------------- inference

def cmd_sample(args: argparse.Namespace) -> None:
    from smdm.checkpoint import load_for_inference
    from smdm.sample import SamplerSettings, generate_texts, read_prompts_file

    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)

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


def cmd_likelihood(args: argparse.Namespace) -> None:
    from smdm.checkpoint import load_for_inference
    from smdm.likelihood import score_text

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    print(json.dumps(score_text(checkpoint.model, tokenizer, args.text, args.prefix, method=args.method,
                                cfg_scale=args.cfg_scale, mc_samples=args.mc_samples, seed=args.seed)))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from smdm.tasks.temporal import load_checkpoints, parse_corpus_spec, temporal_study, write_report

    checkpoints, tokenizer = load_checkpoints(args.checkpoint, args.tokenizer, args.device)
    corpora = dict(parse_corpus_spec(spec) for spec in args.corpus)
    rows = temporal_study(checkpoints, tokenizer, corpora, args.seq_len, args.max_blocks, args.mc_samples)
    for path in write_report(rows, Path(args.out)):
        print(f"wrote {path}")
    print((Path(args.out) / "temporal.md").read_text(), end="")


def cmd_eval(args: argparse.Namespace) -> None:
    from smdm.harness import evaluate_tasks, write_summary

    if not args.tasks or not args.model_args:
        raise SmdmError("smdm eval needs --tasks and --model-args (or the subcommand `smdm eval convert`)")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    summary = evaluate_tasks(args.tasks.split(","), args.model_args, args.data_dir, limit)
    for task, metrics in summary["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        print(json.dumps({"task": task, **shown}))
    if args.out:
        print(f"results -> {write_summary(summary, args.out)}", file=sys.stderr)


def cmd_eval_convert(args: argparse.Namespace) -> None:
    from smdm.tasks.commonsense import convert_commonsense, convert_official

    if args.format == "commonsense":
        counts = convert_commonsense(args.source, args.out, args.tasks.split(",") if args.tasks else None,
                                     split=args.split)
    else:
        counts = {args.format: convert_official(args.format, args.source, args.out)}
    for name, count in counts.items():
        print(f"{Path(args.out) / (name + '.jsonl')}: {count} items (task smdm_{name})")


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
    from smdm.convert import import_smdm_checkpoint

    import_smdm_checkpoint(args.weights, args.config, args.tokenizer, args.objective, args.out)
    print(f"imported {args.weights} ({args.config}) -> {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from smdm.demo import DemoConfig, run_demo

    run_demo(DemoConfig(work_dir=Path(args.work_dir), corpus=[Path(p) for p in args.corpus] or None,
                        max_steps=args.max_steps, model=args.model, threads=args.threads))


def cmd_plot(args: argparse.Namespace) -> None:
    from smdm.plots import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out, x=args.x)}")


def cmd_scale(args: argparse.Namespace) -> None:
    from smdm import sweep
    from smdm.scaling import SweepSpec, plan_sweep, read_manifest, write_manifest

    if args.scale_command == "plan":
        spec = SweepSpec.from_file(args.spec)
        runs = plan_sweep(spec)
        print(sweep.describe_plan(runs))
        print(f"manifest -> {write_manifest(spec, runs, args.out)}")
        return
    spec, runs = read_manifest(args.manifest)
    runs = sweep.select_runs(runs, getattr(args, "only", None), args.manifest)
    data = args.data or spec.data_dir
    if args.scale_command == "run":
        report = sweep.run_sweep(runs, data, jobs=args.jobs, threads=args.threads,
                                 stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
        print(report.describe())
        report.raise_for_failures(len(runs))
    elif args.scale_command == "fit":
        for line in sweep.fit_report(spec, runs, args.out, args.data, args.irreducible, args.bootstrap, args.seed,
                                     warn=lambda text: print(text, file=sys.stderr)):
            print(line)
    else:
        text = (sweep.slurm_script(runs, data, args.nproc_per_node, args.nnodes, args.max_parallel, args.time,
                                   args.partition, job_name=spec.name) if args.format == "slurm"
                else "\n".join(sweep.launch_commands(runs, data, args.nproc_per_node, args.nnodes)) + "\n")
        if args.out:
            Path(args.out).write_text(text)
            print(f"{len(runs)} runs -> {args.out}")
        else:
            print(text, end="")


# ----------------------------------------------------------------------------------------------------------- parser

def _add_sampler_and_length(p: argparse.ArgumentParser, length: int | None, help_length: str,
                            skip: Sequence[str] = ()) -> None:
    from smdm.sample import add_sampler_args

    p.add_argument("--length", type=positive_int, default=length, help=help_length)
    add_sampler_args(p, skip=skip)


def _task_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("task", help="the paper's conditional tasks: reversal curse, GSM8K, MT-Bench")
    tasks = p.add_subparsers(dest="task", required=True)
    t = tasks.add_parser("reversal", help="train (or fine-tune) on the reversal-curse facts, test both directions")
    t.add_argument("--data-dir", required=True, help="the reversal_curse folder (all_prompts_train + 4 test files)")
    t.add_argument("--out", required=True, help="directory for reversal.json (and the trained model in OUT/run)")
    _add_task_model_args(t, epochs=30, lr=3e-3)
    _add_sampler_and_length(t, None, "tokens to generate (default: longest reference + 4)", skip=("stop_at_eos",))
    t.add_argument("--eval-batch-size", type=positive_int, default=64)
    t.add_argument("--limit", type=positive_int, help="questions per test file, spread over it")
    t.add_argument("--rank", type=positive_int, metavar="N",
                   help="name answers: also rank all the file's names by likelihood for N questions (vs chance)")
    t.set_defaults(func=cmd_task_reversal)

    t = tasks.add_parser("gsm8k", help="fine-tune on GSM8K (question -> reasoning + #### answer), then test accuracy")
    t.add_argument("--train", help="GSM8K train jsonl {question, answer} (not needed with --checkpoint)")
    t.add_argument("--test", required=True, help="GSM8K jsonl to evaluate on")
    t.add_argument("--out", required=True, help="directory for gsm8k.json, gsm8k_generations.jsonl (and OUT/run)")
    _add_task_model_args(t, epochs=40, lr=3e-3)
    t.add_argument("--train-limit", type=positive_int, help="train on the first N examples only")
    t.add_argument("--keep-calculator", action="store_true", help="keep GSM8K's <<a*b=c>> annotations in training")
    t.add_argument("--prepare-only", action="store_true",
                   help="write OUT/gsm8k_sft.jsonl and stop (train it with `smdm sft`, e.g. under torchrun)")
    t.add_argument("--limit", type=positive_int, help="test questions (the first N)")
    _add_sampler_and_length(t, 256, "tokens generated (stage 1 with --two-stage)", skip=("stop_at_eos",))
    t.add_argument("--two-stage", action="store_true", help="generate the reasoning, then the answer after ####")
    t.add_argument("--answer-cfg-scale", type=finite_float(), help="MDM CFG of the answer stage")
    t.add_argument("--answer-length", type=positive_int, default=16, help="tokens of the answer stage")
    t.add_argument("--eval-batch-size", type=positive_int, default=16)
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    t.set_defaults(func=cmd_task_gsm8k)

    t = tasks.add_parser("mtbench", help="answer the MT-Bench questions (two turns) in FastChat's answer format")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--questions", required=True, help="FastChat question.jsonl {question_id, category, turns}")
    t.add_argument("--out", required=True, help="directory for model_answer/MODEL_ID.jsonl and mtbench.json")
    t.add_argument("--model-id", help="name in the answer file (default: CONFIG-OBJECTIVE)")
    _add_sampler_and_length(t, 256, "tokens generated per turn", skip=("stop_at_eos",))
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--limit", type=positive_int, help="questions (the first N)")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    t.add_argument("--tokenizer")
    _add_common(t)
    t.set_defaults(func=cmd_task_mtbench)


def _inference_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint (MDM samplers or ARM decoding)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", help="repeatable; default: one unconditional sample")
    p.add_argument("--prompts-file", help="jsonl with a \"prompt\" field per line (added after --prompt)")
    p.add_argument("--out", help="write the samples as jsonl here (default: print them)")
    _add_sampler_and_length(p, 64, "tokens to generate per prompt")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts sampled together (any lengths)")
    p.add_argument("--tokenizer")
    p.add_argument("--bos", action="store_true", help="prepend BOS to prompts")
    p.add_argument("--show-steps", action="store_true", help="print the sequence after every step (stderr)")
    _add_common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("likelihood", help="NLL of a text (MDM: Monte-Carlo ELBO bound; ARM: exact)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True, help="the text to score (the target when --prefix is given)")
    p.add_argument("--prefix", help="score --text as a continuation of this prefix: -log p(text | prefix)")
    p.add_argument("--method", choices=["mc", "chain"], default="mc",
                   help="MDM with --prefix: Monte-Carlo bound or exact left-to-right chain rule")
    p.add_argument("--cfg-scale", type=finite_float(), help="MDM with --prefix: unsupervised CFG weight")
    p.add_argument("--mc-samples", type=positive_int, default=128)
    p.add_argument("--tokenizer")
    _add_common(p)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("perplexity", help="score corpora (e.g. text from different years) with MDMs and ARMs")
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable: MDM and/or ARM checkpoints")
    p.add_argument("--corpus", action="append", required=True, help="repeatable LABEL=GLOB, e.g. 1990s='sotu/199*'")
    p.add_argument("--out", required=True, help="directory for temporal.json / .md / .png")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--max-blocks", type=positive_int, default=32, help="blocks scored per corpus")
    p.add_argument("--mc-samples", type=positive_int, default=64, help="MDM draws per block")
    p.add_argument("--tokenizer")
    _add_common(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint; offline tasks smdm_* read --data-dir")
    p.add_argument("--tasks", help="comma-separated: smdm_arc_easy, smdm_piqa, ... or stock lm-eval task names")
    p.add_argument("--model-args", help="checkpoint=PATH[,nll_type=mc|chain,mc_samples=128,cfg_scale=...,...]")
    p.add_argument("--data-dir", help="directory of the task jsonl files (default: $SMDM_EVAL_DATA)")
    p.add_argument("--limit", type=positive_float, help="items per task (a fraction if below 1)")
    p.add_argument("--out", help="write lm-eval's results as JSON here")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.set_defaults(func=cmd_eval)
    evsub = p.add_subparsers(dest="eval_command")
    c = evsub.add_parser("convert", help="write the jsonl files the smdm_* tasks read")
    c.add_argument("--source", required=True,
                   help="commonsense: the LLM-Adapters dataset directory; else the official file or directory")
    c.add_argument("--out", required=True, help="the data directory to write (task_name.jsonl files)")
    c.add_argument("--format", choices=["commonsense", "hellaswag", "race", "lambada"], default="commonsense")
    c.add_argument("--tasks", help="commonsense subsets to convert, comma-separated (default: all)")
    c.add_argument("--split", default="test", help="commonsense: which <split>.json of each subset")
    c.set_defaults(func=cmd_eval_convert)


def _scale_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="scaling laws: plan, run, fit and launch IsoFLOP sweeps of MDMs and ARMs")
    scale = p.add_subparsers(dest="scale_command", required=True)
    s = scale.add_parser("plan", help="turn a sweep spec (JSON) into a manifest of training runs")
    s.add_argument("spec", help="e.g. configs/scaling-cpu.json")
    s.add_argument("--out", required=True, help="manifest to write")
    s = scale.add_parser("run", help="train the manifest's unfinished runs (resumes killed ones)")
    s.add_argument("manifest")
    s.add_argument("--jobs", type=positive_int, default=1, help="training processes at once")
    s.add_argument("--threads", type=positive_int, default=None, help="torch threads per process")
    s.add_argument("--only", nargs="+", help="run names to train (default: all)")
    s.add_argument("--data", help="override the spec's data directory")
    s.add_argument("--stop-after-steps", type=positive_int, help="end each run early with a checkpoint (time slices)")
    s.add_argument("--no-progress", action="store_true")
    s = scale.add_parser("fit", help="IsoFLOP parabolas, power laws with bootstrap intervals, compute gap, plots")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="directory for scaling.json, isoflop.png, frontier.png")
    s.add_argument("--irreducible", action="store_true", help="also fit L = E + A C^-alpha (needs 4 budgets)")
    s.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap replicates for the intervals")
    s.add_argument("--seed", type=non_negative_int, default=0)
    s.add_argument("--data", help="data directory for the unigram-entropy reference line (default: the spec's)")
    s = scale.add_parser("launch", help="print one torchrun command per run, or a SLURM array script")
    s.add_argument("manifest")
    s.add_argument("--format", choices=["shell", "slurm"], default="shell")
    s.add_argument("--nproc-per-node", type=positive_int, default=8)
    s.add_argument("--nnodes", type=positive_int, default=1)
    s.add_argument("--max-parallel", type=positive_int, default=None, help="SLURM: array tasks running at once")
    s.add_argument("--time", default="24:00:00", help="SLURM time limit per run")
    s.add_argument("--partition", default=None)
    s.add_argument("--data", help="data directory on the cluster (default: the spec's)")
    s.add_argument("--out", help="write here instead of printing")
    p.set_defaults(func=cmd_scale)


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
    p.set_defaults(func=cmd_sft)

    _task_parsers(sub)
    _inference_parsers(sub)

    p = sub.add_parser("plot", help="training and validation loss of runs (an MDM beside its ARM) in one PNG")
    p.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--x", choices=["steps", "tokens", "flops"], default="steps", help="the horizontal axis")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("configs", help="list the named model configs")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("import-smdm", help="convert an ML-GSAI/SMDM checkpoint into an smdm checkpoint")
    p.add_argument("--weights", required=True, help=".safetensors or .pth in lit-gpt layout")
    p.add_argument("--config", required=True, help="e.g. smdm-1028m")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    p.add_argument("--objective", choices=["mdm", "arm"], default="mdm")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_smdm)

    _scale_parsers(sub)
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
