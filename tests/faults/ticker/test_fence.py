"""A ledger fence that refuses the new leader (it holds a newer revision: the lease bucket was
lost and its revisions started again) makes the node stand by and campaign again later, longer
each time: before the fix it won its own lease back at once and was refused again, in a hot
loop of elections."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text

from tests.faults.ticker.conftest import node_settings
from tests.support.pipeline import running_node


async def test_a_refused_fence_backs_off_instead_of_campaigning_in_a_hot_loop(
        tmp_path, fresh_nats, database_url, engine, recorder, caplog):
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO ticker_lease (id, revision, node, acquired_at) "
                                "VALUES (1, 1000000000, 'a-node-from-before', now())"))
    caplog.set_level(logging.INFO, logger="kjob.ticker")
    async with running_node(node_settings(tmp_path, recorder), fresh_nats.url, database_url,
                            roles=frozenset({"ticker"})):
        await asyncio.sleep(4)
    elected = [r for r in caplog.records if "elected leader" in r.getMessage()]
    refused = [r for r in caplog.records if "holds a newer revision" in r.getMessage()]
    assert refused, "the fence never refused: the test proved nothing"
    # 1 s, then 2 s between terms: at most three elections in four seconds
    assert 1 <= len(elected) <= 3, f"{len(elected)} elections in 4 s"
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT revision FROM ticker_lease"))).scalar() == 1000000000
