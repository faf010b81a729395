"""The `smdm` command: a thin shell over library functions. Errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from smdm import chat
from smdm.errors import SmdmError
from smdm.serve import cli as serve_cli


def load_for_inference(path: str, tokenizer_path: str | None, device: str):
    from smdm.checkpoint import load_for_inference as load

    return load(path, tokenizer_path, device)


def _add_train_args(parser: argparse.ArgumentParser, sft: bool = False) -> None:
    from smdm.train import TrainConfig

    defaults = TrainConfig(data_dir="", out_dir="")
    if sft:
        parser.add_argument("--data", required=True, nargs="+",
                            help="jsonl: prompt/completion, prompt/response, question/answer, or chat messages")
    else:
        parser.add_argument("--data", required=True, help="directory written by `smdm prepare`")
    parser.add_argument("--out", required=True, help="run directory (metrics, checkpoint, summary)")
    parser.add_argument("--model", default=defaults.model, help="named config, see `smdm configs`")
    parser.add_argument("--objective", choices=["mdm", "arm"], default=defaults.objective)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-steps", type=int)
    budget.add_argument("--max-tokens", type=int)
    budget.add_argument("--flops", type=float, help="compute budget C = 6·N·D")
    budget.add_argument("--epochs", type=float, help="passes over the training examples/blocks")
    for name in ("seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                 "grad_clip", "random_length_prob", "eval_every", "eval_blocks", "eval_mc_samples", "save_every",
                 "log_every", "seed", "threads"):
        default = getattr(defaults, name)
        kind = float if isinstance(default, float) or name in ("lr",) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default)
    parser.add_argument("--low-discrepancy", action="store_true", help="stratified t across each batch")
    parser.add_argument("--stop-after-steps", type=int, help="stop early with a checkpoint (time-sliced jobs)")
    parser.add_argument("--parallel", choices=["auto", "none", "ddp", "fsdp"], default=defaults.parallel,
                        help="under torchrun: DDP (auto) or FSDP2 sharding")
    parser.add_argument("--compile", action="store_true", help="torch.compile each Transformer block")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--peak-flops", type=float, help="per-device peak FLOP/s for MFU (known GPUs are detected)")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=defaults.dtype)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    parser.add_argument("--init-from", help="start from the weights of this checkpoint")
    parser.add_argument("--no-progress", action="store_true")


def _train_config(args: argparse.Namespace, data_dir: str):
    from smdm.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return TrainConfig(data_dir=data_dir, out_dir=args.out, progress=not args.no_progress,
                       **{k: v for k, v in values.items() if k not in ("data_dir", "out_dir", "progress")})


def cmd_train(args: argparse.Namespace) -> None:
    from smdm.train import train

    print(json.dumps(train(_train_config(args, args.data)), indent=2))


def cmd_sft(args: argparse.Namespace) -> None:
    from smdm.data.sft import SFTConfig
    from smdm.finetune import finetune

    sft_config = SFTConfig(template=args.template, mode=args.mode, prompt_field=args.prompt_field,
                           response_field=args.response_field, val_fraction=args.val_fraction,
                           skip_bad_lines=args.skip_bad_lines, bos=args.bos, seed=args.seed, padding=args.padding)
    config = _train_config(args, "")
    sft_config.seq_len, config.seq_len = config.seq_len, None
    summary = finetune(args.data, config, sft_config, tokenizer=args.tokenizer)
    print(json.dumps(summary, indent=2))


def _task_train_config(args: argparse.Namespace):
    """TrainConfig of a task's fine-tuning (or from-scratch) run in OUT/run."""
    from smdm.train import TrainConfig

    return TrainConfig(data_dir="", out_dir=str(Path(args.out) / "run"), model=args.model, objective=args.objective,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, init_from=args.init_from,
                       seed=args.seed, threads=args.threads, device=args.device, resume=args.resume,
                       eval_every=10**9, save_every=args.save_every, progress=not args.no_progress)


def _task_model(args: argparse.Namespace, train_files: list[Path], text_mode: bool, template: str = "plain",
                tokenizer_files: list[Path] | None = None):
    """The model a task evaluates: --checkpoint as given, or one fine-tuned (or trained) here on train_files.

    From scratch, the BPE is fitted to tokenizer_files (default: train_files), so a run on a few examples can still
    get a tokenizer that covers the task's whole vocabulary.
    """
    if args.checkpoint:
        return load_for_inference(args.checkpoint, args.tokenizer, args.device)
    from smdm.data.sft import SFTConfig, read_examples
    from smdm.finetune import finetune
    from smdm.tokenizer import train_bpe

    tokenizer = args.tokenizer
    if tokenizer is None and args.init_from is None:  # from scratch: a BPE fitted to the task's own text
        tokenizer = Path(args.out) / "tokenizer.json"
        if not tokenizer.is_file():  # kept on --resume: the data was tokenized with it
            sft = SFTConfig(template=template)
            texts = [e.prompt + e.response for f in (tokenizer_files or train_files) for e in read_examples(f, sft)[0]]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            train_bpe(texts, args.vocab_size, tokenizer)
    config = _task_train_config(args)
    finetune(train_files, config, SFTConfig(mode="text" if text_mode else "response", template=template,
                                            seed=args.seed, padding=args.padding), tokenizer=tokenizer)
    return load_for_inference(str(Path(config.out_dir) / "checkpoint"), None, args.device)


