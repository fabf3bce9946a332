"""`/v1/schedules/preview`: when would a schedule fire? The same function as `kjob next`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from kjob.gateway.auth import Viewer
from kjob._time import utcnow
from kjob.model.preview import MAX_PREVIEW, preview
from kjob.model.run import utc_text

router = APIRouter(tags=["schedules"])


@router.get("/schedules/preview", response_model=list[str])
async def preview_schedule(
    principal: Viewer,
    schedule: Annotated[str, Query(description="a schedule expression, e.g. '0 9 * * MON' or '@every 90s'")],
    tz: Annotated[str, Query(description="IANA time zone the schedule is read in")] = "UTC",
    after: Annotated[
        str | None, Query(description="ISO-8601 instant; without an offset it is local to tz; default now")
    ] = None,
    n: Annotated[int, Query(description=f"how many slots, 1..{MAX_PREVIEW}")] = 5,
) -> list[str]:
    """The next `n` slots after `after`, as UTC instants `YYYY-MM-DDTHH:MM:SSZ`."""
    return [utc_text(slot) for slot in preview(schedule, tz, after, n, now=utcnow())]
