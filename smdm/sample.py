"""Generation for both families through one entry, `generate(model, prompt_ids, length, ...)`.

MDM (Nie et al. 2025; LLaDA; Fast-dLLM), `length` [MASK] tokens after the prompt filled in `steps` steps:
- remasking `"low_confidence"`: reveal the k most confident predictions, k on an even schedule (all revealed at the
  end); `"random"`: the reverse process itself, each masked token revealed with probability 1 - s/t from t to s;
- semi-autoregressive blocks (`block_length`): blocks left to right, `steps` split evenly across them (LLaDA);
- temperature through Gumbel-max in float64, and top-p;
- unsupervised classifier-free guidance (`cfg_scale` w): logits = uncond + (w + 1)(cond - uncond), the
  unconditional input being the same sequence with the prompt replaced by [MASK]; both rows in one forward pass;
- confidence-threshold parallel decoding (`threshold`): also reveal every masked token of the block whose
  confidence exceeds it, so a block often needs far fewer steps than scheduled (Fast-dLLM);
- `cache="prefix"`: keys/values of the prompt and finished blocks, recorded once per block and reused by that block's
  later steps; `cache="dual"`: also those of the still-masked blocks after it (Fast-dLLM). Exact for one-layer models
  and for blocks decoded in one step; otherwise an approximation (deeper keys of a bidirectional model depend on the
  block being decoded). `cache="none"` (default) recomputes everything.
ARM: greedy, temperature and top-p with a KV cache (`cache="kv"`, default) or full recompute (`cache="none"`).
Both: text after the first EOS is dropped from the completions; `stop_at_eos` ends generation once every row has
an EOS in its final tokens (finished blocks, or emitted tokens), which never changes the completions.
Batches of prompts of different lengths are left-padded: pads are hidden from attention and each row has its own
positions, so a row of a batch yields the tokens it yields alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from smdm.diffusion import check_shifted_context
from smdm.errors import ContextLengthError, SmdmError
from smdm.model import Transformer, WindowCache
from smdm.sampler_settings import (  # noqa: F401 -- the settings type and its constants, re-exported
    ARM_CACHES,
    MDM_CACHES,
    REMASKINGS,
    SCHEDULE_EPS,
    SCHEDULES,
    SMDM_SCHEDULE_EPS,
    SamplerSettings,
    add_sampler_args,
)

if TYPE_CHECKING:
    from smdm.tokenizer import Tokenizer

Remasking = Literal["low_confidence", "random"]
StepCallback = Callable[[int, torch.Tensor], None]
PromptIds = torch.Tensor | Sequence[int] | Sequence[Sequence[int] | torch.Tensor]


@dataclass
class Generation:
    """What `generate` returns: the raw token grid and the per-prompt completions."""

    tokens: torch.Tensor  # (B, width + length): prompts left-padded to `width`, then every generated token
    prompt_lengths: list[int]
    completions: list[list[int]]  # generated ids of each row, cut before the first EOS when eos_id is known
    forward_passes: int  # model calls; a CFG pass (conditional and unconditional rows together) counts once
    width: int  # the column where generation starts: the longest prompt's length


@dataclass(frozen=True)
class Plan:
    """Validated sampler settings: which blocks, how many steps each, and how to pick tokens."""

    length: int
    steps: int
    block_length: int
    remasking: Remasking
    temperature: float
    top_p: float
    cfg_scale: float | None
    threshold: float | None
    cache: str
    eos_id: int | None
    stop_at_eos: bool
    schedule: str = "even"

    @property
    def num_blocks(self) -> int:
        return self.length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def prompt_room(model: Transformer, length: int) -> int:
    """The longest prompt that fits before `length` generated tokens. An ARM never feeds its last token back, so
    it needs one position less than the tokens it holds: the one place this rule is written."""
    return model.config.block_size - length + (1 if model.causal else 0)


def prepare_prompts(model: Transformer, prompts: Sequence[Sequence[int]], eos_id: int | None) -> list[list[int]]:
    """Prompts as a model can take them: an ARM needs a first token, so an empty prompt starts after an EOS (a fresh
    document, as it saw in training), and so does a shifted model (an adapted ARM, Dream), which predicts token i from
    position i-1; an MDM takes empty prompts as they are (unconditional samples)."""
    if (model.causal or getattr(model.config, "shifted", False)) and eos_id is not None:
        return [list(p) or [eos_id] for p in prompts]
    return [list(p) for p in prompts]


@dataclass(frozen=True)
class PromptBatch:
    """Prompts left-padded to one width, so generation starts at the same column in every row."""

    tokens: torch.Tensor  # (B, width)
    lengths: torch.Tensor  # (B,)

    @classmethod
    def left_padded(cls, prompts: list[list[int]], pad_id: int, device: torch.device) -> PromptBatch:
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        return cls(tokens.to(device), torch.tensor([len(p) for p in prompts], device=device))

    @property
    def width(self) -> int:
        return self.tokens.size(1)

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.width).any())

    def pad_columns(self) -> torch.Tensor:
        return self.width - self.lengths

    def key_mask(self, total: int) -> torch.Tensor | None:
        """(B, total) True where a column holds a real token; None without padding (the fast attention path)."""
        if not self.padded:
            return None
        return torch.arange(total, device=self.tokens.device)[None, :] >= self.pad_columns()[:, None]

    def positions(self, total: int) -> torch.Tensor:
        """(B, total) RoPE positions: each row counts from its first real token, as it would alone."""
        columns = torch.arange(total, device=self.tokens.device)[None, :]
        return (columns - self.pad_columns()[:, None]).clamp_min(0)

    def prompt_mask(self, total: int) -> torch.Tensor:
        """(B, total) True at real prompt tokens: what classifier-free guidance replaces by [MASK]."""
        columns = torch.arange(total, device=self.tokens.device)[None, :]
        return (columns >= self.pad_columns()[:, None]) & (columns < self.width)


def uniform_draws(shape: torch.Size, generator: torch.Generator | None, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U(0, 1) draws made on the generator's device, then moved to `device`.

    With the default CPU generator a seed gives the same draws on every device. A generator on the model's GPU skips
    making (B x n x V) float64 numbers on the CPU and copying them at every step: the likely reason why whole-canvas
    low-confidence sampling ran 3x slower than random remasking on an H200 (docs/gpu.md; not yet re-measured).
    """
    made_on = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=dtype, device=made_on).to(device)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max sampling scores in float64: argmax(logits/T + Gumbel) ~ softmax(logits/T).

    Low-precision Gumbel noise measurably hurts sample quality, hence float64.
    """
    if temperature == 0:
        return logits
    uniform = uniform_draws(logits.shape, generator, logits.device, torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return logits.double() / temperature + gumbel


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of tokens holding probability >= top_p set to -inf (nucleus sampling)."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    return logits.masked_fill(drop, -float("inf"))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy at temperature 0; else a draw from softmax(logits / T) restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    return add_gumbel_noise(top_p_filter(logits.double() / temperature, top_p), 1.0, generator).argmax(-1)


def num_transfer_tokens(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to reveal at each step (B, steps): an even split, the remainder going to the first steps."""
    base = num_masked // steps
    remainder = num_masked % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += (torch.arange(steps, device=num_masked.device)[None, :] < remainder[:, None]).long()
    return schedule


