"""What becomes of a consumed message: the one ack policy of the executor and the dispatcher.

- `done`: its work is over, or was never ours to do (a final run, a run someone else holds, a
  deleted job, a result delivered or given up on): acked, never seen again.
- `later`: its work is not over and cannot go on now (a busy tenant, a deferred or retrying run,
  a claim that lapsed, Relay away): redelivered after `delay_s`, to this node or another.
- `give_back`: its handler never started and this consumer is stopping (a run held for its
  instant, a message waiting for a slot): redelivered at once, to another node or this one
  restarted, rather than at its ack deadline.
- `drop`: it can never be handled (it does not decode): terminated, never redelivered.

An answer that does not reach the server (NATS away) is logged and nothing else: the message
then comes back at its ack deadline, and every consumer's first step (the run's claim, the
delivery's claim) makes handling it twice harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from kjob.bus.errors import BUS_ERRORS

log = logging.getLogger(__name__)


async def done(msg) -> None:
    await _answer(msg, "ack", msg.ack())


async def later(msg, delay_s: float) -> None:
    await _answer(msg, "nak", msg.nak(delay=delay_s))


async def give_back(msg) -> None:
    await _answer(msg, "nak", msg.nak())


async def drop(msg) -> None:
    await _answer(msg, "term", msg.term())


async def _answer(msg, what: str, answer: Awaitable[None]) -> None:
    try:
        await answer
    except BUS_ERRORS as err:  # the ack deadline decides
        log.warning("could not %s the message on %s (%r); it comes back at its ack deadline",
                    what, getattr(msg, "subject", "?"), err)
