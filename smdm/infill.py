"""Infilling, the thing only an MDM can do: `infill` fills [MASK] positions anywhere in a canvas (a prefix, a
suffix, any number of spans between given text) with every sampler option, and `<|mask:N|>` markers write such a
canvas as text (N hidden tokens for the MDM to fill).

Why the markers cannot be confused with real text: they are parsed out of the string *before* tokenization, and
only where a command asks for infilling (`smdm sample --infill`); the text between them is tokenized on its own,
so a marker never becomes tokens and the [MASK] id (one past the vocabulary) is never produced by the tokenizer.
Anything that starts like a marker but is not a well-formed one (`<|mask`, `<|mask:x|>`, `<|mask:0|>`) is an
error, not text, so a typo cannot silently pass as text. To write the characters `<|mask` literally, escape the
bar: `<\\|mask` stands for the text `<|mask`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smdm.errors import SmdmError
from smdm.model import Transformer, WindowCache
from smdm.sample import (
    SCHEDULE_EPS,
    DenoiserInputs,
    Plan,
    Remasking,
    StepCallback,
    block_logits,
    make_plan,
    reveal_low_confidence,
    sample_tokens,
    smdm_tokens_to_reveal,
    tokens_to_reveal,
    uniform_draws,
)

MARKER = re.compile(r"<\|mask:(\d+)\|>")
OPENING = "<|mask"
ESCAPED = "<\\|mask"


@dataclass(frozen=True)
class Canvas:
    """Token ids with [MASK] at the hidden positions, and how to cut the filled sequence back into text."""

    ids: list[int]
    segments: list[list[int] | int]  # given ids, or the number of hidden tokens of a span, in reading order

    @property
    def span_lengths(self) -> list[int]:
        return [s for s in self.segments if isinstance(s, int)]


def parse(text: str) -> list[str | int]:
    """Text with markers -> segments: strings of given text and ints (hidden tokens per span), in reading order."""
    segments: list[str | int] = []
    position = 0
    for match in MARKER.finditer(text):
        segments.append(text[position:match.start()])
        count = int(match.group(1))
        if count < 1:
            raise SmdmError(f"infill marker {match.group(0)!r} hides no tokens; use <|mask:N|> with N >= 1")
        segments.append(count)
        position = match.end()
    segments.append(text[position:])
    given = [s for s in segments if isinstance(s, str)]
    for piece in given:
        if OPENING in piece:
            column = piece.index(OPENING)
            raise SmdmError(f"malformed infill marker near {piece[column:column + 16]!r}; write <|mask:N|> "
                            f"(N hidden tokens), or <\\|mask for the literal text")
    if not any(isinstance(s, int) for s in segments):
        raise SmdmError("the infill text has no <|mask:N|> marker; mark the spans to fill, e.g. 'a <|mask:8|> b'")
    return [s.replace(ESCAPED, OPENING) if isinstance(s, str) else s for s in segments if s != ""]


def encode(segments: Sequence[str | int], encode_text, mask_id: int, bos: list[int] | None = None) -> Canvas:
    """Segments -> a Canvas; encode_text(str) -> ids (each piece of given text is tokenized on its own)."""
    pieces: list[list[int] | int] = [list(bos)] if bos else []
    for segment in segments:
        pieces.append(segment if isinstance(segment, int) else list(encode_text(segment)))
    ids: list[int] = []
    for piece in pieces:
        ids.extend([mask_id] * piece if isinstance(piece, int) else piece)
    return Canvas(ids, pieces)


def spans(canvas: Canvas, fills: Sequence[int]) -> list[list[int]]:
    """Cut the ids filled in reading order (`Infill.fills`) into one list per span."""
    out, used = [], 0
    for length in canvas.span_lengths:
        out.append(list(fills[used:used + length]))
        used += length
    return out


def join(canvas: Canvas, fills: Sequence[int]) -> list[int]:
    """The whole sequence: given ids with each span's filled ids in place."""
    filled = iter(spans(canvas, fills))
    ids: list[int] = []
    for piece in canvas.segments:
        ids.extend(next(filled) if isinstance(piece, int) else piece)
    return ids


