"""One exception type for every problem a user can fix, so the CLI can print one line and exit non-zero."""


class SmdmError(Exception):
    """A user-facing error: bad input, missing file, incompatible checkpoint. The message says what to do."""


class ContextLengthError(SmdmError):
    """Prompt plus generation do not fit the model's context: the server answers it with OpenAI's
    `context_length_exceeded` code instead of reading the message."""
