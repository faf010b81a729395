"""Perplexity over time (the paper's temporal-shift study): how well models trained on older text score newer text.

Each corpus (e.g. one decade of addresses) is tokenized, cut into fixed-length blocks and scored per token by every
model: an MDM by its Monte-Carlo bound (exact-count estimator), an ARM exactly, so the two are read side by side.
"""

from __future__ import annotations

import glob
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from smdm.checkpoint import Checkpoint
from smdm.data.prepare import read_documents
from smdm.errors import SmdmError
from smdm.likelihood import arm_score, mc_score
from smdm.tokenizer import Tokenizer


@dataclass
class CorpusScore:
    """One model on one corpus: nats per token (an upper bound for an MDM) and its standard error."""

    model: str
    corpus: str
    nats_per_token: float
    stderr: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)


def parse_corpus_spec(spec: str) -> tuple[str, list[Path]]:
    """'LABEL=GLOB' -> (label, sorted files); the label names a point in time, e.g. '1900s'."""
    label, sep, pattern = spec.partition("=")
    if not sep or not label or not pattern:
        raise SmdmError(f"corpus {spec!r}: expected LABEL=GLOB, e.g. 1900s='sotu/19[0]*.txt'")
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise SmdmError(f"corpus {label}: no files match {pattern!r}")
    return label, files


def corpus_blocks(tokenizer: Tokenizer, files: list[Path], seq_len: int, max_blocks: int) -> list[list[int]]:
    """Documents joined with EOS, cut into at most max_blocks blocks of seq_len tokens (spread over the corpus)."""
    stream: list[int] = []
    for document in read_documents(files):
        stream.extend(tokenizer.encode(document))
        stream.append(tokenizer.eos_id)
    blocks = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not blocks:
        raise SmdmError(f"{files[0]}...: fewer than {seq_len} tokens to score")
    stride = max(1, len(blocks) // max_blocks)
    return blocks[::stride][:max_blocks]


def score_corpus(name: str, checkpoint: Checkpoint, label: str, blocks: list[list[int]], eos_id: int,
                 mc_samples: int = 64, seed: int = 0) -> CorpusScore:
    """Per-token NLL of a corpus' blocks under one model; the ARM conditions each block on a leading EOS."""
    total, variance, tokens = 0.0, 0.0, 0
    for index, block in enumerate(blocks):
        if checkpoint.model.causal:
            result = arm_score(checkpoint.model, [eos_id], block)
        else:
            result = mc_score(checkpoint.model, [], block, mc_samples=mc_samples, seed=seed + index)
        total += result.nll
        variance += result.stderr ** 2
        tokens += len(block)
    return CorpusScore(name, label, total / tokens, math.sqrt(variance) / tokens, tokens)


def temporal_study(checkpoints: dict[str, Checkpoint], tokenizer: Tokenizer, corpora: dict[str, list[Path]],
                   seq_len: int = 128, max_blocks: int = 32, mc_samples: int = 64,
                   progress: bool = True) -> list[CorpusScore]:
    """Score every corpus with every model."""
    rows = []
    for label, files in tqdm(corpora.items(), desc="corpora", unit="corpus", disable=not progress):
        blocks = corpus_blocks(tokenizer, files, seq_len, max_blocks)
        for name, checkpoint in checkpoints.items():
            rows.append(score_corpus(name, checkpoint, label, blocks, tokenizer.eos_id, mc_samples))
    return rows


def write_report(rows: list[CorpusScore], out_dir: Path, title: str = "Perplexity over time") -> list[Path]:
    """temporal.json, temporal.md (a table) and, when matplotlib is installed, temporal.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "temporal.json", out_dir / "temporal.md"]
    written[0].write_text(json.dumps([asdict(r) | {"perplexity": r.perplexity} for r in rows], indent=2))
    models = list(dict.fromkeys(r.model for r in rows))
    corpora = list(dict.fromkeys(r.corpus for r in rows))
    by_key = {(r.model, r.corpus): r for r in rows}
    lines = ["| corpus | " + " | ".join(f"{m} nats/token" for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    for corpus in corpora:
        cells = []
        for model in models:
            r = by_key[(model, corpus)]
            cells.append(f"{r.nats_per_token:.3f} ± {r.stderr:.3f}" if r.stderr else f"{r.nats_per_token:.3f}")
        lines.append(f"| {corpus} | " + " | ".join(cells) + " |")
    written[1].write_text("\n".join(lines) + "\n")
    from smdm.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return written
    figure, axis = plt.subplots(figsize=(7, 4))
    for model in models:
        values = [by_key[(model, c)] for c in corpora]
        axis.errorbar(range(len(corpora)), [v.nats_per_token for v in values],
                      yerr=[2 * v.stderr for v in values], marker="o", capsize=3, label=model)
    axis.set_xticks(range(len(corpora)), corpora, rotation=45)
    axis.set_ylabel("nats / token (MDM: upper bound)")
    axis.set_title(title)
    axis.legend()
    return [*written, save_figure(figure, out_dir / "temporal.png")]


def load_checkpoints(paths: list[str], tokenizer_path: str | None, device: str,
                     dtype: str | None = None) -> tuple[dict[str, Checkpoint], Tokenizer]:
    """Every model of a comparison, named "OBJECTIVE dir"; they must share one tokenizer, or scores would not compare."""
    from smdm.checkpoint import load_for_inference

    checkpoints, tokenizer = {}, None
    for path in paths:
        checkpoint, its_tokenizer = load_for_inference(path, tokenizer_path, device, dtype)
        if tokenizer is not None and its_tokenizer.fingerprint != tokenizer.fingerprint:
            raise SmdmError(f"{path} uses another tokenizer than {paths[0]}: scores would not compare")
        tokenizer = its_tokenizer
        checkpoints[f"{checkpoint.meta.get('objective', 'model').upper()} {Path(path).name}"] = checkpoint
    return checkpoints, tokenizer
