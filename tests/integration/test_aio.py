"""AsyncClient against a real pool: same results and errors as Client; cancellation and
timeouts leave nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from queueing import AsyncClient, InvalidInput, RequestTimeout, UnknownModel
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.poison import SLOW, build_poison_model


def test_predict_submit_many_keep_and_stream(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="aio", max_batch_size=16)
    x = np.random.default_rng(5).standard_normal((40, 8)).astype(np.float32)
    want = next(iter(models.keras_outputs(mlp_path, x).values()))

    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            one = await client.predict("aio", x[0])
            np.testing.assert_allclose(np.asarray(one), want[0], rtol=1e-5, atol=1e-6)
            futures = await client.submit_many("aio", list(x))
            got = await asyncio.gather(*(client.wait(f) for f in futures))
            np.testing.assert_allclose(np.stack([np.asarray(g) for g in got]), want,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            kept = await client.submit("aio", x[:3], keep=True)
            await client.wait(kept)
            async with AsyncClient(redis_url) as other:
                again = await other.result(kept.request_id, timeout=10)
            np.testing.assert_allclose(np.asarray(again), want[:3], rtol=1e-5, atol=1e-6)
            streamed = [np.asarray(r) async for r in client.stream("aio", iter(x), window=4)]
            np.testing.assert_allclose(np.stack(streamed), want, rtol=1e-5, atol=1e-6)
            with pytest.raises(UnknownModel):
                await client.predict("aoi", x[0])
            with pytest.raises(InvalidInput, match="expected float32"):
                await client.predict("aio", x[0].astype(np.float64))
            assert client.pending == 0

    asyncio.run(main())


def test_cancelled_and_timed_out_callers_leave_nothing_behind(
    start_pool: PoolFactory, model_dir: Path, redis_url: str
) -> None:
    path = build_poison_model(model_dir)
    start_pool(path, name="aio-slow", max_batch_size=1, preload=["tests.integration.poison"])
    slow = np.full(4, SLOW, np.float32)

    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            task = asyncio.create_task(client.predict("aio-slow", slow, timeout=30))
            while client.pending == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert client.pending == 0  # the cancelled caller took its future along

            with pytest.raises(RequestTimeout):
                await client.predict("aio-slow", slow, timeout=0.2)
            assert client.pending == 0

            # Both results still arrive later; they find no future and are dropped.
            await client.predict("aio-slow", np.zeros(4, np.float32), timeout=30)
            while client.duplicates_ignored < 2:
                await asyncio.sleep(0.05)
            assert client.pending == 0

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_an_async_camera_gets_each_result_before_its_next_frame(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    start_pool(mlp_path, name="aio-live")
    x = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
    want = next(iter(models.keras_outputs(mlp_path, x).values()))

    async def main() -> None:
        shown = [asyncio.Event() for _ in x]

        async def camera() -> AsyncIterator[np.ndarray]:
            for i, frame in enumerate(x):
                yield frame
                await asyncio.wait_for(shown[i].wait(), timeout=20)  # a live camera

        async with AsyncClient(redis_url) as client:
            got = []
            async for result in client.stream("aio-live", camera(), window=4):
                got.append(np.asarray(result))
                shown[len(got) - 1].set()
            np.testing.assert_allclose(np.stack(got), want, rtol=1e-5, atol=1e-6)
            assert client.pending == 0

    asyncio.run(main())