def tokens_to_reveal(num_masked: torch.Tensor, steps_left: int) -> torch.Tensor:
    """This step's share of the even schedule, ceil(masked / steps left): equals `num_transfer_tokens` step by
    step, and adapts when threshold decoding revealed more than scheduled."""
    return (num_masked + steps_left - 1) // steps_left


def smdm_tokens_to_reveal(num_masked: torch.Tensor, step: int, steps: int, eps: float = SMDM_SCHEDULE_EPS) -> torch.Tensor:
    """SMDM's diff_sample ("greddy") and Dream's `_sample`: from t to s on timesteps linspace(1, eps, steps + 1)
    (float32, as there), int(n·(1 - s/t)) of the n masked tokens, and all that remain at the last step. With SMDM's
    eps its first step reveals 0 tokens when n <= steps; the last step catches up."""
    if step == steps - 1:
        return num_masked
    times = torch.linspace(1, eps, steps + 1)
    share = 1 - times[step + 1] / times[step]
    return (num_masked.cpu().float() * share).long().to(num_masked.device)


def reveal_low_confidence(confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor,
                          threshold: float | None = None) -> torch.Tensor:
    """(B, n) positions to reveal: each row's `count` most confident masked ones, plus all above `threshold`.

    Ties go to the leftmost position (a stable sort), so the choice is deterministic.
    """
    confidence = confidence.masked_fill(~masked, -float("inf"))
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))
    reveal = (rank < count[:, None]) & masked
    if threshold is not None:
        reveal |= (confidence > threshold) & masked
    return reveal


