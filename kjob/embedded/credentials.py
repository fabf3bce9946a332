"""The passwords of `kjob up`'s embedded servers, generated once and kept in KJOB_HOME.

`$KJOB_HOME/credentials.toml` (mode 0600) holds the PostgreSQL superuser's password and one
NATS password per user of kjob's permissions file. It is created by the first `kjob up`, read
by every later one, and completed when a newer kjob knows a user an older file lacks: a home
made by a kjob without credentials upgrades on its next start.
"""

from __future__ import annotations

import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kjob.embedded.nats import NATS_USERS, PASSWORD_PATTERN
from kjob.errors import ServerError
from kjob.private_files import write_private

_HEADER = (
    "# Passwords of kjob up's embedded PostgreSQL (user postgres) and NATS (one user per role,\n"
    "# see kjob/bus/nats-server.conf). Generated once; keep this file private (mode 0600).\n"
)


def new_password() -> str:
    """192 random bits, spelled so that nats-server reads it back from its environment as the
    same string: a letter first, then hex (a leading `-` or digit would be read as a number)."""
    return "k" + secrets.token_hex(24)


@dataclass(frozen=True)
class EmbeddedCredentials:
    postgres_password: str
    #: NATS user -> password, for every user in NATS_USERS.
    nats: dict[str, str]

    @classmethod
    def ensure(cls, path: Path) -> EmbeddedCredentials:
        """The credentials in `path`, with any missing password generated and saved."""
        data: dict = {}
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise ServerError(f"{path} is not the credentials file kjob wrote ({err}); "
                                  "restore it from a backup, or remove it and the data it protected") from None
        postgres = dict(data.get("postgres") or {})
        nats = dict(data.get("nats") or {})
        # A NATS password nats-server would misread is replaced: the server learns it anew each start.
        for user in NATS_USERS:
            if not PASSWORD_PATTERN.fullmatch(str(nats.get(user) or "")):
                nats.pop(user, None)
        changed = not path.exists() or not postgres.get("password") or any(not nats.get(u) for u in NATS_USERS)
        postgres.setdefault("user", "postgres")
        if not postgres.get("password"):
            postgres["password"] = new_password()
        for user in NATS_USERS:
            if not nats.get(user):
                nats[user] = new_password()
        if changed:
            write_private(path, _HEADER + _toml({"postgres": postgres, "nats": nats}))
        elif path.stat().st_mode & 0o077:
            path.chmod(0o600)  # e.g. restored from a backup with a looser mode
        return cls(postgres_password=str(postgres["password"]), nats={u: str(nats[u]) for u in NATS_USERS})


def _toml(tables: dict[str, dict[str, str]]) -> str:
    """Tables of string keys and values (JSON strings are valid TOML basic strings)."""
    return "".join(
        f"\n[{name}]\n" + "".join(f"{key} = {json.dumps(str(value))}\n" for key, value in table.items())
        for name, table in tables.items()
    )
