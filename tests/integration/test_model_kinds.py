"""Every kind of model users bring, served, and compared with the model called directly.

Each kind is built into files (kinds.py), served by a real worker reading from a real
Redis, and sent concurrent requests of mixed sizes, so that requests share batches and
padding; each answer must equal the model's own on that request's rows alone. The
workers run as threads of this process (one TensorFlow import for the whole matrix); the
spawned path is covered by a subclassed model served with ``preload``, and the start-up
failures by ``tfpool serve`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from queueing import Client, InvalidInput
from tests.integration import kinds
from tests.integration.conftest import PoolFactory
from tests.waiting import wait_until
from workers.batcher import Batcher
from workers.config import PoolConfig
from workers.errors import ModelLoadError
from workers.inspection import inspect_model
from workers.rows import RowsNotIndependent
from workers.runner import load
from workers.worker import Worker

TFPOOL = [sys.executable, "-m", "workers.cli"]

#: Request sizes sent together: one row without the batch axis (None), and batches up to
#: past max_batch_size (split over two batches).
SIZES = (None, 1, 2, 3, 5, 8, 13, 1, 2, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("kinds")
    paths: dict[str, Any] = {**kinds.save_keras_kinds(directory)}
    paths.update(kinds.save_saved_models(directory))
    paths["frozen"], paths["frozen_function"] = kinds.save_frozen_graph(directory)
    paths["checkpoints"] = kinds.save_checkpoints(directory)
    return paths


@contextlib.contextmanager
def serving(redis_url: str, model: str, **options: Any) -> Iterator[Worker]:
    """A real worker for ``model`` in a thread of this process, until the block ends."""
    options.setdefault("max_batch_size", 8)
    options.setdefault("max_latency_ms", 20)
    config = PoolConfig(model=model, redis_url=redis_url, workers=1, **options)
    ready = multiprocessing.Value("i", 0)
    worker = Worker(config, worker_id=f"test:{config.name}", ready=ready)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: ready.value or failure, timeout=120, what=f"{model} ready")
    if failure:
        raise failure[0]
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=30)


def load_only(config: PoolConfig) -> None:
    """What a worker does at start before it takes traffic: load, warm up, check."""
    load(config, Batcher(max_rows=config.max_batch_size, max_latency_s=0.0))


def request_inputs(make: Callable[[int], Any], rows: int | None) -> Any:
    """A request's inputs: ``rows`` rows, or one row without the batch axis (None)."""
    if rows is not None:
        return make(rows)
    batch = make(1)
    return {k: v[0] for k, v in batch.items()} if isinstance(batch, dict) else batch[0]


def check_concurrent(
    client: Client,
    name: str,
    make: Callable[[int], Any],
    direct: Callable[[Any], dict[str, np.ndarray]],
) -> None:
    """Send SIZES at once; each answer equals ``direct`` on that request alone."""
    requests = [request_inputs(make, rows) for rows in SIZES]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: client.predict(name, r, timeout=120), requests))
    for rows, inputs, got in zip(SIZES, requests, answers, strict=True):
        batched = make_batched(inputs, rows)
        want = direct(batched)
        got_dict = got if isinstance(got, dict) else {"": got}
        want_values = list(want.values()) if len(want) == 1 and "" in got_dict else None
        pairs = [("", want_values[0])] if want_values is not None else sorted(want.items())
        for key, value in pairs:
            expected = value[0] if rows is None else value
            np.testing.assert_allclose(
                got_dict[key], expected, rtol=1e-5, atol=1e-5, err_msg=f"{name} rows={rows} {key}"
            )


def make_batched(inputs: Any, rows: int | None) -> Any:
    if rows is not None:
        return inputs
    if isinstance(inputs, dict):
        return {k: v[np.newaxis] for k, v in inputs.items()}
    return inputs[np.newaxis]


