"""lm-evaluation-harness model `smdm`: MDM and ARM checkpoints behind lm-eval's LM interface.

Scores go through smdm.likelihood.score (MDM: Monte-Carlo bound or chain rule, optional unsupervised CFG; ARM:
exact) and generations through smdm.sample.generate, so harness numbers are the numbers of our own API.
Needs `pip install smdm[eval]` (lm-eval >= 0.4). Importing this module registers the model name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from smdm.errors import SmdmError
from smdm.likelihood import is_greedy_continuation, score
from smdm.sample import SamplerSettings, generate, prepare_prompts, prompt_room

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SmdmError("lm-eval is not installed: pip install 'smdm[eval]' (lm-eval>=0.4)") from error

NLL_TYPES = ("mc", "chain")


@dataclass
class HarnessConfig:
    """Model arguments (`--model-args key=value,...`): what to load, how to score, how to generate."""

    checkpoint: str
    tokenizer: str | None = None
    device: str = "auto"
    nll_type: str = "mc"  # MDM scoring: Monte-Carlo bound ("mc") or exact left-to-right chain rule ("chain")
    mc_samples: int = 128
    batch_size: int = 32  # MC draws (or chain-rule rows) per forward pass; prompts per generation batch
    seed: int = 0  # every request uses this seed: choices of one question see the same mask draws
    length: int | None = None  # tokens to generate; default: the task's max_gen_toks
    sampler: SamplerSettings = field(default_factory=SamplerSettings)  # its cfg_scale also guides scoring

    @classmethod
    def from_model_args(cls, checkpoint: str, **options: Any) -> HarnessConfig:
        """Flat `key=value` model arguments: ours, and any SamplerSettings field (steps, cfg_scale, cache, ...)."""
        ours = {f.name for f in fields(cls)} - {"sampler"}
        theirs = set(SamplerSettings.__dataclass_fields__) - {"stop_at_eos"}
        unknown = sorted(set(options) - ours - theirs)
        if unknown:
            raise SmdmError(f"unknown smdm model argument {unknown[0]!r}; use {', '.join(sorted(ours | theirs))}")
        options = {k: v for k, v in options.items() if v is not None}
        sampler = SamplerSettings(**{k: v for k, v in options.items() if k in theirs})
        return cls(checkpoint=checkpoint, sampler=sampler, **{k: v for k, v in options.items() if k in ours})

    def __post_init__(self) -> None:
        if self.nll_type not in NLL_TYPES:
            raise SmdmError(f"unknown nll_type {self.nll_type!r}; use one of {', '.join(NLL_TYPES)}")
        if isinstance(self.batch_size, str) or self.batch_size < 1:
            raise SmdmError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.mc_samples < 2:
            raise SmdmError(f"mc_samples must be at least 2, got {self.mc_samples}")


@register_model("smdm")
class SmdmLM(LM):
    """An smdm checkpoint (MDM or ARM) as an lm-eval model."""

    def __init__(self, checkpoint: str | None = None, max_batch_size: int | None = None, **options: Any) -> None:
        super().__init__()
        if not checkpoint:
            raise SmdmError("the smdm model needs checkpoint=PATH in its model arguments")
        self.config = HarnessConfig.from_model_args(str(checkpoint), **options)
        from smdm.checkpoint import load_for_inference

        loaded, self.tokenizer = load_for_inference(self.config.checkpoint, self.config.tokenizer, self.config.device)
        self.model = loaded.model
        self.block_size = loaded.config.block_size
        self._device = self.model.lm_head.weight.device

    # --- tokens ------------------------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Encode context+continuation together and split, so BPE merges across the boundary match plain text;
        a space ending the context moves to the continuation (lm-eval's convention)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        head = self.tokenizer.encode(context) if context else []
        if whole[:len(head)] != head:  # a merge across the boundary: keep the text split
            return head, self.tokenizer.encode(continuation)
        return head, whole[len(head):]

    def _fit(self, prefix: list[int], target: list[int]) -> list[int]:
        """The prefix an ARM or MDM is given: an ARM needs a first token (EOS, the document boundary it was trained
        after); too long a prefix is cut from the left, as lm-eval does for every model."""
        if self.model.causal and not prefix:
            prefix = [self.tokenizer.eos_id]
        room = self.block_size - len(target)
        if room < (1 if self.model.causal else 0) or not target:
            raise SmdmError(f"the continuation has {len(target)} tokens; the model's context is {self.block_size}"
                            + (" (an ARM also needs one context token)" if self.model.causal else ""))
        return prefix[max(0, len(prefix) - room):]

    # --- scoring -----------------------------------------------------------------------------------------------

    def _score(self, prefix: list[int], target: list[int]) -> float:
        """-log p(target | prefix) in nats through the shared API."""
        c = self.config
        options: dict[str, Any] = {"cfg_scale": c.sampler.cfg_scale} if c.sampler.cfg_scale else {}
        if not self.model.causal:
            options["batch_size"] = c.batch_size
            if c.nll_type == "mc":
                options.update(mc_samples=c.mc_samples, seed=c.seed)
        return score(self.model, prefix, target, method=c.nll_type, **options).nll

    @torch.no_grad()
    def _is_greedy(self, prefix: list[int], target: list[int]) -> bool:
        """MDM: does greedy low-confidence decoding produce the target? ARM: is every target token the argmax?"""
        if not self.model.causal:
            return is_greedy_continuation(self.model, prefix, target)
        tokens = torch.tensor(prefix + target, device=self._device)[None]
        predicted = self.model(tokens[:, :-1])[0, len(prefix) - 1:].argmax(-1)
        return bool((predicted == tokens[0, len(prefix):]).all())

    def scoring_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The (prefix, target) token ids one loglikelihood request is scored on."""
        prefix, target = self._encode_pair(context, continuation)
        if not target:
            raise SmdmError(f"the continuation {continuation!r} encodes to no tokens")
        return self._fit(prefix, target), target

    def loglikelihood_pair(self, context: str, continuation: str) -> tuple[float, bool]:
        """(log p(continuation | context), is it the greedy continuation) for one pair."""
        prefix, target = self.scoring_pair(context, continuation)
        return -self._score(prefix, target), self._is_greedy(prefix, target)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self.loglikelihood_pair(*request.args[:2]) for request in requests]

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(prefix, target) windows covering every token of the text once, each with as much context as fits;
        the first is conditioned on EOS, the document boundary, for both families."""
        tokens = self.tokenizer.encode(text)
        if not tokens:
            return []
        windows = get_rolling_token_windows(tokens, prefix_token=self.tokenizer.eos_id,
                                            max_seq_len=self.block_size - 1, context_len=1)
        return [make_disjoint_window(window) for window in windows]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: exact for an ARM, the sum of per-window bounds for an MDM."""
        return [-sum(self._score(prefix, target) for prefix, target in self.rolling_windows(request.args[0]))
                for request in requests]

    # --- generation --------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, float]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        length = self.config.length or int(gen_kwargs.get("max_gen_toks", 64))
        temperature = float(gen_kwargs.get("temperature", self.config.sampler.temperature))
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        return until, length, temperature

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate `length` tokens per prompt (MDM: one canvas; ARM: greedy/sampled) and cut at the first `until`
        string. Prompts with the same settings are batched; too long a prompt is cut from the left."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            until, length, temperature = self._generation_settings(request.args[1])
            groups.setdefault((tuple(until), length, temperature), []).append(index)
        for (until, length, temperature), indices in groups.items():
            if length >= self.block_size:
                raise SmdmError(f"generation length {length} does not fit the model's context {self.block_size}")
            for first in range(0, len(indices), c.batch_size):
                batch = indices[first:first + c.batch_size]
                prompts = prepare_prompts(self.model, [self.tokenizer.encode(requests[i].args[0]) for i in batch],
                                          self.tokenizer.eos_id)
                room = prompt_room(self.model, length)
                prompts = [p[max(0, len(p) - room):] for p in prompts]
                out = generate(self.model, prompts, length, generator=generator, eos_id=self.tokenizer.eos_id,
                               settings=replace(c.sampler, temperature=temperature))
                for i, completion in zip(batch, out.completions):
                    results[i] = cut_at(self.tokenizer.decode(completion), until)
        return [r or "" for r in results]