def _add_task_model_args(p: argparse.ArgumentParser, epochs: float, model: str, lr: float) -> None:
    p.add_argument("--checkpoint", help="evaluate this model; without it a model is trained first (in OUT/run)")
    p.add_argument("--init-from", help="fine-tune this checkpoint (default: train from scratch)")
    p.add_argument("--model", default=model, help="config when training from scratch")
    p.add_argument("--objective", choices=["mdm", "arm"], default="mdm")
    p.add_argument("--epochs", type=float, default=epochs)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE size when training from scratch")
    _add_padding_arg(p)
    p.add_argument("--tokenizer")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run in OUT/run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _add_padding_arg(p: argparse.ArgumentParser) -> None:
    from smdm.data.sft import PADDINGS

    p.add_argument("--padding", choices=PADDINGS, default="longest",
                   help="longest: every row padded with EOS to the longest example; batch: each batch only to its "
                        "own longest (LLaDA's choice; less compute, fewer EOS targets)")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores); "
                                               "1 is fastest for small models on a busy machine")


def _apply_threads(args: argparse.Namespace) -> None:
    """One place for --threads: every command that runs a model honours it, not only the training loop."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise SmdmError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _refuse_arm_options(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Before training an ARM for a task: the MDM-only sampler options would only fail after the training."""
    if args.checkpoint is None and args.objective == "arm":
        for name in names:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                if "cfg" in name:
                    raise SmdmError(f"classifier-free guidance needs an MDM (it masks the prompt); {flag} cannot "
                                    "apply to --objective arm")
                raise SmdmError(f"{flag} is an MDM sampler option; an ARM decodes one token per step")


def cmd_task_reversal(args: argparse.Namespace) -> None:
    from smdm.tasks.report import format_table, write_results
    from smdm.tasks.reversal import SPLITS, TRAIN_FILE, ReversalConfig, evaluate_reversal, settings_of, split_file

    data_dir = Path(args.data_dir)
    for split in SPLITS:
        if not split_file(data_dir, split).is_file():
            raise SmdmError(f"{split_file(data_dir, split)}: no such file; --data-dir must hold the reversal-curse data")
    _refuse_arm_options(args, ("cfg_scale", "steps", "block_length"))  # before an hour of training, not after
    config = ReversalConfig(data_dir=str(data_dir), length=args.length, steps=args.steps,
                            block_length=args.block_length, remasking=args.remasking, cfg_scale=args.cfg_scale,
                            batch_size=args.eval_batch_size, limit=args.limit, rank=args.rank)
    checkpoint, tokenizer = _task_model(args, [data_dir / TRAIN_FILE], text_mode=True)
    results = evaluate_reversal(checkpoint.model, tokenizer, config, progress=not args.no_progress)
    metrics = {split: {k: v for k, v in r.items() if k != "examples"} for split, r in results.items()}
    write_results(Path(args.out) / "reversal.json", "reversal", metrics, settings_of(config), checkpoint,
                  extra={"examples": {split: r["examples"] for split, r in results.items()}})
    rows = [(split, r["question"], r["direction"], r["n"], 100 * r["accuracy"], r.get("bleu", ""))
            + ((100 * r["rank_accuracy"], 100 * r["rank_chance"]) if "rank_accuracy" in r else ("", "") if args.rank
               else ())
            for split, r in results.items()]
    header = ["file", "question", "direction", "n", "accuracy %", "BLEU"]
    print(format_table(header + (["rank accuracy %", "chance %"] if args.rank else []), rows))


