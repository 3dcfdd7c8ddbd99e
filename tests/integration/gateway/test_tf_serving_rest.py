"""TF Serving's REST API with ``requests`` and ``aiohttp``, in both of its formats."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import numpy as np
import requests

from tests.integration import models
from tests.integration.gateway.conftest import GHOST, MLP, TEXT, TWIN
from workers.gateway.server import GatewayServer


def _base(gateway: GatewayServer) -> str:
    return f"http://localhost:{gateway.rest_port}/v1/models"


def test_row_format_one_input(gateway: GatewayServer, pools: dict[str, str]) -> None:
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    reply = requests.post(
        f"{_base(gateway)}/{MLP}:predict", json={"instances": x.tolist()}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    ((_, want),) = models.keras_outputs(pools[MLP], x).items()
    np.testing.assert_allclose(np.array(reply.json()["predictions"]), want, rtol=1e-5, atol=1e-6)

    versioned = f"{_base(gateway)}/{MLP}/versions/1:predict"
    reply = requests.post(versioned, json={"instances": x[:1].tolist()}, timeout=10)
    assert reply.status_code == 200, reply.text
    np.testing.assert_allclose(
        np.array(reply.json()["predictions"]), want[:1], rtol=1e-5, atol=1e-6
    )


def test_row_and_columnar_formats_two_inputs(gateway: GatewayServer, pools: dict[str, str]) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((3, 3)).astype(np.float32)
    want = models.keras_outputs(pools[TWIN], {"a": a, "b": b})

    rows = [{"a": a[i].tolist(), "b": b[i].tolist()} for i in range(3)]
    reply = requests.post(f"{_base(gateway)}/{TWIN}:predict", json={"instances": rows}, timeout=10)
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert len(predictions) == 3 and all(sorted(p) == ["y", "z"] for p in predictions)
    for name in ("y", "z"):
        got = np.array([p[name] for p in predictions])
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-6)

    async def columnar() -> dict[str, list[list[float]]]:
        async with aiohttp.ClientSession() as session:
            body = {
                "signature_name": "serving_default",
                "inputs": {"a": a.tolist(), "b": b.tolist()},
            }
            async with session.post(f"{_base(gateway)}/{TWIN}:predict", json=body) as response:
                assert response.status == 200, await response.text()
                outputs: dict[str, list[list[float]]] = (await response.json())["outputs"]
                return outputs

    outputs = asyncio.run(columnar())
    for name in ("y", "z"):
        np.testing.assert_allclose(np.array(outputs[name]), want[name], rtol=1e-5, atol=1e-6)


def test_b64_binary_strings(gateway: GatewayServer) -> None:
    texts = [b"abc", b"\x00\xffzz\x00"]
    instances = [{"b64": base64.b64encode(t).decode()} for t in texts]
    reply = requests.post(
        f"{_base(gateway)}/{TEXT}:predict", json={"instances": instances}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert [p["length"] for p in predictions] == [3, 5]
    # An output named *_bytes comes back base64-encoded, as TF Serving does it.
    assert [base64.b64decode(p["upper_bytes"]["b64"]) for p in predictions] == [
        b"ABC",
        b"\x00\xffZZ\x00",
    ]

    reply = requests.post(
        f"{_base(gateway)}/{TEXT}:predict", json={"inputs": ["hi", "there"]}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["outputs"]["length"] == [2, 5]


def test_model_status_and_metadata(gateway: GatewayServer) -> None:
    reply = requests.get(f"{_base(gateway)}/{MLP}", timeout=10)
    assert reply.status_code == 200
    (status,) = reply.json()["model_version_status"]
    assert status["state"] == "AVAILABLE" and status["status"]["error_code"] == "OK"

    (status,) = requests.get(f"{_base(gateway)}/{GHOST}", timeout=10).json()["model_version_status"]
    assert status["state"] != "AVAILABLE"

    metadata = requests.get(f"{_base(gateway)}/{TWIN}/metadata", timeout=10).json()
    assert metadata["model_spec"]["name"] == TWIN
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    a = signature["inputs"]["a"]
    assert a["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in a["tensor_shape"]["dim"]] == ["-1", "4"]
    assert sorted(signature["outputs"]) == ["y", "z"]