def fill_text(model, tokenizer, text: str, *, bos: bool = False, generator=None, on_step=None,
              **sampler) -> dict:
    """Fill the marked spans of `text` with an MDM: {"text": the whole, "spans": each span's text, ...}.

    sampler: the options of `smdm.sample.infill` (steps, temperature, block_length, cfg_scale, cache, ...).
    """
    if model.causal:
        raise SmdmError("--infill needs an MDM (it fills masked spans from both sides); this checkpoint is an ARM, "
                        "which only continues text left to right")
    segments = parse(text)
    canvas = encode(segments, tokenizer.encode, model.mask_id,
                    [tokenizer.bos_id] if bos and tokenizer.bos_id is not None else None)
    result = infill(model, [canvas.ids], generator=generator, on_step=on_step, eos_id=tokenizer.eos_id, **sampler)
    fills = result.fills[0]
    return {"infill": text, "text": tokenizer.decode(join(canvas, fills)),
            "spans": [tokenizer.decode(ids) for ids in spans(canvas, fills)],
            "tokens": len(fills), "forward_passes": result.forward_passes}


# --- Infilling: [MASK] positions anywhere in the canvas --------------------------------------------------------------
# An MDM predicts every masked position from both sides, so the masked positions need not follow the prompt: a prefix,
# a suffix and any number of masked spans between given text are filled by the same reverse process. Blocks run over
# the masked positions in reading order (block k of a row = its masked positions of rank kL..(k+1)L-1), so a plain
# canvas (prompt, then `length` masks) gives exactly what `generate` gives. Rows may differ in mask counts, steps and
# block lengths (the server batches requests of different max_tokens this way): a row finished with its blocks or
# steps simply has nothing left to reveal while the others continue.


@dataclass
class Infill:
    """What `infill` returns: the filled canvases and, per row, the filled ids in reading order."""

    tokens: torch.Tensor  # (B, width): canvases left-padded to the longest one, [MASK] positions filled
    canvas_lengths: list[int]
    fills: list[list[int]]  # the ids written into each row's masked positions, left to right
    forward_passes: int
    width: int


def _per_row(value: int | Sequence[int] | None, rows: int, name: str) -> list[int | None]:
    """One setting for every row, or one per row (the server batches requests with different settings)."""
    if value is None or isinstance(value, int):
        return [value] * rows
    values = list(value)
    if len(values) != rows:
        raise SmdmError(f"{name}: {len(values)} values for {rows} canvases")
    return values


class _CanvasInputs(DenoiserInputs):
    """The model batch of an infilling sampler: pads hidden on both sides, per-row positions, given text for CFG."""

    def __init__(self, canvas: torch.Tensor, real: torch.Tensor, fill: torch.Tensor, mask_id: int,
                 guided: bool) -> None:
        copies = 2 if guided else 1
        self.padded = not bool(real.all())
        self.key_mask = real.repeat(copies, 1) if self.padded else None
        self.positions = (real.long().cumsum(1) - 1).clamp_min(0).repeat(copies, 1)
        self.prompt_mask = real & ~fill  # CFG's unconditional row hides every given token, on both sides
        self.mask_id = mask_id
        self.guided = guided


def _infill_step(logits: torch.Tensor, block: torch.Tensor, current: torch.Tensor, mask_id: int, plan: Plan,
                 steps_left: torch.Tensor, generator: torch.Generator | None, step: int = 0) -> torch.Tensor:
    """One denoising step over the window, revealing only positions of the current block (`current`).

    The same draws and choices as `_denoise_step`, with each row's own number of steps left.
    """
    masked = current & (block == mask_id)
    if plan.remasking == "random":
        draw = uniform_draws(masked.shape, generator, masked.device)
        reveal = masked & (draw < 1.0 / steps_left[:, None])
        return block.masked_scatter(reveal, sample_tokens(logits[reveal], plan.temperature, plan.top_p, generator))
    candidates = logits[masked]
    predicted = sample_tokens(candidates, plan.temperature, plan.top_p, generator)
    chosen = candidates.float().gather(-1, predicted[:, None]).squeeze(-1)
    confidence = torch.full(block.shape, -float("inf"), device=block.device)
    confidence[masked] = (chosen - candidates.float().logsumexp(-1)).exp()
    if plan.schedule in SCHEDULE_EPS:  # each row on its own number of steps per block
        count = torch.stack([smdm_tokens_to_reveal(n[None], int(total - left), int(total),
                                                   SCHEDULE_EPS[plan.schedule])[0]
                             for n, left, total in zip(masked.sum(-1), steps_left, steps_left + step)])
    else:
        count = tokens_to_reveal(masked.sum(-1), steps_left)
    reveal = reveal_low_confidence(confidence, masked, count, plan.threshold)
    return torch.where(reveal, block.masked_scatter(masked, predicted), block)