def cmd_task_gsm8k(args: argparse.Namespace) -> None:
    from smdm.data.jsonl import write_jsonl
    from smdm.tasks.gsm8k import GSM8KConfig, evaluate_gsm8k, settings_of, write_sft_file
    from smdm.tasks.report import format_table, write_results

    out = Path(args.out)
    config = GSM8KConfig(test_file=args.test, length=args.length, steps=args.steps, block_length=args.block_length,
                         remasking=args.remasking, cfg_scale=args.cfg_scale, two_stage=args.two_stage,
                         answer_cfg_scale=args.answer_cfg_scale, answer_length=args.answer_length,
                         temperature=args.temperature, batch_size=args.eval_batch_size, limit=args.limit,
                         skip_bad_lines=args.skip_bad_lines, seed=args.seed)
    if not Path(args.test).is_file():
        raise SmdmError(f"{args.test}: no such file")
    if args.answer_cfg_scale is not None and not args.two_stage:
        raise SmdmError("--answer-cfg-scale applies to the second stage; add --two-stage")
    _refuse_arm_options(args, ("cfg_scale", "answer_cfg_scale", "steps", "block_length"))
    settings = settings_of(config)
    if args.checkpoint is None:
        if args.train is None:
            raise SmdmError("pass --train (GSM8K train jsonl) to fine-tune a model, or --checkpoint to evaluate one")
        sft_file = out / "gsm8k_sft.jsonl"
        strip = not args.keep_calculator
        info = write_sft_file(args.train, sft_file, strip, args.train_limit, args.skip_bad_lines)
        skipped = f" ({info['bad_lines']} bad lines skipped)" if info["bad_lines"] else ""
        print(f"gsm8k: {info['examples']} training examples -> {sft_file}{skipped}", file=sys.stderr)
        settings.update(train_file=args.train, train_limit=args.train_limit, strip_calculator=strip)
        if args.prepare_only:
            return
        tokenizer_files = None
        if args.train_limit and args.tokenizer is None and args.init_from is None:
            tokenizer_files = [out / "gsm8k_sft_all.jsonl"]  # the BPE sees all of GSM8K's words, not only the few
            write_sft_file(args.train, tokenizer_files[0], strip, None, args.skip_bad_lines)
        checkpoint, tokenizer = _task_model(args, [sft_file], text_mode=False, tokenizer_files=tokenizer_files)
    else:
        checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    metrics, records = evaluate_gsm8k(checkpoint.model, tokenizer, config, progress=not args.no_progress)
    generations = out / "gsm8k_generations.jsonl"
    write_jsonl(generations, records)
    write_results(out / "gsm8k.json", "gsm8k", metrics, settings, checkpoint,
                  extra={"generations_file": str(generations)})
    print(format_table(["mode", "n", "correct", "accuracy %", "no answer", "skipped (too long)",
                        "skipped (bad lines)"],
                       [(metrics["mode"], metrics["n"], metrics["correct"], 100 * metrics["accuracy"],
                         metrics["no_answer"], metrics["skipped_too_long"], metrics["skipped_bad_lines"])]))


