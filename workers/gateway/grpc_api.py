"""The gRPC front end: TF Serving's ``PredictionService`` and ``ModelService``, and the
Open Inference Protocol's ``GRPCInferenceService``, as generic handlers registered under
those services' own names (the messages' package is ours; see ``proto/tfs.proto``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from queueing.errors import InvalidInput, RequestError, UnknownModel
from workers.gateway import tensors
from workers.gateway.catalog import ModelEntry
from workers.gateway.errors import grpc_code
from workers.gateway.proto import oip_pb2, tfs_pb2
from workers.gateway.service import DEFAULT_SIGNATURE, Gateway, Route, tfpool_version

log = logging.getLogger(__name__)

TFS_PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
TFS_MODEL_SERVICE = "tensorflow.serving.ModelService"
OIP_SERVICE = "inference.GRPCInferenceService"

#: The Any type URL TF Serving clients unpack GetModelMetadata's ``signature_def`` with.
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
PREDICT_METHOD = "tensorflow/serving/predict"

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Handler = Callable[[Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def handlers(gateway: Gateway) -> list[grpc.GenericRpcHandler]:
    """Every gRPC service the gateway speaks, bound to ``gateway``."""
    tfs = _TfServing(gateway)
    oip = _OpenInference(gateway)
    return [
        grpc.method_handlers_generic_handler(
            TFS_PREDICTION_SERVICE,
            {
                "Predict": _unary(tfs.predict, tfs_pb2.PredictRequest),
                "GetModelMetadata": _unary(tfs.metadata, tfs_pb2.GetModelMetadataRequest),
            },
        ),
        grpc.method_handlers_generic_handler(
            TFS_MODEL_SERVICE,
            {"GetModelStatus": _unary(tfs.status, tfs_pb2.GetModelStatusRequest)},
        ),
        grpc.method_handlers_generic_handler(
            OIP_SERVICE,
            {
                "ServerLive": _unary(oip.server_live, oip_pb2.ServerLiveRequest),
                "ServerReady": _unary(oip.server_ready, oip_pb2.ServerReadyRequest),
                "ServerMetadata": _unary(oip.server_metadata, oip_pb2.ServerMetadataRequest),
                "ModelReady": _unary(oip.model_ready, oip_pb2.ModelReadyRequest),
                "ModelMetadata": _unary(oip.model_metadata, oip_pb2.ModelMetadataRequest),
                "ModelInfer": _unary(oip.infer, oip_pb2.ModelInferRequest),
            },
        ),
    ]


def _unary(
    handler: Handler[Any, Any], request_type: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary handler whose tfpool errors end the call with their mapped status."""

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(request, context)
        except RequestError as e:
            await context.abort(grpc_code(e), str(e))
        except Exception:
            log.exception("gRPC call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway")

    return grpc.unary_unary_rpc_method_handler(
        call,
        request_deserializer=request_type.FromString,
        response_serializer=lambda message: message.SerializeToString(),
    )


