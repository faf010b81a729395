"""`smdm chat`: each turn is the sampler's answer to the whole conversation in the chat template; the live view
redraws the answer in place with hidden positions shown; bad options are one line."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from serving import untrained_checkpoints

from smdm.chat import MASK_GLYPH, prompt_from_messages, reply
from smdm.checkpoint import load_for_inference
from smdm.data.sft import chat_prompt
from smdm.errors import SmdmError
from smdm.sample import generate


@pytest.fixture(scope="module")
def checkpoints(toy_data, tmp_path_factory):
    return untrained_checkpoints(toy_data, tmp_path_factory.mktemp("untrained"))

def expected_answer(checkpoint, messages, max_tokens) -> str:
    loaded, tokenizer = load_for_inference(checkpoint, None, "cpu")
    ids = tokenizer.encode(prompt_from_messages(tokenizer, messages))
    result = generate(loaded.model.eval(), [ids], max_tokens, eos_id=tokenizer.eos_id, stop_at_eos=True)
    return tokenizer.decode(result.completions[0]).split("<|user|>")[0].strip()


def test_the_template_is_the_sft_one(toy_data):
    from smdm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(toy_data.parent / "tokenizer.json")  # no Jinja template of its own
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "how"}, {"type": "text", "text": " are you"}]}]
    assert prompt_from_messages(tokenizer, messages) == chat_prompt([("hi", "hello"), ("how are you", None)])
    with pytest.raises(SmdmError, match="role"):
        prompt_from_messages(tokenizer, [{"role": "wizard", "content": "x"}])


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_chat_answers_every_turn_with_the_whole_conversation(capsys, monkeypatch, checkpoints, objective):
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat\nand the dog\n/quit\n"))
    code, out, err = run_cli(capsys, "chat", "--checkpoint", str(checkpoints[objective]), "--max-tokens", "8",
                             "--no-live")
    assert code == 0, err
    answers = [line[len("model> "):] for line in out.splitlines() if line.startswith("model> ")]
    assert len(answers) == 2
    first = [{"role": "user", "content": "the cat"}]
    assert answers[0] == expected_answer(checkpoints[objective], first, 8)
    second = first + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "and the dog"}]
    assert answers[1] == expected_answer(checkpoints[objective], second, 8)


def test_live_view_redraws_in_place_with_masks(capsys, monkeypatch, checkpoints):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    code, out, err = run_cli(capsys, "chat", "--checkpoint", str(checkpoints["mdm"]), "--max-tokens", "8",
                             "--steps", "4", "--live")
    assert code == 0, err
    frames = out.split("\x1b[J")
    assert len(frames) == 1 + 4 + 1  # before the first draw, one redraw per step, the final answer
    assert all(frame.startswith("model> ") for frame in frames[1:])
    assert [frame.count(MASK_GLYPH) for frame in frames[1:5]] == [6, 4, 2, 0]


def test_long_conversations_drop_the_oldest_turns(checkpoints):
    loaded, tokenizer = load_for_inference(checkpoints["mdm"], None, "cpu")
    model = loaded.model.eval()
    turns = []
    for k in range(12):
        turns += [{"role": "user", "content": f"the quick brown fox {k}"}, {"role": "assistant", "content": "ok"}]
    turns.append({"role": "user", "content": "last"})
    assert isinstance(reply(model, tokenizer, turns, 16, torch.Generator()), str)  # the whole would not fit
    with pytest.raises(SmdmError, match="exceed the context"):
        reply(model, tokenizer, [{"role": "user", "content": "word " * 200}], 16, torch.Generator())


def test_bad_chat_options_are_one_line(capsys, monkeypatch, checkpoints):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run_cli(capsys, "chat", "--checkpoint", str(checkpoints["arm"]), "--cfg-scale", "1")
    assert_one_line_error(code, err, "needs an MDM")


def test_the_live_view_goes_back_over_every_row_it_drew():
    from smdm.chat import LiveView

    out = io.StringIO()
    view = LiveView(out)
    view.columns = 10
    view.draw("a" * 15)  # "model> " + 15 characters = 22 columns: three rows
    view.draw("b\nc")
    view.draw("d")
    assert out.getvalue().split("\x1b[J")[:3] == ["\r", "model> aaaaaaaaaaaaaaa\x1b[2F", "model> b\nc\x1b[1F"]
