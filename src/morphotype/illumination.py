"""Illumination correction of movie frames with BaSiC (BaSiCPy 2.0), as in the study.

For frame ``f`` of a movie of ``n`` frames, BaSiC (darkfield on, time-lapse baseline on) is fitted
on three neighbouring frames of the same movie: ``f-1, f, f+1`` when both neighbours exist;
``f-2, f-1, f`` for the last frame; ``f, f+1, f+2`` for the first. The corrected window is
clipped at 0, divided by its maximum, multiplied by 255 and cast to ``uint8``, and the frame's
plane is kept (the reference's ``pybasic`` post-processing). The ``no_ic`` variant keeps the raw
frame.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

VARIANTS = ("ic", "no_ic")
"""``ic``: BaSiC-corrected uint8 frame; ``no_ic``: the raw frame as stored in the movie."""

WINDOW = 3


def context_window(frame: int, n_frames: int, size: int = WINDOW) -> tuple[list[int], int]:
    """Frames BaSiC is fitted on for ``frame``, and the position of ``frame`` among them.

    Centred on ``frame`` where the movie allows, else shifted to stay inside ``[0, n_frames)``:
    ``(f-1, f, f+1)`` in the middle, ``(f-2, f-1, f)`` at the end, ``(f, f+1, f+2)`` at the start.
    """
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    if not 0 <= frame < n_frames:
        raise ValueError(f"frame {frame} is outside the movie (0..{n_frames - 1})")
    if n_frames < size:
        raise ValueError(f"BaSiC needs {size} frames of context; the movie has {n_frames}")
    start = min(max(frame - size // 2, 0), n_frames - size)
    return list(range(start, start + size)), frame - start


def fit_basic(frames: np.ndarray, *, darkfield: bool = True, **basic_options):
    """Fit a :class:`basicpy.BaSiC` model on a (frames, rows, columns) stack.

    ``basic_options`` go to the ``BaSiC`` constructor (e.g. ``smoothness_flatfield``; by default
    BaSiCPy derives the smoothness from the data, which recovers smooth shading fields best on
    three-frame stacks). Runs on the CPU unless ``device="cuda"`` is given.
    """
    from basicpy import BaSiC

    stack = _check_stack(frames)
    options = {"get_darkfield": darkfield, "device": "cpu", **basic_options}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="get_darkfield=True", category=UserWarning)
        model = BaSiC(**options)
        model.fit(stack)
    return model


def correct_window(
    frames: np.ndarray, position: int, *, darkfield: bool = True, timelapse: bool = True, **basic_options
) -> np.ndarray:
    """BaSiC-correct a stack of neighbouring frames and return frame ``position`` as uint8."""
    stack = _check_stack(frames)
    if not 0 <= position < len(stack):
        raise ValueError(f"position {position} is outside the stack of {len(stack)} frames")
    model = fit_basic(stack, darkfield=darkfield, **basic_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="sort_intensity=False", category=UserWarning)
        corrected = model.transform(stack, is_timelapse=timelapse, use_tqdm=False)
    return to_uint8(np.asarray(corrected))[position]


def to_uint8(corrected: np.ndarray) -> np.ndarray:
    """Clip at 0, divide by the maximum, ×255, uint8 (the reference's scaling; all-zero stays 0)."""
    values = np.clip(np.asarray(corrected, dtype=np.float64), 0, None)
    peak = values.max(initial=0.0)
    if peak > 0:
        values = values / peak
    return (values * 255).astype(np.uint8)


def correct_frame(
    read_frame: Callable[[int], np.ndarray] | np.ndarray,
    frame: int,
    n_frames: int | None = None,
    *,
    variant: str = "ic",
    **basic_options,
) -> np.ndarray:
    """The ``variant`` of movie frame ``frame``.

    ``read_frame`` is either the whole movie (t, rows, columns) or a function returning plane
    ``t``; with a function only the window's frames are read. ``n_frames`` is the movie length
    (taken from the array when a movie is given).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown illumination variant {variant!r}; expected one of {VARIANTS}")
    if isinstance(read_frame, np.ndarray):
        movie = read_frame
        n_frames = len(movie) if n_frames is None else n_frames
        read_frame = movie.__getitem__
    if n_frames is None:
        raise ValueError("n_frames is required when read_frame is a function")
    if variant == "no_ic":
        return np.asarray(read_frame(frame))
    indices, position = context_window(frame, n_frames)
    stack = np.stack([np.asarray(read_frame(t)) for t in indices])
    return correct_window(stack, position, **basic_options)


def _check_stack(frames: np.ndarray) -> np.ndarray:
    stack = np.asarray(frames)
    if stack.ndim != 3:
        raise ValueError(f"expected a (frames, rows, columns) stack, got shape {stack.shape}")
    if not np.issubdtype(stack.dtype, np.number) or not np.isfinite(stack).all():
        raise ValueError("frames must be finite numbers")
    return stack.astype(np.float32, copy=False)
