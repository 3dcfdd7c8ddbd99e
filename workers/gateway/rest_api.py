"""The HTTP front end: TF Serving's REST API (``/v1/models/...``) and the Open Inference
Protocol's (``/v2/...``), as aiohttp routes. JSON arrays become numpy arrays of the dtype
the model's spec (in Redis) names, since JSON numbers carry none."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from queueing.errors import InvalidInput, RequestError
from queueing.wire import BYTES, STR, dtype_name
from workers.gateway import tensors
from workers.gateway.catalog import ModelEntry
from workers.gateway.errors import RETRY_AFTER_S, http_status
from workers.gateway.grpc_api import (
    model_status,
    oip_tensor_metadata,
    oip_version,
    signature_def_map,
)
from workers.gateway.service import DEFAULT_SIGNATURE, Gateway, Route, tfpool_version
from workers.spec import TensorSpec

_GATEWAY = web.AppKey("gateway", Gateway)

# /v1/models/NAME[/versions/V | /labels/L][/metadata | :predict]
_V1 = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<meta>/metadata)|:(?P<verb>\w+))?$"
)
# /v2/models/NAME[/versions/V][/ready | /infer]
_V2 = re.compile(r"^(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>ready|infer))?$")


def create_app(gateway: Gateway, *, max_body_mb: int = 64) -> web.Application:
    """The aiohttp application of both REST APIs, bound to ``gateway``."""
    app = web.Application(client_max_size=max_body_mb * 2**20, middlewares=[_errors])
    app[_GATEWAY] = gateway
    app.router.add_route("*", "/v1/models/{tail:.+}", _v1)
    app.router.add_get("/v2", _v2_server)
    app.router.add_get("/v2/health/live", _v2_live)
    app.router.add_get("/v2/health/ready", _v2_ready)
    app.router.add_route("*", "/v2/models/{tail:.+}", _v2)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """tfpool's errors as ``{"error": message}`` with the mapped status; 429 says when to
    come back."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RequestError as e:
        status = http_status(e)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
        return web.json_response({"error": str(e)}, status=status, headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"the request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


def _not_found(request: web.Request) -> web.Response:
    return web.json_response(
        {"error": f"no such endpoint: {request.method} {request.path}"}, status=404
    )


# --- TF Serving ---------------------------------------------------------------------------


async def _v1(request: web.Request) -> web.StreamResponse:
    match = _V1.match(request.match_info["tail"])
    if match is None:
        return _not_found(request)
    gateway = request.app[_GATEWAY]
    version = match["version"] or match["label"]
    route = await gateway.route(match["name"], version)
    if request.method == "GET" and match["verb"] is None:
        if match["meta"]:
            return web.json_response(_v1_metadata(route))
        return web.json_response(
            json_format.MessageToDict(
                model_status(route, asked=version is not None),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
        )
    if request.method == "POST" and match["verb"] == "predict":
        return web.json_response(await _v1_predict(gateway, route, await _body(request)))
    if request.method == "POST" and match["verb"] in ("classify", "regress"):
        raise InvalidInput(f"{match['verb']} is not served: tfpool runs predict signatures only")
    return _not_found(request)


def _v1_metadata(route: Route) -> dict[str, Any]:
    signatures = json_format.MessageToDict(
        signature_def_map(route.entry),
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    return {
        "model_spec": {
            "name": route.entry.name,
            "signature_name": "",
            "version": "" if route.version is None else str(route.version),
        },
        "metadata": {"signature_def": signatures},
    }


async def _v1_predict(gateway: Gateway, route: Route, body: dict[str, Any]) -> dict[str, Any]:
    """TF Serving's row format (``instances`` -> ``predictions``) or its columnar format
    (``inputs`` -> ``outputs``). TF Serving's answer names no version; nor does this."""
    entry = route.entry
    signature = body.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(signature, str):
        raise InvalidInput("signature_name must be a string")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput('the request must have either "instances" or "inputs"')
    specs = {s.name: s for s in entry.inputs}
    if "instances" in body:
        inputs = _rows_to_arrays(body["instances"], entry)
    else:
        given = body["inputs"]
        if isinstance(given, dict) and not _is_b64(given):
            inputs = {
                name: _to_array(value, _spec(specs, name, entry)) for name, value in given.items()
            }
        else:
            inputs = {_only_input(entry): _to_array(given, entry.inputs[0])}
    outputs = (await gateway.predict(route, inputs)).outputs
    if "instances" in body:
        rows = len(next(iter(outputs.values())))
        if len(outputs) == 1:
            ((name, array),) = outputs.items()
            return {"predictions": _to_json(name, array)}
        columns = {name: _to_json(name, array) for name, array in outputs.items()}
        return {"predictions": [{name: columns[name][i] for name in columns} for i in range(rows)]}
    if len(outputs) == 1:
        ((name, array),) = outputs.items()
        return {"outputs": _to_json(name, array)}
    return {"outputs": {name: _to_json(name, array) for name, array in outputs.items()}}


def _rows_to_arrays(instances: Any, entry: ModelEntry) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('"instances" must be a non-empty list of rows')
    specs = {s.name: s for s in entry.inputs}
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if all(named):
        names = set(instances[0])
        if any(set(row) != names for row in instances):
            raise InvalidInput("every instance must name the same inputs")
        return {
            name: _to_array([row[name] for row in instances], _spec(specs, name, entry))
            for name in names
        }
    if any(named):
        raise InvalidInput("instances must be all objects of named inputs, or all values")
    return {_only_input(entry): _to_array(instances, entry.inputs[0])}


def _spec(specs: dict[str, TensorSpec], name: str, entry: ModelEntry) -> TensorSpec:
    spec = specs.get(name)
    if spec is None:
        raise InvalidInput(f"model {entry.name!r} has no input {name!r}; it has {sorted(specs)}")
    return spec


def _only_input(entry: ModelEntry) -> str:
    if len(entry.inputs) != 1:
        names = [s.name for s in entry.inputs]
        raise InvalidInput(f"model {entry.name!r} takes inputs {names}: name each one")
    return entry.inputs[0].name


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _to_array(value: Any, spec: TensorSpec) -> np.ndarray:
    """A JSON value as an array of the input's dtype; ``{"b64": ...}`` items are bytes."""
    where = f"input {spec.name!r}"
    if spec.dtype in (BYTES, STR):
        array = np.array(_decode_items(value, where), dtype=object)
        if not all(isinstance(item, bytes) for item in array.ravel()):
            raise InvalidInput(f'{where}: expected strings or {{"b64": ...}} items')
        return array
    try:
        return np.asarray(value, dtype=spec.dtype)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{where}: cannot read as {spec.dtype}: {e}") from e


def _decode_items(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode_items(v, where) for v in value]
    if _is_b64(value):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError) as e:
            raise InvalidInput(f"{where}: bad base64: {e}") from e
    if isinstance(value, str):
        return value.encode()
    return value


def _to_json(name: str, array: np.ndarray) -> Any:
    """An output as TF Serving writes it: strings of an output whose name ends in
    ``_bytes``, and any that are not UTF-8, as ``{"b64": ...}``."""
    if dtype_name(array) not in (BYTES, STR):
        return array.tolist()
    binary = name.endswith("_bytes")

    def item(value: Any) -> Any:
        if isinstance(value, list):
            return [item(v) for v in value]
        if isinstance(value, str):
            return value
        if not binary:
            try:
                return bytes(value).decode()
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(bytes(value)).decode()}

    return item(array.tolist())


# --- Open Inference Protocol --------------------------------------------------------------


async def _v2_server(request: web.Request) -> web.Response:
    return web.json_response({"name": "tfpool", "version": tfpool_version(), "extensions": []})


async def _v2_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _v2_ready(request: web.Request) -> web.Response:
    ready = await request.app[_GATEWAY].catalog.ping()
    return web.json_response({"ready": ready}, status=200 if ready else 503)


async def _v2(request: web.Request) -> web.StreamResponse:
    match = _V2.match(request.match_info["tail"])
    if match is None:
        return _not_found(request)
    gateway = request.app[_GATEWAY]
    route = await gateway.route(match["name"], match["version"])
    entry = route.entry
    if request.method == "GET" and match["verb"] is None:
        inputs, outputs = oip_tensor_metadata(entry)
        versions = [str(v) for v in entry.versions]
        metadata = {"name": entry.name, "versions": versions, "platform": "tfpool"}
        return web.json_response({**metadata, "inputs": inputs, "outputs": outputs})
    if request.method == "GET" and match["verb"] == "ready":
        return web.json_response(
            {"name": entry.name, "ready": entry.available}, status=200 if entry.available else 503
        )
    if request.method == "POST" and match["verb"] == "infer":
        return web.json_response(await _v2_infer(gateway, route, await _body(request)))
    return _not_found(request)


async def _v2_infer(gateway: Gateway, route: Route, body: dict[str, Any]) -> dict[str, Any]:
    given = body.get("inputs")
    if not isinstance(given, list) or not given:
        raise InvalidInput('"inputs" must be a non-empty list of tensors')
    inputs = {}
    for tensor in given:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput("each input must be an object with a name")
        inputs[tensor["name"]] = _v2_tensor(tensor)
    wanted = body.get("outputs") or []
    if not isinstance(wanted, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted
    ):
        raise InvalidInput('"outputs" must be a list of objects with a name')
    answer = await gateway.predict(route, inputs, outputs=[o["name"] for o in wanted])
    reply: dict[str, Any] = {
        "model_name": route.entry.name,
        "model_version": oip_version(answer.version),
    }
    if "id" in body:
        reply["id"] = body["id"]
    reply["outputs"] = [_v2_output(name, array) for name, array in answer.outputs.items()]
    return reply


def _v2_tensor(tensor: dict[str, Any]) -> np.ndarray:
    """An OIP JSON tensor: ``data`` flat or nested, in row-major order, reshaped to
    ``shape``; BYTES items are strings."""
    where = f"input {tensor['name']!r}"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of integers")
    elements = tensors.check_shape(shape, where)
    kind = tensors.oip_kind(str(tensor.get("datatype")), where)
    data = tensor.get("data")
    if kind == BYTES:
        items = np.array(_decode_items(data, where), dtype=object).ravel()
        if not all(isinstance(item, bytes) for item in items):
            raise InvalidInput(f"{where}: BYTES data must be strings")
        array = items
    else:
        try:
            array = np.asarray(data, dtype=kind).ravel()
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"{where}: cannot read as {tensor.get('datatype')}: {e}") from e
    if array.size != elements:
        raise InvalidInput(f"{where}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _v2_output(name: str, array: np.ndarray) -> dict[str, Any]:
    kind = dtype_name(array)
    output: dict[str, Any] = {
        "name": name,
        "datatype": tensors.oip_datatype(kind),
        "shape": list(array.shape),
    }
    if kind in (BYTES, STR):
        items = [v if isinstance(v, str) else bytes(v) for v in array.ravel()]
        try:
            output["data"] = [v if isinstance(v, str) else v.decode() for v in items]
        except UnicodeDecodeError:  # binary: base64, and the parameter says so
            output["data"] = [base64.b64encode(v.encode() if isinstance(v, str) else v).decode()
                              for v in items]  # fmt: skip
            output["parameters"] = {"content_type": "base64"}
    else:
        output["data"] = array.ravel().tolist()
    return output
