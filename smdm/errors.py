"""One exception type for every problem a user can fix, so the CLI can print one line and exit non-zero."""


class SmdmError(Exception):
    """A user-facing error: bad input, missing file, incompatible checkpoint. The message says what to do."""
