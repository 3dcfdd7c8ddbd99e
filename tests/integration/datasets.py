"""Dataset files for the scoring tests, written and read back with the formats' own
libraries (pyarrow, json, TensorFlow's TFRecord reader and tf.train.Example), not with the
code under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import tensorflow as tf

#: The suffix each format's files take in the tests.
SUFFIX = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl", "tfrecord": ".tfrecord"}


def write(path: Path, fmt: str, columns: dict[str, Any]) -> None:
    """Columns (1-D arrays, or 2-D arrays for list columns) as a file of ``fmt``. In CSV a
    2-D column ``x`` becomes scalar columns ``x0, x1, ...``."""
    if fmt == "parquet":
        pq.write_table(_table(columns), path, row_group_size=700)
    elif fmt == "csv":
        flat: dict[str, Any] = {}
        for name, values in columns.items():
            if np.ndim(values) == 2:
                flat.update({f"{name}{i}": values[:, i] for i in range(values.shape[1])})
            else:
                flat[name] = values
        pcsv.write_csv(pa.table(flat), path)
    elif fmt == "jsonl":
        rows = _rows(columns)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with tf.io.TFRecordWriter(str(path)) as writer:
            for row in _rows(columns):
                writer.write(_example(row).SerializeToString())


def _table(columns: dict[str, Any]) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if isinstance(values, np.ndarray) and values.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(values.reshape(-1)), values.shape[1]
            )
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def _rows(columns: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(next(iter(columns.values())))
    lists = {k: v.tolist() if isinstance(v, np.ndarray) else list(v) for k, v in columns.items()}
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def _example(row: dict[str, Any]) -> tf.train.Example:
    feature = {}
    for name, value in row.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(values[0], float):
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        elif isinstance(values[0], int):
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            data = [v.encode() if isinstance(v, str) else v for v in values]
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=data))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def read(path: Path, fmt: str) -> list[dict[str, Any]]:
    """A scored file's rows as dicts: lists as lists, null / absent as None."""
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()  # type: ignore[no-any-return]
    if fmt == "csv":
        options = pcsv.ConvertOptions(strings_can_be_null=True)  # empty unquoted: null
        rows = pcsv.read_csv(path, convert_options=options).to_pylist()
        for row in rows:
            for k, v in row.items():
                if isinstance(v, str) and v.startswith("["):
                    row[k] = json.loads(v)
        return rows  # type: ignore[no-any-return]
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = []
    for record in tf.data.TFRecordDataset(str(path)):  # TensorFlow checks the framing
        example = tf.train.Example.FromString(record.numpy())
        fields: dict[str, Any] = {}
        for name, feature in example.features.feature.items():
            kind = feature.WhichOneof("kind")
            values = list(getattr(feature, kind).value)
            fields[name] = [v.decode() for v in values] if kind == "bytes_list" else values
        rows.append(fields)
    return rows
