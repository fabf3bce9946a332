"""The CLI's HTTP client of the gateway.

Where it connects, strongest first: `KJOB_API_URL`, `api_url` in config.toml, the `api.url`
file `kjob up` writes under `KJOB_HOME`, then `http://<host>:<port>` from the settings.
Its token: `KJOB_TOKEN`, `token` in config.toml, then the `admin.token` file `kjob up` writes.

Every failure becomes a KjobError whose text is one line for the terminal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kjob.config import Settings
from kjob.errors import InvalidInput, KjobError
from kjob.model.job import SLUG_PATTERN

TIMEOUT_S = 30.0


class ApiError(KjobError):
    """The gateway refused a request; `field` names the bad input when it says which."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class Unreachable(KjobError):
    """No gateway answers at the URL."""


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None
    #: where the token came from, for hints in errors
    token_source: str


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def resolve(settings: Settings) -> Target:
    """The URL and token the CLI uses under `settings` (see the module docstring for the order)."""
    url = settings.api_url or _read(settings.api_url_file)
    if not url:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        url = f"http://{host}:{settings.port}"
    if settings.token:
        return Target(url.rstrip("/"), settings.token, "KJOB_TOKEN")
    return Target(url.rstrip("/"), _read(settings.token_file), str(settings.token_file))


def _seg(slug: str) -> str:
    """`slug` as one URL path segment. A text that cannot be a slug is refused here: servers
    decode `%2F` before routing, so it would reach the wrong route, not a clear 404."""
    if not re.match(SLUG_PATTERN, slug):
        raise InvalidInput(f"{slug!r} cannot be a job's slug: slugs are lowercase letters, digits and '-'", "slug")
    return quote(slug, safe="")


class ApiClient:
    """Synchronous: a CLI command makes one or two requests and exits."""

    def __init__(self, target: Target, timeout_s: float = TIMEOUT_S) -> None:
        self.target = target
        headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
        self._http = httpx.Client(base_url=target.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer (None for 204).

        :raises Unreachable: nothing answers at the URL.
        :raises ApiError: the gateway answered 4xx/5xx; its message and field.
        """
        url = self.target.url
        try:
            response = self._http.request(method, path, json=json, params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise Unreachable(
                f"cannot reach the kjob API at {url}: start it with `kjob up` or set KJOB_API_URL"
            ) from None
        except httpx.HTTPError as e:
            raise Unreachable(f"the kjob API at {url} did not answer ({type(e).__name__}: {e}); try again") from None
        if response.status_code >= 400:
            raise self._error(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _error(self, response: httpx.Response) -> ApiError:
        try:
            err = response.json()["error"]
            message, field = str(err["message"]), err.get("field")
        except (ValueError, KeyError, TypeError):
            message, field = f"HTTP {response.status_code} from {self.target.url}: {response.text[:200]}", None
        if response.status_code == 401:
            if self.target.token is None:
                message = f"no API token: set KJOB_TOKEN or run `kjob up`, which writes {self.target.token_source}"
            else:
                message = f"{message} (token from {self.target.token_source})"
        return ApiError(response.status_code, message, field)

    # --- the gateway's routes ---------------------------------------------------------------

    def list_jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/jobs")

    def get_job(self, slug: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{_seg(slug)}")

    def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/jobs", json=spec)

    def apply_jobs(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """[{"action": created|updated|unchanged, "job": {...}}, ...] in the order given."""
        return self.request("POST", "/v1/jobs:apply", json={"jobs": specs})["results"]

    def set_enabled(self, slug: str, enabled: bool, note: str | None = None) -> dict[str, Any]:
        if enabled:
            return self.request("POST", f"/v1/jobs/{_seg(slug)}/enable")
        return self.request("POST", f"/v1/jobs/{_seg(slug)}/disable", json={"note": note})

    def delete_job(self, slug: str) -> None:
        self.request("DELETE", f"/v1/jobs/{_seg(slug)}")

    def preview(self, schedule: str, tz: str, n: int, after: str | None = None) -> list[str]:
        params = {"schedule": schedule, "tz": tz, "n": n, **({"after": after} if after else {})}
        return self.request("GET", "/v1/schedules/preview", params=params)

    def run_now(self, slug: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{_seg(slug)}/run")

    def backfill(self, slug: str, start: str, end: str, overlap: str | None = None) -> dict[str, Any]:
        body = {"from": start, "to": end, **({"overlap": overlap} if overlap else {})}
        return self.request("POST", f"/v1/jobs/{_seg(slug)}/backfill", json=body)

    def list_runs(self, slug: str, limit: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{_seg(slug)}/runs", params={"limit": limit})

    def missed_ranges(self, slug: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/jobs/{_seg(slug)}/missed")

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/runs/{quote(run_id, safe='')}")

    def logs(self, run_id: str) -> str:
        response = self._http.get(f"/v1/runs/{quote(run_id, safe='')}/logs")
        if response.status_code >= 400:
            raise self._error(response)
        return response.text

    def follow_logs(self, run_id: str):
        """Yield the run's output as it is produced, until the run ends."""
        with httpx.Client(base_url=self.target.url, headers=self._http.headers, timeout=None) as http:
            with http.stream("GET", f"/v1/runs/{quote(run_id, safe='')}/logs", params={"follow": "true"}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                yield from response.iter_text()

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")
