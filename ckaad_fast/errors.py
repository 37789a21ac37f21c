"""The library's own exception: a bad value of one named argument.

The Python API raises :class:`ArgumentError` where a caller's argument (a folder, a layout, a
ratio) is wrong, carrying the argument's name apart from the message, so that ``ckaad-fast``
can name its own flag (``--data``) where a Python caller reads the parameter (``root``).
"""
from __future__ import annotations

__all__ = ["ArgumentError", "error_text"]


class ArgumentError(ValueError):
    """``name``: the argument at fault, as the Python API spells it; ``message``: what is wrong."""

    def __init__(self, name: str, message: str):
        self.name = name
        self.message = message
        super().__init__(f"{name}: {message}")


def error_text(e: BaseException) -> str:
    """``e`` as one line of at most about 300 characters: what a results row reports."""
    msg = " ".join(str(e).split())  # one line
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