def reveal_random(masked: torch.Tensor, step: int, steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, n) positions to reveal on the step from t = 1 - step/steps to s = t - 1/steps: each masked one with
    probability (t - s) / t = 1 / (steps - step), the reverse process of the forward masking (last step: all)."""
    draw = uniform_draws(masked.shape, generator, masked.device)
    return masked & (draw < 1.0 / (steps - step))


def truncate_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """Drop everything from the first EOS on: text after a document's end is noise."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a jsonl file (one object per line with a "prompt" string); blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SmdmError(f"{path}: not UTF-8 text (invalid byte at offset {error.start}); re-save it as UTF-8") from None
    except IsADirectoryError:
        raise SmdmError(f"{path}: is a directory, expected a .jsonl file of prompts") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SmdmError(f"{path} line {number}: not JSON; expected one object like {{\"prompt\": \"...\"}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SmdmError(f"{path} line {number}: expected an object with a string field \"prompt\"")
        prompts.append(record["prompt"])
    if not prompts:
        raise SmdmError(f"{path}: no prompts; expected one JSON object per line with a \"prompt\" field")
    return prompts


def _as_prompt_lists(prompt_ids: PromptIds) -> list[list[int]]:
    """One prompt (1-D tensor or list of ints), equal-length rows (2-D tensor), or a list of prompts of any length."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            return [prompt_ids.tolist()]
        if prompt_ids.dim() == 2:
            return prompt_ids.tolist()
        raise SmdmError(f"prompt ids must be 1-D or 2-D, not {prompt_ids.dim()}-D")
    prompts = list(prompt_ids)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]
    if not prompts:
        raise SmdmError("no prompts given (pass [[]] or an empty tensor for one unconditional sample)")
    return [p.tolist() if isinstance(p, torch.Tensor) else [int(i) for i in p] for p in prompts]


def check_prompts(model: Transformer, prompts: list[list[int]], length: int) -> None:
    """Ids inside the vocabulary, and prompt + generation inside the context the model has positions for."""
    vocab = model.config.vocab_size
    for prompt in prompts:
        if any(not 0 <= i < vocab for i in prompt):
            raise SmdmError(f"prompt ids must lie in [0, {vocab}) (the vocabulary, [MASK] excluded)")
    longest = max(len(p) for p in prompts)
    if longest > prompt_room(model, length):
        raise ContextLengthError(f"prompt ({longest}) + generation ({length}) tokens exceed the context length "
                                 f"{model.config.block_size}; shorten the prompt or the length")
    if model.causal and min(len(p) for p in prompts) < 1:
        raise SmdmError("an ARM needs a prompt of at least one token (start unconditional samples with EOS)")
    check_shifted_context(model, min(len(p) for p in prompts), "a prompt of at least one token (e.g. BOS)")


def _mdm_plan(length: int, steps: int | None, block_length: int | None, remasking: str,
              threshold: float | None, cache: str | None) -> tuple[int, int, str]:
    """Steps, block length and cache mode of an MDM sampler, refusing combinations that cannot split evenly."""
    steps = length if steps is None else steps
    block_length = length if block_length is None else block_length
    if steps < 1:
        raise SmdmError(f"steps must be at least 1, got {steps}")
    if steps > length:
        raise SmdmError(f"steps ({steps}) exceed the generation length ({length}); a step reveals at least one token")
    if not 1 <= block_length <= length or length % block_length:
        raise SmdmError(f"block length {block_length} must divide the generation length {length}")
    num_blocks = length // block_length
    if steps % num_blocks:
        raise SmdmError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks} = {length} / "
                        f"{block_length}) so every block gets the same number of steps")
    if remasking not in REMASKINGS:
        raise SmdmError(f"unknown remasking {remasking!r}; use low_confidence or random")
    if threshold is not None and not 0 < threshold <= 1:
        raise SmdmError(f"the confidence threshold must lie in (0, 1], got {threshold}")
    if threshold is not None and remasking != "low_confidence":
        raise SmdmError("threshold decoding ranks tokens by confidence; use remasking low_confidence")
    cache = cache or "none"
    if cache not in MDM_CACHES:
        raise SmdmError(f"unknown MDM cache {cache!r}; use one of {', '.join(MDM_CACHES)}")
    return steps, block_length, cache


def _arm_plan(steps: int | None, block_length: int | None, remasking: str, threshold: float | None,
              cfg_scale: float | None, cache: str | None) -> str:
    """Refuse the MDM-only options on an ARM (it decodes one token per step, left to right)."""
    if cfg_scale is not None:
        raise SmdmError("classifier-free guidance needs an MDM (its unconditional pass masks the prompt); "
                        "this checkpoint is an ARM")
    for name, value, default in (("steps", steps, None), ("block length", block_length, None),
                                 ("threshold", threshold, None), ("remasking", remasking, "low_confidence")):
        if value != default:
            raise SmdmError(f"{name} is an MDM option; an ARM decodes one token per step")
    cache = cache or "kv"
    if cache not in ARM_CACHES:
        raise SmdmError(f"unknown ARM cache {cache!r}; use kv or none")
    return cache


def make_plan(model: Transformer, length: int, steps: int | None = None, temperature: float = 0.0, *,
              remasking: str = "low_confidence", block_length: int | None = None, cfg_scale: float | None = None,
              threshold: float | None = None, cache: str | None = None, top_p: float = 1.0,
              eos_id: int | None = None, stop_at_eos: bool = False, schedule: str = "even") -> Plan:
    """Validate every sampler option at once, so bad input fails before any model call."""
    if schedule not in SCHEDULES:
        raise SmdmError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if getattr(model, "diffusion_block_size", None):  # block diffusion validates its own options
        from smdm.block_diffusion import block_settings

        if schedule != "even":
            raise SmdmError("the smdm reveal schedule is an MDM option; block diffusion uses the even schedule")
        settings = block_settings(model, length, steps, temperature, remasking=remasking, block_length=block_length,
                                  cfg_scale=cfg_scale, threshold=threshold, cache=cache, top_p=top_p, eos_id=eos_id,
                                  stop_at_eos=stop_at_eos)
        return Plan(length, settings.steps, settings.block_size, remasking, temperature, top_p, cfg_scale, threshold,
                    cache or "kv", eos_id, stop_at_eos, schedule)  # type: ignore[arg-type]
    if length < 1:
        raise SmdmError(f"the generation length must be at least 1, got {length}")
    if temperature < 0 or not math.isfinite(temperature):
        raise SmdmError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise SmdmError(f"top_p must lie in (0, 1], got {top_p}")
    if stop_at_eos and eos_id is None:
        raise SmdmError("stop_at_eos needs the EOS id")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise SmdmError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if model.causal:
        if schedule != "even":
            raise SmdmError("the reveal schedule is an MDM option; an ARM decodes one token per step")
        cache = _arm_plan(steps, block_length, remasking, threshold, cfg_scale, cache)
        steps, block_length = length, 1
    else:
        steps, block_length, cache = _mdm_plan(length, steps, block_length, remasking, threshold, cache)
    return Plan(length, steps, block_length, remasking, temperature, top_p, cfg_scale, threshold, cache, eos_id,
                stop_at_eos, schedule)  # type: ignore[arg-type]


def _call(model: Transformer, idx: torch.Tensor, **inputs: torch.Tensor | WindowCache | None) -> torch.Tensor:
    """model(idx, ...) passing only the optional inputs in use, so simple stand-in models work too."""
    return model(idx, **{name: value for name, value in inputs.items() if value is not None})


class DenoiserInputs:
    """The model batch of an MDM sampler: the sequences (and, with CFG, their prompt-masked copies)."""

    def __init__(self, batch: PromptBatch, total: int, mask_id: int, guided: bool) -> None:
        copies = 2 if guided else 1
        key_mask = batch.key_mask(total)
        self.key_mask = None if key_mask is None else key_mask.repeat(copies, 1)
        self.positions = batch.positions(total).repeat(copies, 1)
        self.prompt_mask = batch.prompt_mask(total)
        self.padded = batch.padded
        self.mask_id = mask_id
        self.guided = guided

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x, followed by x with the prompt replaced by [MASK] (the unconditional input) under CFG."""
        if not self.guided:
            return x
        return torch.cat([x, x.masked_fill(self.prompt_mask, self.mask_id)])


