"""Integration fixtures: real models on disk, and pools run by a real supervisor."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
    """Start a pool (CPU workers, one intra-op thread each, unless ``slots`` says) with a
    supervisor loop in a thread that restarts crashed workers, and wait until it is ready.
    Every pool started is drained when the module ends."""
    started: list[tuple[Supervisor, threading.Event, threading.Thread]] = []

    def start(
        model: str,
        *,
        workers: int = 1,
        slots: list[Slot] | None = None,
        url: str | None = None,
        **options: Any,
    ) -> Supervisor:
        config = PoolConfig(model=model, redis_url=url or redis_url, workers=workers, **options)
        if slots is None:
            slots = [Slot(i, None, 1, 1) for i in range(workers)]
        supervisor = Supervisor(config, slots=slots)
        supervisor.start()
        assert supervisor.wait_ready(timeout=120), "pool did not become ready"
        until = threading.Event()
        monitor = threading.Thread(target=supervisor.monitor, args=(until,), daemon=True)
        monitor.start()
        started.append((supervisor, until, monitor))
        return supervisor

    yield start
    for supervisor, until, monitor in started:
        until.set()
        monitor.join()
        supervisor.drain(timeout=30)


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c


@pytest.fixture(scope="session")
def image_model(model_dir: Path) -> tuple[str, str]:
    """The image classifier's path and its labels file."""
    return models.build_keras_image_classifier(model_dir)