@torch.no_grad()
def infill(model: Transformer, canvases: Sequence[Sequence[int]], steps: int | Sequence[int] | None = None,
           temperature: float = 0.0, generator: torch.Generator | None = None,
           on_step: StepCallback | None = None, *, remasking: Remasking = "low_confidence",
           block_length: int | Sequence[int] | None = None, cfg_scale: float | None = None,
           threshold: float | None = None, cache: str | None = None, top_p: float = 1.0,
           eos_id: int | None = None, stop_at_eos: bool = False, schedule: str = "even") -> Infill:
    """Fill the [MASK] (model.mask_id) positions of each canvas; given tokens are never changed.

    Every option of `generate` applies, over each row's masked positions: `steps` (default: one per masked token)
    and `block_length` (default: all of them) per row or one for all; CFG hides all given text in the
    unconditional row; caches record the columns outside the current block's span. `stop_at_eos` ends a row whose
    masks all trail its given text once a finished block holds an EOS (filled with EOS after it, as `generate`
    does). on_step(step, tokens) sees the (B, width) grid after every step.
    """
    if model.causal:
        raise SmdmError("infilling needs an MDM (it predicts masked positions from both sides); "
                        "this checkpoint is an ARM, which only continues text left to right")
    if getattr(model, "diffusion_block_size", None):
        raise SmdmError("infilling needs an MDM (it predicts masked positions from both sides); this checkpoint is "
                        "block diffusion, which generates blocks left to right")
    rows = [[int(i) for i in canvas] for canvas in canvases]
    if not rows:
        raise SmdmError("no canvases given")
    mask_id, vocab = model.mask_id, model.config.vocab_size
    counts = []
    for row in rows:
        if any(not (0 <= i < vocab or i == mask_id) for i in row):
            raise SmdmError(f"canvas ids must lie in [0, {vocab}) or be the [MASK] id {mask_id}")
        counts.append(row.count(mask_id))
        if counts[-1] == 0:
            raise SmdmError("a canvas has no [MASK] positions to fill")
        if len(row) > model.config.block_size:
            raise SmdmError(f"a canvas of {len(row)} tokens exceeds the context length {model.config.block_size}")
    row_steps = _per_row(steps, len(rows), "steps")
    row_blocks = _per_row(block_length, len(rows), "block_length")
    plans = [make_plan(model, n, s, temperature, remasking=remasking, block_length=b, cfg_scale=cfg_scale,
                       threshold=threshold, cache=cache, top_p=top_p, eos_id=eos_id, stop_at_eos=stop_at_eos,
                       schedule=schedule)
             for n, s, b in zip(counts, row_steps, row_blocks)]
    plan = plans[0]
    device = model.lm_head.weight.device
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), eos_id if eos_id is not None else 0, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        x[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        real[b, width - len(row):] = True
    x, real = x.to(device), real.to(device)
    fill = x == mask_id
    fill &= real
    inputs = _CanvasInputs(x, real, fill, mask_id, cfg_scale is not None)
    rank = fill.long().cumsum(1) - 1  # a masked position's place among its row's masked positions
    block_of = torch.where(fill, rank // torch.tensor([p.block_length for p in plans], device=device)[:, None], -1)
    steps_per_block = torch.tensor([p.steps_per_block for p in plans], device=device)
    trailing = [row.index(mask_id) + counts[i] == len(row) for i, row in enumerate(rows)]  # masks end the canvas
    passes = step_index = 0
    for k in range(max(p.num_blocks for p in plans)):
        current = block_of == k
        columns = current.any(0).nonzero().flatten()
        if columns.numel() == 0:
            continue
        start, end = int(columns[0]), int(columns[-1]) + 1
        window = None
        if plan.cache != "none":
            window = WindowCache(model.config.n_layer, start, end if plan.cache == "dual" else None)
        here = current[:, start:end]
        for step in range(int(steps_per_block.max())):
            if not (here & (x[:, start:end] == mask_id)).any():
                break  # threshold decoding (or every row's schedule) finished the block early
            logits = block_logits(model, x, inputs, plan, window, start, end)
            passes += 1
            steps_left = (steps_per_block - step).clamp_min(1)
            x[:, start:end] = _infill_step(logits, x[:, start:end], here, mask_id, plan, steps_left, generator, step)
            if on_step is not None:
                on_step(step_index, x)
            step_index += 1
        if stop_at_eos:
            for b in range(len(rows)):
                done = fill[b] & (block_of[b] <= k)
                if trailing[b] and (x[b][done] == eos_id).any():
                    x[b][fill[b] & (x[b] == mask_id)] = eos_id  # nothing after this EOS can reach the completion
            if not (fill & (x == mask_id)).any():
                break
    fills = [x[b][fill[b]].tolist() for b in range(len(rows))]
    return Infill(x, [len(r) for r in rows], fills, passes, width)
