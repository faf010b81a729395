"""MT-Bench (Zheng et al. 2023) answers: two-turn conversations answered in FastChat's answer-file format.

Turn 1 is the first question in the chat template (`smdm.data.sft.chat_prompt`); turn 2 is asked in the same
conversation after the model's own turn-1 answer, as FastChat does. Scores come from a judge model that FastChat's
`gen_judgment.py` calls with the user's API key (see docs/tasks.md); nothing here talks to an API.

A conversation longer than the context the model has left after the generation is cut from the left (its oldest
tokens dropped) and counted: every question keeps an answer, so the judged set stays the full benchmark.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smdm.checkpoint import Checkpoint
from smdm.data.jsonl import read_records, string_field, write_jsonl
from smdm.data.sft import chat_prompt
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import SamplerSettings, generate, prompt_room
from smdm.tasks.report import check_generation_settings
from smdm.tokenizer import Tokenizer

MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Question:
    question_id: int | str
    category: str
    turns: list[str]
    where: str


def parse_question(obj: dict, where: str) -> Question:
    if "question_id" not in obj:
        raise SmdmError(f"{where}: missing field 'question_id'")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise SmdmError(f"{where}: field 'question_id' must be an integer or a string")
    category = string_field(obj, "category", where)
    if "turns" not in obj:
        raise SmdmError(f"{where}: missing field 'turns'")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise SmdmError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
    return Question(qid, category, turns, where)


def read_questions(path: str | Path, limit: int | None = None,
                   skip_bad_lines: bool = False) -> tuple[list[Question], list[str]]:
    """FastChat's question.jsonl ({question_id, category, turns}); bad lines fail with file:line or are skipped."""
    questions, problems = read_records(path, parse_question, skip_bad_lines, limit)
    seen: set = set()
    for q in questions:
        if q.question_id in seen:
            raise SmdmError(f"{q.where}: duplicate question_id {q.question_id!r}")
        seen.add(q.question_id)
    return questions, problems


@dataclass
class MTBenchConfig:
    """Generation settings of the answers; recorded with the results."""

    questions_file: str
    model_id: str
    length: int = 256  # tokens generated per turn
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    batch_size: int = 8
    limit: int | None = None  # questions answered (the first ones of the file)
    skip_bad_lines: bool = False
    seed: int = 0


def check_settings(model: Transformer, config: MTBenchConfig, eos_id: int) -> None:
    """Every bad setting fails before the first answer is generated."""
    if not MODEL_ID.fullmatch(config.model_id):
        raise SmdmError(f"model id {config.model_id!r} names the answer file: use letters, digits, '.', '_', '-'")
    check_generation_settings(model, config.batch_size, config.limit, config.sampler)
    if config.length >= model.config.block_size:
        raise SmdmError(f"--length {config.length} leaves no room for the question in the context length "
                        f"{model.config.block_size}")
    config.sampler.plan(model, config.length, eos_id)


def conversation(question: Question, answers: Sequence[str], turn: int, tokenizer: Tokenizer | None = None) -> str:
    """The prompt of turn `turn` (0-based): earlier questions with the model's answers, then this question (in the
    tokenizer's own chat template when it has one)."""
    return chat_prompt([(question.turns[k], answers[k]) for k in range(turn)] + [(question.turns[turn], None)],
                       tokenizer)


def answer_id(model_id: str, question_id: int | str, turns: Sequence[str]) -> str:
    """A stable id of an answer (same model, question and text -> same id), 22 characters like FastChat's."""
    digest = hashlib.sha256(json.dumps([model_id, question_id, list(turns)]).encode("utf-8")).hexdigest()
    return digest[:22]