def _time_remaining(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    # grpc reports a call without a deadline as a huge number, not None, in some versions.
    return None if remaining is None or remaining > 1e8 else remaining


# --- TF Serving ---------------------------------------------------------------------------


def _version(spec: tfs_pb2.ModelSpec) -> int | str | None:
    if spec.HasField("version"):
        return spec.version.value
    if spec.HasField("version_label"):
        return spec.version_label
    return None


def signature_def_map(entry: ModelEntry) -> tfs_pb2.SignatureDefMap:
    """The model's one signature, built from its spec in Redis. Outputs whose dtype and
    shape neither the workers registered nor an answer has shown are DT_INVALID of
    unknown rank."""
    signature = tfs_pb2.SignatureDef(method_name=PREDICT_METHOD)
    for spec in entry.inputs:
        signature.inputs[spec.name].CopyFrom(
            tfs_pb2.TensorInfo(
                name=spec.name,
                dtype=tensors.tf_dtype(spec.dtype),  # type: ignore[arg-type]
                tensor_shape=tensors.tensor_shape((None, *spec.shape)),
            )
        )
    for name in entry.output_names:
        learned = entry.outputs.get(name)
        info = tfs_pb2.TensorInfo(name=name)
        if learned is None:
            info.tensor_shape.unknown_rank = True
        else:
            info.dtype = tensors.tf_dtype(learned.dtype)  # type: ignore[assignment]
            info.tensor_shape.CopyFrom(tensors.tensor_shape((None, *learned.shape)))
        signature.outputs[name].CopyFrom(info)
    result = tfs_pb2.SignatureDefMap()
    result.signature_def[DEFAULT_SIGNATURE].CopyFrom(signature)
    return result


def model_status(route: Route, *, asked: bool) -> tfs_pb2.GetModelStatusResponse:
    """One status per version the model serves, or only the version ``asked`` for:
    AVAILABLE while a worker of the model is alive; else END, with the reason."""
    entry = route.entry
    numbers = [route.version] if asked and route.version is not None else entry.versions
    if not numbers:  # as TF Serving answers for a model with no version
        raise UnknownModel(f"model {entry.name!r} serves no version now")
    response = tfs_pb2.GetModelStatusResponse()
    for number in numbers:
        status = response.model_version_status.add(version=number)
        if entry.available:
            status.state = tfs_pb2.ModelVersionStatus.AVAILABLE
            status.status.error_code = tfs_pb2.StatusProto.OK
        else:
            status.state = tfs_pb2.ModelVersionStatus.END
            status.status.error_code = tfs_pb2.StatusProto.UNAVAILABLE
            status.status.error_message = f"no live worker serves model {entry.name!r}"
    return response


class _TfServing:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def predict(
        self, request: tfs_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tfs_pb2.PredictResponse:
        spec = request.model_spec
        route = await self.gateway.route(spec.name, _version(spec))
        inputs = {
            name: tensors.from_tensor_proto(proto, f"input {name!r}")
            for name, proto in request.inputs.items()
        }
        answer = await self.gateway.predict(
            route, inputs, deadline_s=_time_remaining(context), outputs=list(request.output_filter)
        )
        response = tfs_pb2.PredictResponse()
        response.model_spec.name = route.entry.name
        if answer.version is not None:
            response.model_spec.version.value = answer.version
        response.model_spec.signature_name = spec.signature_name or DEFAULT_SIGNATURE
        for name, array in answer.outputs.items():
            response.outputs[name].CopyFrom(tensors.to_tensor_proto(array))
        return response

    async def metadata(
        self, request: tfs_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tfs_pb2.GetModelMetadataResponse:
        fields = set(request.metadata_field)
        if fields - {"signature_def"}:
            raise InvalidInput(f"metadata fields {sorted(fields)}: only signature_def is served")
        route = await self.gateway.route(request.model_spec.name, _version(request.model_spec))
        response = tfs_pb2.GetModelMetadataResponse()
        response.model_spec.name = route.entry.name
        if route.version is not None:
            response.model_spec.version.value = route.version
        response.metadata["signature_def"].CopyFrom(
            any_pb2.Any(
                type_url=SIGNATURE_DEF_MAP_URL,
                value=signature_def_map(route.entry).SerializeToString(),
            )
        )
        return response

    async def status(
        self, request: tfs_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tfs_pb2.GetModelStatusResponse:
        version = _version(request.model_spec)
        route = await self.gateway.route(request.model_spec.name, version)
        return model_status(route, asked=version is not None)


# --- Open Inference Protocol --------------------------------------------------------------


def oip_version(version: int | None) -> str:
    """A version as OIP writes it: a string, empty when unknown."""
    return "" if version is None else str(version)


def oip_tensor_metadata(entry: ModelEntry) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as OIP metadata lists (REST and gRPC alike). An output no answer
    has shown yet has datatype "" and shape [-1]."""
    inputs = [
        {
            "name": s.name,
            "datatype": tensors.oip_datatype(s.dtype),
            "shape": [-1, *(-1 if d is None else d for d in s.shape)],
        }
        for s in entry.inputs
    ]
    outputs = []
    for name in entry.output_names:
        learned = entry.outputs.get(name)
        if learned is None:
            outputs.append({"name": name, "datatype": "", "shape": [-1]})
        else:
            shape = [-1, *(-1 if d is None else d for d in learned.shape)]
            outputs.append(
                {"name": name, "datatype": tensors.oip_datatype(learned.dtype), "shape": shape}
            )
    return inputs, outputs


class _OpenInference:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def server_live(
        self, request: oip_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: oip_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ServerReadyResponse:
        return oip_pb2.ServerReadyResponse(ready=await self.gateway.catalog.ping())

    async def server_metadata(
        self, request: oip_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ServerMetadataResponse:
        return oip_pb2.ServerMetadataResponse(name="tfpool", version=tfpool_version())

    async def model_ready(
        self, request: oip_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ModelReadyResponse:
        route = await self.gateway.route(request.name, request.version)
        return oip_pb2.ModelReadyResponse(ready=route.entry.available)

    async def model_metadata(
        self, request: oip_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ModelMetadataResponse:
        entry = (await self.gateway.route(request.name, request.version)).entry
        inputs, outputs = oip_tensor_metadata(entry)
        tensor = oip_pb2.ModelMetadataResponse.TensorMetadata
        return oip_pb2.ModelMetadataResponse(
            name=entry.name,
            versions=[str(v) for v in entry.versions],
            platform="tfpool",
            inputs=[tensor(**t) for t in inputs],
            outputs=[tensor(**t) for t in outputs],
        )

    async def infer(
        self, request: oip_pb2.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip_pb2.ModelInferResponse:
        route = await self.gateway.route(request.model_name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidInput(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: one each"
            )
        inputs = {
            tensor.name: tensors.from_infer_input(
                tensor, raw[i] if raw else None, f"input {tensor.name!r}"
            )
            for i, tensor in enumerate(request.inputs)
        }
        answer = await self.gateway.predict(
            route,
            inputs,
            deadline_s=_time_remaining(context),
            outputs=[o.name for o in request.outputs],
        )
        response = oip_pb2.ModelInferResponse(
            model_name=route.entry.name, model_version=oip_version(answer.version), id=request.id
        )
        for name, array in answer.outputs.items():
            tensor, contents = tensors.to_infer_output(name, array)
            response.outputs.append(tensor)
            response.raw_output_contents.append(contents)
        return response
