"""Scoring table datasets (Parquet, CSV, JSON Lines, TFRecord): row for row as the model,
columns mapped and kept, bad rows marked, resumable to the same bytes, flat memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from queueing import Client
from queueing.score import Progress, score
from tests.integration import models
from tests.integration.conftest import PoolFactory
from tests.integration.datasets import SUFFIX, read, write
from tests.integration.helpers import TFPOOL
from tests.integration.poison import FAIL, build_poison_model

FORMATS = list(SUFFIX)


@pytest.fixture(scope="module")
def mlp_pool(start_pool: PoolFactory, mlp_path: str) -> str:
    start_pool(mlp_path, name="ds-mlp", max_batch_size=256)
    return mlp_path


@pytest.fixture(scope="module")
def poison_pool(start_pool: PoolFactory, model_dir: Path) -> str:
    path = build_poison_model(model_dir)
    start_pool(path, name="ds-poison", max_batch_size=64, preload=["tests.integration.poison"])
    return path


def _quiet(total: int, done: int) -> Progress:
    return Progress(total, done, stream=io.StringIO())


def _x(rows: int, seed: int, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def _scalar(value: Any) -> Any:
    """TFRecord has no scalars: a one-value list is the value."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.parametrize(("fmt_in", "fmt_out"), [(f, f) for f in FORMATS] + [("csv", "parquet")])
def test_each_format_in_and_out_equals_the_model_row_for_row(
    mlp_pool: str, redis_url: str, tmp_path: Path, fmt_in: str, fmt_out: str
) -> None:
    x = _x(1000, 1)
    ids = np.arange(1000, dtype=np.int64) * 7
    source = tmp_path / f"in{SUFFIX[fmt_in]}"
    write(source, fmt_in, {"id": ids, "x": x})
    output = tmp_path / f"out{SUFFIX[fmt_out]}"
    # CSV holds x as eight columns x0..x7: mapped by a pattern.
    mapping = {"x": ["x*"]} if fmt_in == "csv" else None
    with Client(redis_url) as client:
        summary = score(client, "ds-mlp", str(source), str(output), chunk_rows=64, window=4,
                        input_columns=mapping, keep_columns=["id"], progress=_quiet)  # fmt: skip
    assert (summary.rows, summary.scored, summary.failed_rows) == (1000, 1000, 0)
    rows = read(output, fmt_out)
    want = next(iter(models.keras_outputs(mlp_pool, x).values()))
    assert [_scalar(r["id"]) for r in rows] == ids.tolist()  # kept, in input order
    assert all(r.get("error") is None for r in rows)
    np.testing.assert_allclose([r["output"] for r in rows], want, rtol=1e-5, atol=1e-6)
    if fmt_out != "tfrecord":
        assert list(rows[0]) == ["id", "output", "error"]
    assert sorted(os.listdir(tmp_path)) == sorted([source.name, output.name])  # no leftovers


