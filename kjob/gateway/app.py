"""The HTTP gateway: `create_app(state)` builds the FastAPI app; whoever runs the API role
(`kjob up`, `kjob server --roles api`) serves it with uvicorn.

Routes (OpenAPI at `/openapi.json`): `/healthz`, `/readyz` and `/metrics` without a token;
everything under `/v1` with a bearer token (see `kjob.gateway.auth`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Depends, FastAPI

from kjob.gateway import errors, ui
from kjob.gateway.auth import authenticate, wire_security
from kjob.gateway.limits import BodyLimit, storable_parameters
from kjob.gateway.routes import audit, backfill, health, jobs, metrics, quotas, runs, schedules, secrets, status, tokens
from kjob.gateway.state import GatewayState
from kjob.telemetry import tracing


def create_app(state: GatewayState) -> FastAPI:
    app = FastAPI(
        title="kjob",
        summary="Cluster-wide, multi-tenant cron for AI agents",
        version=_version(),
        openapi_url="/openapi.json",
    )
    wire_security(state)
    app.state.gateway = state
    errors.install(app)
    app.add_middleware(BodyLimit, per_path={"/v1/jobs:apply": state.settings.api.apply_max_body_bytes})
    # The token dependency sits on the router, so no /v1 route can be added without it.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(storable_parameters), Depends(authenticate)],
                   responses=errors.V1_ERROR_RESPONSES)
    v1.include_router(jobs.router)
    v1.include_router(schedules.router)
    v1.include_router(runs.router)
    for router in (tokens.router, secrets.router, audit.router, quotas.router, backfill.router, status.router):
        v1.include_router(router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(metrics.router)
    tracing.instrument_app(app)
    ui.mount(app, state)  # the web dashboard at /ui, last: its login token must not reach the spans
    return app


def _version() -> str:
    try:
        return version("koder-scheduler")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