def cmd_task_mtbench(args: argparse.Namespace) -> None:
    from smdm.tasks.mtbench import MTBenchConfig, generate_answers, settings_of, write_answer_file
    from smdm.tasks.report import format_table, write_results

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    model_id = args.model_id or f"{checkpoint.config.name}-{checkpoint.meta.get('objective', 'model')}"
    config = MTBenchConfig(questions_file=args.questions, model_id=model_id, length=args.length, steps=args.steps,
                           block_length=args.block_length, remasking=args.remasking, cfg_scale=args.cfg_scale,
                           temperature=args.temperature, batch_size=args.batch_size, limit=args.limit,
                           skip_bad_lines=args.skip_bad_lines, seed=args.seed)
    records, stats, _ = generate_answers(checkpoint.model, tokenizer, config, progress=not args.no_progress)
    answer_file = write_answer_file(Path(args.out) / "model_answer" / f"{model_id}.jsonl", records)
    by_category = stats.pop("by_category")
    write_results(Path(args.out) / "mtbench.json", "mtbench", stats, settings_of(config), checkpoint,
                  extra={"answer_file": str(answer_file), "by_category": by_category})
    turns = sorted({k for row in by_category.values() for k in row if k.startswith("mean_tokens_turn")})
    rows = [(category, row["questions"], *(row.get(k, "") for k in turns)) for category, row in by_category.items()]
    print(format_table(["category", "questions", *(k.replace("mean_tokens_", "tokens ") for k in turns)], rows))
    print(f"{stats['questions']} answers ({stats['truncated_prompts']} prompts cut from the left, "
          f"{stats['empty_answers']} empty turns) -> {answer_file}", file=sys.stderr)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from smdm.data.prepare import read_documents
    from smdm.tokenizer import train_bpe

    tokenizer = train_bpe(read_documents([Path(p) for p in args.input], text_field=args.text_field),
                          args.vocab_size, args.out)
    print(f"trained byte-level BPE with {tokenizer.vocab_size} tokens -> {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from smdm.data.prepare import PrepareConfig, prepare_corpus
    from smdm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    config = PrepareConfig(val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field)
    manifest = prepare_corpus([Path(p) for p in args.input], tokenizer, Path(args.out), config)
    splits = manifest["splits"]
    print(f"{args.out}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens "
          f"({manifest['dtype']})")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from smdm.sample import check_prompts, generate, make_plan, read_prompts_file

    if args.infill is not None:
        return _sample_infill(args)
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    prompts = prompts or [""]  # one unconditional sample
    if args.batch_size < 1:
        raise SmdmError(f"--batch-size must be at least 1, got {args.batch_size}")
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    model = checkpoint.model
    options = {"remasking": args.remasking, "block_length": args.block_length, "cfg_scale": args.cfg_scale,
               "threshold": args.threshold, "cache": args.cache, "top_p": args.top_p, "eos_id": tokenizer.eos_id,
               "stop_at_eos": args.stop_at_eos}
    make_plan(model, args.length, args.steps, args.temperature, **options)  # every bad option fails before output
    encoded = [tokenizer.encode(p, bos=tokenizer.bos_id is not None and args.bos) for p in prompts]
    if model.causal:
        encoded = [ids or [tokenizer.eos_id] for ids in encoded]  # an ARM starts a fresh document after an EOS
    check_prompts(model, encoded, args.length)
    generator = torch.Generator().manual_seed(args.seed)
    records = []
    for first in range(0, len(encoded), args.batch_size):
        batch = encoded[first:first + args.batch_size]
        on_step = None
        if args.show_steps:
            def on_step(step: int, x: torch.Tensor, first: int = first, width: int = max(map(len, batch))) -> None:
                for row in range(x.size(0)):  # [MASK] shows where tokens are still hidden
                    text = tokenizer.decode(x[row, width:].tolist())
                    print(f"[prompt {first + row + 1} step {step + 1:>3}] {text!r}", file=sys.stderr, flush=True)
        result = generate(model, batch, args.length, args.steps, args.temperature, generator, on_step, **options)
        for prompt, completion in zip(prompts[first:first + args.batch_size], result.completions):
            record = {"prompt": prompt, "completion": tokenizer.decode(completion), "tokens": len(completion)}
            records.append(record)
            if args.out is None:
                print(json.dumps(record, ensure_ascii=False), flush=True)
    if args.out is not None:
        from smdm.data.jsonl import write_jsonl

        out = write_jsonl(args.out, records)
        print(f"{len(records)} samples -> {out}", file=sys.stderr)


def _sample_infill(args: argparse.Namespace) -> None:
    """`smdm sample --infill TEXT`: fill the <|mask:N|> spans of TEXT (MDM only); one JSON line."""
    import torch

    from smdm.infill import fill_text

    if args.prompt or args.prompts_file:
        raise SmdmError("--infill takes the whole text (given parts and <|mask:N|> spans); drop --prompt")
    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    record = fill_text(checkpoint.model, tokenizer, args.infill, bos=args.bos,
                       generator=torch.Generator().manual_seed(args.seed), steps=args.steps,
                       temperature=args.temperature, remasking=args.remasking, block_length=args.block_length,
                       cfg_scale=args.cfg_scale, threshold=args.threshold, cache=args.cache, top_p=args.top_p)
    print(json.dumps(record, ensure_ascii=False), flush=True)


def cmd_likelihood(args: argparse.Namespace) -> None:
    import torch

    from smdm.likelihood import score, sequence_nll

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device)
    ids = tokenizer.encode(args.text)
    if not ids:
        raise SmdmError("the text is empty")
    if args.prefix is None and args.suffix is None:
        nll, stderr = sequence_nll(checkpoint.model, torch.tensor(ids), mc_samples=args.mc_samples, seed=args.seed)
        print(json.dumps({"tokens": len(ids), "nll_nats": nll, "stderr": stderr, "nats_per_token": nll / len(ids)}))
        return
    prefix = tokenizer.encode(args.prefix or "")
    options = {"cfg_scale": args.cfg_scale} if args.cfg_scale else {}
    if args.suffix:
        options["suffix"] = tokenizer.encode(args.suffix)
    if args.method == "mc" and not checkpoint.model.causal:
        options.update(mc_samples=args.mc_samples, seed=args.seed)
    result = score(checkpoint.model, prefix, ids, method=args.method, **options)
    print(json.dumps({"prefix_tokens": len(prefix), "suffix_tokens": len(options.get("suffix", [])),
                      "tokens": len(ids), "nll_nats": result.nll,
                      "stderr": result.stderr, "nats_per_token": result.nll / len(ids),
                      "forward_passes": result.forward_passes}))


def cmd_perplexity(args: argparse.Namespace) -> None:
    from smdm.tasks.temporal import parse_corpus_spec, temporal_study, write_report

    checkpoints, tokenizer = {}, None
    for path in args.checkpoint:
        checkpoint, its_tokenizer = load_for_inference(path, args.tokenizer, args.device)
        if tokenizer is not None and its_tokenizer.fingerprint != tokenizer.fingerprint:
            raise SmdmError(f"{path} uses another tokenizer than {args.checkpoint[0]}: scores would not compare")
        tokenizer = its_tokenizer
        name = f"{checkpoint.meta.get('objective', 'model').upper()} {Path(path).name}"
        checkpoints[name] = checkpoint
    corpora = dict(parse_corpus_spec(spec) for spec in args.corpus)
    rows = temporal_study(checkpoints, tokenizer, corpora, args.seq_len, args.max_blocks, args.mc_samples)
    for path in write_report(rows, Path(args.out)):
        print(f"wrote {path}")
    print((Path(args.out) / "temporal.md").read_text(), end="")


