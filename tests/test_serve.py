"""`smdm serve` as a real process on a loopback port, driven by the official `openai` client, raw HTTP and
lm-eval's `local-completions`: answers equal the in-process samplers, concurrent requests are batched without
changing them, streams carry the denoising, and bad requests get OpenAI-style 4xx bodies while the server goes on."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import urllib.request

import pytest
from serving import get_json, need_serve_extra, post_json, running_server, train_tiny

from smdm.checkpoint import load_for_inference
from smdm.sample import generate

need_serve_extra()
import openai

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {objective: train_tiny(toy_data, root / objective, objective) for objective in ("mdm", "arm")}


@pytest.fixture(scope="module")
def mdm_server(trained):
    with running_server(trained["mdm"], "--api-key", KEY) as base:
        yield base


@pytest.fixture(scope="module")
def arm_server(trained):
    with running_server(trained["arm"], "--batch-window-ms", "50") as base:  # room for concurrent tests to meet
        yield base


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def reference(checkpoint, prompt: str, max_tokens: int, **options) -> str:
    """What the sampler gives in-process for one prompt (greedy): the server must answer exactly this."""
    loaded, tokenizer = load_for_inference(checkpoint, None, "cpu")
    model = loaded.model.eval()
    ids = tokenizer.encode(prompt) or ([tokenizer.eos_id] if model.causal else [])
    result = generate(model, [ids], max_tokens, eos_id=tokenizer.eos_id, stop_at_eos=True, **options)
    return tokenizer.decode(result.completions[0])


def sse_events(base: str, body: dict, headers: dict | None = None) -> list[dict]:
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    events = []
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completions_equal_the_in_process_sampler(trained, mdm_server, arm_server):
    for objective, base in (("mdm", mdm_server), ("arm", arm_server)):
        answer = client(base).completions.create(model="toy", prompt="the cat sat", max_tokens=12, temperature=0)
        assert answer.object == "text_completion" and len(answer.choices) == 1
        assert answer.choices[0].text == reference(trained[objective], "the cat sat", 12)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 12


def test_several_prompts_and_n(mdm_server):
    answer = client(mdm_server).completions.create(model="toy", prompt=["the cat", "a bird in the"], n=2,
                                                   max_tokens=6, temperature=0.8, seed=3)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert all(isinstance(c.text, str) for c in answer.choices)


def test_concurrent_requests_are_batched_and_answered_as_alone(trained, arm_server):
    prompts = [("the cat", 5), ("all that glitters is not", 9), ("to be", 3), ("a bird in the hand is", 7)] * 3
    answers: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def ask(index: int, prompt: str, max_tokens: int) -> None:
        c = client(arm_server)
        start.wait()  # all at once, so the batcher finds them waiting together
        answers[index] = c.completions.create(model="toy", prompt=prompt, max_tokens=max_tokens,
                                              temperature=0).choices[0].text

    before = get_json(arm_server + "/health")[1]
    threads = [threading.Thread(target=ask, args=(i, p, m)) for i, (p, m) in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = get_json(arm_server + "/health")[1]
    assert len(answers) == len(prompts)
    for index, (prompt, max_tokens) in enumerate(prompts):
        assert answers[index] == reference(trained["arm"], prompt, max_tokens)
    assert after["rows"] - before["rows"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts)  # at least two requests shared a sampler call


def test_mdm_batch_of_mixed_lengths_equals_alone(trained, mdm_server):
    prompts = [("the quick brown", 4, None), ("to be or", 8, None), ("the cat", 6, " on the mat.")] * 2
    answers: dict[int, str] = {}

    def ask(index: int, prompt: str, max_tokens: int, suffix: str | None) -> None:
        out = client(mdm_server).completions.create(model="toy", prompt=prompt, max_tokens=max_tokens,
                                                    temperature=0, suffix=suffix)
        answers[index] = out.choices[0].text

    threads = [threading.Thread(target=ask, args=(i, *p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded, tokenizer = load_for_inference(trained["mdm"], None, "cpu")
    from smdm.infill import infill

    for index, (prompt, max_tokens, suffix) in enumerate(prompts):
        if suffix is None:
            assert answers[index] == reference(trained["mdm"], prompt, max_tokens)
        else:
            canvas = tokenizer.encode(prompt) + [loaded.model.mask_id] * max_tokens + tokenizer.encode(suffix)
            fills = infill(loaded.model.eval(), [canvas], eos_id=tokenizer.eos_id).fills[0]
            cut = fills[: fills.index(tokenizer.eos_id)] if tokenizer.eos_id in fills else fills
            assert answers[index] == tokenizer.decode(cut)


def test_chat_and_its_stream(mdm_server):
    c = client(mdm_server)
    messages = [{"role": "user", "content": "the cat"}]
    answer = c.chat.completions.create(model="toy", messages=messages, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="toy", messages=messages, max_tokens=8, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_mdm_stream_shows_every_denoising_step(mdm_server):
    body = {"model": "toy", "prompt": "the cat", "max_tokens": 8, "steps": 4, "temperature": 0, "stream": True,
            "smdm_show_steps": True}
    events = sse_events(mdm_server, body, {"Authorization": f"Bearer {KEY}"})
    frames = [e["choices"][0]["smdm"] for e in events if "tokens" in e["choices"][0].get("smdm", {})]
    final = frames.pop()
    assert final["done"] and None not in final["tokens"] and final["step"] == 4
    assert [f["step"] for f in frames] == [1, 2, 3, 4] and [f["forward_passes"] for f in frames] == [1, 2, 3, 4]
    hidden = [sum(t is None for t in f["tokens"]) for f in frames]
    assert hidden == [6, 4, 2, 0]  # two tokens revealed per step (8 tokens in 4 steps)
    for earlier, later in itertools.pairwise(frames):  # a revealed token is final
        assert all(a is None or a == b for a, b in zip(earlier["tokens"], later["tokens"]))
    streamed = "".join(e["choices"][0]["text"] for e in events)
    plain = client(mdm_server).completions.create(model="toy", prompt="the cat", max_tokens=8, temperature=0,
                                                  extra_body={"steps": 4})
    assert streamed == plain.choices[0].text


def test_arm_streams_tokens_in_order(arm_server):
    c = client(arm_server)
    plain = c.completions.create(model="toy", prompt="the quick", max_tokens=10, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="toy", prompt="the quick", max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == plain and sum(bool(t) for t in texts) >= 2  # more than one piece, in order
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_suffix_fills_the_span_on_an_mdm_and_is_refused_by_an_arm(mdm_server, arm_server):
    answer = client(mdm_server).completions.create(model="toy", prompt="the cat", suffix=" on the mat.",
                                                   max_tokens=4, temperature=0)
    assert isinstance(answer.choices[0].text, str)
    with pytest.raises(openai.BadRequestError) as error:
        client(arm_server).completions.create(model="toy", prompt="the cat", suffix="mat", max_tokens=4)
    assert "needs an MDM" in error.value.body["message"]


def test_a_block_diffusion_model_is_served_block_by_block(toy_data, tmp_path):
    """A BDM checkpoint goes through generate's block sampler: answers equal the in-process sampler, streams reveal
    the same text, infilling and prompts past the context (in whole blocks) are refused with OpenAI errors."""
    checkpoint = train_tiny(toy_data, tmp_path / "bdm", "bdm", diffusion_block_size=4)
    with running_server(checkpoint) as base:
        c = client(base)
        assert get_json(base + "/v1/models")[1]["data"][0]["family"] == "bdm"
        for prompt, extra in (("the cat sat", {}), ("a bird", {"steps": 2})):
            answer = c.completions.create(model="toy", prompt=prompt, max_tokens=10, temperature=0, extra_body=extra)
            assert answer.choices[0].text == reference(checkpoint, prompt, 10, **extra)
            chunks = list(c.completions.create(model="toy", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                               extra_body=extra))
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == answer.choices[0].text
        with pytest.raises(openai.BadRequestError) as error:
            c.completions.create(model="toy", prompt="the cat", suffix="mat", max_tokens=4)
        assert "block diffusion" in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            c.completions.create(model="toy", prompt="the cat sat on the mat", max_tokens=125)
        assert error.value.body["code"] == "context_length_exceeded"
        assert c.completions.create(model="toy", prompt="the", max_tokens=3, temperature=0).choices[0].text \
            == reference(checkpoint, "the", 3)  # the server went on


def test_bad_requests_get_openai_errors_and_the_server_goes_on(mdm_server, arm_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = post_json(mdm_server + "/v1/completions", b"{not json", auth)
    assert status == 400 and body["error"]["code"] == "invalid_json" and body["error"]["message"]
    status, body = post_json(mdm_server + "/v1/completions", {"model": "toy", "prompt": "x"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    # A body announced over the limit is refused before it is read (sending it would race the early answer).
    connection = http.client.HTTPConnection(mdm_server.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    for name, value in {**auth, "Content-Type": "application/json", "Content-Length": str(2 << 20)}.items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    status, body = post_json(mdm_server + "/v1/nothing", {}, auth)
    assert status == 404 and body["error"]["message"]
    assert get_json(mdm_server + "/health")[0] == 200  # the one endpoint without a key
    with pytest.raises(openai.AuthenticationError):
        client(mdm_server, key="wrong").models.list()
    c = client(mdm_server)
    with pytest.raises(openai.NotFoundError) as error:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        c.completions.create(model="toy", prompt="x", max_tokens=-3)
    assert "max_tokens" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        c.completions.create(model="toy", prompt="the cat " * 60, max_tokens=64)
    assert error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        c.completions.create(model="toy", prompt="x", max_tokens=8, extra_body={"steps": 3, "block_length": 4})
    assert "multiple of the number of blocks" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client(arm_server).completions.create(model="toy", prompt="x", max_tokens=4, extra_body={"cfg_scale": 1.0})
    assert "needs an MDM" in error.value.body["message"]
    assert [m.id for m in c.models.list().data] == ["toy"]
    assert c.completions.create(model="toy", prompt="the", max_tokens=4).choices[0].text is not None


def test_full_queue_answers_429_and_a_disconnect_frees_the_slot(trained):
    with running_server(trained["mdm"], "--max-batch", "1", "--max-queue", "2") as base:
        # A client that leaves mid-stream: its batch stops at the next step. Sixteen rows with CFG make the batch
        # last seconds (about 3.6 s on 2 cores), not the 0.3 s of one row that a loaded machine could finish before
        # the server reads the disconnect.
        body = {"model": "toy", "prompt": "the", "max_tokens": 120, "temperature": 0, "stream": True,
                "smdm_show_steps": True, "cfg_scale": 1.0, "n": 16}
        request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=60)
        assert response.readline().startswith(b"data: ")
        response.close()
        for _ in range(600):
            health = get_json(base + "/health")[1]
            if health["abandoned"] == 1:
                break
            threading.Event().wait(0.05)
        assert health["abandoned"] == 1
        results: list[int] = []
        start = threading.Barrier(24)

        def ask() -> None:
            start.wait()
            status, answer = post_json(base + "/v1/completions", {"model": "toy", "prompt": "the", "max_tokens": 120,
                                                                  "temperature": 0, "cfg_scale": 1.0})
            assert ("choices" in answer) if status == 200 else answer["error"]["code"] == "queue_full"
            results.append(status)

        threads = [threading.Thread(target=ask) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 24 and set(results) == {200, 429}  # every request answered: served or refused


def test_lm_eval_local_completions_runs_a_generation_task(trained, arm_server, tmp_path):
    pytest.importorskip("lm_eval")
    # Registered explicitly: once smdm.harness has registered `smdm`, lm-eval no longer loads its own models lazily.
    import lm_eval.models.openai_completions  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from smdm.tasks.lm_eval import TASK_DIR

    lines = [{"prompt": "the cat sat on the", "completion": "mat"}, {"prompt": "to be or not to", "completion": "be"},
             {"prompt": "all that glitters is not", "completion": "gold"}]
    (tmp_path / "completion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(tmp_path)})
    results = simple_evaluate(
        model="local-completions", task_manager=manager, tasks=["smdm_completion"], log_samples=True,
        model_args={"base_url": arm_server + "/v1/completions", "model": "toy", "tokenizer_backend": "none",
                    "tokenized_requests": False, "num_concurrent": 2, "max_retries": 1})
    metric = results["results"]["smdm_completion"]["exact_match,none"]
    assert 0.0 <= metric <= 1.0
    samples = results["samples"]["smdm_completion"]
    assert len(samples) == 3
    for sample in samples:  # what lm-eval received is what the server answers for that prompt
        answer = client(arm_server).completions.create(model="toy", prompt=sample["doc"]["prompt"], max_tokens=32,
                                                       temperature=0, stop=["\n"])
        assert sample["resps"][0][0] == answer.choices[0].text


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(trained):
    with running_server(trained["mdm"], "--timeout", "0.01") as base:
        status, body = post_json(base + "/v1/completions", {"model": "toy", "prompt": "the", "max_tokens": 120,
                                                            "temperature": 0, "cfg_scale": 1.0})
        assert status == 504 and body["error"]["code"] == "timeout"
        assert get_json(base + "/health")[0] == 200
