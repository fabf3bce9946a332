"""OpenID Connect bearer tokens: JWTs signed by a configured issuer (e.g. Koder ID).

A token is accepted when its signature verifies with one of the issuer's published keys
(RS256 or ES256), `iss` is the issuer, `aud` holds the configured audience, and it has not
expired (30 s of leeway for clock skew). Its claims then name the tenant and the roles:

    KJOB_OIDC_TENANT_CLAIM (default `tenant`)   one tenant name
    KJOB_OIDC_ROLES_CLAIM  (default `roles`)    a role or a list; the highest kjob role wins

A claim name may be a dotted path into nested claims (`realm_access.roles`); a claim whose
own name holds dots (a URL) is found first.

Keys come from the JWKS URL (`KJOB_OIDC_JWKS_URL`, else the `jwks_uri` of the issuer's
`/.well-known/openid-configuration`). They are cached for `oidc_jwks_cache_s`; a token signed
with a key id the cache does not know makes one refetch (the issuer rotated its keys), at most
once per `oidc_jwks_refetch_s`, so a stream of made-up key ids cannot hammer the issuer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from kjob.config import Settings
from kjob.errors import Forbidden, InvalidInput, ServerError, Unauthorized
from kjob.store.tokens import ROLES, TENANT_PATTERN, Principal

log = logging.getLogger(__name__)

ALGORITHMS = ("RS256", "ES256")
LEEWAY_S = 30.0
FETCH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str | None = None
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    cache_s: float = 600.0
    refetch_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcConfig | None:
        """The OIDC settings, or None when no issuer is configured.

        :raises InvalidInput: an issuer without an audience (field `oidc_audience`): without
            one, a token the issuer made for any other service would be accepted here.
        """
        if not settings.oidc_issuer:
            return None
        if not settings.oidc_audience:
            raise InvalidInput(
                "is required with KJOB_OIDC_ISSUER: set KJOB_OIDC_AUDIENCE to the audience the issuer "
                "puts in tokens for this API",
                "oidc_audience",
            )
        return cls(
            issuer=settings.oidc_issuer,
            audience=settings.oidc_audience,
            jwks_url=settings.oidc_jwks_url,
            tenant_claim=settings.oidc_tenant_claim,
            roles_claim=settings.oidc_roles_claim,
            cache_s=settings.oidc_jwks_cache_s,
            refetch_s=settings.oidc_jwks_refetch_s,
        )


class JwksCache:
    """The issuer's signing keys by key id, fetched when first needed and refreshed when stale
    or when a token names a key id not seen yet (see the module docstring)."""

    def __init__(self, config: OidcConfig) -> None:
        self.config = config
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._jwks_url = config.jwks_url
        self._lock = asyncio.Lock()
        #: How many times the keys were fetched (for `kjob status` and the tests).
        self.fetches = 0

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key that signed a token whose header names `kid`.

        :raises Unauthorized: the issuer publishes no such key (also after a refetch).
        :raises ServerError: the keys could not be fetched and none are cached.
        """
        async with self._lock:
            now = time.monotonic()
            if self._fetched_at is None or now - self._fetched_at >= self.config.cache_s:
                await self._refresh(keep_stale=self._fetched_at is not None)
            elif self._find(kid) is None and now - self._fetched_at >= self.config.refetch_s:
                log.info("oidc: token signed with unknown key id %r; fetching the issuer's keys again", kid)
                await self._refresh(keep_stale=True)
            key = self._find(kid)
        if key is None:
            raise Unauthorized(
                f"the token is signed with key id {kid!r}, which the issuer {self.config.issuer} does not "
                "publish; get a new token"
            )
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:  # a token without `kid` from an issuer with one key
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, keep_stale: bool) -> None:
        try:
            keys = await self._fetch()
        except ServerError:
            if not keep_stale:
                raise
            # The issuer is briefly away: keep trusting the keys it published last.
            log.warning("oidc: refreshing the issuer's keys failed; keeping the %d cached keys", len(self._keys))
            # Try again after `refetch_s`, not on every request while the issuer is away.
            self._fetched_at = time.monotonic() - self.config.cache_s + self.config.refetch_s
            return
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=True) as http:
            if self._jwks_url is None:
                discovery = await _get_json(http, self.config.issuer.rstrip("/") + "/.well-known/openid-configuration")
                if discovery.get("issuer") != self.config.issuer:
                    raise ServerError(
                        f"the discovery document of {self.config.issuer} names issuer {discovery.get('issuer')!r}; "
                        "set KJOB_OIDC_ISSUER to exactly the issuer its tokens carry"
                    )
                if not isinstance(discovery.get("jwks_uri"), str):
                    raise ServerError(
                        f"the discovery document of {self.config.issuer} has no jwks_uri; set KJOB_OIDC_JWKS_URL"
                    )
                self._jwks_url = discovery["jwks_uri"]
            jwks = await _get_json(http, self._jwks_url)
        self.fetches += 1
        keys: dict[str | None, jwt.PyJWK] = {}
        for entry in jwks.get("keys") or []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry.get("kid")] = jwt.PyJWK(entry)
            except jwt.PyJWTError as err:  # a key type or curve we do not use: skip it, keep the others
                log.debug("oidc: skipping JWKS key %r: %s", entry.get("kid"), err)
        return keys