@torch.no_grad()
def generate_answers(model: Transformer, tokenizer: Tokenizer, config: MTBenchConfig,
                     progress: bool = True) -> tuple[list[dict], dict, list[Question]]:
    """FastChat answer records (one per question, every turn answered), statistics, and the questions."""
    check_settings(model, config, tokenizer.eos_id)
    questions, bad_lines = read_questions(config.questions_file, config.limit, config.skip_bad_lines)
    room = prompt_room(model, config.length)
    answers: list[list[str]] = [[] for _ in questions]
    tokens: list[list[int]] = [[] for _ in questions]
    truncated = 0
    generator = torch.Generator().manual_seed(config.seed)
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompts = []
        for i in active:
            ids = tokenizer.encode(conversation(questions[i], answers[i], turn, tokenizer))
            if len(ids) > room:
                ids, truncated = ids[len(ids) - room:], truncated + 1
            prompts.append(ids)
        for first in tqdm(range(0, len(active), config.batch_size), desc=f"mt-bench turn {turn + 1}",
                          disable=not progress):
            result = generate(model, prompts[first:first + config.batch_size], config.length,
                              generator=generator, eos_id=tokenizer.eos_id,
                              settings=replace(config.sampler, stop_at_eos=True))
            for i, ids in zip(active[first:first + config.batch_size], result.completions):
                answers[i].append(tokenizer.decode(ids).strip())
                tokens[i].append(len(ids))
    records = [{"question_id": q.question_id, "answer_id": answer_id(config.model_id, q.question_id, a),
                "model_id": config.model_id, "choices": [{"index": 0, "turns": a}], "tstamp": time.time()}
               for q, a in zip(questions, answers)]
    counts = [n for per_question in tokens for n in per_question]
    stats = {"questions": len(questions), "turns": len(counts), "truncated_prompts": truncated,
             "empty_answers": sum(not t for a in answers for t in a),
             "mean_answer_tokens": sum(counts) / len(counts), "skipped_bad_lines": len(bad_lines),
             "by_category": _by_category(questions, tokens)}
    return records, stats, questions


def _by_category(questions: Sequence[Question], tokens: Sequence[Sequence[int]]) -> dict[str, dict]:
    """Questions and mean answer tokens per turn for each category, in first-seen order."""
    table: dict[str, dict] = {}
    for q, counts in zip(questions, tokens):
        row = table.setdefault(q.category, {"questions": 0, "tokens": {}})
        row["questions"] += 1
        for turn, n in enumerate(counts, start=1):
            row["tokens"].setdefault(turn, []).append(n)
    return {c: {"questions": r["questions"],
                **{f"mean_tokens_turn{t}": sum(v) / len(v) for t, v in sorted(r["tokens"].items())}}
            for c, r in table.items()}


def write_answer_file(path: str | Path, records: Sequence[dict]) -> Path:
    """FastChat's `model_answer/{model_id}.jsonl`: one JSON object per line, written atomically."""
    return write_jsonl(path, records)


def settings_of(config: MTBenchConfig) -> dict:
    return asdict(config)


def run_mtbench(checkpoint: Checkpoint, tokenizer: Tokenizer, config: MTBenchConfig, out: Path,
                progress: bool = True) -> str:
    """`smdm task mtbench`: answer every question, write FastChat's answer file and OUT/mtbench.json; returns the
    per-category table."""
    import sys

    from smdm.tasks.report import format_table, write_results

    records, stats, _ = generate_answers(checkpoint.model, tokenizer, config, progress=progress)
    answer_file = write_answer_file(out / "model_answer" / f"{config.model_id}.jsonl", records)
    by_category = stats.pop("by_category")
    write_results(out / "mtbench.json", "mtbench", stats, settings_of(config), checkpoint,
                  extra={"answer_file": str(answer_file), "by_category": by_category})
    turns = sorted({k for row in by_category.values() for k in row if k.startswith("mean_tokens_turn")})
    rows = [(category, row["questions"], *(row.get(k, "") for k in turns)) for category, row in by_category.items()]
    print(f"{stats['questions']} answers ({stats['truncated_prompts']} prompts cut from the left, "
          f"{stats['empty_answers']} empty turns) -> {answer_file}", file=sys.stderr)
    return format_table(["category", "questions", *(k.replace("mean_tokens_", "tokens ") for k in turns)], rows)
