"""Fixtures for the security tests: a real OpenID Connect issuer (discovery document and JWKS
served over HTTP by a small server in a thread, keys that can rotate), JWTs signed with its
keys, and the gateway app on this test's real database, with a bus stand-in that records what
run-now publishes (the pipeline tests use real NATS)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy.ext.asyncio import AsyncEngine

from kjob.config import Settings
from kjob.executor.agents import AgentRegistry
from kjob.gateway.app import create_app
from kjob.gateway.state import GatewayState
from kjob.model.run import Run
from kjob.store.jobs import JobStore
from kjob.store.runs import RunReads
from kjob.store.slots import SlotLedger
from kjob.store.secrets import generate_key
from kjob.store.tokens import TokenStore

AUDIENCE = "kjob-api"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        public = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "use": "sig", "alg": self.alg}


def new_key(alg: str = "RS256", kid: str | None = None) -> SigningKey:
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    return SigningKey(kid=kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}", alg=alg, private=private)


@dataclass
class Issuer:
    """An OIDC issuer on 127.0.0.1: `/.well-known/openid-configuration` and `/jwks`.

    `keys` is what the JWKS publishes (change it to rotate); `jwks_fetches` counts fetches.
    """

    keys: list[SigningKey]
    url: str = ""
    jwks_fetches: int = 0
    requests: list[str] = field(default_factory=list)

    def token(self, key: SigningKey | None = None, *, drop: tuple[str, ...] = (), **claims: Any) -> str:
        """A JWT for tenant acme, role editor, valid for 5 minutes, unless `claims` say otherwise."""
        key = key or self.keys[0]
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300,
                "tenant": "acme", "roles": ["editor"], **claims}
        for name in drop:
            body.pop(name, None)
        return jwt.encode(body, key.private, algorithm=key.alg, headers={"kid": key.kid})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    state = Issuer(keys=[new_key("RS256"), new_key("ES256")])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append(self.path)
            if self.path == "/.well-known/openid-configuration":
                body = {"issuer": state.url, "jwks_uri": f"{state.url}/jwks"}
            elif self.path == "/jwks":
                state.jwks_fetches += 1
                body = {"keys": [k.jwk() for k in state.keys]}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


Published = list[Run]
MakeApp = Callable[..., GatewayState]
ClientFor = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
def published() -> Published:
    """The runs run-now handed to the bus, in order."""
    return []


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(home=tmp_path / "home", secret_key=overrides.pop("secret_key", generate_key()), **overrides)

    return make


@pytest.fixture
def make_state(engine: AsyncEngine, settings_for: Callable[..., Settings], published: Published) -> MakeApp:
    """`make_state(**settings)`: the gateway's state on this test's database."""

    async def publish(run: Run) -> None:
        published.append(run)

    def make(**overrides: Any) -> GatewayState:
        return GatewayState(
            settings=settings_for(**overrides), engine=engine, jobs=JobStore(engine), tokens=TokenStore(engine),
            agents=AgentRegistry.load(None), relay_configured=False, runs=RunReads(engine),
            slots=SlotLedger(engine), publish_due=publish,
        )

    return make


@pytest.fixture
async def client_for(make_state: MakeApp) -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    """`await client_for(tenant, role, token=None, state=None)`: an in-process client of the app.

    The app is built once per state (the default state unless one is given); without `token`,
    a kjob API token of `tenant` and `role` is created.
    """
    clients: list[httpx.AsyncClient] = []
    apps: dict[int, Any] = {}
    default: list[GatewayState] = []

    async def make(tenant: str = "acme", role: str = "admin", *, token: str | None = None,
                   state: GatewayState | None = None) -> httpx.AsyncClient:
        if state is None:
            if not default:
                default.append(make_state())
            state = default[0]
        app = apps.get(id(state))
        if app is None:
            app = apps[id(state)] = create_app(state)
        if token is None:
            _, token = await state.tokens.create(tenant, role, f"test {role}")
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://kjob.test",
            headers={"Authorization": f"Bearer {token}"} if token else {},
        )
        client.state = state  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def job_body(slug: str = "nightly", **fields: Any) -> dict[str, Any]:
    return {"slug": slug, "prompt": "echo hello", "agent": "shell", "schedule": "0 3 * * *",
            "output": {"channel": "none"}, **fields}
