"""Why ``torch.load(weights_only=True)`` refused a file, in words a user can act on."""
from __future__ import annotations

import re

__all__ = ["refusal_reason"]


def refusal_reason(e: Exception, what: str = "a checkpoint") -> str:
    """One line: the forbidden global when there is one (the sign of a file that would run code),
    else the first line of the error. Never torch's advice to retry with ``weights_only=False``,
    which is the wrong advice for a hostile file: a library must not tell its users to execute a
    file's code."""
    text = str(e)
    m = re.search(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it names the Python object {m.group(1) or m.group(2)}, which {what} never holds"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
