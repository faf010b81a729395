"""GSM8K (Cobbe et al. 2021) as the paper runs it: fine-tune on question -> reasoning + `#### answer`, then compare
the generated final answer with the reference after normalising both to one number.

Prompt: `Question: {question}\\nAnswer:`; response: the reference solution (GSM8K's `<<48/2=24>>` calculator
annotations stripped by default, as in SMDM's `train_no_aug` data), which ends with `#### 72`.

Generation, for an MDM (any sampler setting) or an ARM (no CFG):
- one stage: `length` tokens after the prompt; the answer is read from the whole text;
- two stages (the paper's option for MDMs): generate the reasoning with `cfg_scale`, keep the text before the first
  `####` (or all of it when the model reached EOS without one), append `\\n####` and generate `answer_length` more
  tokens with `answer_cfg_scale`, so the guidance for the short answer is chosen independently.

Answer extraction: the first number after the first `####`, else the last number of the text. Numbers are compared
exactly after normalisation: commas between thousands, `$`, `%`, unit words and trailing periods dropped, decimals
equal to integers made integers (`1,000.00` == `1000`), fractions `3/4` == `0.75`, signs kept.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from smdm.data.jsonl import read_records, string_field
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import SamplerSettings, generate, prompt_room
from smdm.tasks.report import check_generation_settings
from smdm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from smdm.tasks.training import TaskModel

ANSWER_MARK = "####"
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
CALCULATOR = re.compile(r"<<[^<>]*>>")
# An optional sign directly before the number (so "10 - 5" is not -5), an optional $, then thousands-grouped or
# plain digits with an optional decimal part, then an optional "/denominator". Not inside a word or after a dot.
NUMBER = re.compile(r"(?<![\w.])(-?)(?:\$\s?)?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s?/\s?(\d+)(?![\d.]))?")


def _value(match: re.Match) -> Fraction:
    sign, digits, denominator = match.groups()
    value = Fraction(digits.replace(",", ""))
    if denominator is not None and int(denominator) != 0:
        value /= int(denominator)
    return -value if sign else value


def canonical(value: Fraction) -> str:
    """One spelling per number: integers without a decimal point, terminating decimals in shortest form, else p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    q = value.denominator
    while q % 2 == 0:
        q //= 2
    while q % 5 == 0:
        q //= 5
    if q != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def numbers_in(text: str) -> list[str]:
    """The normalised numbers of a text, in order."""
    return [canonical(_value(m)) for m in NUMBER.finditer(text)]


def normalize_number(text: str) -> str | None:
    """The first number of `text` in canonical form ("$1,000.00" -> "1000", "-3/4" -> "-0.75"), None without one."""
    found = numbers_in(text)
    return found[0] if found else None


def extract_answer(text: str) -> str | None:
    """A generation's final answer: the first number after the first `####`, else the last number in the text."""
    if ANSWER_MARK in text:
        after = normalize_number(text.split(ANSWER_MARK, 1)[1])
        if after is not None:
            return after
    found = numbers_in(text)
    return found[-1] if found else None


def is_correct(generation: str, target: str) -> bool:
    """Whether the generation's final answer equals the reference's (both normalised); no answer is wrong."""
    predicted, reference = extract_answer(generation), normalize_number(target)
    return predicted is not None and predicted == reference