async def _get_json(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await http.get(url)
        response.raise_for_status()
        data = response.json()
    except (httpx.HTTPError, ValueError) as err:
        raise ServerError(f"cannot fetch the identity provider's keys from {url} ({err}); try again shortly") from None
    if not isinstance(data, dict):
        raise ServerError(f"{url} did not answer a JSON object")
    return data


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def claim(claims: dict[str, Any], name: str) -> Any:
    """The claim `name`: its own key first, else a dotted path into nested objects."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


class OidcVerifier:
    def __init__(self, config: OidcConfig, keys: JwksCache | None = None) -> None:
        self.config = config
        self.keys = keys or JwksCache(config)

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token of the issuer.

        :raises Unauthorized: not a JWT, bad signature, unknown key, wrong issuer or audience,
            expired or not yet valid.
        :raises Forbidden: valid, but with no usable tenant or no kjob role in its claims.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is neither a kjob API token nor a valid JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthorized(f"the token is signed with {alg!r}; this API accepts {' or '.join(ALGORITHMS)}")
        key = await self.keys.key(header.get("kid"))
        claims = self._decode(token, key, alg)
        return Principal(
            tenant=self._tenant(claims),
            role=self._role(claims),
            token_id=str(claims["jti"])[:64] if claims.get("jti") else None,
            subject=f"oidc:{claims['sub']}"[:256],
        )

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        c = self.config
        try:
            return jwt.decode(
                token, key=key.key, algorithms=[alg], audience=c.audience, issuer=c.issuer, leeway=LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired; get a new one from the identity provider") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"the token is not meant for this API: its audience is not {c.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(f"the token was not issued by {c.issuer}") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the token is not valid yet (nbf/iat in the future); check the clocks") from None
        except jwt.MissingRequiredClaimError as err:
            raise Unauthorized(f"the token has no {err.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("the token's signature does not verify") from None
        except jwt.PyJWTError as err:
            raise Unauthorized(f"the token is not valid: {err}") from None

    def _tenant(self, claims: dict[str, Any]) -> str:
        name = self.config.tenant_claim
        tenant = claim(claims, name)
        if tenant is None:
            raise Forbidden(f"the token has no {name!r} claim naming its tenant; ask for a token with one")
        if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
            raise Forbidden(f"the token's {name!r} claim ({tenant!r}) is not a tenant name")
        return tenant

    def _role(self, claims: dict[str, Any]) -> str:
        name = self.config.roles_claim
        value = claim(claims, name)
        granted = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        known = [r for r in granted if r in ROLES]
        if not known:
            raise Forbidden(
                f"the token grants no kjob role: its {name!r} claim holds {value!r}; "
                f"it needs one of {', '.join(ROLES)}"
            )
        return max(known, key=ROLES.index)