def test_columns_named_otherwise_and_several_kept(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    x = _x(300, 2)
    table = pa.table({
        "ts": pa.array(np.arange(300, dtype=np.int64) * 1000, pa.timestamp("ms")),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
        "id": [f"row-{i}" for i in range(300)],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    with Client(redis_url) as client:
        score(client, "ds-mlp", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"),
              input_columns={"x": ["features"]}, keep_columns=["id", "ts"], chunk_rows=50,
              progress=_quiet)  # fmt: skip
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.column_names == ["id", "ts", "output", "error"]
    assert got.column("ts").equals(table.column("ts"))
    assert got.column("id").to_pylist() == [f"row-{i}" for i in range(300)]
    assert got.schema.field("output").type == pa.list_(pa.float32(), 3)  # fixed-size list
    want = next(iter(models.keras_outputs(mlp_pool, x).values()))
    np.testing.assert_allclose(got.column("output").to_pylist(), want, rtol=1e-5, atol=1e-6)


def test_without_a_mapping_a_column_is_refused_by_name(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    pq.write_table(pa.table({"a": [1.0], "b": [2.0]}), tmp_path / "in.parquet")
    with Client(redis_url) as client, pytest.raises(ValueError, match="--input-column"):
        score(client, "ds-mlp", str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bad_row_in_each_format_is_marked_and_its_neighbours_scored(
    poison_pool: str, redis_url: str, tmp_path: Path, fmt: str
) -> None:
    x = _x(200, 3, width=4)
    x[57, 1] = FAIL  # the model raises on this row
    columns: dict[str, Any] = {"id": np.arange(200), "x": x}
    source = tmp_path / f"in{SUFFIX[fmt]}"
    write(source, fmt, columns)
    if fmt == "csv":  # a value that is not a number
        lines = source.read_text().splitlines()
        cells = lines[1 + 130].split(",")
        cells[2] = "abc"
        lines[1 + 130] = ",".join(cells)
        source.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":  # three values where the model takes four
        lines = source.read_text().splitlines()
        row = json.loads(lines[130])
        row["x"] = row["x"][:3]
        lines[130] = json.dumps(row)
        source.write_text("\n".join(lines) + "\n")
    else:  # a null (Parquet), a missing feature (TFRecord)
        values: list[Any] = x.tolist()
        values[130] = None
        rows = [{"id": i, "x": v} for i, v in enumerate(values)]
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), source)
        else:
            write(source, "tfrecord", {"id": np.arange(130), "x": x[:130]})
            tail = tmp_path / "tail.tfrecord"
            write(tail, "tfrecord", {"id": np.arange(131, 200), "x": x[131:]})
            import tensorflow as tf

            with tf.io.TFRecordWriter(str(tmp_path / "bad.tfrecord")) as w:
                for record in tf.data.TFRecordDataset(str(source)):
                    w.write(record.numpy())
                only_id = tf.train.Example()
                only_id.features.feature["id"].int64_list.value.append(130)
                w.write(only_id.SerializeToString())
                for record in tf.data.TFRecordDataset(str(tail)):
                    w.write(record.numpy())
            os.replace(tmp_path / "bad.tfrecord", source)
            tail.unlink()
    output = tmp_path / f"out{SUFFIX[fmt]}"
    mapping = {"x": ["x*"]} if fmt == "csv" else None
    with Client(redis_url) as client:
        summary = score(client, "ds-poison", str(source), str(output), chunk_rows=32,
                        input_columns=mapping, keep_columns=["id"], progress=_quiet)  # fmt: skip
    assert summary.failed_rows == 2
    rows = read(output, fmt)
    assert [_scalar(r["id"]) for r in rows] == list(range(200))
    failed = {i: _scalar(r.get("error")) for i, r in enumerate(rows) if r.get("error")}
    assert sorted(failed) == [57, 130]
    assert failed[57].startswith("ModelError: model failed")
    assert "a FAIL marker in the input" in failed[57]
    assert failed[130].startswith("InvalidInput")
    assert rows[57].get("output") is None and rows[130].get("output") is None
    good = [i for i in range(200) if i not in failed]
    want = next(iter(models.keras_outputs(poison_pool, x[good]).values()))
    np.testing.assert_allclose([rows[i]["output"] for i in good], want, rtol=1e-5, atol=1e-6)


class _CtrlCAfter(Progress):
    """Raises KeyboardInterrupt once ``limit`` rows are done: Ctrl-C at a known point."""

    limit = 0

    def __init__(self, total: int, done: int) -> None:
        super().__init__(total, done, stream=io.StringIO())

    def update(self, rows: int) -> None:
        super().update(rows)
        if self.done >= self.limit:
            raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_an_interrupted_run_resumes_to_the_same_bytes(
    mlp_pool: str, redis_url: str, tmp_path: Path, fmt: str
) -> None:
    x = _x(2000, 4)
    source = tmp_path / f"in{SUFFIX[fmt]}"
    write(source, fmt, {"id": np.arange(2000), "x": x})
    mapping = {"x": ["x*"]} if fmt == "csv" else None
    options: dict[str, Any] = {"chunk_rows": 100, "input_columns": mapping, "keep_columns": ["id"]}
    whole, cut = tmp_path / f"whole{SUFFIX[fmt]}", tmp_path / f"cut{SUFFIX[fmt]}"
    with Client(redis_url) as client:
        score(client, "ds-mlp", str(source), str(whole), progress=_quiet, **options)
        for limit in (700, 1300):  # twice: the second run resumes, then stops again
            _CtrlCAfter.limit = limit
            with pytest.raises(KeyboardInterrupt):
                score(client, "ds-mlp", str(source), str(cut), progress=_CtrlCAfter, **options)
            record = json.loads(Path(f"{cut}.progress.json").read_text())
            assert record["files"][source.name]["rows"] == limit
        summary = score(client, "ds-mlp", str(source), str(cut), progress=_quiet, **options)
    assert (summary.rows, summary.scored) == (2000, 700)
    assert cut.read_bytes() == whole.read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted([source.name, whole.name, cut.name])


def test_a_folder_of_parquet_files_scores_across_files_and_resumes_per_file(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "days"
    (folder / "late").mkdir(parents=True)
    sizes = {"2026-01-01.parquet": 250, "2026-01-02.parquet": 40, "late/2026-01-03.parquet": 310}
    xs = {}
    for i, (name, rows) in enumerate(sizes.items()):
        xs[name] = _x(rows, 10 + i)
        write(folder / name, "parquet", {"id": np.arange(rows), "x": xs[name]})
    options: dict[str, Any] = {"chunk_rows": 32, "window": 6, "keep_columns": ["id"]}
    with Client(redis_url) as client:
        score(client, "ds-mlp", str(folder), str(tmp_path / "whole"), progress=_quiet, **options)
        _CtrlCAfter.limit = 300  # into the third file, the first two done
        with pytest.raises(KeyboardInterrupt):
            score(client, "ds-mlp", str(folder), str(tmp_path / "cut"),
                  progress=_CtrlCAfter, **options)  # fmt: skip
        record = json.loads((tmp_path / "cut.progress.json").read_text())
        assert record["files"]["2026-01-01.parquet"] == {"finished": True, "rows": 250}
        assert record["files"]["2026-01-02.parquet"] == {"finished": True, "rows": 40}
        assert record["files"]["late/2026-01-03.parquet"]["rows"] == 300 - 290 + 22
        summary = score(client, "ds-mlp", str(folder), str(tmp_path / "cut"),
                        progress=_quiet, **options)  # fmt: skip
    assert summary.rows == 600
    for name in sizes:
        got = pq.read_table(tmp_path / "cut" / name)
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
        want = next(iter(models.keras_outputs(mlp_pool, xs[name]).values()))
        np.testing.assert_allclose(got.column("output").to_pylist(), want, rtol=1e-5, atol=1e-6)


def test_record_batches_from_python(mlp_pool: str, redis_url: str, tmp_path: Path) -> None:
    x = _x(500, 5)
    batches = (
        pa.record_batch({
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x[i : i + 77].reshape(-1)), 8),
            "n": np.arange(i, min(i + 77, 500)),
        })
        for i in range(0, 500, 77)
    )  # fmt: skip
    with Client(redis_url) as client:
        summary = score(client, "ds-mlp", batches, str(tmp_path / "out.jsonl"),
                        keep_columns=["n"], progress=_quiet)  # fmt: skip
    assert summary.scored == 500
    rows = read(tmp_path / "out.jsonl", "jsonl")
    assert [r["n"] for r in rows] == list(range(500))
    want = next(iter(models.keras_outputs(mlp_pool, x).values()))
    np.testing.assert_allclose([r["output"] for r in rows], want, rtol=1e-5, atol=1e-6)


# Peak RSS from VmHWM: ru_maxrss would carry the forking pytest process's peak (with
# TensorFlow in it) over into the child, and this child's own peak is what is measured.
_MEMORY_SCRIPT = """
import io, sys
import pyarrow.parquet
from queueing import Client
from queueing.score import Progress, score

def peak():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

before = peak()
with Client(sys.argv[1]) as client:
    summary = score(client, "ds-mlp", sys.argv[2], sys.argv[3], keep_columns=["id", "note"],
                    chunk_rows=1024, window=8, progress=lambda t, d: Progress(t, d, io.StringIO()))
print(summary.scored, before, peak())
"""


def test_a_dataset_larger_than_the_memory_allowed(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    rows, per_group = 1_200_000, 50_000
    writer = None
    for start in range(0, rows, per_group):
        x = _x(per_group, start)
        numbers = np.arange(start, start + per_group).astype(str)
        note = np.char.add("a note of text carried through for row ", numbers)
        table = pa.table({
            "id": np.arange(start, start + per_group),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 8),
            "note": pa.array(np.char.multiply(note, 4).tolist()),
        })  # fmt: skip
        if writer is None:
            writer = pq.ParquetWriter(tmp_path / "big.parquet", table.schema, compression="none")
        writer.write_table(table)
    assert writer is not None
    writer.close()
    size = (tmp_path / "big.parquet").stat().st_size
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, redis_url, str(tmp_path / "big.parquet"),
         str(tmp_path / "out.parquet")],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    scored, before, peak = map(int, run.stdout.split())
    assert scored == rows
    # Measured flat: about 100 MB over the imports for 400,000 rows and for 1,000,000.
    allowed = before + (128 << 20)
    print(f"input {size >> 20} MB; peak RSS {peak >> 20} MB ({before >> 20} MB after imports)")
    assert peak < allowed < size
    assert pq.ParquetFile(tmp_path / "out.parquet").metadata.num_rows == rows


# --- an image model fed from a column of bytes or of file paths ---------------------------


@pytest.fixture(scope="module")
def pets_pool(start_pool: PoolFactory, image_model: tuple[str, str]) -> str:
    path, labels = image_model
    start_pool(
        path, name="ds-pets", preprocess="image", image_scale=1 / 255, postprocess="top_k",
        top_k=2, labels_file=labels, max_batch_size=8,
    )  # fmt: skip
    return path


@pytest.mark.parametrize("column", ["bytes", "paths"])
def test_images_from_a_column_of_bytes_or_of_paths(
    pets_pool: str, redis_url: str, tmp_path: Path, column: str
) -> None:
    import keras

    rng = np.random.default_rng(7)
    images = [
        models.encode_image(rng.integers(0, 256, (9 + i, 11, 3), dtype=np.uint8), "png")
        for i in range(20)
    ]
    images[6] = images[6][:-50]  # broken
    if column == "bytes":
        pq.write_table(pa.table({"name": [f"{i}.png" for i in range(20)], "image": images}),
                       tmp_path / "in.parquet")  # fmt: skip
        source, mapping = tmp_path / "in.parquet", None  # the column has the input's name
    else:
        (tmp_path / "photos").mkdir()
        for i, data in enumerate(images):
            (tmp_path / "photos" / f"{i}.png").write_bytes(data)
        names = [f"photos/{i}.png" for i in range(20)]
        (tmp_path / "in.csv").write_text("name,file\n" + "".join(f"{n},{n}\n" for n in names))
        source, mapping = tmp_path / "in.csv", {"image": ["file"]}
    with Client(redis_url) as client:
        summary = score(client, "ds-pets", str(source), str(tmp_path / "out.parquet"),
                        chunk_rows=4, input_columns=mapping, keep_columns=["name"],
                        progress=_quiet)  # fmt: skip
    assert summary.failed_rows == 1
    got = pq.read_table(tmp_path / "out.parquet")
    assert got.column_names == ["name", "indices", "scores", "labels", "error"]
    errors = got.column("error").to_pylist()
    assert errors[6].startswith("InvalidInput") and "decoded" in errors[6]
    assert [e is None for e in errors] == [i != 6 for i in range(20)]
    assert got.column("labels")[6].as_py() is None
    model = keras.models.load_model(pets_pool, compile=False)
    for i, data in enumerate(images):
        if i == 6:
            continue
        direct = model.predict_on_batch(models.decoded_image_input(data, scale=1 / 255)[None])
        assert got.column("indices")[i].as_py() == np.argsort(-direct[0])[:2].tolist()
        labels = [models.IMAGE_LABELS[k] for k in got.column("indices")[i].as_py()]
        assert got.column("labels")[i].as_py() == labels


def test_the_command_line_maps_and_keeps_columns(
    mlp_pool: str, redis_url: str, tmp_path: Path
) -> None:
    x = _x(300, 8)
    write(tmp_path / "in.csv", "csv", {"id": np.arange(300), "x": x})
    command = [*TFPOOL, "score", "--model", "ds-mlp", str(tmp_path / "in.csv"),
               str(tmp_path / "out.jsonl"), "--redis-url", redis_url, "--input-column", "x=x*",
               "--keep-columns", "id", "--chunk-rows", "64"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "scored 300 of 300 rows" in run.stdout
    rows = read(tmp_path / "out.jsonl", "jsonl")
    assert [r["id"] for r in rows] == list(range(300))
    want = next(iter(models.keras_outputs(mlp_pool, x).values()))
    np.testing.assert_allclose([r["output"] for r in rows], want, rtol=1e-5, atol=1e-6)
