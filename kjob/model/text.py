"""Text that can be stored: PostgreSQL's text and JSONB hold neither NUL characters nor lone
UTF-16 surrogates (which JSON's `\\ud800` escapes can produce), and refuse them with a server
error. These find such text, anywhere in a value, and name where it is."""

from __future__ import annotations

from typing import Any

NUL_MESSAGE = "holds a NUL character (\\0), which cannot be stored; remove it"
SURROGATE_MESSAGE = "holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a character; remove it"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None."""
    if "\x00" in text:
        return NUL_MESSAGE
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_MESSAGE
    return None


def find_bad_text(value: Any, path: str = "") -> tuple[str | None, str] | None:
    """(dotted field, why) of the first string in `value` (dicts, lists, strings) that cannot
    be stored, else None. A bad key is named by the table holding it (the key itself is the
    bad text)."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (path or None, problem) if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return path or None, problem
            found = find_bad_text(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_bad_text(item, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None
