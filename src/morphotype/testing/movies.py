"""Synthetic movies with known truth, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def synthetic_movie(
    n_frames: int = 8,
    shape: tuple[int, int] = (128, 160),
    *,
    n_nuclei: int = 12,
    radius: float = 6.0,
    background: float = 30.0,
    seed: int = 0,
) -> dict:
    """A uint8 (t, y, x) movie of drifting nuclei under a known shading field.

    Returns ``movie``, ``flatfield`` (mean 1), ``darkfield``, ``centres`` ((t, n, 2) array of
    nucleus centres as x, y), ``labels`` ((t, y, x) planted nucleus masks, numbered 1..n),
    ``radius`` and ``brightness`` (each nucleus's signal before shading). Nuclei are discs that
    do not overlap, stay inside the frame, and drift a few pixels per frame with the field.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width]
    flatfield = 1.0 - 0.8 * (((xx - 0.6 * width) / width) ** 2 + ((yy - 0.4 * height) / height) ** 2)
    flatfield /= flatfield.mean()
    darkfield = np.full(shape, 6.0)
    drift = rng.uniform(-1.0, 1.0, size=2)  # the whole field drifts; each nucleus wanders a little
    velocity = drift + rng.uniform(-0.3, 0.3, size=(n_nuclei, 2))
    travel = np.abs(velocity).max(axis=0) * (n_frames - 1)
    low = np.array([radius + 2, radius + 2]) + np.where(drift < 0, travel, 0)
    high = np.array([width, height]) - radius - 2 - np.where(drift > 0, travel, 0)
    spacing = 2 * radius + 4 + 0.85 * (n_frames - 1)  # discs never touch while they wander
    centres0: list[np.ndarray] = []
    for _ in range(20000):  # rejection sampling of non-overlapping start positions
        if len(centres0) == n_nuclei or np.any(high <= low):
            break
        point = rng.uniform(low, high)
        if all(np.hypot(*(point - c)) > spacing for c in centres0):
            centres0.append(point)
    if len(centres0) < n_nuclei:
        raise ValueError(f"cannot place {n_nuclei} nuclei of radius {radius} in a {shape} frame over {n_frames} frames")
    start = np.array(centres0)
    brightness = rng.uniform(90, 140, size=n_nuclei)
    frames, labels, centres = [], [], []
    for t in range(n_frames):
        here = start + velocity * t
        signal = np.zeros(shape)
        mask = np.zeros(shape, np.int32)
        for number, ((cx, cy), level) in enumerate(zip(here, brightness), start=1):
            rows, cols = disk((cy, cx), radius + 0.5, shape=shape)
            inside = (cols - cx) ** 2 + (rows - cy) ** 2 <= radius**2
            signal[rows[inside], cols[inside]] = level
            mask[rows[inside], cols[inside]] = number
        signal = gaussian_filter(signal, 1.0) + background
        observed = signal * flatfield + darkfield + rng.normal(0, 1.5, shape)
        frames.append(np.clip(np.rint(observed), 0, 255).astype(np.uint8))
        labels.append(mask)
        centres.append(here)
    return {"movie": np.stack(frames), "flatfield": flatfield, "darkfield": darkfield,
            "centres": np.stack(centres), "labels": np.stack(labels), "radius": radius, "brightness": brightness}
