"""`GET /v1/schedules/preview`: the same answers as `kjob next`."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.gateway.app import create_app
from kjob.gateway.state import GatewayState
from kjob.store.database import create_engine
from kjob.store.tokens import TokenStore
from tests.support.gateway import assert_error


async def test_spring_forward_slot_runs_once_right_after_the_jump(api: httpx.AsyncClient) -> None:
    params = {"schedule": "30 2 * * *", "tz": "America/New_York", "after": "2026-03-07T00:00:00Z", "n": 3}
    response = await api.get("/v1/schedules/preview", params=params)
    assert response.json() == ["2026-03-07T07:30:00Z", "2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"]


async def test_defaults_are_utc_now_and_five(api: httpx.AsyncClient) -> None:
    slots = (await api.get("/v1/schedules/preview", params={"schedule": "@every 1h"})).json()
    assert len(slots) == 5 and all(s.endswith(":00:00Z") for s in slots)


async def test_after_without_offset_is_local_to_tz(api: httpx.AsyncClient) -> None:
    params = {"schedule": "0 9 * * *", "tz": "Asia/Kolkata", "after": "2026-01-01T08:00", "n": 1}
    assert (await api.get("/v1/schedules/preview", params=params)).json() == ["2026-01-01T03:30:00Z"]


@pytest.mark.parametrize(
    "params,field",
    [
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "@daily", "tz": "Nowhere/City"}, "tz"),
        ({"schedule": "@daily", "after": "tomorrow"}, "after"),
        ({"schedule": "@daily", "n": 0}, "n"),
        ({"schedule": "@daily", "n": 101}, "n"),
        ({"schedule": "@daily", "n": "many"}, "n"),
        ({}, "schedule"),
    ],
)
async def test_bad_parameters_name_the_field(api: httpx.AsyncClient, params: dict, field: str) -> None:
    assert_error(await api.get("/v1/schedules/preview", params=params), 422, field)


async def test_a_database_that_does_not_answer_is_503(state: GatewayState) -> None:
    dead: AsyncEngine = create_engine("postgresql://kjob@127.0.0.1:1/kjob")
    state.engine = dead
    state.tokens = TokenStore(dead)
    app = create_app(state)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://kjob.test") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert "database" in assert_error(await client.get("/readyz"), 503, None)
        listed = await client.get("/v1/jobs", headers={"Authorization": "Bearer kjob_000000000000_x"})
        assert "database" in assert_error(listed, 503, None)
    await dead.dispose()