def floats(width: int, name: str | None = None) -> Callable[[int], Any]:
    rng = np.random.default_rng(width)

    def make(rows: int) -> Any:
        x = rng.standard_normal((rows, width)).astype(np.float32)
        return {name: x} if name else x

    return make


def keras_direct(path: str) -> Callable[[Any], dict[str, np.ndarray]]:
    model = keras.models.load_model(path, compile=False)

    def direct(x: Any) -> dict[str, np.ndarray]:
        out = model(x, training=False)
        return (
            {k: np.asarray(v) for k, v in out.items()}
            if isinstance(out, dict)
            else {"output_0": np.asarray(out)}
        )

    return direct


def saved_model_direct(path: str) -> Callable[[Any], dict[str, np.ndarray]]:
    concrete = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = concrete.structured_input_signature[1]

    def direct(x: Any) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in concrete(**{name: tf.constant(x)}).items()}

    direct.keep = concrete  # type: ignore[attr-defined]
    return direct


KERAS_FILES = [
    "sequential.keras", "sequential.h5", "functional.keras", "functional.h5", "subclassed.keras",
]  # fmt: skip
SAVED_MODELS = [
    "sequential export", "sequential saved_model", "functional export",
    "functional saved_model", "subclassed export", "subclassed saved_model",
]  # fmt: skip


@pytest.mark.parametrize("kind", KERAS_FILES + SAVED_MODELS)
def test_keras_models_in_every_format_serve_their_own_answers(
    kind: str, files: dict[str, Any], redis_url: str, client: Client
) -> None:
    path = files[kind]
    name = kind.replace(" ", "-").replace(".", "-")
    direct = keras_direct(path) if kind in KERAS_FILES else saved_model_direct(path)
    with serving(redis_url, path, name=name, preload=["tests.integration.kinds"]) as worker:
        assert worker.model is not None
        check_concurrent(client, name, floats(4), direct)
        if kind == "subclassed saved_model":
            # Saved from a model built on one row: the signature fixes the batch at 1.
            assert worker.model.batch_limit == 1
            assert worker.desk.batcher.buckets == [1]
            assert worker.model.inputs[0].describe() == "float32 [1, 4]"


def test_fixed_batch_is_announced_at_start(
    files: dict[str, Any], redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), serving(redis_url, files["subclassed saved_model"],
                                                   name="fixed"):  # fmt: skip
        pass
    assert "the model's signature fixes the batch at 1 rows" in caplog.text


def test_string_keras_model_takes_str_and_bytes(
    files: dict[str, Any], redis_url: str, client: Client
) -> None:
    words = np.array(["the cat", "a dog ran", "sat on the mat", "far away", "the"])
    rng = np.random.default_rng(5)

    def make(rows: int) -> Any:
        return words[rng.integers(0, len(words), (rows, 1))]

    model = keras.models.load_model(files["text.keras"], compile=False)

    def direct(x: Any) -> dict[str, np.ndarray]:
        return {"score": np.asarray(model(tf.constant(x.astype(bytes)), training=False))}

    with serving(redis_url, files["text.keras"], name="text"):
        check_concurrent(client, "text", make, direct)  # str items: UTF-8 encoded
        as_bytes = make(3).astype(object)
        as_bytes[:] = np.vectorize(str.encode, otypes=[object])(as_bytes)
        got = client.predict("text", as_bytes, timeout=60)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, direct(as_bytes)["score"], atol=1e-5)


def test_int32_ids_widen_to_an_int64_model_and_lossy_input_is_refused(
    files: dict[str, Any], redis_url: str, client: Client
) -> None:
    ids = np.arange(12, dtype=np.int32).reshape(4, 3)
    with serving(redis_url, files["ids"], name="ids"):
        np.testing.assert_array_equal(
            client.predict("ids", ids, timeout=60), ids.sum(1, keepdims=True) * 0.5
        )
        with pytest.raises(InvalidInput, match="expected int64"):
            client.predict("ids", ids.astype(np.float32), timeout=60)
    with (
        serving(redis_url, files["ids"], name="ids-strict", convert_inputs=False),
        pytest.raises(InvalidInput, match="expected int64"),
    ):
        client.predict("ids-strict", ids, timeout=60)