def accuracy(generations: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of generations whose final answer equals the reference final answer."""
    if len(generations) != len(targets) or not targets:
        raise SmdmError(f"accuracy needs as many generations ({len(generations)}) as references ({len(targets)}), "
                        "at least one")
    return sum(is_correct(g, t) for g, t in zip(generations, targets)) / len(targets)


@dataclass
class Problem:
    """One GSM8K item: the question, the reference solution and its final answer (the text after `####`)."""

    question: str
    solution: str
    target: str
    where: str


def parse_problem(obj: dict, where: str) -> Problem:
    question, solution = string_field(obj, "question", where), string_field(obj, "answer", where)
    if ANSWER_MARK not in solution or normalize_number(solution.rsplit(ANSWER_MARK, 1)[1]) is None:
        raise SmdmError(f"{where}: field 'answer' must end with '{ANSWER_MARK} <number>'")
    return Problem(question, solution, solution.rsplit(ANSWER_MARK, 1)[1].strip(), where)


def read_problems(path: str | Path, limit: int | None = None,
                  skip_bad_lines: bool = False) -> tuple[list[Problem], list[str]]:
    """GSM8K jsonl ({question, answer ending with `#### N`}); bad lines fail with file:line or are skipped."""
    return read_records(path, parse_problem, skip_bad_lines, limit)


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_response(solution: str, strip_calculator: bool = True) -> str:
    """The training target: the solution (calculator annotations removed unless asked to keep them)."""
    text = CALCULATOR.sub("", solution) if strip_calculator else solution
    return " " + text.strip()


def write_sft_file(train_path: str | Path, out_path: str | Path, strip_calculator: bool = True,
                   limit: int | None = None, skip_bad_lines: bool = False) -> dict:
    """GSM8K train jsonl -> prompt/response jsonl that `smdm sft` (and the task's own training) reads; atomic."""
    problems, bad = read_problems(train_path, limit, skip_bad_lines)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for p in problems:
                row = {"prompt": format_prompt(p.question), "response": format_response(p.solution, strip_calculator)}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"examples": len(problems), "bad_lines": len(bad), "problems": bad[:20]}


@dataclass
class GSM8KConfig:
    """Generation settings of the evaluation; recorded with the results."""

    test_file: str
    length: int = 256  # tokens of the (stage-1) generation
    sampler: SamplerSettings = field(default_factory=SamplerSettings)  # stage 1 (the reasoning, or everything in one stage)
    two_stage: bool = False
    answer_cfg_scale: float | None = None  # MDM: guidance of stage 2 (the answer after `####`)
    answer_length: int = 16  # tokens of stage 2 (its steps: the same number)
    batch_size: int = 16
    limit: int | None = None  # questions evaluated (the first ones of the file)
    skip_bad_lines: bool = False
    seed: int = 0


def stage_settings(model: Transformer, config: GSM8KConfig, stage: int) -> SamplerSettings:
    """The sampler of one stage: stage 2 (the short answer) has one block, one token per step, its own CFG."""
    if stage == 1:
        return config.sampler
    return replace(config.sampler, block_length=None, cfg_scale=config.answer_cfg_scale,
                   steps=None if model.causal else config.answer_length, stop_at_eos=True)


def check_settings(model: Transformer, config: GSM8KConfig, eos_id: int) -> None:
    """Every bad setting fails before the first question is generated."""
    check_generation_settings(model, config.batch_size, config.limit, config.sampler,
                              {"--answer-cfg-scale": config.answer_cfg_scale})
    if _context_needed(model, config) >= model.config.block_size:
        raise SmdmError(f"--length {config.length}" + (f" + --answer-length {config.answer_length}" if config.two_stage
                        else "") + f" leaves no room for the question in the context length {model.config.block_size}")
    stage_settings(model, config, 1).plan(model, config.length, eos_id)
    if config.two_stage:
        stage_settings(model, config, 2).plan(model, config.answer_length, eos_id)
    elif config.answer_cfg_scale is not None:
        raise SmdmError("--answer-cfg-scale applies to the second stage; add --two-stage")


def _context_needed(model: Transformer, config: GSM8KConfig) -> int:
    """Tokens a question's generation occupies besides its prompt (an ARM never feeds its last token back)."""
    extra = config.length + (config.answer_length + 2 if config.two_stage else 0)
    return model.config.block_size - prompt_room(model, extra)


def _stage(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], length: int,
           settings: SamplerSettings, generator: torch.Generator) -> list[str]:
    result = generate(model, prompts, length, generator=generator, eos_id=tokenizer.eos_id,
                      settings=replace(settings, stop_at_eos=True))
    return [tokenizer.decode(ids) for ids in result.completions]


def _answer_prompt(model: Transformer, tokenizer: Tokenizer, prompt: list[int], reasoning: str,
                   config: GSM8KConfig) -> list[int]:
    """Stage 2's prompt: question + reasoning + `\\n####`, the reasoning cut from the left if it would not fit."""
    tail = tokenizer.encode(reasoning.rstrip() + "\n" + ANSWER_MARK)
    room = prompt_room(model, config.answer_length) - len(prompt)
    return prompt + tail[max(0, len(tail) - room):]


