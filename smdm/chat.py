"""`smdm chat`: a multi-turn conversation in the terminal, and the one place that turns messages into a prompt.

The prompt is the model's chat template: the tokenizer's own (`apply_chat_template`, e.g. a Hugging Face model's
Jinja template) when it has one, else smdm's SFT template (`smdm.data.sft.render_chat`), the format `smdm sft
--template chat` trains on, so a model answers in the format it was fine-tuned with.
"""

from __future__ import annotations

from smdm.data.sft import render_chat
from smdm.errors import SmdmError

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
    template = getattr(tokenizer, "apply_chat_template", None)
    if callable(template):
        return template(clean, add_generation_prompt=True)
    return render_chat(clean + [{"role": "assistant", "content": ""}], "messages").prompt