def test_builder_restored_from_each_checkpoint_layout(
    files: dict[str, Any], redis_url: str, client: Client
) -> None:
    ckpt = files["checkpoints"]
    model = ckpt["model"]

    def direct(x: Any) -> dict[str, np.ndarray]:
        return {"output_0": np.asarray(model(x, training=False))}

    for name, checkpoint in (("ckpt-folder", ckpt["folder"]), ("ckpt-prefix", ckpt["prefix"]),
                             ("ckpt-weights", ckpt["weights"])):  # fmt: skip
        with serving(redis_url, "tests.integration.kinds:build_sequential", name=name,
                     checkpoint=checkpoint):  # fmt: skip
            check_concurrent(client, name, floats(4), direct)
    affine = ckpt["affine"]
    with serving(redis_url, "tests.integration.kinds:build_affine", name="affine",
                 checkpoint=ckpt["affine_prefix"]):  # fmt: skip
        check_concurrent(client, "affine", floats(4), lambda x: {"y": affine(x)["y"].numpy()})


def test_partial_restore_is_a_load_error(files: dict[str, Any], redis_url: str) -> None:
    config = PoolConfig(model="tests.integration.kinds:build_bigger", redis_url=redis_url,
                        checkpoint=files["checkpoints"]["folder"])  # fmt: skip
    with pytest.raises(ModelLoadError, match="does not restore all of"):
        load_only(config)


def test_frozen_graph(files: dict[str, Any], redis_url: str, client: Client) -> None:
    function = files["frozen_function"]
    with serving(redis_url, files["frozen"], name="frozen", graph_inputs={"x": "x:0"},
                 graph_outputs={"probs": "probs:0"}):  # fmt: skip
        check_concurrent(client, "frozen", floats(3), lambda x: {"probs": function(x).numpy()})


@pytest.mark.parametrize(("kind", "output"), sorted(kinds.LEAKING.items()))
def test_models_that_mix_rows_are_refused_naming_the_output(
    kind: str, output: str, files: dict[str, Any], redis_url: str
) -> None:
    config = PoolConfig(model=files[kind], redis_url=redis_url)
    with pytest.raises(RowsNotIndependent, match=f"output '{output}'") as raised:
        load_only(config)
    assert 'batching = "off"' in str(raised.value)


def test_batching_off_runs_each_request_alone(
    files: dict[str, Any], redis_url: str, client: Client
) -> None:
    """x - mean(x, axis=0) over a request's own rows: other requests never enter it."""
    with serving(redis_url, files["centred"], name="centred", batching="off"):
        check_concurrent(client, "centred", floats(4),
                         lambda x: {"centred": x - x.mean(axis=0, keepdims=True)})  # fmt: skip
    with serving(redis_url, files["scalar"], name="scalar", batching="off"):
        x = floats(4)(6)
        total = client.predict("scalar", x, timeout=60)
        assert isinstance(total, np.ndarray) and total.shape == ()
        np.testing.assert_allclose(total, x.sum(), rtol=1e-5)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    pixels = np.zeros((*size, 3), np.uint8) + np.array(colour, np.uint8)
    return tf.io.encode_png(pixels).numpy()  # type: ignore[no-any-return]


