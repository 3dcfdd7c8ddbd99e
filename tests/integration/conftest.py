"""Integration fixtures: real models on disk, and pools run by a real supervisor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from queueing import Client
from tests.integration import models
from workers.config import PoolConfig
from workers.placement import Slot
from workers.supervisor import Supervisor


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def twin_paths(model_dir: Path) -> tuple[str, str]:
    return models.build_keras_two_in_two_out(model_dir)


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> str:
    return models.build_keras_mlp(model_dir)


@pytest.fixture(scope="session")
def saved_model_path(model_dir: Path) -> str:
    return models.build_saved_model(model_dir)


PoolFactory = Callable[..., Supervisor]


@pytest.fixture(scope="module")
def start_pool(redis_url: str) -> Iterator[PoolFactory]:
    """Start a pool (one CPU worker unless told) and wait until it is ready; every pool
    started is drained when the module ends."""
    started: list[Supervisor] = []

    def start(model: str, *, workers: int = 1, **options: object) -> Supervisor:
        config = PoolConfig(model=model, redis_url=redis_url, workers=workers, **options)  # type: ignore[arg-type]
        slots = [Slot(i, None, 1, 1) for i in range(workers)]
        supervisor = Supervisor(config, slots=slots)
        supervisor.start()
        started.append(supervisor)
        assert supervisor.wait_ready(timeout=120), "pool did not become ready"
        return supervisor

    yield start
    for supervisor in started:
        supervisor.drain(timeout=30)


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c
