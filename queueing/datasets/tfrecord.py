"""TFRecord files of ``tf.train.Example``, read and written without TensorFlow.

The framing is TFRecord's own (for each record: length as uint64, masked CRC-32C of the
length, the bytes, masked CRC-32C of the bytes; little-endian), checked on read with
``google-crc32c``. The ``Example`` message is parsed with the ``protobuf`` package from a
descriptor built here, field for field as TensorFlow's ``example.proto`` and
``feature.proto`` define it, so that no ``protoc`` step and no TensorFlow are needed.

A feature becomes a column: ``float_list`` float32, ``int64_list`` int64, ``bytes_list``
binary; a scalar column when every record of the first batch holds exactly one value, a
list column otherwise. A record without a feature has a null there.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import google_crc32c
import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from queueing.datasets.base import reopen_append, skip_rows, sync_append

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C (rotated, plus a constant, so that a CRC of data holding
    CRCs is not itself a CRC)."""
    crc = int(google_crc32c.value(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(file: BinaryIO, path: str) -> Iterator[bytes]:
    """The records of a TFRecord file, checked. Raises ValueError on a corrupt one: past it
    the framing cannot be trusted."""
    offset = 0
    while head := file.read(12):
        if len(head) < 12:
            raise ValueError(f"{path}: truncated record header at byte {offset}")
        (length,) = struct.unpack("<Q", head[:8])
        if struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
            raise ValueError(f"{path}: corrupt record length at byte {offset}")
        data = file.read(length)
        tail = file.read(4)
        if len(data) < length or len(tail) < 4:
            raise ValueError(f"{path}: truncated record at byte {offset}")
        if struct.unpack("<I", tail)[0] != masked_crc(data):
            raise ValueError(f"{path}: corrupt record (CRC mismatch) at byte {offset}")
        offset += 16 + length
        yield data


def frame(data: bytes) -> bytes:
    """One record, framed."""
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data))


def _example_class() -> Any:
    """``tensorflow.Example``'s message class, from a descriptor equal to TensorFlow's."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="tfpool_example.proto", package="tensorflow", syntax="proto3"
    )
    label, repeated = descriptor_pb2.FieldDescriptorProto, 3
    for name, value_type in (("BytesList", 12), ("FloatList", 2), ("Int64List", 3)):
        message = proto.message_type.add(name=name)
        message.field.add(name="value", number=1, type=value_type, label=repeated)
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, kind) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        feature.field.add(
            name=name, number=number, type=label.TYPE_MESSAGE, type_name=f".tensorflow.{kind}",
            label=label.LABEL_OPTIONAL, oneof_index=0,
        )  # fmt: skip
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=label.TYPE_STRING, label=label.LABEL_OPTIONAL)
    entry.field.add(
        name="value", number=2, type=label.TYPE_MESSAGE, type_name=".tensorflow.Feature",
        label=label.LABEL_OPTIONAL,
    )  # fmt: skip
    features.field.add(
        name="feature", number=1, type=label.TYPE_MESSAGE, label=repeated,
        type_name=".tensorflow.Features.FeatureEntry",
    )  # fmt: skip
    example = proto.message_type.add(name="Example")
    example.field.add(
        name="features", number=1, type=label.TYPE_MESSAGE, type_name=".tensorflow.Features",
        label=label.LABEL_OPTIONAL,
    )  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()

_KINDS = {"float_list": pa.float32(), "int64_list": pa.int64(), "bytes_list": pa.binary()}


class TFRecordSource:
    """The Examples of one TFRecord file, as record batches."""

    def __init__(self, path: str) -> None:
        self.path, self.name, self.base_dir = path, os.path.basename(path), os.path.dirname(path)
        self._schema: pa.Schema | None = None

    def schema(self) -> pa.Schema:
        if self._schema is None:
            with open(self.path, "rb") as file:
                records = itertools.islice(read_records(file, self.path), 1024)
                first = [Example.FromString(r) for r in records]
            fields = []
            for name in sorted({n for e in first for n in e.features.feature}):
                features = [e.features.feature[name] for e in first if name in e.features.feature]
                kind = features[0].WhichOneof("kind") or "float_list"
                scalar = all(len(getattr(f, kind).value) == 1 for f in features)
                fields.append(pa.field(name, _KINDS[kind] if scalar else pa.list_(_KINDS[kind])))
            self._schema = pa.schema(fields)
        return self._schema

    def count_rows(self) -> int:
        rows = 0
        with open(self.path, "rb") as file:
            while head := file.read(8):
                file.seek(struct.unpack("<Q", head)[0] + 8, os.SEEK_CUR)
                rows += 1
        return rows

    def identity(self) -> dict[str, Any]:
        stat = os.stat(self.path)
        return {"size": stat.st_size, "mtime": stat.st_mtime_ns}

    def batches(
        self, columns: Sequence[str], skip: int, batch_rows: int, as_text: Sequence[str] = ()
    ) -> Iterator[pa.RecordBatch]:
        schema = pa.schema([self.schema().field(c) for c in columns])
        return skip_rows(self._batches(schema, batch_rows), skip)

    def _batches(self, schema: pa.Schema, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with open(self.path, "rb") as file:
            records = read_records(file, self.path)
            while examples := [
                Example.FromString(r) for r in itertools.islice(records, batch_rows)
            ]:
                yield pa.RecordBatch.from_arrays(
                    [_column(examples, f) for f in schema], schema=schema
                )


def _column(examples: list[Any], field: pa.Field) -> pa.Array:
    kind = {pa.float32(): "float_list", pa.int64(): "int64_list", pa.binary(): "bytes_list"}
    scalar = not pa.types.is_list(field.type)
    which = kind[field.type if scalar else field.type.value_type]
    values: list[Any] = []
    for example in examples:
        feature = example.features.feature.get(field.name)
        got = None if feature is None else list(getattr(feature, which).value)
        if scalar:
            values.append(got[0] if got is not None and len(got) == 1 else None)
        else:
            values.append(got)
    return pa.array(values, type=field.type)


class TFRecordSink:
    """Rows as Examples: numbers as float or int64 lists (a list column's values
    flattened), strings and bytes as bytes lists; a null is an absent feature."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: BinaryIO | None = None

    def write(self, table: pa.Table) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - open for the run
        kinds = [_kind_of(f.type) for f in table.schema]
        out = bytearray()
        for row in table.to_pylist():
            example = Example()
            feature = example.features.feature
            for (name, value), kind in zip(row.items(), kinds, strict=True):
                if value is None:
                    continue
                flat = _flatten(value)
                if kind == "bytes_list":
                    flat = [v.encode() if isinstance(v, str) else v for v in flat]
                getattr(feature[name], kind).value.extend(flat)
            out += frame(example.SerializeToString(deterministic=True))
        self.file.write(out)

    def checkpoint(self) -> dict[str, Any]:
        return {"bytes": sync_append(self.file)}

    def resume(self, state: dict[str, Any]) -> None:
        self.file = reopen_append(self.path, state["bytes"])

    def finish(self) -> None:
        if self.file is None:
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed on the next line
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _kind_of(kind: pa.DataType) -> str:
    while pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    if pa.types.is_floating(kind):
        return "float_list"
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return "int64_list"
    return "bytes_list"


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [v for item in value for v in _flatten(item)]
    return [value]
