"""Sizes written the way Docker users write them: `64m`, `512MiB`, `1.5g`, `1048576` (bytes)."""

from __future__ import annotations

import re
from decimal import Decimal

from kjob.errors import InvalidInput

#: Binary multiples, as `docker run --memory` reads them: `64m` is 64 MiB.
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")


def parse_size(text: str, field: str = "size") -> int:
    """Parse `64m`-style text into bytes (> 0). Raises InvalidInput naming `field` on anything else."""
    m = _SIZE.match(text.strip().lower()) if isinstance(text, str) else None
    if m is None:
        raise InvalidInput(f"{text!r} is not a size; write e.g. '256m', '1g' or '512MiB'", field)
    # Decimal, not float: 400 digits would make float infinite and int() raise.
    size = int(Decimal(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise InvalidInput("a size must be more than 0 bytes, e.g. '256m'", field)
    return size
