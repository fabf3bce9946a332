"""Text that can be stored: PostgreSQL's text and JSONB hold neither NUL characters nor lone
UTF-16 surrogates (which JSON's `\\ud800` escapes can produce), and refuse them with a server
error. These find such text, anywhere in a value, and name where it is; `storable` mends the
text nobody can be asked to fix (what an agent printed or wrote)."""

from __future__ import annotations

import json
import re
from typing import Any

NUL_MESSAGE = "holds a NUL character (\\0), which cannot be stored; remove it"
SURROGATE_MESSAGE = "holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a character; remove it"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None."""
    if "\x00" in text:
        return NUL_MESSAGE
    if text.isascii():  # most text: no surrogate possible, no encoding to try
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_MESSAGE
    return None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    """`text` with each NUL and lone surrogate made U+FFFD, as undecodable bytes already are:
    an agent's output must be recorded whatever it holds (an end the ledger refused would leave
    the claim to lapse, and the agent to run again)."""
    return text if text_problem(text) is None else _UNSTORABLE.sub("\ufffd", text)


def find_bad_text(value: Any, path: str = "") -> tuple[str | None, str] | None:
    """(dotted field, why) of the first string in `value` (dicts, lists, strings) that cannot
    be stored, else None. A bad key is named by the table holding it (the key itself is the
    bad text)."""
    if _all_storable(value):
        return None
    found = _bad_text(value)
    if found is None:
        return None
    trail, problem = found
    parts = ([path] if path else []) + [str(key) for key in reversed(trail)]
    return (".".join(parts) or None), problem


def _all_storable(value: Any) -> bool:
    """True if no string in `value` can be bad: one pass in C over its JSON, which escapes a
    NUL as `\\u0000` and keeps a lone surrogate, which then fails to encode. False only
    means "look closer" (a literal backslash-u0000 in some text, a value JSON cannot hold)."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str, check_circular=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return "\\u0000" not in text and text_problem(text) is None


def _bad_text(value: Any) -> tuple[list[Any], str] | None:
    """(keys from the bad string up to `value`, why) or None. The path is built only for a
    bad value: a job file of 10,000 jobs is checked several times on its way in."""
    if isinstance(value, str):
        problem = text_problem(value)
        return ([], problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return [], problem
            found = _bad_text(item)
            if found:
                found[0].append(key)
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _bad_text(item)
            if found:
                found[0].append(i)
                return found
    return None
