"""Who is calling: the configured API keys, the short-lived JWTs minted for them, and revocation.

API keys are configuration (`api_keys`, `api_keys_file`: key → tenant). A key can be revoked by its holder
(`DELETE /api/v1/auth/apikey/me`, what `tinker auth logout` sends): the store keeps the key's fingerprint
(SHA-256, never the key), every replica loads the revoked set at start and again every reaper interval,
and the replica that revoked it refuses it at once. A revoked key stays refused although the
configuration still lists it (remove it there too).

`POST /api/v1/auth/token` exchanges a key for a JWT (HS256, signed with `UrlSigner.mac` under a secret the
replicas share through the store, like download URLs): claims `sub` (the tenant), `kid` (the key's
fingerprint), `iat`, `exp`. The gateway takes it in X-API-Key like the key itself, as long as the
signature holds, it has not expired, and its key is still configured for that tenant and not revoked;
else a 401 with `WWW-Authenticate: Bearer error="invalid_token"`, on which the SDK exchanges its key
again and replays the request once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from tinkerkube_gateway.errors import Unauthenticated
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.downloads import UrlSigner
from tinkerkube_gateway.store.repo import AsyncRepo

TOKEN_SIGNING_SECRET = "auth-token-signing"
JWT_PREFIX = "eyJ"  # base64url of '{"' : how the SDK tells a JWT from an API key
_HEADER = {"alg": "HS256", "typ": "JWT"}
MAX_TOKEN_CHARS = 4096


class InvalidToken(Unauthenticated):
    """A JWT the gateway does not take (forged, expired, its key revoked): RFC 6750's invalid_token, which
    the SDK answers by exchanging its key for a new JWT and replaying the request once."""

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer error="invalid_token"'}


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    fingerprint: str  # of the API key, or of the key a JWT was minted from


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(fp: str) -> int:
    """The SDK's integer key id (`SelfApiKeyResponse.key_id`): the fingerprint's first 48 bits."""
    return int(fp[:12], 16)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(signer: UrlSigner, claims: dict[str, Any]) -> str:
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    return f"{head}.{body}.{signer.mac(f'{head}.{body}'.encode())}"


def decode_jwt(signer: UrlSigner, token: str, now: float) -> dict[str, Any]:
    """The claims of a token this gateway signed and that has not expired; InvalidToken otherwise."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3:
        raise InvalidToken("malformed token: not a JWT")
    head, body, signature = parts
    if not hmac.compare_digest(signer.mac(f"{head}.{body}".encode()), signature):
        raise InvalidToken("invalid token: its signature does not match (not minted by this gateway)")
    try:
        header, claims = json.loads(_unb64(head)), json.loads(_unb64(body))
    except (ValueError, binascii.Error):
        raise InvalidToken("malformed token: undecodable header or claims") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        raise InvalidToken("malformed token: unexpected header or claims")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or now >= exp:
        raise InvalidToken("the token has expired; exchange the API key for a new one (POST /api/v1/auth/token)")
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("kid"), str):
        raise InvalidToken("malformed token: no subject or key id")
    return claims


class KeyRing:
    def __init__(self, keys: dict[str, str], repo: AsyncRepo, metrics: Metrics, *, token_ttl_seconds: float):
        self.repo = repo
        self.metrics = metrics
        self.token_ttl_seconds = token_ttl_seconds
        self._tenants = {fingerprint(k): tenant for k, tenant in keys.items()}
        self._revoked: set[str] = set()
        self._signer: UrlSigner | None = None

    @property
    def tenants(self) -> set[str]:
        return set(self._tenants.values())

    async def refresh(self) -> None:
        """Revocations made by other replicas (periodic; the revoking replica applies its own at once)."""
        self._revoked = await self.repo.revoked_fingerprints()

    async def _signer_now(self) -> UrlSigner:
        if self._signer is None:
            self._signer = UrlSigner(await self.repo.shared_secret(TOKEN_SIGNING_SECRET))
        return self._signer

    def api_key_tenant(self, key: str | None) -> str | None:
        """The tenant of a configured, unrevoked API key (not a JWT); None otherwise."""
        if not key:
            return None
        fp = fingerprint(key)
        return None if fp in self._revoked else self._tenants.get(fp)

    async def identify(self, credential: str | None, missing: str) -> Caller:
        try:
            return await self._identify(credential, missing)
        except InvalidToken:
            self.metrics.auth_rejected_total.labels(reason="invalid_token").inc()
            raise
        except Unauthenticated as exc:
            reason = "missing" if not credential else "revoked" if "revoked" in exc.detail else "unknown"
            self.metrics.auth_rejected_total.labels(reason=reason).inc()
            raise

    async def _identify(self, credential: str | None, missing: str) -> Caller:
        if not credential:
            raise Unauthenticated(missing)
        if credential.startswith(JWT_PREFIX):
            claims = decode_jwt(await self._signer_now(), credential, time.time())
            fp, tenant = claims["kid"], claims["sub"]
            if fp in self._revoked or self._tenants.get(fp) != tenant:
                raise InvalidToken("the API key this token was minted from is revoked or no longer configured")
            return Caller(tenant, fp)
        fp = fingerprint(credential)
        if fp in self._revoked:
            raise Unauthenticated("this API key was revoked")
        tenant = self._tenants.get(fp)
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return Caller(tenant, fp)

    async def tenant_or_none(self, credential: str | None) -> str | None:
        try:
            return (await self._identify(credential, "")).tenant
        except Unauthenticated:
            return None

    async def mint(self, caller: Caller) -> str:
        now = int(time.time())
        claims = {"sub": caller.tenant, "kid": caller.fingerprint, "iat": now,
                  "exp": now + int(self.token_ttl_seconds), "iss": "tinkerkube"}
        token = encode_jwt(await self._signer_now(), claims)
        self.metrics.auth_tokens_issued_total.labels(tenant=caller.tenant).inc()
        return token

    def describe(self, caller: Caller) -> dict[str, Any]:
        """The SDK's `SelfApiKeyResponse`: the key's id and public metadata (never the key)."""
        return {"key_id": key_id(caller.fingerprint), "name": f"{caller.tenant}-{caller.fingerprint[:8]}",
                "note": f"configured API key of tenant {caller.tenant!r}",
                "details": {"org_details": {"name": caller.tenant}, "user_details": {"email": caller.tenant}}}

    async def revoke(self, caller: Caller) -> None:
        await self.repo.revoke_key(caller.fingerprint, caller.tenant, time.time(),
                                   {"key_id": key_id(caller.fingerprint)})
        self._revoked.add(caller.fingerprint)
        self.metrics.api_keys_revoked_total.labels(tenant=caller.tenant).inc()