def test_detector_with_fixed_batch_free_size_images_and_detections(
    files: dict[str, Any], redis_url: str, client: Client, tmp_path: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    images = [((30, 40), (200, 50, 100)), ((16, 16), (10, 220, 30)), ((30, 40), (90, 90, 250))]
    with serving(redis_url, files["detector"], name="detector", preprocess="image",
                 postprocess="detections", min_score=0.3, labels_file=str(labels),
                 box_units="pixels") as worker:  # fmt: skip
        assert worker.desk.batcher.buckets == [1]
        with ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(
                lambda im: client.predict("detector", _png(im[0], im[1]), timeout=120),
                images,
            ))  # fmt: skip
    for ((height, width), colour), got in zip(images, answers, strict=True):
        assert isinstance(got, dict)
        means = np.array(colour) / 255.0
        order = [int(i) for i in np.argsort(-means, kind="stable") if means[i] >= 0.3]
        assert got["count"] == len(order)
        assert got["classes"].tolist() == [i + 1 for i in order]
        assert got["labels"].tolist() == [["red", "green", "blue"][i] for i in order]
        np.testing.assert_allclose(got["scores"], means[order], atol=1e-3)
        scale = np.array([height, width, height, width])
        want = np.array([kinds.Detector.BOXES[i] for i in order]).reshape(-1, 4) * scale
        np.testing.assert_allclose(got["boxes"], want, atol=1e-3)


def test_subclassed_keras_file_served_by_spawned_workers_with_preload(
    start_pool: PoolFactory, files: dict[str, Any], client: Client
) -> None:
    start_pool(files["subclassed.keras"], name="spawned-subclassed",
               preload=["tests.integration.kinds"], max_batch_size=8)  # fmt: skip
    check_concurrent(
        client, "spawned-subclassed", floats(4), keras_direct(files["subclassed.keras"])
    )


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("corrupt", [], "cannot read {path} as a Keras model"),
        ("missing preload", ["--preload", "no_such_module_for_tfpool"],
         "cannot import preload module 'no_such_module_for_tfpool'"),
        ("leaking", [], "output 'centred'"),
    ],
)  # fmt: skip
def test_models_that_can_never_load_stop_the_pool_with_exit_code_3(
    kind: str, options: list[str], message: str, files: dict[str, Any], redis_url: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    path = files["sequential.keras"]
    if kind == "corrupt":
        path = str(tmp_path / "corrupt.keras")
        Path(path).write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "leaking":
        path = files["centred"]
    done = subprocess.run(
        [*TFPOOL, "serve", "--model", path, "--redis-url", redis_url, "--workers", "1", *options],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert message.format(path=path) in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_inspect_says_what_to_send(files: dict[str, Any]) -> None:
    fixed = inspect_model(PoolConfig(model=files["subclassed saved_model"], name="sub"))
    assert "  inputs: float32 [1, 4]" in fixed
    assert "batch: fixed at 1 by the model's signature" in fixed
    assert "client.predict('sub', np.zeros((1, 4), np.float32))" in fixed
    leaking = inspect_model(PoolConfig(model=files["centred"]))
    assert "rows independent: NO: output 'centred'" in leaking
    graph = inspect_model(PoolConfig(model=files["frozen"], graph_inputs={"x": "x:0"},
                                     graph_outputs={"probs": "probs:0"}))  # fmt: skip
    assert "TF1 frozen GraphDef" in graph and "  probs: float32 [*, 2]" in graph


def test_inspect_command(files: dict[str, Any]) -> None:
    done = subprocess.run([*TFPOOL, "inspect", files["text.keras"]], capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # TensorFlow's start-up lines (oneDNN, cuda drivers, cuInit) are kept off the terminal.
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"model: {files['text.keras']} (Keras Functional)",
        "inputs:",
        "  text: bytes [*, 1]",
        "outputs:",
        "  score: float32 [*, 2]",
        "batch: any size: requests share batches of up to max_batch_size = 32",
        "rows independent: yes (checked on batches of 1, 2, 4, 8, 16, 32 rows)",
        "example:",
        "  import numpy as np",
        "  from queueing import Client",
        "  with Client(REDIS_URL) as client:",
        "      result = client.predict('text', np.full((2, 1), b'...', dtype=object))",
        "  # result: an array, float32 [2, 2]",
    ]
