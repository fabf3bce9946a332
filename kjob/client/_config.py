"""Where the client connects, and with which token: as the CLI does.

URL, strongest first: the `url` argument, `KJOB_API_URL`, `api_url` in config.toml, the `api.url`
file `kjob up` writes under `KJOB_HOME`, then `http://<host>:<port>` from the settings.
Token: the `token` argument, `KJOB_TOKEN`, `token` in config.toml, then the `admin.token` file
`kjob up` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kjob.config import Settings

#: Seconds a request may take (connect, each read, each write); a followed log waits forever.
DEFAULT_TIMEOUT_S = 30.0
#: Attempts of an idempotent request that meets a connection error, the first included.
DEFAULT_ATTEMPTS = 3


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None
    #: Where the token came from (or where it was looked for), for the hint of a 401.
    token_source: str


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def resolve(url: str | None = None, token: str | None = None, settings: Settings | None = None) -> Target:
    """The URL and token to use (see the module docstring for the order).

    :raises pydantic.ValidationError, tomllib.TOMLDecodeError: KJOB_* or config.toml do not parse.
    """
    if url is not None and token is not None:
        return Target(url.rstrip("/"), token, "the token argument")
    settings = settings or Settings()
    url = url or settings.api_url or _read(settings.api_url_file)
    if not url:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        url = f"http://{host}:{settings.port}"
    if token is not None:
        return Target(url.rstrip("/"), token, "the token argument")
    if settings.token:
        return Target(url.rstrip("/"), settings.token, "KJOB_TOKEN")
    return Target(url.rstrip("/"), _read(settings.token_file), str(settings.token_file))
