"""The kjob API from Python: `Client` (blocking) and `AsyncClient` (asyncio), the same surface.

    from kjob.client import Client

    with Client() as kjob:                      # KJOB_API_URL / KJOB_TOKEN, or `kjob up`'s files
        kjob.jobs.apply([{"slug": "audit", "prompt": "/k-housekeep", "agent": "kode",
                          "schedule": "0 9 * * MON"}])
        run = kjob.runs.run_now("audit", wait=True)
        for line in kjob.runs.logs(run.id):
            print(line)

Jobs go in as `JobSpec` (or its fields) and come back as `JobView`, the models the server
validates with, so a bad job is refused here with the field the API would name. Errors are
exceptions by kind (`NotFound`, `InvalidInput`, `Forbidden`, `QuotaExceeded`,
`ServerUnavailable`, ...), each with the server's message. docs/sdk.md has the whole tour.
"""

from kjob.client._client import AsyncClient, Client
from kjob.client._errors import (
    ApiError,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    RateLimited,
    ServerUnavailable,
    Unauthorized,
    WaitTimedOut,
)
from kjob.model.job import JobSpec
from kjob.model.run import RunStatus
from kjob.model.views import (
    AppliedAction,
    ApplyResult,
    AuditView,
    BackfillResult,
    JobView,
    MissedRangeView,
    NewToken,
    QuotaView,
    RunDetail,
    RunView,
    SecretView,
    StatusView,
    TokenView,
)

__all__ = [
    "ApiError",
    "AppliedAction",
    "ApplyResult",
    "AsyncClient",
    "AuditView",
    "BackfillResult",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidInput",
    "JobSpec",
    "JobView",
    "MissedRangeView",
    "NewToken",
    "NotFound",
    "QuotaExceeded",
    "QuotaView",
    "RateLimited",
    "RunDetail",
    "RunStatus",
    "RunView",
    "SecretView",
    "ServerUnavailable",
    "StatusView",
    "TokenView",
    "Unauthorized",
    "WaitTimedOut",
]
