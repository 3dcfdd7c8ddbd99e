"""An example web service: HTTP in front of the pool, with aiohttp and ``AsyncClient``.

    pip install -e '.[examples]'
    python scripts/web_service.py --redis-url redis://localhost:6379/0 --port 8080

Routes (``MODEL`` is the name the pool serves the model under):

* ``POST /v1/models/MODEL/predict``, JSON ``{"inputs": [[...], ...], "dtype": "float32"}``
  (or ``"inputs": {"name": [...], ...}`` for several inputs; ``dtype`` defaults to float32)
  -> ``{"outputs": ...}`` (nested lists; a dict for several outputs);
* ``POST /v1/models/MODEL/predict`` with an image body (``Content-Type: image/jpeg``,
  ``image/png``, ... or ``application/octet-stream``) -> the same, for a pool with
  ``preprocess = "image"``: the encoded bytes go to the workers as they are;
* ``POST /v1/models/MODEL/submit`` (either body) -> ``202 {"id": ...}``, and later
  ``GET /v1/results/ID?wait=SECONDS`` -> the outputs, or ``404`` while there is none;
* ``GET /healthz`` -> ``{"ok": true}`` while Redis answers, else ``503``.

``?deadline_ms=N`` on predict and submit drops a request not started within N ms. Errors
come back as ``{"error": KIND, "message": ...}`` with a status that says whose fault it is:
400 InvalidInput, 404 UnknownModel, 503 QueueFull / Unavailable (with Retry-After),
504 DeadlineExceeded / RequestTimeout, 500 ModelError and the rest.
"""

from __future__ import annotations

import argparse
import base64
import sys
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis
from aiohttp import web

from queueing import AsyncClient
from queueing.errors import (
    DeadlineExceeded,
    InvalidInput,
    QueueFull,
    RequestError,
    RequestTimeout,
    Unavailable,
    UnknownModel,
)
from queueing.wire import ALLOWED_DTYPES, Outputs, Sendable

CLIENT = web.AppKey("client", AsyncClient)

#: The HTTP status of each error kind (the rest: 500).
STATUS: dict[type[RequestError], int] = {
    InvalidInput: 400,
    UnknownModel: 404,
    QueueFull: 503,
    Unavailable: 503,
    DeadlineExceeded: 504,
    RequestTimeout: 504,
}

#: Largest request body taken, in bytes.
MAX_BODY_BYTES = 32 * 2**20


def create_app(client: AsyncClient, *, timeout_s: float = 30.0) -> web.Application:
    """The service, sending to the pool through ``client`` (closed by the caller)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors])
    app[CLIENT] = client
    health_redis = aioredis.Redis.from_url(
        client.redis_url, socket_timeout=2, socket_connect_timeout=2
    )

    async def predict(request: web.Request) -> web.Response:
        inputs, deadline = await _inputs(request)
        outputs = await client.predict(
            request.match_info["model"], inputs, deadline=deadline, timeout=timeout_s
        )
        return web.json_response({"outputs": _jsonable(outputs)})

    async def submit(request: web.Request) -> web.Response:
        inputs, deadline = await _inputs(request)
        future = await client.submit(request.match_info["model"], inputs, deadline=deadline,
                                     keep=True)  # fmt: skip
        return web.json_response({"id": future.request_id}, status=202)

    async def result(request: web.Request) -> web.Response:
        wait_s = min(_number(request, "wait", 0.0), timeout_s)
        try:
            outputs = await client.result(request.match_info["id"], timeout=max(wait_s, 0.01))
        except RequestTimeout:
            raise web.HTTPNotFound(
                text='{"error": "NotReady", "message": "no result (yet) under this id"}',
                content_type="application/json",
            ) from None
        return web.json_response({"outputs": _jsonable(outputs)})

    async def healthz(request: web.Request) -> web.Response:
        # Healthy means able to queue: Redis answers. (Whether a pool serves the model is
        # `tfpool status`'s question: requests may wait for one.)
        try:
            await health_redis.ping()
        except redis.RedisError as e:
            body = {"ok": False, "error": "Unavailable", "message": f"cannot reach Redis: {e}"}
            return web.json_response(body, status=503, headers={"Retry-After": "1"})
        return web.json_response({"ok": True})

    async def close_health_redis(_: web.Application) -> None:
        await health_redis.aclose()

    app.on_cleanup.append(close_health_redis)

    app.router.add_post("/v1/models/{model}/predict", predict)
    app.router.add_post("/v1/models/{model}/submit", submit)
    app.router.add_get("/v1/results/{id}", result)
    app.router.add_get("/healthz", healthz)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """A request error as JSON, with the status that says whose fault it is."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except RequestError as e:
        status = next((code for kind, code in STATUS.items() if isinstance(e, kind)), 500)
        headers = {"Retry-After": "1"} if status == 503 else None
        body = {"error": type(e).__name__, "message": str(e)}
        return web.json_response(body, status=status, headers=headers)


async def _inputs(request: web.Request) -> tuple[Sendable, float | None]:
    """The request's inputs: a JSON body's arrays, or the raw bytes of an image body."""
    deadline_ms = _number(request, "deadline_ms", 0.0)
    deadline = deadline_ms / 1000 if deadline_ms > 0 else None
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError as e:
            raise InvalidInput(f"body is not JSON: {e}") from e
        if not isinstance(body, dict) or "inputs" not in body:
            raise InvalidInput('JSON body must be {"inputs": ..., "dtype": ...}')
        dtype = body.get("dtype", "float32")
        if dtype not in ALLOWED_DTYPES:
            raise InvalidInput(f"dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
        raw = body["inputs"]
        if isinstance(raw, dict):
            return {str(k): _array(v, dtype, str(k)) for k, v in raw.items()}, deadline
        return _array(raw, dtype, "inputs"), deadline
    data = await request.read()
    if not data:
        raise InvalidInput("empty body: send JSON or an encoded image")
    if data.lstrip()[:1] in (b"{", b"["):  # no image starts so: JSON sent without its type
        raise InvalidInput(
            "the body looks like JSON but its Content-Type is"
            f" {request.content_type!r}: send it with -H 'Content-Type: application/json'"
        )
    return data, deadline


def _array(value: Any, dtype: str, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as e:  # ragged lists, strings in numbers, ...
        raise InvalidInput(f"{name}: not an array of {dtype}: {e}") from e


def _number(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise InvalidInput(f"query parameter {name}={text!r} is not a number") from None


def _jsonable(outputs: Outputs) -> Any:
    if isinstance(outputs, dict):
        return {name: _jsonable(value) for name, value in outputs.items()}
    if outputs.dtype == object:  # bytes items: base64, the way JSON carries bytes
        return np.vectorize(lambda b: base64.b64encode(b).decode(), otypes=[object])(
            outputs
        ).tolist()
    return outputs.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="the pool's Redis (default: TFPOOL_REDIS_URL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per request")
    args = parser.parse_args(argv)

    async def app() -> web.Application:
        client = AsyncClient(args.redis_url)
        application = create_app(client, timeout_s=args.timeout)

        async def close(_: web.Application) -> None:
            await client.close()

        application.on_cleanup.append(close)
        return application

    web.run_app(app(), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
