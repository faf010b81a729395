"""The batcher on a real tiny model, in process: compatible jobs share one sampler call and get what they get alone,
incompatible settings and seeded sampling run apart, max_batch and the queue bound hold, a cancelled job leaves."""

from __future__ import annotations

import threading

import pytest
import torch
from test_sample import tiny

from smdm.infill import infill
from smdm.model import Transformer
from smdm.sample import generate
from smdm.serve.batcher import Batcher, BatcherConfig, Job, QueueFull, Row, Settings

EOS = 0


class Collector:
    """A job's emit(): records its events and signals when the job is answered."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.answered = threading.Event()

    def __call__(self, *event) -> None:
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.answered.set()

    def result(self):
        assert self.answered.wait(60)
        kind, *payload = self.events[-1]
        assert kind == "done", payload
        return payload[0]


def model(causal: bool) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny(), causal=causal).eval()


def run(batcher: Batcher, jobs: list[Job]) -> None:
    """Queue every job before the worker starts, so what it batches does not depend on timing."""
    for job in jobs:
        batcher.submit(job)
    batcher.start()
    for job in jobs:
        job.emit.answered.wait(60)
    batcher.stop()


def job(rows: list[Row], settings: Settings | None = None, watch: bool = False, every: bool = True) -> Job:
    return Job(rows, settings or Settings(), Collector(), watch_steps=watch, every_step=every)


@pytest.mark.parametrize("causal", [False, True])
def test_compatible_jobs_share_a_call_and_get_what_they_get_alone(causal):
    net = model(causal)
    rows = [Row([3, 4, 5], 4), Row([6, 7, 8, 9, 1, 2], 8), Row([5], 6, steps=3 if not causal else None)]
    if not causal:
        rows.append(Row([2, 2], 4, suffix=[7, 8, 9]))
    jobs = [job([r]) for r in rows]
    batcher = Batcher(net, EOS, BatcherConfig(max_batch=16, window_s=0))
    run(batcher, jobs)
    assert batcher.batches_run == 1 and batcher.rows_run == len(rows)
    for row, j in zip(rows, jobs):
        got = j.emit.result()[0].ids
        if causal:
            alone = generate(net, [row.prompt], row.max_tokens, eos_id=EOS).completions[0]
        else:
            canvas = row.prompt + [net.mask_id] * row.max_tokens + (row.suffix or [])
            fills = infill(net, [canvas], steps=row.steps, eos_id=EOS).fills[0]
            alone = fills[: fills.index(EOS)] if EOS in fills else fills
        assert got == alone


def test_incompatible_settings_and_seeded_sampling_run_apart():
    net = model(False)
    greedy = [job([Row([3, 4], 4)]) for _ in range(2)]
    guided = [job([Row([3, 4], 4)], Settings(cfg_scale=1.0))]
    seeded = [job([Row([3, 4], 4)], Settings(temperature=1.0, seed=7)) for _ in range(2)]
    batcher = Batcher(net, EOS, BatcherConfig(max_batch=16, window_s=0))
    run(batcher, greedy + guided + seeded)
    assert batcher.batches_run == 1 + 1 + 2
    first, second = (j.emit.result()[0].ids for j in seeded)
    assert first == second  # the same seed alone gives the same draw, whatever else was queued


def test_max_batch_counts_rows():
    net = model(False)
    jobs = [job([Row([3], 4), Row([4], 4)]) for _ in range(3)]  # n = 2 each
    batcher = Batcher(net, EOS, BatcherConfig(max_batch=4, window_s=0))
    run(batcher, jobs)
    assert batcher.batches_run == 2 and batcher.rows_run == 6


def test_the_queue_is_bounded_and_a_cancelled_job_leaves_it():
    batcher = Batcher(model(False), EOS, BatcherConfig(max_batch=1, max_queue=2))
    waiting = [job([Row([3], 4)]) for _ in range(2)]
    for j in waiting:
        batcher.submit(j)
    with pytest.raises(QueueFull):
        batcher.submit(job([Row([3], 4)]))
    batcher.cancel(waiting[0])
    assert batcher.waiting == 1
    batcher.submit(job([Row([3], 4)]))  # the freed slot takes a new job


def test_streaming_jobs_see_every_step():
    net = model(False)
    watched = job([Row([3, 4], 8, steps=4)], watch=True)
    run(Batcher(net, EOS, BatcherConfig(window_s=0)), [watched])
    steps = [e[1] for e in watched.emit.events if e[0] == "step"]
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert [sum(t == net.mask_id for t in s.rows[0]) for s in steps] == [6, 4, 2, 0]


class LeavesAfterFirstStep(Collector):
    """A streaming client that disconnects once it has seen one step."""

    def __init__(self, batcher: Batcher) -> None:
        super().__init__()
        self.batcher, self.job = batcher, None

    def __call__(self, *event) -> None:
        super().__call__(*event)
        if event[0] == "step":
            self.batcher.cancel(self.job)


def test_a_client_leaving_mid_batch_does_not_disturb_the_others():
    net = model(False)
    batcher = Batcher(net, EOS, BatcherConfig(max_batch=16, window_s=0))
    client = LeavesAfterFirstStep(batcher)
    leaving = client.job = Job([Row([3, 4], 8)], Settings(), client, watch_steps=True, every_step=True)
    staying = job([Row([5, 6, 7], 8)], watch=True)
    run(batcher, [leaving, staying])
    alone = infill(net, [[5, 6, 7] + [net.mask_id] * 8], eos_id=EOS).fills[0]
    assert staying.emit.result()[0].ids == (alone[: alone.index(EOS)] if EOS in alone else alone)
    assert len([e for e in client.events if e[0] == "step"]) == 1  # nothing more is sent to a gone client
    assert batcher.batches_run == 1 and batcher.batches_abandoned == 0


def test_text_streams_hear_only_of_steps_that_extend_the_revealed_prefix():
    net = model(False)
    text_only = job([Row([3, 4], 8, steps=8)], watch=True, every=False)
    frames = job([Row([3, 4], 8, steps=8)], watch=True, every=True)
    run(Batcher(net, EOS, BatcherConfig(window_s=0)), [text_only, frames])
    everything = [e[1] for e in frames.emit.events if e[0] == "step"]
    heard = [e[1] for e in text_only.emit.events if e[0] == "step"]

    def front(view):
        ids = view.rows[0]
        return ids.index(net.mask_id) if net.mask_id in ids else len(ids)

    expected = [v.step for prev, v in zip([None, *everything], everything) if front(v) > (front(prev) if prev else 0)]
    assert [v.step for v in heard] == expected and len(everything) == 8


def test_block_diffusion_jobs_share_a_call_and_get_what_they_get_alone():
    """A BDM batch goes through `generate`'s block sampler: rows of different prompt lengths and max_tokens get what
    they get alone; a different number of steps per block runs apart (the sampler takes one per call)."""
    from test_block_diffusion import bd_model

    net = bd_model(4).float()
    rows = [Row([3, 4, 5], 6, steps=2), Row([6, 7, 8, 9, 1, 2], 8, steps=2), Row([5], 5, steps=2)]
    jobs = [job([r]) for r in rows]
    batcher = Batcher(net, EOS, BatcherConfig(max_batch=16, window_s=0))
    run(batcher, jobs)
    assert batcher.batches_run == 1 and batcher.rows_run == 3
    for row, j in zip(rows, jobs):
        alone = generate(net, [row.prompt], row.max_tokens, steps=row.steps, eos_id=EOS, stop_at_eos=True)
        assert j.emit.result()[0].ids == alone.completions[0]
    apart = Batcher(net, EOS, BatcherConfig(max_batch=16, window_s=0))
    run(apart, [job([Row([3, 4], 4, steps=2)]), job([Row([3, 4], 4, steps=4)])])
    assert apart.batches_run == 2