def cmd_eval(args: argparse.Namespace) -> None:
    from smdm.harness import evaluate_tasks

    if not args.tasks or not args.model_args:
        raise SmdmError("smdm eval needs --tasks and --model-args (or the subcommand `smdm eval convert`)")
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    summary = evaluate_tasks(args.tasks.split(","), args.model_args, args.data_dir, limit)
    for task, metrics in summary["results"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        print(json.dumps({"task": task, **shown}))
    if args.out:
        out = Path(args.out)
        try:
            out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        except OSError as error:
            raise SmdmError(f"could not write {out}: {error.strerror or error}") from None
        print(f"results -> {out}", file=sys.stderr)


def cmd_eval_convert(args: argparse.Namespace) -> None:
    from smdm.tasks.commonsense import convert_commonsense, convert_official

    if args.format == "commonsense":
        subsets = args.tasks.split(",") if args.tasks else None
        counts = convert_commonsense(args.source, args.out, subsets, split=args.split)
    else:
        counts = {args.format: convert_official(args.format, args.source, args.out)}
    for name, count in counts.items():
        print(f"{Path(args.out) / (name + '.jsonl')}: {count} items (task smdm_{name})")


def cmd_configs(args: argparse.Namespace) -> None:
    from smdm.config import CONFIGS, non_embedding_params, total_params

    print(f"{'name':<12} {'layers':>6} {'heads':>5} {'width':>5} {'mlp':>6} {'block':>5} {'non-emb':>9} {'total':>9}")
    for name, c in CONFIGS.items():
        print(f"{name:<12} {c.n_layer:>6} {c.n_head:>5} {c.n_embd:>5} {c.intermediate_size:>6} {c.block_size:>5} "
              f"{non_embedding_params(c) / 1e6:>8.1f}M {total_params(c) / 1e6:>8.1f}M")


def cmd_import_smdm(args: argparse.Namespace) -> None:
    from smdm.checkpoint import save_checkpoint
    from smdm.convert import load_smdm_checkpoint
    from smdm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    model, config = load_smdm_checkpoint(args.weights, args.config)
    if tokenizer.vocab_size != config.vocab_size:
        raise SmdmError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens, {args.config} expects "
                        f"{config.vocab_size}")
    meta = {"objective": args.objective, "imported_from": str(args.weights),
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id}}
    save_checkpoint(args.out, model, config, meta, tokenizer_file=tokenizer.path)
    print(f"imported {args.weights} ({args.config}) -> {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from smdm.demo import DemoConfig, run_demo

    run_demo(DemoConfig(work_dir=Path(args.work_dir), corpus=[Path(p) for p in args.corpus] or None,
                        max_steps=args.max_steps, model=args.model, threads=args.threads))


def _scale_manifest(args: argparse.Namespace):
    from smdm.scaling import read_manifest

    spec, runs = read_manifest(args.manifest)
    if getattr(args, "only", None):
        unknown = sorted(set(args.only) - {r.name for r in runs})
        if unknown:
            raise SmdmError(f"{args.manifest}: no runs named {', '.join(unknown)}")
        runs = [r for r in runs if r.name in args.only]
    return spec, runs


def cmd_scale_plan(args: argparse.Namespace) -> None:
    from smdm.scaling import SweepSpec, plan_sweep, write_manifest
    from smdm.sweep import describe_plan

    spec = SweepSpec.from_file(args.spec)
    runs = plan_sweep(spec)
    print(describe_plan(runs))
    print(f"manifest -> {write_manifest(spec, runs, args.out)}")


def cmd_scale_run(args: argparse.Namespace) -> None:
    from smdm.sweep import run_sweep

    spec, runs = _scale_manifest(args)
    report = run_sweep(runs, args.data or spec.data_dir, jobs=args.jobs, threads=args.threads,
                       stop_after_steps=args.stop_after_steps, progress=not args.no_progress)
    print(f"{len(report.trained)} trained, {len(report.skipped)} already finished, {len(report.busy)} running "
          f"elsewhere, {len(report.failed)} failed")
    if report.failed:
        raise SmdmError(f"{len(report.failed)} of {len(runs)} runs failed: "
                        + "; ".join(f"{name} ({why})" for name, why in report.failed.items()))


def cmd_scale_fit(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from smdm.data.packed import corpus_unigram_entropy
    from smdm.scaling import fit_sweep, plot_sweep
    from smdm.sweep import collect_results

    spec, runs = _scale_manifest(args)
    results, missing = collect_results(runs)
    for name, why in missing.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if not results:
        raise SmdmError(f"{args.manifest}: no finished runs to fit; run `smdm scale run {args.manifest}` first")
    report = fit_sweep(results, count=spec.flops_count, irreducible=args.irreducible, bootstrap=args.bootstrap,
                       seed=args.seed)
    try:  # context for the reader: the loss of a model that ignores context
        unigram = corpus_unigram_entropy(args.data or spec.data_dir, "val")
    except (SmdmError, OSError):
        unigram = None
    report.update(sweep=spec.name, unigram_entropy_val=unigram, skipped_runs=missing,
                  runs=[asdict(r) for r in results])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")
    for note in report["notes"]:
        print(note, file=sys.stderr)
    for family, entry in report["families"].items():
        for count in [report["flops_count"], *report["other_counts"]]:
            key = "loss_vs_flops" if count == report["flops_count"] else f"loss_vs_flops_{count}"
            law = entry[key]
            ci = law["alpha_ci95"]
            print(f"{family.upper()} ({count}): L* = {law['A']:.4g} * C^-{law['alpha']:.4f}"
                  + (f"  alpha 95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
        print(f"{family.upper()}: N* ~ C^{entry['n_opt_exponent']['a']:.3f}, D* ~ C^{entry['d_opt_exponent']['b']:.3f}")
    for count, gaps in report.get("compute_gap", {}).items():
        print(f"compute gap MDM/ARM ({count}): " + ", ".join(
            f"{g['gap']:.1f}x at {label}" + (f" [{g['ci95'][0]:.1f}, {g['ci95'][1]:.1f}]" if g["ci95"] else "")
            for label, g in gaps.items()))
    for path in [out / "scaling.json", *plot_sweep(results, report, out, unigram)]:
        print(f"wrote {path}")


def cmd_scale_launch(args: argparse.Namespace) -> None:
    from smdm.sweep import launch_commands, slurm_script

    spec, runs = _scale_manifest(args)
    data = args.data or spec.data_dir
    if args.format == "slurm":
        text = slurm_script(runs, data, args.nproc_per_node, args.nnodes, args.max_parallel, args.time,
                            args.partition, job_name=spec.name)
    else:
        text = "\n".join(launch_commands(runs, data, args.nproc_per_node, args.nnodes)) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"{len(runs)} runs -> {args.out}")
    else:
        print(text, end="")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; exposed for tests and documentation."""
    parser = argparse.ArgumentParser(prog="smdm", description="Masked diffusion language models (and matched ARMs).")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cli.add_parser(sub)  # smdm serve (smdm/serve/cli.py)
    chat.add_parser(sub)  # smdm chat (smdm/chat.py)

    p = sub.add_parser("demo", help="train a small MDM on the embedded corpus, then sample and score text")
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--corpus", nargs="*", default=[], help="text/jsonl files to use instead of the embedded corpus")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a byte-level BPE on a corpus")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--text-field", default="text")
    t.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize text/jsonl into token shards with a train/val split")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, SentencePiece .model, or a directory")
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--text-field", default="text")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pre-train an MDM or an ARM")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="fine-tune on prompt/response pairs (loss on the response only)")
    _add_train_args(p, sft=True)
    p.add_argument("--tokenizer", help="default: the tokenizer stored with --init-from")
    p.add_argument("--prompt-dropout", type=float, default=0.0,
                   help="MDM: mask each example's whole prompt with this probability (trains standard CFG)")
    p.add_argument("--template", choices=["plain", "chat"], default="plain",
                   help="plain: prompt text + response text; chat: role-tagged turns")
    p.add_argument("--mode", choices=["response", "text"], default="response",
                   help="text: train on prompt+response as one text (the reversal-curse recipe)")
    p.add_argument("--prompt-field")
    p.add_argument("--response-field")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    p.add_argument("--bos", action="store_true", help="prepend BOS to every prompt")
    _add_padding_arg(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("task", help="the paper's conditional tasks: reversal curse, GSM8K, MT-Bench")
    tasks = p.add_subparsers(dest="task", required=True)
    t = tasks.add_parser("reversal", help="train (or fine-tune) on the reversal-curse facts, test both directions")
    t.add_argument("--data-dir", required=True, help="the reversal_curse folder (all_prompts_train + 4 test files)")
    t.add_argument("--out", required=True, help="directory for reversal.json (and the trained model in OUT/run)")
    _add_task_model_args(t, epochs=30, model="tiny-1m", lr=3e-3)
    t.add_argument("--length", type=int, help="tokens to generate (default: longest reference + 4)")
    t.add_argument("--steps", type=int, help="MDM denoising steps (default: length)")
    t.add_argument("--block-length", type=int, help="MDM semi-autoregressive blocks (length rounds up to a multiple)")
    t.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    t.add_argument("--cfg-scale", type=float)
    t.add_argument("--eval-batch-size", type=int, default=64)
    t.add_argument("--limit", type=int, help="questions per test file, spread over it")
    t.add_argument("--rank", type=int, metavar="N",
                   help="name answers: also rank all the file's names by likelihood for N questions (vs chance)")
    t.set_defaults(func=cmd_task_reversal)

    t = tasks.add_parser("gsm8k", help="fine-tune on GSM8K (question -> reasoning + #### answer), then test accuracy")
    t.add_argument("--train", help="GSM8K train jsonl {question, answer} (not needed with --checkpoint)")
    t.add_argument("--test", required=True, help="GSM8K jsonl to evaluate on")
    t.add_argument("--out", required=True, help="directory for gsm8k.json, gsm8k_generations.jsonl (and OUT/run)")
    _add_task_model_args(t, epochs=40, model="tiny-1m", lr=3e-3)
    t.add_argument("--train-limit", type=int, help="train on the first N examples only")
    t.add_argument("--keep-calculator", action="store_true", help="keep GSM8K's <<a*b=c>> annotations in training")
    t.add_argument("--prepare-only", action="store_true",
                   help="write OUT/gsm8k_sft.jsonl and stop (train it with `smdm sft`, e.g. under torchrun)")
    t.add_argument("--limit", type=int, help="test questions (the first N)")
    t.add_argument("--length", type=int, default=256, help="tokens generated (stage 1 with --two-stage)")
    t.add_argument("--steps", type=int, help="MDM denoising steps (default: length)")
    t.add_argument("--block-length", type=int, help="MDM semi-autoregressive block length (default: length)")
    t.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    t.add_argument("--cfg-scale", type=float, help="MDM unsupervised CFG (of the reasoning with --two-stage)")
    t.add_argument("--two-stage", action="store_true", help="generate the reasoning, then the answer after ####")
    t.add_argument("--answer-cfg-scale", type=float, help="MDM CFG of the answer stage")
    t.add_argument("--answer-length", type=int, default=16, help="tokens of the answer stage")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--eval-batch-size", type=int, default=16)
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    t.set_defaults(func=cmd_task_gsm8k)

    t = tasks.add_parser("mtbench", help="answer the MT-Bench questions (two turns) in FastChat's answer format")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--questions", required=True, help="FastChat question.jsonl {question_id, category, turns}")
    t.add_argument("--out", required=True, help="directory for model_answer/MODEL_ID.jsonl and mtbench.json")
    t.add_argument("--model-id", help="name in the answer file (default: CONFIG-OBJECTIVE)")
    t.add_argument("--length", type=int, default=256, help="tokens generated per turn")
    t.add_argument("--steps", type=int, help="MDM denoising steps (default: length)")
    t.add_argument("--block-length", type=int, help="MDM semi-autoregressive block length (default: length)")
    t.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    t.add_argument("--cfg-scale", type=float, help="MDM unsupervised classifier-free guidance")
    t.add_argument("--temperature", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--limit", type=int, help="questions (the first N)")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines instead of failing")
    t.add_argument("--tokenizer")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--no-progress", action="store_true")
    _add_threads_arg(t)
    t.set_defaults(func=cmd_task_mtbench)

    p = sub.add_parser("sample", help="generate text from a checkpoint (MDM samplers or ARM decoding)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", help="repeatable; default: one unconditional sample")
    p.add_argument("--prompts-file", help="jsonl with a \"prompt\" field per line (added after --prompt)")
    p.add_argument("--out", help="write the samples as jsonl here (default: print them)")
    p.add_argument("--length", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--steps", type=int, default=None, help="MDM denoising steps (default: length)")
    p.add_argument("--block-length", type=int, default=None,
                   help="MDM semi-autoregressive block length; steps are split evenly across blocks (default: length)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence",
                   help="MDM: reveal the most confident predictions, or each masked token with probability 1 - s/t")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="MDM classifier-free guidance w: uncond + (w + 1)(cond - uncond), prompt masked for uncond")
    p.add_argument("--threshold", type=float, default=None,
                   help="MDM parallel decoding: also reveal every token whose confidence exceeds this")
    p.add_argument("--cache", choices=["none", "prefix", "dual", "kv"], default=None,
                   help="MDM: none (exact, default), prefix or dual (Fast-dLLM, approximate); ARM: kv (default) or none")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop once every sample has an EOS in its final tokens (completions are cut there anyway)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled together (any lengths)")
    p.add_argument("--tokenizer")
    p.add_argument("--bos", action="store_true", help="prepend BOS to prompts")
    p.add_argument("--show-steps", action="store_true", help="print the sequence after every step (stderr)")
    p.add_argument("--infill", metavar="TEXT",
                   help="MDM: fill the spans marked <|mask:N|> (N hidden tokens) in TEXT, given text on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("likelihood", help="NLL of a text (MDM: Monte-Carlo ELBO bound; ARM: exact)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", required=True, help="the text to score (the target when --prefix is given)")
    p.add_argument("--prefix", help="score --text as a continuation of this prefix: -log p(text | prefix)")
    p.add_argument("--suffix", help="MDM with --prefix: also condition on this text after --text (a span between)")
    p.add_argument("--method", choices=["mc", "chain"], default="mc",
                   help="MDM with --prefix: Monte-Carlo bound or exact left-to-right chain rule")
    p.add_argument("--cfg-scale", type=float, default=None, help="MDM with --prefix: unsupervised CFG weight")
    p.add_argument("--mc-samples", type=int, default=128)
    p.add_argument("--tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_likelihood)

    p = sub.add_parser("perplexity", help="score corpora (e.g. text from different years) with MDMs and ARMs")
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable: MDM and/or ARM checkpoints")
    p.add_argument("--corpus", action="append", required=True, help="repeatable LABEL=GLOB, e.g. 1990s='sotu/199*'")
    p.add_argument("--out", required=True, help="directory for temporal.json / .md / .png")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-blocks", type=int, default=32, help="blocks scored per corpus")
    p.add_argument("--mc-samples", type=int, default=64, help="MDM draws per block")
    p.add_argument("--tokenizer")
    p.add_argument("--device", default="auto")
    _add_threads_arg(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint; offline tasks smdm_* read --data-dir")
    p.add_argument("--tasks", help="comma-separated: smdm_arc_easy, smdm_piqa, ... or stock lm-eval task names")
    p.add_argument("--model-args", help="checkpoint=PATH[,nll_type=mc|chain,mc_samples=128,cfg_scale=...,...]")
    p.add_argument("--data-dir", help="directory of the task jsonl files (default: $SMDM_EVAL_DATA)")
    p.add_argument("--limit", type=float, help="items per task (a fraction if below 1)")
    p.add_argument("--out", help="write lm-eval's results as JSON here")
    _add_threads_arg(p)
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

    p = sub.add_parser("configs", help="list the named model configs")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("import-smdm", help="convert an ML-GSAI/SMDM checkpoint into an smdm checkpoint")
    p.add_argument("--weights", required=True, help=".safetensors or .pth in lit-gpt layout")
    p.add_argument("--config", required=True, help="e.g. smdm-1028m")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    p.add_argument("--objective", choices=["mdm", "arm"], default="mdm")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_smdm)

    p = sub.add_parser("scale", help="scaling laws: plan, run, fit and launch IsoFLOP sweeps of MDMs and ARMs")
    scale = p.add_subparsers(dest="scale_command", required=True)
    s = scale.add_parser("plan", help="turn a sweep spec (JSON) into a manifest of training runs")
    s.add_argument("spec", help="e.g. configs/scaling-cpu.json")
    s.add_argument("--out", required=True, help="manifest to write")
    s.set_defaults(func=cmd_scale_plan)
    s = scale.add_parser("run", help="train the manifest's unfinished runs (resumes killed ones)")
    s.add_argument("manifest")
    s.add_argument("--jobs", type=int, default=1, help="training processes at once")
    s.add_argument("--threads", type=int, default=None, help="torch threads per process")
    s.add_argument("--only", nargs="+", help="run names to train (default: all)")
    s.add_argument("--data", help="override the spec's data directory")
    s.add_argument("--stop-after-steps", type=int, help="end each run early with a checkpoint (time slices)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_scale_run)
    s = scale.add_parser("fit", help="IsoFLOP parabolas, power laws with bootstrap intervals, compute gap, plots")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, help="directory for scaling.json, isoflop.png, frontier.png")
    s.add_argument("--irreducible", action="store_true", help="also fit L = E + A C^-alpha (needs 4 budgets)")
    s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the intervals")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", help="data directory for the unigram-entropy reference line (default: the spec's)")
    s.set_defaults(func=cmd_scale_fit)
    s = scale.add_parser("launch", help="print one torchrun command per run, or a SLURM array script")
    s.add_argument("manifest")
    s.add_argument("--format", choices=["shell", "slurm"], default="shell")
    s.add_argument("--nproc-per-node", type=int, default=8)
    s.add_argument("--nnodes", type=int, default=1)
    s.add_argument("--max-parallel", type=int, default=None, help="SLURM: array tasks running at once")
    s.add_argument("--time", default="24:00:00", help="SLURM time limit per run")
    s.add_argument("--partition", default=None)
    s.add_argument("--data", help="data directory on the cluster (default: the spec's)")
    s.add_argument("--out", help="write here instead of printing")
    s.set_defaults(func=cmd_scale_launch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `smdm` console script."""
    args = build_parser().parse_args(argv)
    try:
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
