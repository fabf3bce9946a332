"""The ack policy's one rule for answers NATS does not take: logged, never raised into the
handler (the message comes back at its ack deadline); anything else is a bug and goes up."""

from __future__ import annotations

import logging

import nats.errors
import pytest

from kjob.bus import ack


class _Msg:
    subject = "kjob.run.due.acme"

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.answers = error, []

    async def _say(self, what):
        if self.error is not None:
            raise self.error
        self.answers.append(what)

    def ack(self):
        return self._say("ack")

    def nak(self, delay=None):
        return self._say(("nak", delay))

    def term(self):
        return self._say("term")


async def test_each_answer_reaches_the_message():
    msg = _Msg()
    await ack.done(msg)
    await ack.later(msg, 2.5)
    await ack.drop(msg)
    assert msg.answers == ["ack", ("nak", 2.5), "term"]


async def test_an_answer_nats_does_not_take_is_logged_not_raised(caplog):
    with caplog.at_level(logging.WARNING, logger="kjob.bus.ack"):
        await ack.later(_Msg(nats.errors.ConnectionClosedError()), 1.0)
    assert "could not nak the message on kjob.run.due.acme" in caplog.text


async def test_an_error_that_is_not_the_bus_goes_up():
    with pytest.raises(RuntimeError):
        await ack.done(_Msg(RuntimeError("a bug")))
