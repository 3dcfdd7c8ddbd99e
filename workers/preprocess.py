"""Processing before inference: images in, the model's input tensor out. Imports TensorFlow:
a worker-only module.

The image input of a request takes either

* encoded images (JPEG, PNG, GIF, BMP): one ``bytes`` item per row (``[rows]``, or one
  item without the batch axis), decoded, resized, scaled and cast; or
* uint8 pixels of any height and width (``[h, w, c]`` or ``[rows, h, w, c]``), resized,
  scaled and cast; or
* an array already of the model's dtype and shape, passed on unchanged.

The worker's reader runs it on every request of one read together (one TensorFlow call
for all their images) while the model runs the batch before. When that call fails
because of one broken image, each request is run again alone, so the broken one gets its
:class:`InvalidInput` and the others their tensors.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from queueing import wire
from queueing.errors import InvalidInput
from workers.config import PoolConfig
from workers.errors import ConfigError
from workers.spec import TensorSpec

log = logging.getLogger(__name__)

#: Formats tf.io.decode_image reads.
FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})

# Our own pixel limit (max_image_pixels) is checked from the header; Pillow's would only
# warn, or refuse with an error of its own, for the same reason.
Image.MAX_IMAGE_PIXELS = None


class ImagePreprocessor:
    """Encoded images or pixels -> the model's image input, as configured."""

    def __init__(self, config: PoolConfig, inputs: Sequence[TensorSpec]) -> None:
        self.spec = _image_spec(config, inputs)
        self.name = self.spec.name
        height, width, channels = self.spec.shape
        if config.image_size:
            height, width = config.image_size
        # None: the model takes any size (a detector's [1, None, None, 3]); each image is
        # decoded at its own size, and each size batches apart.
        self.size = None if height is None or width is None else (int(height), int(width))
        self.channels = int(channels or 3)
        if self.channels not in (1, 3):  # what decode_image gives for every format
            raise ConfigError(f"input {self.name!r} has {self.channels} channels: need 1 or 3")
        self.max_pixels = config.max_image_pixels
        self.row_shape = (*(self.size or (None, None)), self.channels)
        mean = _per_channel("image_mean", config.image_mean, self.channels, 0.0)
        std = _per_channel("image_std", config.image_std, self.channels, 1.0)
        methods = sorted(v for k, v in vars(tf.image.ResizeMethod).items() if k.isupper())
        if config.image_resize not in methods:
            raise ConfigError(
                f"image_resize {config.image_resize!r} is not a method; choose from {methods}"
            )
        method, scale, offset = config.image_resize, config.image_scale, config.image_offset
        dtype = tf.as_dtype(self.spec.dtype)
        size, shape = self.size, self.row_shape
        channels_ = self.channels

        def finish(pixels: tf.Tensor) -> tf.Tensor:
            x = tf.cast(pixels, tf.float32) * scale + offset
            if config.image_mean or config.image_std:
                x = (x - mean) / std
            if dtype.is_integer:
                return tf.saturate_cast(tf.round(x), dtype)
            return tf.cast(x, dtype)

        def decode_one(data: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(data, channels=channels_, expand_animations=False)
            image.set_shape([None, None, channels_])
            if size is None:
                return tf.cast(image, tf.float32)
            return tf.image.resize(image, size, method=method)

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)  # type: ignore[untyped-decorator]
        def decode_own_size(data: tf.Tensor) -> tf.Tensor:
            return finish(decode_one(data)[tf.newaxis])

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)  # type: ignore[untyped-decorator]
        def decode(data: tf.Tensor) -> tf.Tensor:
            images = tf.map_fn(
                decode_one, data, fn_output_signature=tf.TensorSpec(shape, tf.float32)
            )
            return finish(images)

        @tf.function(  # type: ignore[untyped-decorator]
            input_signature=[tf.TensorSpec([None, None, None, channels_], tf.uint8)],
            autograph=False,
        )
        def from_pixels(pixels: tf.Tensor) -> tf.Tensor:
            if size is None:
                return finish(pixels)
            return finish(tf.image.resize(pixels, size, method=method))

        self._decode = decode if size is not None else self._decode_own_sizes
        self._decode_own_size = decode_own_size
        self._from_pixels = from_pixels

    def describe(self) -> str:
        """What producers send to the image input, for the model's info in Redis."""
        h, w, c = ("*" if d is None else d for d in self.row_shape)
        return (
            f"{self.name}: bytes [*] (encoded JPEG/PNG/GIF/BMP) or uint8 [*, h, w, {c}]"
            f" -> {self.spec.dtype} [*, {h}, {w}, {c}]"
            + (" (each image at its own size)" if self.size is None else "")
        )

    def _decode_own_sizes(self, items: np.ndarray) -> tf.Tensor:
        """Decode images at their own sizes; they stack only if they share one (the images
        of one request must, for a model of free height and width)."""
        images = [self._decode_own_size(item) for item in items]
        if len({tuple(i.shape) for i in images}) > 1:
            sizes = sorted({f"{i.shape[1]}x{i.shape[2]}" for i in images})
            raise InvalidInput(
                f"input {self.name!r}: the images of one request differ in size"
                f" ({', '.join(sizes)}); send them in requests of their own"
            )
        return tf.concat(images, axis=0)

    def warm_up(self) -> None:
        """Trace both paths once (every request size then reuses the traces)."""
        png = tf.io.encode_png(tf.zeros([7, 5, self.channels], tf.uint8)).numpy()
        self.run([_bytes_array([png, png])])
        self.run([np.zeros((1, 9, 11, self.channels), np.uint8)])

    def run(self, values: Sequence[np.ndarray]) -> list[np.ndarray | InvalidInput]:
        """The model input for each request's image value (rows kept as sent: a value
        without the batch axis gives one without it), or the error for that request."""
        results: list[np.ndarray | InvalidInput | None] = [None] * len(values)
        encoded: list[int] = []
        for i, value in enumerate(values):
            try:
                kind = self._kind(value)
                if kind == "bytes":
                    for item in value.reshape(-1):
                        self._check_header(item)
                    encoded.append(i)
                elif kind == "pixels":
                    results[i] = self._pixels(value)
                else:
                    results[i] = value
            except InvalidInput as e:
                results[i] = e
        if encoded:
            self._decode_requests([values[i] for i in encoded], encoded, results)
        return [r for r in results if r is not None]

    def _kind(self, value: np.ndarray) -> str:
        name = wire.dtype_name(value)
        if name == wire.BYTES:
            if value.ndim > 1:
                raise InvalidInput(
                    f"input {self.name!r}: encoded images come one per row ([rows] or one"
                    f" item), got bytes {list(value.shape)}"
                )
            if value.size == 0:
                raise InvalidInput(f"input {self.name!r}: no images")
            return "bytes"
        if name == "uint8" and value.ndim in (3, 4):
            if value.shape[-1] != self.channels or 0 in value.shape:
                raise InvalidInput(
                    f"input {self.name!r}: pixels must be uint8 [rows, h, w, {self.channels}]"
                    f" (or [h, w, {self.channels}]), got uint8 {list(value.shape)}"
                )
            if value.shape[-3] * value.shape[-2] > self.max_pixels:
                raise InvalidInput(
                    f"input {self.name!r}: {value.shape[-3]}x{value.shape[-2]} pixels is over"
                    f" the limit of {self.max_pixels}"
                )
            return "pixels"
        if name == self.spec.dtype and all(
            want is None or want == have
            for want, have in zip(self.row_shape, value.shape[-3:], strict=True)
        ):
            return "tensor"
        raise InvalidInput(
            f"input {self.name!r}: expected encoded images (bytes), uint8 pixels"
            f" [rows, h, w, {self.channels}] or {self.spec.describe()};"
            f" got {name} {list(value.shape)}"
        )

    def _check_header(self, data: bytes) -> None:
        """Refuse what is not an image of a format we decode, or is too large, from its
        header alone: a small file may claim billions of pixels."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
        except UnidentifiedImageError as e:
            raise InvalidInput(f"input {self.name!r}: not an image of a known format") from e
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's ways of saying "corrupt"
            raise InvalidInput(f"input {self.name!r}: not an image ({e})") from e
        if fmt not in FORMATS:
            raise InvalidInput(
                f"input {self.name!r}: {fmt} images are not decoded here; send"
                f" {', '.join(sorted(FORMATS))}"
            )
        if width * height > self.max_pixels:
            raise InvalidInput(
                f"input {self.name!r}: a {width}x{height} image is over the limit of"
                f" {self.max_pixels} pixels"
            )

    def _pixels(self, value: np.ndarray) -> np.ndarray:
        batch = value if value.ndim == 4 else value[np.newaxis]
        out: np.ndarray = self._from_pixels(batch).numpy()
        return out if value.ndim == 4 else out[0]

    def _decode_requests(
        self,
        values: list[np.ndarray],
        positions: list[int],
        results: list[np.ndarray | InvalidInput | None],
    ) -> None:
        """One decode call for all the requests' images; on failure, one per request."""
        if self.size is None and len(values) > 1:  # images of free sizes: request by request
            for value, i in zip(values, positions, strict=True):
                self._decode_requests([value], [i], results)
            return
        items = [item for value in values for item in value.reshape(-1)]
        try:
            images = self._decode(_bytes_array(items)).numpy()
        except InvalidInput as e:
            results[positions[0]] = e
            return
        except tf.errors.OpError:  # InvalidArgumentError for corrupt data, but any op error
            if len(values) == 1:
                results[positions[0]] = self._explain(values[0])
            else:
                for value, i in zip(values, positions, strict=True):
                    self._decode_requests([value], [i], results)
            return
        offset = 0
        for value, i in zip(values, positions, strict=True):
            rows = images[offset : offset + value.size]
            results[i] = rows if value.ndim == 1 else rows[0]
            offset += value.size

    def _explain(self, value: np.ndarray) -> InvalidInput:
        """The error of a request whose images did not decode, naming the first bad one."""
        for row, item in enumerate(value.reshape(-1)):
            try:
                self._decode(_bytes_array([item]))
            except tf.errors.OpError as e:
                first = (e.message or str(e)).strip().splitlines()[0]
                where = f"image {row}" if value.ndim else "the image"
                return InvalidInput(f"input {self.name!r}: {where} cannot be decoded: {first}")
        return InvalidInput(f"input {self.name!r}: the images cannot be decoded")


def _image_spec(config: PoolConfig, inputs: Sequence[TensorSpec]) -> TensorSpec:
    if config.image_input:
        for spec in inputs:
            if spec.name == config.image_input:
                if len(spec.shape) != 3:
                    raise ConfigError(
                        f"image_input {spec.name!r} is {spec.describe()}: need [*, h, w, c]"
                    )
                return spec
        names = [s.name for s in inputs]
        raise ConfigError(f"image_input {config.image_input!r} is not one of the inputs {names}")
    candidates = [s for s in inputs if len(s.shape) == 3]
    if len(candidates) != 1:
        raise ConfigError(
            "preprocess = 'image' needs image_input: the model's inputs are "
            + ", ".join(f"{s.name} {s.describe()}" for s in inputs)
        )
    return candidates[0]


def _per_channel(option: str, values: list[float], channels: int, default: float) -> Any:
    if not values:
        return tf.constant([default] * channels, tf.float32)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ConfigError(f"{option} has {len(values)} values for {channels} channels")
    return tf.constant(values, tf.float32)


def _bytes_array(items: Sequence[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array