def cut_at(text: str, until: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text



class _DropNotice(logging.Filter):
    """lm-eval warns on every task with a custom dataset that kwargs could come from --metadata; ours do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def check_task(lm: SmdmLM, spec: Any, data_dir: str | None, limit: float | None) -> None:
    """Fail before any model call, in one line naming file:line, on an item the model cannot score: a broken
    record or a continuation longer than the context. Checks the items `limit` selects (lm-eval's first N)."""
    from smdm.tasks.lm_eval import read_task_file

    records = read_task_file(spec.path(data_dir), spec.kind)
    if limit is not None:
        records = records[:math.ceil(len(records) * limit) if limit < 1 else int(limit)]
    for where, record in records:
        try:
            if spec.kind == "multiple_choice":  # the YAML's target delimiter is lm-eval's default " "
                for choice in record["choices"]:
                    lm.scoring_pair(record["query"], " " + choice)
            elif spec.kind == "lambada":
                context, _, word = record["text"].rpartition(" ")
                lm.scoring_pair(context, " " + word)
        except SmdmError as error:
            raise SmdmError(f"{where}: {error}") from None


def evaluate_tasks(tasks: Sequence[str], model_args: str | dict[str, Any], data_dir: str | None = None,
                   limit: float | None = None, bootstrap_iters: int = 1000) -> dict[str, Any]:
    """lm_eval.simple_evaluate with model `smdm` and our offline tasks on the include path.

    The model and our task files are checked before lm-eval starts, so bad input fails at once in one line. Our
    tasks (smdm_*) read `data_dir` (or $SMDM_EVAL_DATA); lm-eval's stock tasks are indexed only when asked for,
    since they download from the Hugging Face hub. Returns lm-eval's results without per-sample logs.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from smdm.tasks.lm_eval import TASK_DIR, resolve_data_dir, task_names, task_spec

    tasks = [t.strip() for t in tasks if t.strip()]
    ours = set(task_names())
    if not tasks:
        raise SmdmError("no tasks given; e.g. --tasks smdm_arc_easy,smdm_piqa (ours: " + ", ".join(sorted(ours)) + ")")
    strays = [t for t in tasks if t.startswith("smdm_") and t not in ours]
    if strays:
        raise SmdmError(f"unknown task {strays[0]!r}; ours are {', '.join(sorted(ours))}")
    metadata = {"data_dir": str(resolve_data_dir(data_dir))} if ours & set(tasks) else {}
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=not set(tasks) <= ours, metadata=metadata)
    missing = [t for t in tasks if t not in set(manager.all_tasks)]
    if missing:
        raise SmdmError(f"unknown task {missing[0]!r}; ours are {', '.join(sorted(ours))}, "
                        "or any lm-eval task name (those need the Hugging Face hub)")
    lm = SmdmLM.create_from_arg_string(model_args) if isinstance(model_args, str) else SmdmLM(**model_args)
    for task in tasks:
        if task in ours:
            check_task(lm, task_spec(task), metadata["data_dir"], limit)
    notice = _DropNotice()
    logging.getLogger("lm_eval.api.task").addFilter(notice)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=bootstrap_iters)
    finally:
        logging.getLogger("lm_eval.api.task").removeFilter(notice)
    return {key: results[key] for key in ("results", "groups", "configs", "versions", "n-shot", "n-samples")
            if key in results}


def write_summary(summary: dict[str, Any], out: str | Path) -> Path:
    """lm-eval's results as JSON at `out`; an unwritable path is a one-line error."""
    import json

    path = Path(out)
    try:
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    except OSError as error:
        raise SmdmError(f"could not write {path}: {error.strerror or error}") from None
    return path
