"""Scoring a dataset with one version of a model whose versions take different inputs:
the columns are matched against the version the address names (``name@2``,
``name@canary``), not the default version's."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from queueing import Client
from queueing.score import Progress, score
from tests.integration import models
from tests.integration.gateway.conftest import serve_versions
from workers.repository import READY_MARKER
from workers.supervisor import Supervisor

#: Version 1: x [*, 4] float32 -> y. Version 2: features [*, 6] float64 -> total, doubled.
NAME = "score-versions"


@pytest.fixture(scope="module")
def wider(
    tmp_path_factory: pytest.TempPathFactory,
    start_pool: Callable[..., Supervisor],
    redis_url: str,
) -> str:
    """A pool serving both versions (default 1, label canary = 2); version 2's path."""
    repo = tmp_path_factory.mktemp("score-versions")
    models.build_times_model(repo / NAME / "1", 1.0)
    wider = models.build_wider_model(repo / NAME / "2")
    for version in ("1", "2"):
        (repo / NAME / version / READY_MARKER).touch()
    serve_versions(start_pool, redis_url, repo, NAME, {"stable": 1, "canary": 2})
    return wider


def _quiet(total: int, done: int) -> Progress:
    return Progress(total, done, stream=io.StringIO())


@pytest.mark.parametrize("address", [f"{NAME}@2", f"{NAME}@canary"])
def test_columns_are_matched_against_the_version_named(
    address: str, wider: str, redis_url: str, tmp_path: Path
) -> None:
    features = np.random.default_rng(3).normal(size=(120, 6))
    table = pa.table({
        "id": np.arange(120, dtype=np.int64),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 6),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    with Client(redis_url) as client:
        summary = score(client, address, str(tmp_path / "in.parquet"),
                        str(tmp_path / "out.parquet"), keep_columns=["id"], chunk_rows=32,
                        progress=_quiet)  # fmt: skip
    assert (summary.scored, summary.failed_rows) == (120, 0)
    got = pq.read_table(tmp_path / "out.parquet")
    assert sorted(got.column_names) == ["doubled", "error", "id", "total"]
    serve = tf.saved_model.load(wider).signatures["serving_default"]
    want = {k: v.numpy() for k, v in serve(features=tf.constant(features)).items()}
    for name in ("total", "doubled"):
        np.testing.assert_allclose(np.array(got.column(name).to_pylist()).reshape(want[name].shape),
                                   want[name], rtol=1e-6)  # fmt: skip
