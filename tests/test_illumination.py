"""Illumination correction with BaSiC on neighbouring movie frames."""

from __future__ import annotations

import numpy as np
import pytest

from morphotype import illumination
from morphotype.testing import synthetic_movie


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_movie(6, (160, 200), n_nuclei=14, seed=4)


def test_context_window_keeps_the_frame_inside_three_neighbours():
    assert illumination.context_window(5, 95) == ([4, 5, 6], 1)
    assert illumination.context_window(94, 95) == ([92, 93, 94], 2)  # last frame: the three before
    assert illumination.context_window(0, 95) == ([0, 1, 2], 0)
    assert illumination.context_window(1, 3) == ([0, 1, 2], 1)
    with pytest.raises(ValueError, match="outside the movie"):
        illumination.context_window(95, 95)
    with pytest.raises(ValueError, match="needs 3 frames"):
        illumination.context_window(0, 2)


def test_basic_recovers_the_planted_flatfield(synthetic):
    model = illumination.fit_basic(synthetic["movie"][1:4])
    assert model.flatfield.shape == synthetic["flatfield"].shape
    correlation = np.corrcoef(model.flatfield.ravel(), synthetic["flatfield"].ravel())[0, 1]
    assert correlation >= 0.95


def test_correction_removes_the_shading_from_nuclei(synthetic):
    movie, labels, flat = synthetic["movie"], synthetic["labels"][2], synthetic["flatfield"]
    corrected = illumination.correct_window(movie[1:4], 1)
    assert corrected.dtype == np.uint8 and corrected.max() > 200
    numbers = np.arange(1, labels.max() + 1)
    core = [(labels == n) & (np.hypot(*np.gradient((labels == n).astype(float))) == 0) for n in numbers]
    shading = np.array([flat[mask].mean() for mask in core])
    raw = np.array([movie[2][mask].mean() for mask in core]) / synthetic["brightness"]
    fixed = np.array([corrected[mask].astype(float).mean() for mask in core]) / synthetic["brightness"]
    # per unit of planted brightness, raw nuclei follow the shading; corrected ones do not
    assert np.corrcoef(shading, raw)[0, 1] > 0.9
    assert np.std(fixed) / np.mean(fixed) < 0.35 * np.std(raw) / np.mean(raw)


@pytest.mark.parametrize("timelapse", [True, False])
def test_background_no_longer_follows_the_shading(synthetic, timelapse):
    from scipy.ndimage import binary_dilation

    movie, flat = synthetic["movie"], synthetic["flatfield"]
    background = ~binary_dilation(synthetic["labels"][2] > 0, iterations=5)
    corrected = illumination.correct_window(movie[1:4], 1, timelapse=timelapse).astype(float)
    assert np.corrcoef(movie[2][background], flat[background])[0, 1] > 0.9
    assert abs(np.corrcoef(corrected[background], flat[background])[0, 1]) < 0.2


def test_correct_frame_reads_only_the_window_and_no_ic_is_raw(synthetic):
    movie = synthetic["movie"]
    asked = []

    def read(t):
        asked.append(t)
        return movie[t]

    corrected = illumination.correct_frame(read, 5, n_frames=6)
    assert sorted(asked) == [3, 4, 5]
    assert np.array_equal(corrected, illumination.correct_window(movie[3:6], 2))
    assert np.array_equal(illumination.correct_frame(movie, 5, variant="no_ic"), movie[5])
    with pytest.raises(ValueError, match="unknown illumination variant"):
        illumination.correct_frame(movie, 5, variant="flat")
    with pytest.raises(ValueError, match="n_frames"):
        illumination.correct_frame(read, 5)


def test_to_uint8_clips_and_scales_like_the_reference():
    values = np.array([[-5.0, 0.0], [50.0, 100.0]])
    assert np.array_equal(illumination.to_uint8(values), np.array([[0, 0], [127, 255]], np.uint8))
    assert illumination.to_uint8(np.zeros((2, 2))).max() == 0
    with pytest.raises(ValueError, match="stack"):
        illumination.correct_window(np.zeros((4, 4)), 0)
    with pytest.raises(ValueError, match="finite"):
        illumination.fit_basic(np.full((3, 4, 4), np.nan))
