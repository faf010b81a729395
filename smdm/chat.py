"""`smdm chat`: a multi-turn conversation in the terminal, and the one place that turns messages into a prompt.

The prompt is the model's chat template: the tokenizer's own (`apply_chat_template`, e.g. a Hugging Face model's
Jinja template) when it has one, else smdm's SFT template (`smdm.data.sft.render_chat`), the format `smdm sft
--template chat` trains on, so a model answers in the format it was fine-tuned with.
"""

from __future__ import annotations

import argparse

from smdm.cli_types import non_negative_int, positive_int
from smdm.errors import SmdmError
from smdm.sampler_settings import SamplerSettings, add_sampler_args

ROLES = ("system", "developer", "user", "assistant")


def message_text(content: object, where: str) -> str:
    """OpenAI message content: a string, or a list of {"type": "text", "text": ...} parts (other parts refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise SmdmError(f"{where}: only text content parts are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise SmdmError(f"{where}: content must be a string or a list of text parts")


def prompt_from_messages(tokenizer, messages: object) -> str:
    """The prompt text for the next assistant turn of a conversation (a list of {role, content})."""
    if not isinstance(messages, list) or not messages:
        raise SmdmError("messages must be a non-empty list of {role, content} objects")
    clean = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise SmdmError(f"{where}: expected an object with a role among {', '.join(ROLES)}")
        clean.append({"role": message["role"], "content": message_text(message.get("content"), where)})
    return tokenizer.apply_chat_template(clean, add_generation_prompt=True)


# --- `smdm chat` -----------------------------------------------------------------------------------------------

MASK_GLYPH = "▒"
HELP = "type a message; /reset forgets the conversation, /quit (or end of input) leaves"


def add_parser(subparsers) -> None:
    """Register `smdm chat` on the CLI's subparsers."""
    p = subparsers.add_parser("chat", help="talk to a checkpoint in the terminal (multi-turn, its chat template)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per answer (an MDM's canvas)")
    add_sampler_args(p, skip=("stop_at_eos",))  # every answer stops at EOS
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="redraw the answer in place as it is unmasked (default: on when stdout is a terminal)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default=None, help="weights for inference")
    p.set_defaults(func=cmd_chat)


def _live_text(tokenizer, ids: list[int], mask_id: int | None) -> str:
    """The answer so far: revealed tokens as text, hidden ones as a glyph, nothing after an EOS."""
    if tokenizer.eos_id in ids and (mask_id is None or mask_id not in ids[: ids.index(tokenizer.eos_id)]):
        ids = ids[: ids.index(tokenizer.eos_id)]
    pieces, run = [], []
    for token in ids:
        if token == mask_id:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            pieces.append(MASK_GLYPH)
        elif token != tokenizer.eos_id:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)


def reply(model, tokenizer, messages: list[dict], max_tokens: int, generator, on_text=None, **sampler) -> str:
    """The assistant's next turn: the conversation through the chat template, sampled, cut at EOS / the next turn.

    Older turns are dropped (two messages at a time, a system message kept) when the conversation and the answer
    would not fit the model's context.
    """
    from smdm.data.sft import CHAT_USER
    from smdm.sample import generate

    history = list(messages)
    while True:
        ids = tokenizer.encode(prompt_from_messages(tokenizer, history))
        if len(ids) + max_tokens <= model.config.block_size:
            break
        first = 1 if history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            raise SmdmError(f"the message ({len(ids)} tokens) and the answer ({max_tokens}) exceed the context "
                            f"{model.config.block_size}; write less or lower --max-tokens")
        del history[first:first + 2]
    mask_id = None if model.causal else model.mask_id
    on_step = None
    if on_text is not None:
        def on_step(step: int, grid) -> None:
            on_text(_live_text(tokenizer, grid[0, len(ids):].tolist(), mask_id))
    if model.causal and not ids:
        ids = [tokenizer.eos_id]
    result = generate(model, [ids], max_tokens, generator=generator, on_step=on_step, eos_id=tokenizer.eos_id,
                      stop_at_eos=True, **sampler)
    text = tokenizer.decode(result.completions[0])
    return text.split(CHAT_USER.strip())[0].strip()


class LiveView:
    """Redraws "model> <answer so far>" in place: back to the start of the rows drawn last time, clear, write.

    Counting rows (not saving the cursor) keeps working when the answer wraps or the terminal scrolls.
    """

    PREFIX = "model> "

    def __init__(self, stream) -> None:
        import shutil

        self.stream, self.rows_drawn = stream, 0
        self.columns = max(shutil.get_terminal_size().columns, 10)

    def draw(self, text: str) -> None:
        line = self.PREFIX + text
        back = f"\x1b[{self.rows_drawn - 1}F" if self.rows_drawn > 1 else "\r"
        self.stream.write(back + "\x1b[J" + line)
        self.stream.flush()
        self.rows_drawn = sum(max(1, -(-len(part) // self.columns)) for part in line.split("\n"))


def cmd_chat(args: argparse.Namespace) -> None:
    import sys

    import torch

    from smdm.checkpoint import load_for_inference

    checkpoint, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, args.device, args.dtype)
    model = checkpoint.model.eval()
    settings = SamplerSettings.from_namespace(args, stop_at_eos=True)
    settings.plan(model, args.max_tokens, tokenizer.eos_id)  # bad options fail before the first turn
    sampler = {"steps": settings.steps, "temperature": settings.temperature, **settings.options()}
    sampler.pop("stop_at_eos")
    live = sys.stdout.isatty() if args.live is None else args.live
    generator = torch.Generator().manual_seed(args.seed)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    print(f"smdm chat: {'ARM' if model.causal else 'MDM'} {args.checkpoint} — {HELP}", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(opening)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})

        view = LiveView(sys.stdout) if live else None
        try:
            answer = reply(model, tokenizer, messages, args.max_tokens, generator, view.draw if view else None,
                           **sampler)
        except SmdmError as error:
            messages.pop()
            print(("\n" if live else "") + f"smdm: error: {error}", file=sys.stderr)
            continue
        if view is not None:
            view.draw(answer)
            print(flush=True)
        else:
            print("model> " + answer, flush=True)
        messages.append({"role": "assistant", "content": answer})
