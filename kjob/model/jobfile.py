"""Job files: TOML as in RFC section 5. Pure, except `load_jobs_file` which reads one file.

A file holds one `[job]` table, or several `[[job]]` tables:

    [job]
    slug     = "weekly-stack-audit"
    prompt   = "/k-housekeep"
    agent    = "kode"
    schedule = "0 9 * * MON"
    sandbox  = { backend = "docker", image = "koder-cli:latest" }
    retries  = { max = 3, backoff = "exponential" }
    timeout  = "30m"

Errors name the job and the field as a path into the file: `job.schedule` for a `[job]`
file, `job[2].schedule` for the second `[[job]]` (counted from 1, as people count tables).
The whole file is refused if any job in it is bad, so applying a file changes all or nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import tomli_w

from kjob.errors import InvalidInput, JobFileError
from kjob.model.job import JobSpec, in_job, parse_job
from kjob.model.text import find_bad_text

T = TypeVar("T")

#: Fields written even when they hold the default, because a reader expects to see them.
_ALWAYS_WRITTEN = frozenset({"enabled"})


def load_jobs(text: str) -> list[JobSpec]:
    """The jobs of a job file's text, in file order.

    :raises JobFileError: the text is not TOML, holds no `job` table, has other top-level keys,
        a job is invalid (the error's field is e.g. `job[2].schedule`), or two jobs share a slug.
    """
    return [_load_one(path, table) for path, table in _entries(text)]


def load_job_tables(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, table) of each job of a job file's text, in file order, as written (`job`, or
    `job[1]`, `job[2]`...: what errors call it): `load_jobs` without validating each job, for a
    caller that has them validated elsewhere (`kjob apply`, by the server: one check of 10,000
    jobs instead of two). What is the file's alone is checked here: TOML, its tables, distinct
    slugs, and text that can be stored (refused in the words of `load_jobs`).

    :raises JobFileError: as `load_jobs`, except for the fields of each job.
    """
    return _entries(text)


def _entries(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, table) of each job of the file, e.g. `("job[2]", {...})`; the file's own checks."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise JobFileError(f"not valid TOML: {e}") from None
    unknown = sorted(k for k in doc if k != "job")
    if unknown:
        raise JobFileError(
            f"unknown top-level key {unknown[0]!r}; a job file holds one [job] table or "
            "several [[job]] tables", unknown[0],
        )
    tables = doc.get("job")
    if isinstance(tables, dict):
        entries = [("job", tables)]
    elif isinstance(tables, list) and tables:
        entries = [(f"job[{i}]", t) for i, t in enumerate(tables, start=1)]
    elif tables is None or tables == []:
        raise JobFileError("no job in the file; write a [job] table, or [[job]] tables for "
                           "several jobs", "job")
    else:
        raise JobFileError("job must be a [job] table or [[job]] tables", "job")
    seen: dict[str, str] = {}
    for path, table in entries:
        if not isinstance(table, dict):
            raise JobFileError(f"{path} must be a table of fields", path)
        slug = table.get("slug")
        if isinstance(slug, str) and slug in seen:
            raise JobFileError(f"slug {slug!r} is already used by {seen[slug]}; "
                               "each job in a file needs its own slug", f"{path}.slug")
        if isinstance(slug, str):
            seen[slug] = path
    # One pass over the whole file's text (a TOML escape can write a NUL), not one per job.
    found = find_bad_text([table for _, table in entries])
    if found:
        where, problem = found
        index, _, field = (where or "").partition(".")
        path, table = entries[int(index)]
        raise JobFileError(in_job(InvalidInput(problem, field or None), table.get("slug"), path),
                           f"{path}.{field}" if field else path)
    return entries


def _load_one(path: str, table: dict[str, Any]) -> JobSpec:
    try:
        return parse_job(table)
    except InvalidInput as e:
        raise JobFileError(in_job(e, table.get("slug"), path), f"{path}.{e.field}" if e.field else path) from None


def load_jobs_file(path: str | Path) -> list[JobSpec]:
    """`load_jobs` of a file; errors start with the file's name."""
    return _from_file(path, load_jobs)


def load_job_tables_file(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """`load_job_tables` of a file; errors start with the file's name."""
    return _from_file(path, load_job_tables)


def _from_file(path: str | Path, load: Callable[[str], list[T]]) -> list[T]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise JobFileError(f"cannot read {p}: {e.strerror or e}", "file") from None
    except UnicodeDecodeError:
        raise JobFileError(f"{p} is not UTF-8 text; save the job file as UTF-8", "file") from None
    try:
        return load(text)
    except JobFileError as e:
        raise JobFileError(f"{p}: {e.message}", e.field) from None


def dump_job(spec: JobSpec) -> str:
    """`spec` as a `[job]` file that `load_jobs` reads back equal. Defaults are left out."""
    return "[job]\n" + _table_body(spec)


def dump_jobs(specs: Iterable[JobSpec]) -> str:
    """`specs` as `[[job]]` tables, one block per job, that `load_jobs` reads back equal."""
    return "\n".join("[[job]]\n" + _table_body(s) for s in specs)


def _table_body(spec: JobSpec) -> str:
    fields = set(JobSpec.model_fields)
    data = spec.model_dump(mode="json", include=fields, exclude_defaults=True)
    for name in _ALWAYS_WRITTEN:
        data.setdefault(name, getattr(spec, name))
    order = list(JobSpec.model_fields)  # the RFC's order: slug, prompt, agent, schedule, ...
    items = sorted(((k, v) for k, v in data.items() if v is not None), key=lambda kv: order.index(kv[0]))
    width = max(len(k) for k, _ in items)
    return "".join(f"{k.ljust(width)} = {_value(v, top=True)}\n" for k, v in items)


def _key(k: str) -> str:
    return tomli_w.dumps({k: 0}).rsplit(" = ", 1)[0]


def _value(v: Any, top: bool = False) -> str:
    """One value as TOML. tomli-w writes tables as `[job.sandbox]` sections; the RFC's shape
    keeps a job's tables inline on its key's line, so only those are assembled here."""
    if isinstance(v, dict):
        inner = ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None)
        return f"{{ {inner} }}" if inner else "{}"
    # Inline tables must stay on one line, so only top-level strings may span lines; and not
    # one with a carriage return: a reader turns a literal CRLF into LF, tomli-w writes it as is.
    multiline = top and not (isinstance(v, str) and "\r" in v)
    line = tomli_w.dumps({"v": v}, multiline_strings=multiline)
    return line[len("v = "):].rstrip("\n")
