"""The reversal curse (Berglund et al. 2023) as the paper tests it: learn "A is B", then ask for A given B.

Training texts state each fictitious person's fact in one direction only (name → description for the p2d group,
description → name for d2p). The four test files ask in the trained direction (`p2d`, `d2p`) and reversed
(`p2d_reverse`, `d2p_reverse`). A hit is the reference contained in the generation (case-insensitive); for
answers that are descriptions BLEU is also reported, since a long description is rarely reproduced verbatim.
An ARM only ever predicts left to right, so it scores ~0% reversed; an MDM is trained to fill any masked span.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from smdm.checkpoint import Checkpoint
from smdm.data.jsonl import read_records, string_field
from smdm.errors import SmdmError
from smdm.model import Transformer
from smdm.sample import SamplerSettings, generate
from smdm.tasks.report import check_generation_settings
from smdm.tokenizer import Tokenizer

TRAIN_FILE = "all_prompts_train.jsonl"
# test file -> (question asked, answer kind, trained direction for these people?)
SPLITS = {
    "p2d": ("name → description", "description", "same"),
    "d2p": ("description → name", "name", "same"),
    "p2d_reverse": ("description → name", "name", "reverse"),
    "d2p_reverse": ("name → description", "description", "reverse"),
}


def split_file(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}_prompts_test.jsonl"


def contains(reference: str, generation: str) -> bool:
    """The paper's accuracy: the reference answer appears in the generated text, ignoring case and outer spaces."""
    reference = reference.strip().lower()
    return bool(reference) and reference in generation.lower()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU-4 in [0, 100] (Papineni et al. 2002): clipped n-gram precisions, geometric mean, brevity penalty.

    Words and punctuation are separate tokens; no smoothing, so a corpus without any matching 4-gram scores 0.
    """
    if len(references) != len(hypotheses):
        raise SmdmError(f"BLEU needs as many references ({len(references)}) as hypotheses ({len(hypotheses)})")
    matches, totals = [0] * max_order, [0] * max_order
    ref_len = hyp_len = 0
    for reference, hypothesis in zip(references, hypotheses):
        ref, hyp = _words(reference), _words(hypothesis)
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for n in range(1, max_order + 1):
            ref_counts = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            hyp_counts = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


@dataclass
class ReversalConfig:
    """Generation settings of the evaluation; recorded with the results."""

    data_dir: str
    length: int | None = None  # tokens generated; default: the longest reference of the file + 4
    sampler: SamplerSettings = field(default_factory=SamplerSettings)  # MDM blocks: the length rounds up to a multiple of block_length
    batch_size: int = 64
    limit: int | None = None  # questions per file, spread evenly over it
    rank: int | None = None  # name answers: also rank all the file's names by likelihood for this many questions


def read_split(data_dir: str | Path, split: str) -> list[tuple[str, str]]:
    rows, _ = read_records(split_file(data_dir, split),
                           lambda obj, where: (string_field(obj, "prompt", where), string_field(obj, "completion", where)))
    return rows


def spread(rows: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """At most `limit` rows evenly spaced over the file: its questions come grouped by person."""
    if limit and limit < len(rows):
        return rows[::math.ceil(len(rows) / limit)][:limit]
    return rows


@torch.no_grad()
def answer(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], config: ReversalConfig,
           length: int) -> list[str]:
    """Greedy answers (low-confidence remasking for an MDM, KV-cache decoding for an ARM), cut at EOS."""
    answers: list[str] = []
    for first in range(0, len(prompts), config.batch_size):
        encoded = [tokenizer.encode(p) for p in prompts[first:first + config.batch_size]]
        result = generate(model, encoded, length, eos_id=tokenizer.eos_id, settings=config.sampler)
        answers += [tokenizer.decode(ids) for ids in result.completions]
    return answers


@torch.no_grad()
def rank_accuracy(model: Transformer, tokenizer: Tokenizer, rows: Sequence[tuple[str, str]],
                  candidates: Sequence[str]) -> float:
    """Fraction of questions whose reference is the most likely of the candidates (all the file's distinct answers).

    Each candidate is scored as the continuation `answer + EOS` of the question (exactly for an ARM, by the
    left-to-right chain rule for an MDM), so a model that knows the fact but cannot yet spell it out still
    counts, and chance is 1 / len(candidates).
    """
    from smdm.likelihood import score

    encoded = {c: tokenizer.encode(c) + [tokenizer.eos_id] for c in candidates}
    hits = 0
    for prompt, reference in rows:
        prefix = tokenizer.encode(prompt)
        nll = {c: score(model, prefix, ids, method="chain", batch_size=64).nll for c, ids in encoded.items()}
        hits += min(nll, key=nll.get) == reference
    return hits / len(rows)


def evaluate_reversal(model: Transformer, tokenizer: Tokenizer, config: ReversalConfig,
                      progress: bool = True) -> dict[str, dict]:
    """Accuracy (and BLEU for description answers) on each of the four test files, with a few examples."""
    check_generation_settings(model, config.batch_size, config.limit, config.sampler)
    results: dict[str, dict] = {}
    for split in tqdm(SPLITS, desc="reversal", disable=not progress):
        question, kind, direction = SPLITS[split]
        all_rows = read_split(config.data_dir, split)
        rows = spread(all_rows, config.limit)
        length = config.length or max(len(tokenizer.encode(c)) for _, c in rows) + 4
        if config.sampler.block_length and not model.causal:
            length = math.ceil(length / config.sampler.block_length) * config.sampler.block_length
        generations = answer(model, tokenizer, [p for p, _ in rows], config, length)
        hits = [contains(c, g) for (_, c), g in zip(rows, generations)]
        result = {"question": question, "direction": direction, "answer": kind, "n": len(rows),
                  "accuracy": sum(hits) / len(rows), "length": length}
        if kind == "description":
            result["bleu"] = corpus_bleu([c for _, c in rows], generations)
        if config.rank and kind == "name":  # 30 names; descriptions come in many paraphrases, so no clean ranking
            candidates = sorted({c for _, c in all_rows})
            ranked = spread(all_rows, config.rank)
            result["rank_accuracy"] = rank_accuracy(model, tokenizer, ranked, candidates)
            result["rank_n"], result["rank_chance"] = len(ranked), 1 / len(candidates)
        result["examples"] = [{"prompt": p, "reference": c, "generation": g}
                              for (p, c), g in list(zip(rows, generations))[:3]]
        results[split] = result
    return results


def settings_of(config: ReversalConfig) -> dict:
    return asdict(config)


def check_data_dir(data_dir: str | Path) -> None:
    """Every file the task reads, before any training."""
    for split in SPLITS:
        if not split_file(data_dir, split).is_file():
            raise SmdmError(f"{split_file(data_dir, split)}: no such file; --data-dir must hold the reversal-curse data")


def report(results: dict[str, dict], config: ReversalConfig, checkpoint: Checkpoint, out: Path) -> str:
    """Write OUT/reversal.json (metrics, settings, examples) and return the table to print."""
    from smdm.tasks.report import format_table, write_results

    metrics = {split: {k: v for k, v in r.items() if k != "examples"} for split, r in results.items()}
    write_results(out / "reversal.json", "reversal", metrics, settings_of(config), checkpoint,
                  extra={"examples": {split: r["examples"] for split, r in results.items()}})
    rows = [(split, r["question"], r["direction"], r["n"], 100 * r["accuracy"], r.get("bleu", ""))
            + ((100 * r["rank_accuracy"], 100 * r["rank_chance"]) if "rank_accuracy" in r
               else ("", "") if config.rank else ())
            for split, r in results.items()]
    header = ["file", "question", "direction", "n", "accuracy %", "BLEU"]
    return format_table(header + (["rank accuracy %", "chance %"] if config.rank else []), rows)
