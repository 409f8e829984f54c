"""API keys, the JWTs minted for them, and revocation seen by every replica (two key rings, one store)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from tinkerkube_gateway.errors import Unauthenticated
from tinkerkube_gateway.metrics import Metrics
from tinkerkube_gateway.services.downloads import UrlSigner
from tinkerkube_gateway.services.keys import InvalidToken, KeyRing, decode_jwt, encode_jwt, fingerprint, key_id
from tinkerkube_gateway.store.repo import AsyncRepo, Repo

SIGNER = UrlSigner(b"k" * 32)
NOW = 1_800_000_000.0


def _claims(**over: object) -> dict[str, object]:
    return {"sub": "alice", "kid": fingerprint("tml-a"), "iat": int(NOW), "exp": int(NOW) + 600, **over}


def test_a_minted_token_is_a_jwt_the_sdk_can_read_and_only_this_key_verifies() -> None:
    token = encode_jwt(SIGNER, _claims())
    head, body, _ = token.split(".")
    assert token.startswith("eyJ")  # how the SDK tells a JWT from an API key
    assert json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["exp"] == int(NOW) + 600
    assert decode_jwt(SIGNER, token, NOW)["sub"] == "alice"
    with pytest.raises(InvalidToken, match="signature"):
        decode_jwt(UrlSigner(b"x" * 32), token, NOW)


def test_expired_forged_and_malformed_tokens_are_invalid_tokens() -> None:
    with pytest.raises(InvalidToken, match="expired"):
        decode_jwt(SIGNER, encode_jwt(SIGNER, _claims(exp=int(NOW) - 1)), NOW)
    head, _, sig = encode_jwt(SIGNER, _claims()).split(".")
    forged_body = base64.urlsafe_b64encode(json.dumps(_claims(sub="bob")).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="signature"):
        decode_jwt(SIGNER, f"{head}.{forged_body}.{sig}", NOW)
    for bad in ["eyJ", "eyJa.b", "eyJ." * 3, "eyJ" + "a" * 5000, f"{head}.!!.{sig}"]:
        with pytest.raises(InvalidToken):
            decode_jwt(SIGNER, bad, NOW)
    for claims in [_claims(exp="soon"), _claims(sub=None), {"exp": int(NOW) + 5}]:
        with pytest.raises(InvalidToken):
            decode_jwt(SIGNER, encode_jwt(SIGNER, claims), NOW)
    assert InvalidToken("x").headers == {"www-authenticate": 'Bearer error="invalid_token"'}


def test_a_revocation_on_one_replica_holds_there_at_once_and_on_the_other_after_its_refresh(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Repo(f"sqlite:///{tmp_path / 'gw.db'}")
        keys = {"tml-a": "alice", "tml-a2": "alice", "tml-b": "bob"}
        one = KeyRing(keys, AsyncRepo(store), Metrics(), token_ttl_seconds=600)
        two = KeyRing(keys, AsyncRepo(store), Metrics(), token_ttl_seconds=600)
        caller = await one.identify("tml-a", "missing")
        assert caller.tenant == "alice" and one.describe(caller)["key_id"] == key_id(fingerprint("tml-a"))
        token = await one.mint(caller)
        assert (await two.identify(token, "missing")).tenant == "alice"  # the signing secret is shared
        await one.revoke(caller)
        with pytest.raises(Unauthenticated, match="revoked"):
            await one.identify("tml-a", "missing")
        with pytest.raises(InvalidToken, match="revoked"):
            await one.identify(token, "missing")
        assert (await two.identify("tml-a", "missing")).tenant == "alice"  # until its periodic refresh
        await two.refresh()
        with pytest.raises(Unauthenticated, match="revoked"):
            await two.identify("tml-a", "missing")
        with pytest.raises(InvalidToken):
            await two.identify(token, "missing")
        assert (await two.identify("tml-a2", "missing")).tenant == "alice"  # only that key
        restarted = KeyRing(keys, AsyncRepo(store), Metrics(), token_ttl_seconds=600)
        await restarted.refresh()
        assert await restarted.tenant_or_none("tml-a") is None  # durable
        with pytest.raises(Unauthenticated, match="unknown"):
            await restarted.identify("tml-zzz", "missing")
        with pytest.raises(Unauthenticated, match="missing"):
            await restarted.identify(None, "missing")
        gone = KeyRing({"tml-b": "bob"}, AsyncRepo(store), Metrics(), token_ttl_seconds=600)
        bob_token = await gone.mint(await gone.identify("tml-b", "missing"))
        with pytest.raises(InvalidToken):  # a JWT whose key is no longer configured for its tenant
            await KeyRing({"tml-b": "carol"}, AsyncRepo(store), Metrics(), token_ttl_seconds=600).identify(
                bob_token, "missing")
        store.close()

    asyncio.run(scenario())
