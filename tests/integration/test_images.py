"""Images in, classes out: decoding, resizing and top-k in the worker, against the same
steps done directly with TensorFlow and the model in this process."""

from __future__ import annotations

import io
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import redis
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from queueing import Client, keys
from queueing.errors import InvalidInput
from queueing.score import Progress, score
from tests.integration.conftest import PoolFactory
from tests.integration.helpers import TFPOOL
from tests.integration.models import IMAGE_LABELS, decoded_image_input, encode_image
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.preprocess import ImagePreprocessor
from workers.spec import TensorSpec

SCALE = 1 / 255
SPEC = [TensorSpec("image", "float32", (8, 8, 3))]


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose header is changed to claim ``width`` x ``height`` pixels: a
    decompression bomb's header (its data would never decode to that)."""
    png = bytearray(encode_image(_pixels(0, 2, 2), "png"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # and its checksum
    return bytes(png)


def _preprocessor(**options: Any) -> ImagePreprocessor:
    config = PoolConfig(model="m.keras", preprocess="image", image_scale=SCALE, **options)
    return ImagePreprocessor(config, SPEC)


def _bytes(*items: bytes) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def _arrays(results: list[np.ndarray | InvalidInput]) -> list[np.ndarray]:
    for r in results:
        assert isinstance(r, np.ndarray), r
    return results  # type: ignore[return-value]


def _scalar(item: bytes) -> np.ndarray:
    array = np.empty((), dtype=object)
    array[()] = item
    return array


# --- the preprocessor on its own ---------------------------------------------------------


def test_encoded_images_and_pixels_become_the_models_input() -> None:
    pre = _preprocessor()
    png, jpeg = encode_image(_pixels(1, 12, 10), "png"), encode_image(_pixels(2, 20, 30), "jpeg")
    pixels = _pixels(3, 5, 7)
    exact = np.full((2, 8, 8, 3), 0.5, np.float32)
    results = _arrays(pre.run([_bytes(png, jpeg), _scalar(png), pixels, pixels[np.newaxis], exact]))
    want_png, want_jpeg = (decoded_image_input(b, scale=SCALE) for b in (png, jpeg))
    want_pixels = tf.image.resize(pixels, (8, 8)).numpy() * SCALE
    np.testing.assert_allclose(results[0], np.stack([want_png, want_jpeg]), rtol=1e-6)
    np.testing.assert_allclose(results[1], want_png, rtol=1e-6)  # one image: no batch axis
    np.testing.assert_allclose(results[2], want_pixels, rtol=1e-6)
    np.testing.assert_allclose(results[3], want_pixels[np.newaxis], rtol=1e-6)
    assert results[4] is exact  # already the model's input: passed on as it is


def test_mean_std_and_integer_inputs() -> None:
    config = PoolConfig(model="m.keras", preprocess="image", image_scale=SCALE, image_mean=[0.5],
                        image_std=[0.25, 0.5, 1.0])  # fmt: skip
    pre = ImagePreprocessor(config, SPEC)
    pixels = _pixels(4, 8, 8)
    (out,) = _arrays(pre.run([pixels]))
    std = np.array([0.25, 0.5, 1.0], np.float32)
    want = (pixels.astype(np.float32) * np.float32(SCALE) - np.float32(0.5)) / std
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    as_uint8 = ImagePreprocessor(
        PoolConfig(model="m.keras", preprocess="image", image_scale=2.0),
        [TensorSpec("image", "uint8", (8, 8, 3))],
    )
    (doubled,) = as_uint8.run([pixels])
    assert isinstance(doubled, np.ndarray) and doubled.dtype == np.uint8
    np.testing.assert_array_equal(doubled, np.minimum(pixels.astype(int) * 2, 255))


def test_a_broken_image_fails_its_own_request_only() -> None:
    pre = _preprocessor(max_image_pixels=10_000)
    good = encode_image(_pixels(5, 9, 9), "png")
    truncated = good[: len(good) - 40]  # its header reads; its pixels do not decode
    results = pre.run(
        [
            _bytes(good),
            _bytes(good, truncated),
            _scalar(b"GIF89a? no"),
            _bytes(b"plain text"),
            _scalar(_png_claiming(50_000, 50_000)),
            _bytes(good, good),
            np.zeros((2, 8, 8), np.float32),
            np.zeros((1, 4, 4, 1), np.uint8),
            _bytes(),
        ]
    )
    want = decoded_image_input(good, scale=SCALE)
    first, sixth = _arrays([results[0], results[5]])
    np.testing.assert_allclose(first, want[np.newaxis], rtol=1e-6)
    np.testing.assert_allclose(sixth, np.stack([want, want]), rtol=1e-6)
    messages = {i: str(r) for i, r in enumerate(results) if isinstance(r, InvalidInput)}
    assert sorted(messages) == [1, 2, 3, 4, 6, 7, 8]
    assert "image 1 cannot be decoded" in messages[1]
    assert "not an image" in messages[2] and "not an image" in messages[3]
    assert "50000x50000 image is over the limit of 10000 pixels" in messages[4]
    assert "expected encoded images" in messages[6]
    assert "uint8 [rows, h, w, 3]" in messages[7]
    assert "no images" in messages[8]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_input": "nope"}, "not one of the inputs"),
        ({"image_resize": "sideways"}, "not a method"),
        ({"image_mean": [1.0, 2.0]}, "2 values for 3 channels"),
    ],
)
def test_configuration_that_does_not_fit_the_model(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _preprocessor(**options)
    free = [TensorSpec("image", "float32", (None, None, 3))]
    own_size = ImagePreprocessor(PoolConfig(model="m.keras", preprocess="image"), free)
    (decoded,) = own_size.run([np.array([encode_image(np.zeros((5, 7, 3), np.uint8), "png")] * 2,
                                        dtype=object)])  # fmt: skip
    assert isinstance(decoded, np.ndarray) and decoded.shape == (2, 5, 7, 3)  # its own size
    rgba = [TensorSpec("image", "float32", (8, 8, 4))]
    with pytest.raises(ConfigError, match="4 channels: need 1 or 3"):
        ImagePreprocessor(PoolConfig(model="m.keras", preprocess="image"), rgba)


# --- a pool serving an image classifier --------------------------------------------------


@pytest.fixture(scope="module")
def pets(start_pool: PoolFactory, image_model: tuple[str, str]) -> str:
    path, labels = image_model
    start_pool(
        path, preprocess="image", image_scale=SCALE, postprocess="top_k", top_k=3,
        labels_file=labels, max_batch_size=8, max_latency_ms=20,
    )  # fmt: skip
    return path


def test_images_to_top_k_labels_match_the_model_run_directly(pets: str, client: Client) -> None:
    images = [
        encode_image(_pixels(10 + i, 6 + i, 9 + 2 * i), ("jpeg", "png", "gif", "bmp")[i % 4])
        for i in range(12)  # every format the README lists
    ]
    broken = images[4][:-40]
    sent = [*images[:4], broken, *images[4:]]
    futures = client.submit_many("pets", sent)  # one-image requests, batched together
    model = keras.models.load_model(pets, compile=False)
    direct = model.predict_on_batch(np.stack([decoded_image_input(b, scale=SCALE) for b in images]))
    want_scores, want_indices = tf.math.top_k(direct, k=3)
    results = []
    for i, future in enumerate(futures):
        if i == 4:
            with pytest.raises(InvalidInput, match="cannot be decoded"):
                future.result(timeout=30)
        else:
            results.append(future.result(timeout=30))
    for got, scores, indices in zip(
        results, want_scores.numpy(), want_indices.numpy(), strict=True
    ):
        assert isinstance(got, dict) and sorted(got) == ["indices", "labels", "scores"]
        np.testing.assert_array_equal(got["indices"], indices)
        np.testing.assert_allclose(got["scores"], scores, rtol=1e-5)
        assert got["labels"].tolist() == [IMAGE_LABELS[i] for i in indices]
    # Several images in one request, and raw pixels of another size: rows kept in order.
    batch = client.predict("pets", images[:3], timeout=30)
    assert isinstance(batch, dict)
    np.testing.assert_array_equal(batch["indices"], want_indices.numpy()[:3])
    pixels = _pixels(99, 31, 17)
    direct_pixels = model.predict_on_batch(tf.image.resize(pixels[np.newaxis], (8, 8)) * SCALE)
    from_pixels = client.predict("pets", pixels, timeout=30)
    assert isinstance(from_pixels, dict)
    np.testing.assert_array_equal(from_pixels["indices"], np.argsort(-direct_pixels[0])[:3])


def test_the_model_info_says_what_to_send(pets: str, redis_url: str) -> None:
    info = redis.Redis.from_url(redis_url).hgetall(keys.model_info("pets"))
    assert b"bytes [*] (encoded JPEG/PNG/GIF/BMP) or uint8 [*, h, w, 3]" in info[b"inputs"]
    assert info[b"outputs"] == b"indices, scores, labels"


def test_scoring_a_folder_of_images(pets: str, client: Client, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    files = {}
    for i in range(7):
        data = encode_image(_pixels(40 + i, 10 + i, 12), "jpeg" if i % 2 else "png")
        name = f"b/{i}.PNG" if i == 5 else f"{i:02d}.{'jpg' if i % 2 else 'png'}"
        files[name] = data
    files["03.jpg"] = files["03.jpg"][:-60]  # broken
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not an image, not a row")
    output = str(tmp_path / "classes.npz")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the first chunk, then again
        score(client, "pets", str(folder), output, chunk_rows=3, progress=_ctrl_c_after_3)
    summary = score(client, "pets", str(folder), output, chunk_rows=3, progress=_quiet)
    order = sorted(files)
    assert (tmp_path / "classes.npz.files.txt").read_text().split() == order
    assert summary.rows == 7 and summary.scored == 4 and summary.failed_rows == 1
    assert summary.rows_done == 7  # the first run's 3 rows too
    errors = (tmp_path / "classes.npz.errors.tsv").read_text().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"{order.index('03.jpg')}\t03.jpg: InvalidInput"
    )
    model = keras.models.load_model(pets, compile=False)
    with np.load(output) as result:
        for row, name in enumerate(order):
            if name == "03.jpg":
                assert np.isnan(result["scores"][row]).all()
                assert (result["indices"][row] == -1).all()  # not 0: that is a class
                continue
            direct = model.predict_on_batch(decoded_image_input(files[name], scale=SCALE)[None])
            np.testing.assert_array_equal(result["indices"][row], np.argsort(-direct[0])[:3])
            assert result["labels"][row].tolist() == [
                IMAGE_LABELS[i] for i in result["indices"][row]
            ]


def _quiet(total: int, done: int) -> Progress:
    return Progress(total, done, stream=io.StringIO())


class _CtrlC(Progress):
    def update(self, rows: int) -> None:
        super().update(rows)
        if self.done >= 3:
            raise KeyboardInterrupt


def _ctrl_c_after_3(total: int, done: int) -> Progress:
    return _CtrlC(total, done, stream=io.StringIO())


def test_video_script_streams_a_file_through_the_pool(
    pets: str, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cv2

    from scripts import video_frames

    path = str(tmp_path / "clip.avi")
    fourcc = cv2.VideoWriter.fourcc(*"MJPG")
    writer = cv2.VideoWriter(path, fourcc, 25.0, (64, 48))
    for i in range(12):
        writer.write(_pixels(i, 48, 64))
    writer.release()
    code = video_frames.main(["--video", path, "--redis-url", redis_url, "--model", "pets",
                              "--encode", "jpeg", "--deadline-ms", "5000"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    sent = int(out.split("frames sent: ")[1].split(",")[0])
    answered = int(out.split("answered: ")[1].split(",")[0])
    skipped = int(out.split("dropped: ")[1].split(" ")[0])
    assert "target: 25.0 fps" in out
    assert sent == answered and sent + skipped == 12 and sent > 0
    assert "0 expired in the queue (deadline), 0 failed" in out and "latency" in out


def test_tfpool_predict_sends_an_image_file(pets: str, redis_url: str, tmp_path: Path) -> None:
    png = encode_image(_pixels(77, 16, 16), "png")
    (tmp_path / "one.png").write_bytes(png)
    done = subprocess.run(
        [*TFPOOL, "predict", "--model", "pets", "--input", str(tmp_path / "one.png"),
         "--redis-url", redis_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    model = keras.models.load_model(pets, compile=False)
    direct = model.predict_on_batch(decoded_image_input(png, scale=SCALE)[None])[0]
    best = [IMAGE_LABELS[i] for i in np.argsort(-direct)[:3]]
    assert f"labels: <U3 [3]\n{np.array(best)}" in done.stdout, done.stdout


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(["png", "jpeg"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=6),
    cut=st.integers(0, 10**6),
)
def test_mangled_images_are_invalid_input_or_decode(
    fmt: str, flips: list[tuple[int, int]], cut: int
) -> None:
    """Bit flips and truncations anywhere in a real image: each request either decodes to
    the model's input or gets InvalidInput; nothing else escapes, and its batch-mate is
    always served."""
    pre = _mangling_preprocessor()
    good = encode_image(_pixels(8, 12, 9), fmt)
    data = bytearray(good)
    for position, mask in flips:
        data[position % len(data)] ^= mask
    mangled = bytes(data[: max(1, len(data) - cut % len(data))])
    bad, fine = pre.run([_bytes(mangled), _bytes(good)])
    assert isinstance(bad, (np.ndarray, InvalidInput))
    if isinstance(bad, np.ndarray):
        assert bad.shape == (1, 8, 8, 3) and bad.dtype == np.float32
    assert isinstance(fine, np.ndarray) and fine.shape == (1, 8, 8, 3)


_MANGLING: list[ImagePreprocessor] = []


def _mangling_preprocessor() -> ImagePreprocessor:
    if not _MANGLING:  # one, traced once: a new one per case would retrace every time
        _MANGLING.append(_preprocessor())
    return _MANGLING[0]


def test_a_grayscale_model_gets_color_images_as_gray() -> None:
    gray = ImagePreprocessor(
        PoolConfig(model="m.keras", preprocess="image", image_size=[6, 5]),
        [TensorSpec("image", "float32", (None, None, 1))],
    )
    jpeg = encode_image(_pixels(21, 30, 20), "jpeg")
    (out,) = _arrays(gray.run([_scalar(jpeg)]))
    want = tf.image.resize(tf.io.decode_image(jpeg, channels=1), (6, 5)).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out.shape == (6, 5, 1)
