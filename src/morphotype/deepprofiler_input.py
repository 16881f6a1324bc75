"""DeepProfiler's single-cell input pipeline, operation for operation, in numpy.

At the study's commit of cytomining/DeepProfiler (``2fb3ed3027cded6676b7e409687322ef67491ec7``)
a nucleus reaches the network through three files:

1. ``deepprofiler/imaging/boxes.py``: the box ``[c - box/2, c + box/2]`` on each axis, stored as
   float32 and divided by the image height (rows) or width (columns);
2. ``deepprofiler/imaging/cropping.py``: ``tf.image.crop_and_resize`` to ``box x box`` (bilinear,
   zeros outside the image), then ``(x - min) / max`` per crop;
3. ``plugins/crop_generators/repeat_channel_crop_generator.py``: the legacy
   ``tf.compat.v1.image.resize_images`` to 224 (bilinear, no half-pixel centres, no antialiasing),
   grey repeated to RGB, and min-max scaling of each crop to [-1, 1]. No ImageNet normalisation.

Written by hand because no library outside TensorFlow has these two resamplers: torch, scikit-image
and OpenCV resize with half-pixel centres, and ``crop_and_resize``'s sample grid (``(size - 1)``
scaling, whole rows and columns outside the image set to 0) is TensorFlow's own. The arithmetic
follows TensorFlow's CPU kernels (``crop_and_resize_op.cc``, ``resize_bilinear_op.cc``) in float32
and in their order; ``tests/data/deepprofiler_resampling.npz`` holds values recorded from
TensorFlow 2.15.1 that the main test suite compares against.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def deepprofiler_boxes(centres_xy: np.ndarray, box_size: int, image_shape: tuple[int, int]) -> np.ndarray:
    """Normalised ``(y1, x1, y2, x2)`` boxes as DeepProfiler's ``get_cropping_regions`` makes them.

    Parameters
    ----------
    centres_xy : (N, 2) nucleus centres (x = column, y = row), fractional values kept.
    box_size : side of the box in pixels.
    image_shape : (height, width) of the image.

    Returns
    -------
    (N, 4) float32 array; coordinates outside [0, 1] are boxes reaching past the image edge.
    """
    centres = np.asarray(centres_xy, dtype=np.float64).reshape(-1, 2)
    boxes = np.zeros((len(centres), 4), np.float32)
    boxes[:, 0] = centres[:, 1] - box_size / 2
    boxes[:, 1] = centres[:, 0] - box_size / 2
    boxes[:, 2] = centres[:, 1] + box_size / 2
    boxes[:, 3] = centres[:, 0] + box_size / 2
    boxes[:, [0, 2]] /= int(image_shape[0])  # float32 / int stays float32, as in DeepProfiler
    boxes[:, [1, 3]] /= int(image_shape[1])
    return boxes


def _crop_grid(start: np.ndarray, end: np.ndarray, size: int, crop_size: int):
    """Sample positions of ``crop_and_resize`` along one axis for every box (float32, TF's order)."""
    scale = (end - start) * F32(size - 1) / F32(crop_size - 1)
    position = start[:, None] * F32(size - 1) + np.arange(crop_size, dtype=F32)[None] * scale[:, None]
    inside = (position >= 0) & (position <= F32(size - 1))
    floor = np.floor(position)
    low = np.clip(floor, 0, size - 1).astype(np.intp)
    high = np.clip(np.ceil(position), 0, size - 1).astype(np.intp)
    return low, high, (position - floor).astype(F32), inside


def crop_and_resize(image: np.ndarray, boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """``tf.image.crop_and_resize`` (bilinear, extrapolation value 0) of one grey image.

    Parameters
    ----------
    image : (H, W) array; computed in float32 like TensorFlow's kernel.
    boxes : (N, 4) normalised ``(y1, x1, y2, x2)``; a pixel row ``r`` sits at ``r / (H - 1)``.
    crop_size : output side (> 1).

    Returns
    -------
    (N, crop_size, crop_size) float32 crops.
    """
    image = np.asarray(image, dtype=F32)
    if image.ndim != 2 or crop_size < 2:
        raise ValueError(f"crop_and_resize needs a 2-D image and crop_size > 1, got {image.shape}, {crop_size}")
    boxes = np.asarray(boxes, dtype=F32).reshape(-1, 4)
    top, bottom, y_lerp, rows_in = _crop_grid(boxes[:, 0], boxes[:, 2], image.shape[0], crop_size)
    left, right, x_lerp, cols_in = _crop_grid(boxes[:, 1], boxes[:, 3], image.shape[1], crop_size)

    def pixels(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return image[rows[:, :, None], cols[:, None, :]]

    x_lerp = x_lerp[:, None, :]
    upper_left, lower_left = pixels(top, left), pixels(bottom, left)
    upper = upper_left + (pixels(top, right) - upper_left) * x_lerp
    lower = lower_left + (pixels(bottom, right) - lower_left) * x_lerp
    crops = upper + (lower - upper) * y_lerp[:, :, None]
    return np.where(rows_in[:, :, None] & cols_in[:, None, :], crops, F32(0))


def _legacy_axis(in_size: int, out_size: int):
    """``compute_interpolation_weights`` with ``LegacyScaler``: source = i * in / out, no half pixel."""
    scale = F32(in_size) / F32(out_size)
    source = np.arange(out_size, dtype=F32) * scale
    floor = np.floor(source)
    low = np.maximum(floor.astype(np.intp), 0)
    high = np.minimum(np.ceil(source).astype(np.intp), in_size - 1)
    return low, high, (source - floor).astype(F32)


def resize_bilinear_legacy(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``tf.compat.v1.image.resize_images`` (bilinear, ``align_corners=False``, no half-pixel centres).

    Parameters
    ----------
    images : (N, h, w) grey images.
    size : output side, or (height, width).

    Returns
    -------
    (N, height, width) float32.
    """
    images = np.asarray(images, dtype=F32)
    height, width = (size, size) if np.isscalar(size) else size
    top, bottom, y_lerp = _legacy_axis(images.shape[1], int(height))
    left, right, x_lerp = _legacy_axis(images.shape[2], int(width))
    upper_rows, lower_rows = images[:, top], images[:, bottom]
    upper_left, lower_left = upper_rows[:, :, left], lower_rows[:, :, left]
    upper = upper_left + (upper_rows[:, :, right] - upper_left) * x_lerp
    lower = lower_left + (lower_rows[:, :, right] - lower_left) * x_lerp
    return upper + (lower - upper) * y_lerp[None, :, None]


def deepprofiler_network_input(crops: np.ndarray, input_size: int = 224) -> np.ndarray:
    """DeepProfiler's per-crop scaling and resize: crops of :func:`crop_and_resize` -> (N, S, S)
    float32 in [-1, 1] (one grey plane; DeepProfiler repeats it to RGB).

    A constant crop divides 0 by 0 and gives NaN, as it does in DeepProfiler.
    """
    crops = np.asarray(crops, dtype=F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (crops - crops.min(axis=(1, 2), keepdims=True)) / crops.max(axis=(1, 2), keepdims=True)
        resized = resize_bilinear_legacy(scaled, input_size)
        low, high = resized.min(axis=(1, 2), keepdims=True), resized.max(axis=(1, 2), keepdims=True)
        return ((resized - low) / (high - low)) * F32(2.0) - F32(1.0)