@torch.no_grad()
def evaluate_gsm8k(model: Transformer, tokenizer: Tokenizer, config: GSM8KConfig,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy on the test file, and one record per question (generation, extracted and reference answer)."""
    check_settings(model, config, tokenizer.eos_id)
    problems, bad_lines = read_problems(config.test_file, config.limit, config.skip_bad_lines)
    budget = model.config.block_size - _context_needed(model, config)
    encoded = [(p, tokenizer.encode(format_prompt(p.question))) for p in problems]
    kept = [(p, ids) for p, ids in encoded if len(ids) <= budget]
    if not kept:
        raise SmdmError(f"every question is longer than the {budget} tokens left by the context length "
                        f"{model.config.block_size} after generating; lower --length")
    generator = torch.Generator().manual_seed(config.seed)
    records: list[dict] = []
    batches = range(0, len(kept), config.batch_size)
    for first in tqdm(batches, desc="gsm8k", disable=not progress):
        batch = kept[first:first + config.batch_size]
        prompts = [ids for _, ids in batch]
        texts = _stage(model, tokenizer, prompts, config.length, stage_settings(model, config, 1), generator)
        stage2: list[str | None] = [None] * len(batch)
        if config.two_stage:
            reasonings = [t.split(ANSWER_MARK, 1)[0] for t in texts]
            second = [_answer_prompt(model, tokenizer, ids, r, config) for ids, r in zip(prompts, reasonings)]
            stage2 = _stage(model, tokenizer, second, config.answer_length, stage_settings(model, config, 2),
                            generator)
            texts = [r.rstrip() + "\n" + ANSWER_MARK + a for r, a in zip(reasonings, stage2)]
        for (problem, _), text, answer_text in zip(batch, texts, stage2):
            record = {"where": problem.where, "question": problem.question, "reference": problem.target,
                      "generation": text, "prediction": extract_answer(text),
                      "correct": is_correct(text, problem.target)}
            if config.two_stage:
                record["answer_stage"] = answer_text
            records.append(record)
    correct = sum(r["correct"] for r in records)
    metrics = {"n": len(records), "correct": correct, "accuracy": correct / len(records),
               "no_answer": sum(r["prediction"] is None for r in records),
               "skipped_too_long": len(encoded) - len(kept), "skipped_bad_lines": len(bad_lines),
               "mode": "two-stage" if config.two_stage else "one-stage"}
    return metrics, records


def settings_of(config: GSM8KConfig) -> dict:
    return asdict(config)


def run_gsm8k(config: GSM8KConfig, task_model: TaskModel, train_file: str | None, train_limit: int | None = None,
              strip_calculator: bool = True, prepare_only: bool = False) -> str:
    """`smdm task gsm8k`: fine-tune on the train file (unless task_model names a checkpoint), evaluate, write
    OUT/gsm8k.json and the generations; returns the table to print (or a note with prepare_only)."""
    from smdm.data.jsonl import write_jsonl
    from smdm.tasks.report import format_table, write_results

    out = Path(task_model.out)
    if not Path(config.test_file).is_file():
        raise SmdmError(f"{config.test_file}: no such file")
    if config.answer_cfg_scale is not None and not config.two_stage:
        raise SmdmError("--answer-cfg-scale applies to the second stage; add --two-stage")
    settings = settings_of(config)
    if task_model.checkpoint is None:
        if train_file is None:
            raise SmdmError("pass --train (GSM8K train jsonl) to fine-tune a model, or --checkpoint to evaluate one")
        sft_file = out / "gsm8k_sft.jsonl"
        info = write_sft_file(train_file, sft_file, strip_calculator, train_limit, config.skip_bad_lines)
        skipped = f" ({info['bad_lines']} bad lines skipped)" if info["bad_lines"] else ""
        note = f"gsm8k: {info['examples']} training examples -> {sft_file}{skipped}"
        settings.update(train_file=train_file, train_limit=train_limit, strip_calculator=strip_calculator)
        if prepare_only:
            return note
        tokenizer_files = None
        if train_limit and task_model.tokenizer is None and task_model.init_from is None:
            tokenizer_files = [out / "gsm8k_sft_all.jsonl"]  # the BPE sees all of GSM8K's words, not only the few
            write_sft_file(train_file, tokenizer_files[0], strip_calculator, None, config.skip_bad_lines)
        checkpoint, tokenizer = task_model.load([sft_file], text_mode=False, tokenizer_files=tokenizer_files)
    else:
        checkpoint, tokenizer = task_model.load([], text_mode=False)
    metrics, records = evaluate_gsm8k(checkpoint.model, tokenizer, config, progress=task_model.progress)
    generations = out / "gsm8k_generations.jsonl"
    write_jsonl(generations, records)
    write_results(out / "gsm8k.json", "gsm8k", metrics, settings, checkpoint,
                  extra={"generations_file": str(generations)})
    return format_table(["mode", "n", "correct", "accuracy %", "no answer", "skipped (too long)",
                         "skipped (bad lines)"],
                        [(metrics["mode"], metrics["n"], metrics["correct"], 100 * metrics["accuracy"],
                          metrics["no_answer"], metrics["skipped_too_long"], metrics["skipped_bad_lines"])])
