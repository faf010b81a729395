"""Span markers for infilling text: `<|mask:N|>` stands for N hidden tokens for an MDM to fill.

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

from smdm.errors import SmdmError

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
    from smdm.sample import infill

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
