"""`smdm task ...` and `smdm eval ...`: parse arguments and call the task and harness modules; nothing else."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from smdm.cli_types import (
    add_common_args,
    add_length_and_sampler_args,
    finite_float,
    positive_float,
    positive_int,
)
from smdm.errors import SmdmError


def _add_task_model_args(p: argparse.ArgumentParser, epochs: float, lr: float) -> None:
    from smdm.data.sft import PADDINGS
    from smdm.objectives import LOSS_WEIGHTINGS, objective_names

    p.add_argument("--checkpoint", help="evaluate this model; without it a model is trained first (in OUT/run)")
    p.add_argument("--init-from", help="fine-tune this checkpoint (default: train from scratch)")
    p.add_argument("--model", default="tiny-1m", help="config when training from scratch")
    p.add_argument("--objective", choices=objective_names(), default="mdm")
    p.add_argument("--diffusion-block-size", type=positive_int, help="bdm: tokens per diffusion block (BD3-LM)")
    p.add_argument("--epochs", type=positive_float, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=lr)
    p.add_argument("--low-discrepancy", action="store_true", help="MDM training: stratified t per batch")
    p.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default="elbo",
                   help="mdm, bdm training loss: the 1/t-weighted ELBO (default) or the simple CE of Sahoo et al. 2026")
    p.add_argument("--save-every", type=positive_int, default=500)
    p.add_argument("--vocab-size", type=positive_int, default=1024, help="BPE size when training from scratch")
    p.add_argument("--padding", choices=PADDINGS, default="longest")
    p.add_argument("--tokenizer")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run in OUT/run")
    add_common_args(p)


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

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype)
    model_id = args.model_id or f"{checkpoint.config.name}-{checkpoint.meta.get('objective', 'model')}"
    config = MTBenchConfig(questions_file=args.questions, model_id=model_id, length=args.length,
                           sampler=SamplerSettings.from_namespace(args), batch_size=args.batch_size,
                           limit=args.limit, skip_bad_lines=args.skip_bad_lines, seed=args.seed)
    print(run_mtbench(checkpoint, tokenizer, config, Path(args.out), progress=not args.no_progress))


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


def add_task_parsers(sub: argparse._SubParsersAction) -> None:
    """`smdm task reversal|gsm8k|mtbench`."""
    p = sub.add_parser("task", help="the paper's conditional tasks: reversal curse, GSM8K, MT-Bench")
    tasks = p.add_subparsers(dest="task", required=True)
    t = tasks.add_parser("reversal", help="train (or fine-tune) on the reversal-curse facts, test both directions")
    t.add_argument("--data-dir", required=True, help="the reversal_curse folder (all_prompts_train + 4 test files)")
    t.add_argument("--out", required=True, help="directory for reversal.json (and the trained model in OUT/run)")
    _add_task_model_args(t, epochs=30, lr=3e-3)
    add_length_and_sampler_args(t, None, "tokens to generate (default: longest reference + 4)", skip=("stop_at_eos",))
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
    add_length_and_sampler_args(t, 256, "tokens generated (stage 1 with --two-stage)", skip=("stop_at_eos",))
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
    add_length_and_sampler_args(t, 256, "tokens generated per turn", skip=("stop_at_eos",))
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--limit", type=positive_int, help="questions (the first N)")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    t.add_argument("--tokenizer")
    add_common_args(t)
    t.set_defaults(func=cmd_task_mtbench)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`smdm eval` and `smdm eval convert`."""
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
