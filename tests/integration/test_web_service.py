"""The example web service (scripts/web_service.py) in front of real pools."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from queueing import AsyncClient
from scripts.web_service import create_app
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.models import IMAGE_LABELS, decoded_image_input, encode_image
from tests.waiting import wait_until
from workers.embedded_redis import free_port

Call = Callable[[TestClient[Any, Any]], Awaitable[None]]


def _serve(redis_url: str, call: Call) -> None:
    async def main() -> None:
        async with (
            AsyncClient(redis_url) as client,
            TestClient(TestServer(create_app(client, timeout_s=20))) as http,
        ):
            await call(http)

    asyncio.run(main())


@pytest.fixture(scope="module")
def pools(start_pool: PoolFactory, mlp_path: str, image_model: tuple[str, str]) -> str:
    start_pool(mlp_path, name="web-mlp")
    path, labels = image_model
    start_pool(path, name="web-pets", preprocess="image", image_scale=1 / 255,
               postprocess="argmax", labels_file=labels)  # fmt: skip
    return path


def test_json_and_image_requests(pools: str, mlp_path: str, redis_url: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    png = encode_image(np.random.default_rng(2).integers(0, 256, (20, 14, 3), np.uint8), "png")

    async def call(http: TestClient[Any, Any]) -> None:
        reply = await http.post("/v1/models/web-mlp/predict", json={"inputs": x.tolist()})
        assert reply.status == 200
        got = np.array((await reply.json())["outputs"], np.float32)
        want = next(iter(models.keras_outputs(mlp_path, x).values()))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        reply = await http.post("/v1/models/web-pets/predict", data=png,
                                headers={"Content-Type": "image/png"})  # fmt: skip
        assert reply.status == 200
        outputs = (await reply.json())["outputs"]
        direct = models.keras_outputs(pools, decoded_image_input(png, scale=1 / 255)[None])
        best = int(np.argmax(next(iter(direct.values()))[0]))
        assert outputs["index"] == best and outputs["label"] == IMAGE_LABELS[best]

        reply = await http.post("/v1/models/web-mlp/submit", json={"inputs": x[0].tolist()})
        assert reply.status == 202
        request_id = (await reply.json())["id"]
        reply = await http.get(f"/v1/results/{request_id}", params={"wait": "10"})
        assert reply.status == 200
        np.testing.assert_allclose((await reply.json())["outputs"], want[0], rtol=1e-5, atol=1e-6)

    _serve(redis_url, call)


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/models/web-mlp/predict", {"json": {"inputs": [[1.0, 2.0]]}}, 400, "InvalidInput"),
        ("/v1/models/web-mlp/predict", {"json": {"inputs": [[1], [1, 2]]}}, 400, "InvalidInput"),
        ("/v1/models/web-mlp/predict", {"json": {"x": 1}}, 400, "InvalidInput"),
        ("/v1/models/nope/predict", {"json": {"inputs": [1.0]}}, 404, "UnknownModel"),
        ("/v1/models/web-pets/predict", {"data": b"not an image"}, 400, "InvalidInput"),
        ("/v1/results/no-such-id", None, 404, "NotReady"),
    ],
)
def test_errors_say_whose_fault_it_is(
    pools: str, redis_url: str, path: str, body: dict[str, Any] | None, status: int, kind: str
) -> None:
    async def call(http: TestClient[Any, Any]) -> None:
        reply = await (http.get(path) if body is None else http.post(path, **body))
        assert reply.status == status
        assert (await reply.json())["error"] == kind

    _serve(redis_url, call)


def test_healthz_is_503_while_redis_is_unreachable() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def call(http: TestClient[Any, Any]) -> None:
        reply = await http.get("/healthz")
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "1"
        body = await reply.json()
        assert body["ok"] is False and body["error"] == "Unavailable"
        assert body["message"].startswith("cannot reach Redis: Error 111 connecting to")

    _serve(closed, call)


def test_healthz_is_200_while_redis_answers(redis_url: str) -> None:
    async def call(http: TestClient[Any, Any]) -> None:
        reply = await http.get("/healthz")
        assert reply.status == 200 and (await reply.json()) == {"ok": True}

    _serve(redis_url, call)


def test_json_sent_without_its_content_type_is_told_so(redis_url: str) -> None:
    async def call(http: TestClient[Any, Any]) -> None:
        # What `curl -d '{...}'` sends: application/x-www-form-urlencoded.
        reply = await http.post(
            "/v1/models/web-mlp/predict",
            data=b'{"inputs": [[0.1, 0.2]]}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert reply.status == 400
        assert (await reply.json())["message"] == (
            "the body looks like JSON but its Content-Type is"
            " 'application/x-www-form-urlencoded': send it with"
            " -H 'Content-Type: application/json'"
        )

    _serve(redis_url, call)


def test_a_full_queue_is_503_with_retry_after_and_a_late_answer_is_504(
    start_pool: PoolFactory, mlp_path: str, redis_url: str
) -> None:
    supervisor = start_pool(mlp_path, name="web-stalled", max_queue=3)
    worker = supervisor.handles[0].process
    assert worker is not None and worker.pid is not None
    pid = worker.pid
    row = {"inputs": [0.5] * 8}
    deadline_ms = 50

    async def main() -> None:
        async with (
            AsyncClient(redis_url) as client,
            TestClient(TestServer(create_app(client, timeout_s=1))) as short,
            TestClient(TestServer(create_app(client, timeout_s=30))) as long,
        ):
            # No answer within the service's timeout: 504 RequestTimeout (queue: 1 of 3).
            reply = await short.post("/v1/models/web-stalled/predict", json=row)
            assert reply.status == 504 and (await reply.json())["error"] == "RequestTimeout"
            assert "Retry-After" not in reply.headers
            # A request whose deadline passes while it waits (queue: 2 of 3), one more (3).
            reply = await long.post("/v1/models/web-stalled/submit", json=row,
                                    params={"deadline_ms": str(deadline_ms)})  # fmt: skip
            assert reply.status == 202
            late = (await reply.json())["id"]
            sent = time.monotonic()
            assert (await long.post("/v1/models/web-stalled/submit", json=row)).status == 202
            # The queue is full: 503 QueueFull, come back in a second.
            reply = await long.post("/v1/models/web-stalled/predict", json=row)
            assert reply.status == 503 and (await reply.json())["error"] == "QueueFull"
            assert reply.headers["Retry-After"] == "1"
            await asyncio.to_thread(
                wait_until, lambda: time.monotonic() > sent + deadline_ms / 1000,
                what="the deadline to pass",
            )  # fmt: skip
            os.kill(pid, signal.SIGCONT)
            # The worker sheds it unrun: 504 DeadlineExceeded.
            reply = await long.get(f"/v1/results/{late}", params={"wait": "20"})
            assert reply.status == 504 and (await reply.json())["error"] == "DeadlineExceeded"

    os.kill(pid, signal.SIGSTOP)
    try:
        asyncio.run(main())
    finally:
        os.kill(pid, signal.SIGCONT)


def test_redis_unreachable_is_503_with_retry_after() -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def call(http: TestClient[Any, Any]) -> None:
        reply = await http.post("/v1/models/web-mlp/predict", json={"inputs": [0.5] * 8})
        assert reply.status == 503 and (await reply.json())["error"] == "Unavailable"
        assert reply.headers["Retry-After"] == "1"

    _serve(closed, call)