def block_logits(model: Transformer, x: torch.Tensor, inputs: DenoiserInputs, plan: Plan,
                  window: WindowCache | None, start: int, end: int) -> torch.Tensor:
    """Logits (B, end - start, V) of the block, guided when cfg_scale is set; reuses the window cache once recorded."""
    rows = inputs.rows(x)
    if window is None or not window.recorded:
        positions = inputs.positions if inputs.padded or window is not None else None
        logits = _call(model, rows, positions=positions, key_mask=inputs.key_mask, window=window)[:, start:end]
    else:
        stop = rows.size(1) if window.end is None else window.end
        logits = _call(model, rows[:, start:stop], positions=inputs.positions[:, start:stop],
                       key_mask=inputs.key_mask, window=window)[:, : end - start]
    if not inputs.guided:
        return logits
    cond, uncond = logits.chunk(2)
    # = uncond + (w + 1)(cond - uncond), written so that w = 0 gives cond exactly.
    return cond + plan.cfg_scale * (cond - uncond)


def _denoise_step(logits: torch.Tensor, block: torch.Tensor, mask_id: int, plan: Plan, step: int,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The block after one step: predictions written into the positions chosen for revealing.

    Tokens are drawn only where they can be revealed (masked positions; for random remasking, the chosen ones):
    the float64 Gumbel noise over the vocabulary costs a third of a small model's forward pass otherwise.
    """
    masked = block == mask_id
    if plan.remasking == "random":
        reveal = reveal_random(masked, step, plan.steps_per_block, generator)
        return block.masked_scatter(reveal, sample_tokens(logits[reveal], plan.temperature, plan.top_p, generator))
    candidates = logits[masked]
    predicted = sample_tokens(candidates, plan.temperature, plan.top_p, generator)
    chosen = candidates.float().gather(-1, predicted[:, None]).squeeze(-1)
    confidence = torch.full(block.shape, -float("inf"), device=block.device)
    confidence[masked] = (chosen - candidates.float().logsumexp(-1)).exp()  # softmax probability of the choice
    if plan.schedule in SCHEDULE_EPS:
        count = smdm_tokens_to_reveal(masked.sum(-1), step, plan.steps_per_block, SCHEDULE_EPS[plan.schedule])
    else:
        count = tokens_to_reveal(masked.sum(-1), plan.steps_per_block - step)
    reveal = reveal_low_confidence(confidence, masked, count, plan.threshold)
    return torch.where(reveal, block.masked_scatter(masked, predicted), block)


def _all_rows_ended(tokens: torch.Tensor, eos_id: int | None) -> bool:
    return eos_id is not None and bool((tokens == eos_id).any(dim=1).all())


def _mdm_sample(model: Transformer, batch: PromptBatch, plan: Plan, generator: torch.Generator | None,
                on_step: StepCallback | None) -> tuple[torch.Tensor, int]:
    """Fill plan.length [MASK] tokens after the prompts, block by block; returns tokens and forward passes."""
    total = batch.width + plan.length
    masks = torch.full((batch.tokens.size(0), plan.length), model.mask_id, device=batch.tokens.device)
    x = torch.cat([batch.tokens, masks], dim=1)
    inputs = DenoiserInputs(batch, total, model.mask_id, plan.cfg_scale is not None)
    passes = step_index = 0
    for start in range(batch.width, total, plan.block_length):
        end = start + plan.block_length
        window = None
        if plan.cache != "none":
            window = WindowCache(model.config.n_layer, start, end if plan.cache == "dual" else None)
        for step in range(plan.steps_per_block):
            if not (x[:, start:end] == model.mask_id).any():
                break  # threshold decoding finished the block early
            logits = block_logits(model, x, inputs, plan, window, start, end)
            passes += 1
            x[:, start:end] = _denoise_step(logits, x[:, start:end], model.mask_id, plan, step, generator)
            if on_step is not None:
                on_step(step_index, x)
            step_index += 1
        if plan.stop_at_eos and end < total and _all_rows_ended(x[:, batch.width:end], plan.eos_id):
            x[:, end:] = plan.eos_id  # finished blocks are final: nothing after this EOS can reach a completion
            break
    return x, passes


def _arm_sample(model: Transformer, batch: PromptBatch, plan: Plan, generator: torch.Generator | None,
                on_step: StepCallback | None) -> tuple[torch.Tensor, int]:
    """Left-to-right decoding, with a KV cache (one pass over the prompts, then one per token) or recomputing all."""
    total = batch.width + plan.length
    tokens = torch.cat([batch.tokens, batch.tokens.new_full((batch.tokens.size(0), plan.length),
                                                            plan.eos_id if plan.eos_id is not None else 0)], dim=1)
    key_mask, positions = batch.key_mask(total), batch.positions(total)
    padded_positions = positions if batch.padded else None
    cached = plan.cache == "kv"
    if cached:
        model.setup_kv_cache(tokens.size(0), total)
    try:
        slots = torch.arange(batch.width, device=tokens.device)
        logits = _call(model, batch.tokens, input_pos=slots if cached else None,
                       positions=None if padded_positions is None else padded_positions[:, : batch.width],
                       key_mask=key_mask if cached or key_mask is None else key_mask[:, : batch.width])[:, -1]
        passes = 1
        for column in range(batch.width, total):
            tokens[:, column] = sample_tokens(logits, plan.temperature, plan.top_p, generator)
            if on_step is not None:
                on_step(column - batch.width, tokens[:, : column + 1])
            if column + 1 == total or (plan.stop_at_eos and _all_rows_ended(tokens[:, batch.width:column + 1],
                                                                             plan.eos_id)):
                break
            if cached:
                here = slice(column, column + 1)
                logits = _call(model, tokens[:, here], input_pos=slots.new_tensor([column]),
                               positions=None if padded_positions is None else padded_positions[:, here],
                               key_mask=key_mask)[:, -1]
            else:
                seen = slice(0, column + 1)
                logits = _call(model, tokens[:, seen],
                               positions=None if padded_positions is None else padded_positions[:, seen],
                               key_mask=None if key_mask is None else key_mask[:, seen])[:, -1]
            passes += 1
    finally:
        if cached:
            model.clear_kv_cache()
    return tokens, passes


@torch.no_grad()
def generate(model: Transformer, prompt_ids: PromptIds, length: int, steps: int | None = None,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             on_step: StepCallback | None = None, *, remasking: Remasking = "low_confidence",
             block_length: int | None = None, cfg_scale: float | None = None, threshold: float | None = None,
             cache: str | None = None, top_p: float = 1.0, eos_id: int | None = None,
             stop_at_eos: bool = False, schedule: str = "even",
             settings: SamplerSettings | None = None) -> Generation:
    """Generate `length` tokens after each prompt: diffusion sampling for an MDM, left-to-right for an ARM.

    prompt_ids: one prompt (1-D tensor / list of ints), equal-length rows (2-D tensor) or a list of prompts of any
    lengths. The sampler options come either as keywords or as one `settings` (then no other option may be given);
    they are described in the module docstring and in SamplerSettings. on_step(step, tokens) sees the token grid
    after every step ([MASK] where still hidden).
    """
    if settings is not None:
        given = SamplerSettings(steps, block_length, remasking, schedule, temperature, top_p, cfg_scale, threshold,
                                cache, stop_at_eos)
        if given != SamplerSettings():
            raise SmdmError("pass the sampler options either as settings or as keywords, not both")
        plan = settings.plan(model, length, eos_id)
    else:
        plan = make_plan(model, length, steps, temperature, remasking=remasking, block_length=block_length,
                         cfg_scale=cfg_scale, threshold=threshold, cache=cache, top_p=top_p, eos_id=eos_id,
                         stop_at_eos=stop_at_eos, schedule=schedule)
    if getattr(model, "diffusion_block_size", None):  # block diffusion (BD3-LM): its own sampler
        from smdm.block_diffusion import generate_blocks

        return generate_blocks(model, prompt_ids, length, plan.steps, plan.temperature, generator, on_step,
                               remasking=plan.remasking, cfg_scale=plan.cfg_scale, threshold=plan.threshold,
                               cache=plan.cache, top_p=plan.top_p, eos_id=eos_id, stop_at_eos=plan.stop_at_eos)
    prompts = _as_prompt_lists(prompt_ids)
    check_prompts(model, prompts, length)
    batch = PromptBatch.left_padded(prompts, eos_id if eos_id is not None else 0, model.lm_head.weight.device)
    sampler = _arm_sample if model.causal else _mdm_sample
    tokens, passes = sampler(model, batch, plan, generator, on_step)
    completions = [row[batch.width:] for row in tokens.tolist()]
    if eos_id is not None:
        completions = [truncate_at_eos(ids, eos_id) for ids in completions]
    return Generation(tokens, [len(p) for p in prompts], completions, passes, batch.width)


def generate_texts(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], length: int,
                   settings: SamplerSettings, batch_size: int = 16, seed: int = 0, bos: bool = False,
                   on_step: Callable[[int, int, torch.Tensor, int], None] | None = None) -> Iterator[dict]:
    """Text in, text out, batch by batch: one record {prompt, completion, tokens} per prompt, in order.

    Every option is checked before the first model call. on_step(first_row, step, tokens, width) sees each batch's
    token grid after every step (`first_row`: the batch's first prompt index; `width`: where generation starts).
    """
    if batch_size < 1:
        raise SmdmError(f"the batch size must be at least 1, got {batch_size}")
    settings.plan(model, length, tokenizer.eos_id)
    encoded = [tokenizer.encode(p, bos=tokenizer.bos_id is not None and bos) for p in prompts]
    encoded = prepare_prompts(model, encoded, tokenizer.eos_id)
    check_prompts(model, encoded, length)
    generator = torch.Generator().manual_seed(seed)
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first:first + batch_size]
        width = max(map(len, batch))
        callback = None if on_step is None else (
            lambda step, tokens, first=first, width=width: on_step(first, step, tokens, width))
        result = generate(model, batch, length, generator=generator, on_step=callback, eos_id=tokenizer.eos_id,
                          settings=settings)
        for prompt, completion in zip(prompts[first:first + batch_size], result.completions):
            yield {"prompt": prompt, "completion": tokenizer.decode(completion), "tokens": len(completion)}
