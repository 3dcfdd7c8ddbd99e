"""What the supervisor checks of Redis before any worker starts: that the URL is one,
that Redis is reachable (waiting for it if not), and that it would not evict requests."""

from __future__ import annotations

import logging
import threading

import redis

from queueing import connection
from queueing.base import without_password
from queueing.redis_state import eviction_problem, read_policy
from workers.config import PoolConfig
from workers.errors import ConfigError, RedisSettingsError

log = logging.getLogger("workers.supervisor")  # said by the supervisor, as before

#: Waiting for Redis at start: first delay between tries, and the cap.
REDIS_RETRY_START_S = 1.0
REDIS_RETRY_MAX_S = 30.0


def check_redis_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is a Redis URL redis-py can connect with."""
    try:
        redis.connection.parse_url(connection.first_node_url(url))  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise ConfigError(
            f"redis_url {without_password(url)!r} is not a Redis URL: {e}"
            " (e.g. redis://host:6379/0, rediss://..., unix:///path/redis.sock,"
            " redis+cluster://node:6379)"
        ) from e


def check_redis(config: PoolConfig) -> None:
    """Refuse an evicting Redis (see queueing.redis_state), unless the config allows
    it; then say so loudly."""
    conn = connection.connect(config.redis_url, socket_timeout=10)
    try:
        problem = eviction_problem(read_policy(conn))
    finally:
        conn.close()
    if problem is None:
        return
    if not config.allow_evicting_redis:
        raise RedisSettingsError(
            f"{problem}. To serve anyway, set allow_evicting_redis (--allow-evicting-redis)"
        )
    log.warning("%s. Serving anyway, as allow_evicting_redis says: requests may be "
                "evicted and lost without an error", problem)  # fmt: skip


def wait_for_redis(config: PoolConfig, stop: threading.Event) -> bool:
    """Reach Redis before any worker starts: a worker without Redis would only crash
    and be restarted, each time after loading TensorFlow and the model. Unreachable,
    Redis may still come up later (started beside us, as in Kubernetes): wait, one
    log line per try. False if ``stop`` was set meanwhile (a signal). A refused password raises
    ConfigError: waiting would not change it."""
    delay = REDIS_RETRY_START_S
    safe_url = without_password(config.redis_url)
    while not stop.is_set():
        conn = connection.connect(config.redis_url, socket_connect_timeout=5, socket_timeout=5)
        try:
            conn.ping()
            return True
        except redis.AuthenticationError as e:
            raise ConfigError(f"Redis at {safe_url} refused the credentials: {e}") from e
        except redis.ResponseError as e:  # NOAUTH, WRONGPASS, ...
            raise ConfigError(f"Redis at {safe_url} refused: {e}") from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            log.warning(
                "cannot reach Redis at %s (%s); trying again in %.0fs, no worker started",
                safe_url, e, delay,
            )  # fmt: skip
        except redis.RedisError as e:  # it answers, but not as Redis does
            raise ConfigError(f"{safe_url} does not answer as Redis: {e}") from e
        finally:
            conn.close()
        stop.wait(delay)
        delay = min(delay * 2, REDIS_RETRY_MAX_S)
    return False
