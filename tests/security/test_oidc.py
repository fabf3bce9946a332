"""OpenID Connect bearer JWTs from a real (local) issuer: accepted when valid, each kind of bad
token refused with a clear 401/403, nothing stored; key rotation; kjob's own tokens still work."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest

from kjob.errors import InvalidInput
from kjob.gateway.app import create_app
from tests.security.conftest import AUDIENCE, Issuer, MakeApp, job_body, new_key
from tests.support.gateway import assert_error


@pytest.fixture
def oidc_state(make_state: MakeApp, issuer: Issuer):
    # refetch_s=0: a test may rotate keys right after the first fetch.
    return make_state(oidc_issuer=issuer.url, oidc_audience=AUDIENCE, oidc_jwks_refetch_s=0)


async def _client(state, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state), raise_app_exceptions=False),
                             base_url="http://kjob.test", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_valid_jwt_acts_as_its_tenant_and_role(oidc_state, issuer: Issuer, alg: str) -> None:
    key = next(k for k in issuer.keys if k.alg == alg)
    async with await _client(oidc_state, issuer.token(key, sub="alice", jti="jwt-1")) as alice:
        created = await alice.post("/v1/jobs", json=job_body())
        assert created.status_code == 201, created.text
        assert created.json()["tenant"] == "acme"
        [entry] = (await alice.get("/v1/audit")).json()
    assert (entry["actor"], entry["token_id"], entry["action"]) == ("oidc:alice", "jwt-1", "job.create")
    # discovery once, then the JWKS once: later requests use the cache
    assert issuer.requests == ["/.well-known/openid-configuration", "/jwks"]


async def test_the_highest_kjob_role_in_the_claim_wins_and_nested_claims_work(make_state: MakeApp, issuer: Issuer) -> None:
    state = make_state(oidc_issuer=issuer.url, oidc_audience=AUDIENCE,
                       oidc_tenant_claim="org.id", oidc_roles_claim="realm_access.roles")
    token = issuer.token(drop=("tenant", "roles"), org={"id": "globex"},
                         realm_access={"roles": ["offline_access", "viewer", "operator"]})
    async with await _client(state, token) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
        message = assert_error(await client.post("/v1/jobs", json=job_body()), 403, None)
        assert "'operator'" in message and "'editor'" in message
        assert (await client.get("/v1/quotas")).json()["tenant"] == "globex"


def _minus(seconds: int) -> int:
    return int(time.time()) - seconds


BAD_TOKENS = [
    # (case, how to make the token, status, words the message must hold)
    ("wrong audience", lambda i: i.token(aud="another-service"), 401, "not meant for this API"),
    ("expired", lambda i: i.token(iat=_minus(7200), exp=_minus(3600)), 401, "expired"),
    ("unknown key id", lambda i: i.token(new_key("RS256", kid="stranger")), 401, "'stranger'"),
    ("bad signature", lambda i: i.token(new_key("RS256", kid=i.keys[0].kid)), 401, "signature"),
    ("wrong issuer", lambda i: i.token(iss="https://evil.example"), 401, "not issued by"),
    ("no expiry", lambda i: i.token(drop=("exp",)), 401, "'exp'"),
    ("not yet valid", lambda i: i.token(nbf=int(time.time()) + 3600), 401, "not valid yet"),
    ("HS256 with the public key", lambda i: _hs256(i), 401, "RS256 or ES256"),
    ("alg none", lambda i: _unsigned(i), 401, "RS256 or ES256"),
    ("garbage with two dots", lambda i: "abc.def.ghi", 401, "JWT"),
    ("no tenant claim", lambda i: i.token(drop=("tenant",)), 403, "'tenant' claim"),
    ("tenant not a name", lambda i: i.token(tenant="acme.>"), 403, "not a tenant name"),
    ("no kjob role", lambda i: i.token(roles=["superuser", "root"]), 403, "no kjob role"),
    ("role claim of the wrong type", lambda i: i.token(roles={"admin": True}), 403, "no kjob role"),
]


def _admin_claims(issuer: Issuer) -> dict:
    return {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60,
            "tenant": "acme", "roles": ["admin"]}


def _hs256(issuer: Issuer) -> str:
    """Signed with HMAC, using a shared secret: the classic key-confusion attempt."""
    headers = {"kid": issuer.keys[0].kid}
    return jwt.encode(_admin_claims(issuer), "a-shared-secret-of-32-bytes-long!", algorithm="HS256", headers=headers)


def _unsigned(issuer: Issuer) -> str:
    return jwt.encode(_admin_claims(issuer), None, algorithm="none")


@pytest.mark.parametrize(("case", "make", "status", "words"), BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
async def test_a_bad_jwt_is_refused_clearly_and_changes_nothing(
    oidc_state, issuer: Issuer, client_for, case, make, status: int, words: str
) -> None:
    async with await _client(oidc_state, make(issuer)) as client:
        message = assert_error(await client.post("/v1/jobs", json=job_body()), status, None)
        assert words in message, message
    admin = await client_for("acme", "admin", state=oidc_state)
    assert (await admin.get("/v1/jobs")).json() == []
    assert (await admin.get("/v1/audit")).json() == []


async def test_an_unknown_key_id_makes_exactly_one_refetch(oidc_state, issuer: Issuer) -> None:
    async with await _client(oidc_state, issuer.token()) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
    assert issuer.jwks_fetches == 1
    async with await _client(oidc_state, issuer.token(new_key("ES256", kid="not-published"))) as client:
        assert_error(await client.get("/v1/jobs"), 401, None)
    assert issuer.jwks_fetches == 2


async def test_key_rotation_a_new_key_is_fetched_when_a_token_names_it(oidc_state, issuer: Issuer) -> None:
    old = issuer.keys[0]
    async with await _client(oidc_state, issuer.token(old)) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
    rotated = new_key("RS256")
    issuer.keys = [rotated]  # the issuer rotates: the old key is gone, a new one signs
    async with await _client(oidc_state, issuer.token(rotated)) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
    assert issuer.jwks_fetches == 2
    # a token of the retired key no longer verifies once the cache holds the new set
    async with await _client(oidc_state, issuer.token(old)) as client:
        assert "does not publish" in assert_error(await client.get("/v1/jobs"), 401, None)


async def test_refetches_for_unknown_keys_are_rate_limited(make_state: MakeApp, issuer: Issuer) -> None:
    state = make_state(oidc_issuer=issuer.url, oidc_audience=AUDIENCE, oidc_jwks_refetch_s=3600)
    for kid in ("made-up-1", "made-up-2", "made-up-3"):
        async with await _client(state, issuer.token(new_key("RS256", kid=kid))) as client:
            assert_error(await client.get("/v1/jobs"), 401, None)
    assert issuer.jwks_fetches == 1


async def test_kjob_tokens_and_jwts_work_side_by_side(oidc_state, issuer: Issuer, client_for) -> None:
    static = await client_for("acme", "editor", state=oidc_state)
    assert (await static.post("/v1/jobs", json=job_body("from-static"))).status_code == 201
    async with await _client(oidc_state, issuer.token()) as jwt_client:
        assert [j["slug"] for j in (await jwt_client.get("/v1/jobs")).json()] == ["from-static"]


async def test_an_issuer_that_does_not_answer_is_a_503_not_a_500(make_state: MakeApp, issuer: Issuer) -> None:
    state = make_state(oidc_issuer=issuer.url, oidc_audience=AUDIENCE, oidc_jwks_url="http://127.0.0.1:9/jwks")
    async with await _client(state, issuer.token()) as client:
        message = assert_error(await client.get("/v1/jobs"), 503, None)
    assert "127.0.0.1:9/jwks" in message


def test_an_issuer_without_an_audience_is_refused_at_start(make_state: MakeApp, issuer: Issuer) -> None:
    with pytest.raises(InvalidInput) as err:
        create_app(make_state(oidc_issuer=issuer.url))
    assert err.value.field == "oidc_audience"
