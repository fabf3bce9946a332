"""Secrets on the executor side: put the values a job references into its sandbox's
environment just before the attempt starts, and mask them in everything captured from it.

Masking replaces each value with `***` in the stored log, the output excerpt (and so the
Relay body built from it), the failure reason, and the live log lines. Live output arrives in
chunks, and a value may be split across two of them: `LiveMask` holds back the end of a chunk
that could be the start of a value, until the next chunk (or the end) shows whether it is.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.config import Settings

from kjob.errors import KjobError, NotFound
from kjob.executor.sandbox.base import Outcome
from kjob.store.secrets import SecretBox, SecretStore, references

log = logging.getLogger(__name__)

MASK = "***"


class SecretsUnavailable(KjobError):
    """The attempt cannot start: a referenced secret is missing or cannot be decrypted here."""


class Masker:
    """Replaces every secret value in text with `***`. Where values overlap, the one that starts
    first wins, and of those the longest, so a value that contains another is masked whole."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self.values = sorted({v for v in values if v}, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.values)

    def mask(self, text: str | None) -> str | None:
        if not text or not self.values:
            return text
        return self.mask_until(text, len(text))[0]

    def mask_until(self, text: str, cut: int) -> tuple[str, int]:
        """Mask `text` up to about `cut`: returns the masked part and how much of `text` it
        covers. A value that starts before `cut` but ends after it is left for later, whole."""
        out: list[str] = []
        i = 0
        while i < cut:
            found = [(start, -len(v), v) for v in self.values if (start := text.find(v, i)) != -1]
            start, _, value = min(found) if found else (len(text), 0, "")
            if start >= cut:
                out.append(text[i:cut])
                return "".join(out), cut
            if start + len(value) > cut:
                out.append(text[i:start])
                return "".join(out), start
            out.append(text[i:start] + MASK)
            i = start + len(value)
        return "".join(out), i

    def partial_tail(self, text: str) -> int:
        """The length of the longest end of `text` that could be the start of a value: what a
        live stream must hold back until the next chunk shows whether the value follows."""
        longest = 0
        for value in self.values:
            window = len(value) - 1
            first = value[0]
            start = max(len(text) - window, 0)
            while (p := text.find(first, start)) != -1:
                if value.startswith(text[p:]):
                    longest = max(longest, len(text) - p)
                    break  # the earliest such start is this value's longest
                start = p + 1
        return longest

    def outcome(self, outcome: Outcome) -> Outcome:
        """The outcome with its output and messages masked (byte counts are what was produced)."""
        if not self.values:
            return outcome
        return dataclasses.replace(
            outcome,
            output=self.mask(outcome.output) or "",
            reason=self.mask(outcome.reason),
            start_error=self.mask(outcome.start_error),
        )


class LiveMask:
    """Masks live output chunk by chunk, per stream, holding back a possible partial value."""

    def __init__(self, masker: Masker, sink: Callable[[str, str], Awaitable[None]]) -> None:
        self.masker = masker
        self.sink = sink
        self._pending: dict[str, str] = {}

    async def write(self, stream: str, text: str) -> None:
        if not self.masker:
            await self.sink(stream, text)
            return
        raw = self._pending.get(stream, "") + text
        masked, used = self.masker.mask_until(raw, len(raw) - self.masker.partial_tail(raw))
        self._pending[stream] = raw[used:]
        if masked:
            await self.sink(stream, masked)

    async def flush(self) -> None:
        """Send what is held back: the attempt has ended, so nothing more can complete a value."""
        pending, self._pending = self._pending, {}
        for stream, text in pending.items():
            if text:
                await self.sink(stream, self.masker.mask(text) or "")


class SecretResolver:
    """Looks up the secrets a job's environment references, for one attempt."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    async def environment(self, tenant: str, env: Mapping[str, str]) -> tuple[dict[str, str], Masker]:
        """`env` with every `secret:<name>` value replaced by the secret, and the masker of
        those values.

        :raises SecretsUnavailable: a secret is missing (deleted since the job was saved) or this
            node cannot decrypt it; the message says which and what to do.
        """
        refs = references(env)
        if not refs:
            return dict(env), Masker()
        try:
            values = await self.store.values(tenant, set(refs.values()))
        except NotFound as err:
            raise SecretsUnavailable(
                f"the job references secret {err.key!r}, which its tenant no longer has; "
                f"set it with `kjob secret set {err.key}`"
            ) from None
        except KjobError as err:  # no key on this node, or a key that cannot open the value
            raise SecretsUnavailable(str(err)) from None
        resolved = {var: values[refs[var]] if var in refs else value for var, value in env.items()}
        return resolved, Masker(values.values())


def secret_resolver(engine: AsyncEngine, settings: Settings) -> SecretResolver:
    """The resolver of a node, with the secret key of its settings (None: secrets fail clearly).

    :raises InvalidInput: a configured key that is not a Fernet key (field `secret_key`).
    """
    box = SecretBox.from_settings(settings)
    if box is None:
        log.info("executor: no secret key configured; jobs that reference secrets will end as `error`")
    return SecretResolver(SecretStore(engine, box))
