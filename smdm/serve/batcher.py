"""Gathers concurrent requests into batched sampler calls on one worker thread that owns the model.

Why a thread and not the event loop: a sampler call blocks for its whole duration, and the HTTP side must keep
accepting, streaming and refusing requests meanwhile. The worker takes the oldest waiting job, waits a short
window for more, and adds every waiting job with the same sampler settings (vLLM's continuous batching does the
same per step; smdm's samplers take a whole batch per call). Rows of one batch may have different prompt lengths,
suffixes, max_tokens, steps and block lengths: `smdm.sample.infill` and `generate` take them as they are (a
block-diffusion batch shares one number of steps per block). Settings
that change every row's computation (temperature, top_p, remasking, CFG, threshold, cache) split batches, and so does
a seed with sampling, since a seeded draw must not depend on which other requests happened to arrive with it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from smdm.block_diffusion import BlockLayout
from smdm.infill import infill
from smdm.sample import generate


class QueueFull(Exception):
    """The bounded queue is full: the HTTP layer answers 429."""


class ShuttingDown(Exception):
    """The worker is stopping or stopped: the HTTP layer answers 503."""


class _BatchOver(Exception):
    """Raised from a step callback when every row of the batch is finished or its client gone."""


@dataclass(frozen=True)
class Settings:
    """Sampler settings shared by a whole batch (per-row ones live in Row)."""

    temperature: float = 0.0
    top_p: float = 1.0
    remasking: str = "low_confidence"
    cfg_scale: float | None = None
    threshold: float | None = None
    cache: str | None = None
    seed: int | None = None  # only kept when sampling (temperature > 0); such jobs then run alone


@dataclass
class Row:
    """One completion to produce: the prompt ids, the text after the span (infilling) and the per-row options."""

    prompt: list[int]
    max_tokens: int
    suffix: list[int] | None = None
    steps: int | None = None
    block_length: int | None = None


@dataclass
class RowResult:
    ids: list[int]  # the generated ids, cut before the first EOS
    finished_by_eos: bool


@dataclass
class Job:
    """One HTTP request: its rows (prompts x n), settings, and where its events go.

    emit(kind, payload) is called from the worker thread: ("step", StepView), ("done", list[RowResult], passes)
    or ("error", Exception). The HTTP layer hands it to its event loop thread-safely.
    """

    rows: list[Row]
    settings: Settings
    emit: Callable[..., None]
    watch_steps: bool = False  # streaming: deliver the steps' token grids for these rows
    every_step: bool = False  # every step (denoising frames); else only steps that extend a row's revealed prefix
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)

    def key(self) -> tuple:
        return (self.settings, id(self)) if self.settings.seed is not None else (self.settings,)


@dataclass
class StepView:
    """One step of a batch as a job sees it: for each of its rows, the completion's ids so far (mask_id where still
    hidden; an ARM's grow by one per step), the step index and the batch's forward passes so far."""

    rows: list[list[int]]
    step: int
    forward_passes: int


@dataclass
class BatcherConfig:
    max_batch: int = 16  # rows per sampler call; 1 = one request at a time
    window_s: float = 0.002  # how long the oldest job waits for company (under load, company is already queued)
    max_queue: int = 64  # jobs waiting; past it new jobs are refused (429)


class Batcher:
    """The worker thread and its bounded queue; `submit` and `cancel` are safe from any thread."""

    def __init__(self, model, eos_id: int, config: BatcherConfig | None = None) -> None:
        self.model, self.eos_id = model, eos_id
        self.block_size = getattr(model, "diffusion_block_size", None)  # block diffusion: generate's block sampler
        self.config = config or BatcherConfig()
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="smdm-batcher", daemon=True)
        self.batches_run = 0
        self.rows_run = 0
        self.batches_abandoned = 0  # stopped early because every client of the batch went away

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new jobs, answer the waiting ones with ShuttingDown, and let the running batch finish."""
        with self._cond:
            self._stopping = True
            waiting, self._queue = self._queue, []
            self._cond.notify_all()
        for job in waiting:
            job.emit("error", ShuttingDown("the server is shutting down"))
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or (self._thread.ident is not None and not self._thread.is_alive()):
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting; retry shortly")
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it is still waiting, else stop feeding it (its batch goes on)."""
        with self._cond:
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)

    # --- the worker -----------------------------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """The oldest job plus every compatible one that arrives within the window, up to max_batch rows."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.pop(0)
            batch, rows = [first], len(first.rows)
            deadline = time.monotonic() + self.config.window_s
            while rows < self.config.max_batch and not self._stopping:
                for job in list(self._queue):
                    if job.key() == first.key() and rows + len(job.rows) <= self.config.max_batch \
                            and self._fits(batch + [job]):
                        self._queue.remove(job)
                        batch.append(job)
                        rows += len(job.rows)
                left = deadline - time.monotonic()
                if left <= 0 or rows >= self.config.max_batch:
                    break
                self._cond.wait(left)
            return batch

    def _fits(self, jobs: list[Job]) -> bool:
        """An ARM batch generates max(max_tokens) after the longest prompt: both must fit the context together. A
        block-diffusion batch lays whole blocks after each row's full prompt blocks (BlockLayout), and takes one
        number of steps per block."""
        rows = [row for job in jobs for row in job.rows]
        if self.block_size:
            _, _, needed = BlockLayout.columns([len(r.prompt) for r in rows], max(r.max_tokens for r in rows),
                                               self.block_size)
            return needed <= self.model.config.block_size and len({r.steps for r in rows}) == 1
        if not self.model.causal:
            return True
        longest = max(len(r.prompt) for r in rows)
        return longest + max(r.max_tokens for r in rows) - 1 <= self.model.config.block_size

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled]
            if not batch:
                continue
            try:
                results, passes = self._generate(batch)
            except Exception as error:  # noqa: BLE001 (a failure must still answer every job of the batch)
                for job in batch:
                    job.emit("error", error)
                continue
            self.batches_run += 1
            self.rows_run += sum(len(job.rows) for job in batch)
            at = 0
            for job in batch:
                job.emit("done", results[at:at + len(job.rows)], passes)
                at += len(job.rows)

    def _generate(self, batch: list[Job]) -> tuple[list[RowResult], int]:
        rows = [row for job in batch for row in job.rows]
        settings = batch[0].settings
        seed = settings.seed if settings.seed is not None else secrets.randbits(62)
        generator = torch.Generator().manual_seed(seed)
        model, eos = self.model, self.eos_id
        mask_id = None if model.causal else model.mask_id
        # Where each row's completion lives in the token grid, filled in once the grid's width is known.
        latest: dict[str, torch.Tensor | int] = {"grid": None, "passes": 0}
        owners = [(job, index) for job in batch for index in range(len(job.rows))]

        if self.block_size:  # each row's completion starts right after its prompt in the block layout
            lengths = [len(r.prompt) for r in rows]
            pads = BlockLayout.columns(lengths, max(r.max_tokens for r in rows), self.block_size)[0]
            starts = [pad + n for pad, n in zip(pads, lengths, strict=True)]

        def completion_ids(grid: torch.Tensor, row: int, width: int) -> list[int]:
            if model.causal:
                return grid[row, width:].tolist()
            if self.block_size:
                return grid[row, starts[row]:starts[row] + rows[row].max_tokens].tolist()
            canvas = rows[row]
            start = width - self._canvas_length(canvas) + len(canvas.prompt)
            return grid[row, start:start + canvas.max_tokens].tolist()

        watched = [(row_index, job) for row_index, (job, _) in enumerate(owners) if job.watch_steps]
        revealed = [0] * len(rows)  # each row's revealed prefix: text streams only when it grows
        limits = torch.tensor([r.max_tokens for r in rows])

        def on_step(step: int, grid: torch.Tensor) -> None:
            latest["grid"], latest["passes"] = grid, step + 1  # one forward pass per step (ARM: the prompt's first)
            if all(job.cancelled for job in batch):
                raise _BatchOver
            width = self._width(rows, grid)
            views: dict[int, list[list[int]]] = {}
            grown: set[int] = set()
            for row_index, job in watched:  # only streaming jobs pay for a per-step copy of their rows
                ids = completion_ids(grid, row_index, width)
                views.setdefault(id(job), []).append(ids)
                front = ids.index(mask_id) if mask_id is not None and mask_id in ids else len(ids)
                if front > revealed[row_index]:
                    revealed[row_index] = front
                    grown.add(id(job))
            for job in batch:
                if job.watch_steps and not job.cancelled and (job.every_step or id(job) in grown):
                    job.emit("step", StepView(views[id(job)], step, step + 1))
            if model.causal:
                # Every row has its EOS or its own max_tokens: the longer rows' budget is not needed.
                generated = grid[:, width:]
                ended = (generated == eos).any(1).cpu() | (generated.size(1) >= limits)
                ended |= torch.tensor([job.cancelled for job, _ in owners])
                if bool(ended.all()):
                    raise _BatchOver

        common = {"temperature": settings.temperature, "top_p": settings.top_p, "generator": generator,
                  "on_step": on_step}
        try:
            if model.causal:
                result = generate(model, [r.prompt for r in rows], max(r.max_tokens for r in rows),
                                  cache=settings.cache, eos_id=eos, stop_at_eos=True, **common)
                grid, passes, width = result.tokens, result.forward_passes, result.width
            elif self.block_size:
                result = generate(model, [r.prompt for r in rows], max(r.max_tokens for r in rows),
                                  steps=rows[0].steps, remasking=settings.remasking, cfg_scale=settings.cfg_scale,
                                  threshold=settings.threshold, cache=settings.cache, eos_id=eos, stop_at_eos=True,
                                  **common)
                grid, passes, width = result.tokens, result.forward_passes, result.width
            else:
                canvases = [r.prompt + [mask_id] * r.max_tokens + (r.suffix or []) for r in rows]
                result = infill(model, canvases, steps=[r.steps or r.max_tokens for r in rows],
                                block_length=[r.block_length or r.max_tokens for r in rows],
                                remasking=settings.remasking, cfg_scale=settings.cfg_scale,
                                threshold=settings.threshold, cache=settings.cache, eos_id=eos,
                                stop_at_eos=True, **common)
                grid, passes, width = result.tokens, result.forward_passes, result.width
        except _BatchOver:
            if all(job.cancelled for job in batch):
                self.batches_abandoned += 1
            grid, passes = latest["grid"], latest["passes"]
            width = self._width(rows, grid)
        results = []
        for row_index, row in enumerate(rows):
            ids = completion_ids(grid, row_index, width)[: row.max_tokens]
            if mask_id is not None and mask_id in ids:  # a batch abandoned by all its clients
                ids = ids[: ids.index(mask_id)]
            cut = ids.index(eos) if eos in ids else None
            results.append(RowResult(ids[:cut] if cut is not None else ids, cut is not None))
        return results, passes

    @staticmethod
    def _canvas_length(row: Row) -> int:
        return len(row.prompt) + row.max_tokens + len(row.suffix or [])

    def _width(self, rows: list[Row], grid: torch.Tensor) -> int:
        """The column where generation starts (ARM: after the longest prompt); an MDM grid is right-aligned."""
        if self.model.causal:
            return max(len(r.prompt) for r in rows)
        return grid.size(1)
