"""The gateway's store opened again, as a restarted gateway opens it (migrations and back-fills run)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tinkerkube_gateway.store.repo import Repo


@contextlib.contextmanager
def reopened(repo: Repo) -> Iterator[Repo]:
    """`repo` closed, then its database opened by a new `Repo`; closed again on the way out."""
    url = repo.engine.url.render_as_string(hide_password=False)
    repo.close()
    again = Repo(url)
    try:
        yield again
    finally:
        again.close()
