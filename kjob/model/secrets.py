"""Secret names: what the API, the CLI and kjob.client accept before anything is stored or sent
(a name is one URL path segment, so a '/' would reach another route)."""

from __future__ import annotations

import re

from kjob.errors import InvalidInput

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(
            f"{name!r} is not a secret name: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            field,
        )
    return name
