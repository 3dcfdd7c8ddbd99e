"""Dataset formats without a pool: framing, chunking, columns to arrays, sinks that resume."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from queueing.datasets.base import Sink, rechunk
from queueing.datasets.columns import (
    InputMapping,
    InputSpec,
    parse_input_columns,
    parse_model_inputs,
    to_arrow,
    to_numpy,
)
from queueing.datasets.formats import FORMATS, format_of, supported
from queueing.datasets.parquet import ParquetSink, ParquetSource
from queueing.datasets.text import CsvSink, JsonLinesSink
from queueing.datasets.tfrecord import Example, TFRecordSink, TFRecordSource, frame, read_records


def test_the_registry_names_every_format_once() -> None:
    assert format_of("a/b.PARQUET") is not None and format_of("x.ndjson") is not None
    assert format_of("x.txt") is None
    text = supported(outputs=True)
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            assert text.count(suffix + ",") + text.endswith(suffix) == 1


def test_tfrecord_framing_round_trips_and_refuses_corruption() -> None:
    records = [b"", b"a", bytes(range(256)) * 40]
    data = b"".join(frame(r) for r in records)
    assert list(read_records(io.BytesIO(data), "f")) == records
    for at, what in ((3, "length"), (12 + 2, "CRC mismatch")):
        bad = bytearray(data)
        bad[at] ^= 1
        with pytest.raises(ValueError, match=what):
            list(read_records(io.BytesIO(bytes(bad)), "f"))
    with pytest.raises(ValueError, match="truncated"):
        list(read_records(io.BytesIO(data[:-1]), "f"))


def test_tfrecord_examples_become_columns_and_back(tmp_path: Path) -> None:
    table = pa.table({
        "id": pa.array([1, 2, 3], pa.int64()),
        "x": pa.array([[1.5, 2.0], [3.0, 4.0], None], pa.list_(pa.float32())),
        "tag": pa.array([b"a", b"b", b"c"]),
    })  # fmt: skip
    sink = TFRecordSink(str(tmp_path / "t.tfrecord"))
    sink.write(table)
    sink.finish()
    source = TFRecordSource(str(tmp_path / "t.tfrecord"))
    assert source.count_rows() == 3
    assert dict(zip(source.schema().names, source.schema().types, strict=True)) == {
        "id": pa.int64(), "tag": pa.binary(), "x": pa.list_(pa.float32()),
    }  # fmt: skip
    (batch,) = source.batches(["id", "x", "tag"], 0, 10)
    assert pa.Table.from_batches([batch]).equals(table)
    (tail,) = source.batches(["id"], 2, 10)
    assert tail.column(0).to_pylist() == [3]
    with open(tmp_path / "t.tfrecord", "rb") as f:
        first = Example.FromString(next(read_records(f, "t")))
    assert list(first.features.feature["x"].float_list.value) == [1.5, 2.0]


def test_chunks_are_exact_whatever_the_batches() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, 30)
    start, batches = 0, []
    for size in sizes:
        batches.append(pa.record_batch({"n": np.arange(start, start + size)}))
        start += size
    chunks = list(rechunk(batches, 25))
    assert [len(c) for c in chunks] == [25] * (start // 25) + ([start % 25] if start % 25 else [])
    assert np.concatenate([c.column("n").to_numpy() for c in chunks]).tolist() == list(range(start))


def test_columns_to_arrays() -> None:
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float64)), 3)
    got = to_numpy(fixed, "float32", ".")
    assert got.dtype == np.float32 and got.shape == (2, 3)
    nested = pa.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    assert to_numpy(nested, None, ".").shape == (2, 2, 2)
    with pytest.raises(ValueError, match="different lengths"):
        to_numpy(pa.array([[1.0, 2.0], [3.0]]), None, ".")
    with pytest.raises(ValueError, match="null"):
        to_numpy(pa.array([1.0, None]), None, ".")
    assert to_numpy(pa.array(["[1, 2]", "[3, 4]"]), "float32", ".").tolist() == [[1, 2], [3, 4]]
    assert to_numpy(pa.array(["1.5", "2"]), "float32", ".").tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match="not a number"):
        to_numpy(pa.array(["1.5", "abc"]), "float32", ".")
    images = to_numpy(pa.array([b"\x89PNG", b"GIF8"]), "bytes", ".")
    assert images.dtype == object and images.tolist() == [b"\x89PNG", b"GIF8"]


def test_outputs_to_columns_with_failed_rows_null() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    column = to_arrow(values, np.array([False, True, False]))
    assert column.type == pa.list_(pa.list_(pa.float32(), 2), 2)
    assert column.to_pylist() == [[[0, 1], [2, 3]], None, [[8, 9], [10, 11]]]
    assert to_arrow(np.array([1.0, 2.0]), np.array([True, False])).to_pylist() == [None, 2.0]


def test_columns_map_to_inputs_by_name_by_pattern_or_alone() -> None:
    schema = pa.schema([("id", pa.int64()), ("f0", pa.float64()), ("f1", pa.float64()),
                        ("a", pa.float64())])  # fmt: skip
    spec = parse_model_inputs("x: float32 [*, 2], a: float32 [*]")
    assert spec == [InputSpec("x", "float32", 1), InputSpec("a", "float32", 0)]
    mapping = InputMapping(schema, spec=spec, input_columns=parse_input_columns(["x=f*"]),
                           keep_columns=["id"])  # fmt: skip
    with pytest.raises(ValueError, match="no column for the model's input x"):
        InputMapping(schema, spec=spec, input_columns=None, keep_columns=[])
    mapping = InputMapping(schema, spec=spec, input_columns={"x": ["f*"], "a": ["a"]},
                           keep_columns=["id"])  # fmt: skip
    table = pa.table({"id": [7], "f0": [1.0], "f1": [2.0], "a": [3.0]})
    inputs = mapping.convert(table, ".")
    assert isinstance(inputs, dict) and inputs["x"].tolist() == [[1.0, 2.0]]
    assert inputs["x"].dtype == np.float32
    alone = InputMapping(pa.schema([("id", pa.int64()), ("v", pa.float64())]),
                         spec=[InputSpec("x", "float32", 0)], input_columns=None,
                         keep_columns=["id"])  # fmt: skip
    assert alone.single and alone.columns == ["v"]
    with pytest.raises(ValueError, match="--keep-columns"):
        InputMapping(schema, spec=None, input_columns=None, keep_columns=["nope"])
    with pytest.raises(ValueError, match="NAME=COLUMN"):
        parse_input_columns(["x="])
    image = parse_model_inputs(
        "image: bytes [*] (encoded JPEG/PNG/GIF/BMP) or uint8 [*, h, w, 3] -> float32 [*, 8, 8, 3]"
    )
    assert image == [InputSpec("image", "bytes", 0)]


@pytest.mark.parametrize("sink_type", [CsvSink, JsonLinesSink, TFRecordSink, ParquetSink])
def test_a_resumed_sink_ends_as_an_uninterrupted_one(
    tmp_path: Path, sink_type: Callable[[str], Sink]
) -> None:
    tables = [
        pa.table({"id": [i, i + 1], "y": pa.array([[i, 0.5], [i, 0.25]], pa.list_(pa.float32(), 2)),
                  "error": pa.array([None, "bad, \"quoted\""], pa.string())})
        for i in range(0, 10, 2)
    ]  # fmt: skip
    whole = sink_type(str(tmp_path / "whole"))
    for table in tables:
        whole.write(table)
    whole.finish()
    cut = sink_type(str(tmp_path / "cut"))
    cut.write(tables[0])
    cut.write(tables[1])
    state = cut.checkpoint()
    cut.write(tables[2])  # lost with the interruption
    cut.close()
    resumed = sink_type(str(tmp_path / "cut"))
    resumed.resume(state)
    for table in tables[2:]:
        resumed.write(table)
    resumed.finish()
    assert (tmp_path / "cut").read_bytes() == (tmp_path / "whole").read_bytes()
    if sink_type is ParquetSink:
        assert pq.read_table(tmp_path / "cut").equals(pa.concat_tables(tables))
        assert pq.ParquetFile(tmp_path / "cut").num_row_groups == len(tables)


def test_parquet_source_skips_whole_row_groups(tmp_path: Path) -> None:
    pq.write_table(pa.table({"n": np.arange(1000)}), tmp_path / "n.parquet", row_group_size=128)
    source = ParquetSource(str(tmp_path / "n.parquet"))
    assert source.count_rows() == 1000
    rows = np.concatenate([b.column(0).to_numpy() for b in source.batches(["n"], 300, 64)])
    assert rows.tolist() == list(range(300, 1000))
