"""Unit fixtures for the gateway: the store on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.support.postgres import postgres_url
from tinkerkube_gateway.store.repo import Repo, make_engine

__all__ = ["postgres_url"]


@pytest.fixture(params=["sqlite", "postgresql"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Repo]:
    if request.param == "sqlite":
        store = Repo(f"sqlite:///{tmp_path / 'gw.db'}")
        yield store
        store.close()
        return
    base = request.getfixturevalue("postgres_url")
    name = "t_" + uuid.uuid4().hex[:10]
    engine = make_engine(base)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    store = Repo(base.rsplit("/", 1)[0] + "/" + name)
    yield store
    store.close()
