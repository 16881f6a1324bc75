"""Nucleus segmentation: label images from one grayscale (H2B-GFP / DNA) frame or crop.

Two backends behind :func:`segment_nuclei`:

``threshold``
    scikit-image: Gaussian smoothing, Otsu threshold, hole filling, small-object removal and a
    distance-transform watershed that splits touching nuclei. Needs no weights; the backend for
    pre-cropped nuclei and for machines without Cellpose weights.
``cellpose``
    Cellpose 3.1 with the study's settings: ``cyto`` model, diameter estimated by Cellpose's
    size model, flow threshold 0.8, cellprob threshold 0, channels [0, 0], min size 15, edge
    objects removed. Weights are read from Cellpose's local model cache and never downloaded.

:func:`match_points` transfers point annotations (e.g. MitoCheck's annotated nucleus centres)
to the objects of a label image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage import filters, morphology, segmentation
from skimage.feature import peak_local_max

from morphotype.io import MorphotypeInputError

logger = logging.getLogger(__name__)

BACKENDS = ("threshold", "cellpose")

THRESHOLD_DEFAULTS: dict[str, Any] = {
    # Light smoothing: removes shot noise and chromatin texture without merging neighbours.
    "sigma": 1.0,
    # Minimum distance (px) between watershed seeds; the smallest MitoCheck nuclei are ~15 px
    # across (radius ~7), so seeds closer than that belong to the same nucleus.
    "min_distance": 7,
    # A seed must rise this many px of distance above the saddle (neck half-width) to its
    # neighbour to start its own object (h-dome): keeps elongated and lobed nuclei whole while
    # splitting touching pairs. 2.5 measured on the MitoCheck crops (see benchmarks/segment.py).
    "h": 2.5,
    # Also keep objects above an Otsu threshold of log intensity that hold no pixel above the
    # linear one: a dim interphase nucleus beside bright mitotic ones (MitoCheck crops: centre
    # nucleus found in 98.3 % instead of 97.6 %) without widening every other mask.
    "dim_objects": True,
    # Split touching nuclei with the seeded watershed above. False keeps every connected
    # foreground component whole: MitoCheck labels *cells*, so a binuclear cell's two nuclei or
    # a grape's fragments stay one object (crops: training-split CV weighted F1 0.813 against
    # 0.784 when split; benchmarks/segment.py --cv).
    "split_touching": True,
}

CELLPOSE_DEFAULTS: dict[str, Any] = {
    "model_type": "cyto",
    # None: the built-in weights of model_type from the local cache; a path: a trained model
    # file; False: a randomly initialised network (tests, benchmarks).
    "pretrained_model": None,
    "diameter": 0.0,  # 0: estimate with the size model
    "flow_threshold": 0.8,
    "cellprob_threshold": 0.0,
    "channels": (0, 0),
    "gpu": False,
    "batch_size": 8,
    # Torch threads per process; None: $MORPHOTYPE_TORCH_THREADS, else 1 (one worker per core).
    "torch_threads": None,
    # Mean object diameter of a randomly initialised network (pretrained_model=False only).
    "diam_mean": 30.0,
}

TORCH_THREADS_ENV = "MORPHOTYPE_TORCH_THREADS"
CELLPOSE_MODELS_ENV = "CELLPOSE_LOCAL_MODELS_PATH"
CELLPOSE_MODEL_URL = "https://www.cellpose.org/models"

# File names of Cellpose 3.1's built-in weights (cellpose.models.model_path / size_model_path)
# and the object diameter each was trained at.
_BUILTIN_WEIGHTS = {"cyto": "cytotorch_0", "cyto2": "cyto2torch_0", "nuclei": "nucleitorch_0",
                    "cyto3": "cyto3"}
BUILTIN_CELLPOSE_MODELS = tuple(_BUILTIN_WEIGHTS)
_BUILTIN_SIZE = {"cyto": "size_cytotorch_0.npy", "cyto2": "size_cyto2torch_0.npy",
                 "nuclei": "size_nucleitorch_0.npy", "cyto3": "size_cyto3.npy"}
_BUILTIN_DIAM_MEAN = {"cyto": 30.0, "cyto2": 30.0, "cyto3": 30.0, "nuclei": 17.0}


class CellposeWeightsError(FileNotFoundError, MorphotypeInputError):
    """Cellpose weights are not available locally (they are never downloaded): bad input."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def segment_nuclei(
    image: np.ndarray,
    backend: str = "threshold",
    *,
    remove_edge_objects: bool = True,
    min_size: int = 15,
    **options: Any,
) -> np.ndarray:
    """Segment the nuclei of one 2-D grayscale image.

    Parameters
    ----------
    image
        2-D array (rows, columns) of any real dtype; bright nuclei on a dark background.
    backend
        ``"threshold"`` (scikit-image, no weights) or ``"cellpose"``.
    remove_edge_objects
        Drop objects touching the image border (the study removes edge masks).
    min_size
        Objects with fewer pixels are removed (Cellpose's ``min_size`` semantics).
    **options
        Backend options. ``threshold``: ``sigma`` (1.0), ``min_distance`` (7), ``h`` (2.5),
        ``dim_objects`` (True), ``split_touching`` (True); see ``THRESHOLD_DEFAULTS``.
        ``cellpose``: ``model_type`` ("cyto"), ``pretrained_model`` (None: built-in weights
        from the local cache; path; False: random network), ``diameter`` (0 = estimate),
        ``flow_threshold`` (0.8), ``cellprob_threshold`` (0.0), ``channels`` ((0, 0)),
        ``gpu`` (False), ``batch_size`` (8), ``torch_threads`` (None → $MORPHOTYPE_TORCH_THREADS
        or 1), ``diam_mean`` (30.0, random network only).

    Returns
    -------
    numpy.ndarray
        int32 labels of the image's shape: 0 background, objects numbered 1..N consecutively.

    Raises
    ------
    ValueError
        Unknown backend or option, or an image that is not a finite 2-D array.
    CellposeWeightsError
        ``cellpose`` backend whose weights are not present locally.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown segmentation backend {backend!r}; expected one of {BACKENDS}")
    defaults = THRESHOLD_DEFAULTS if backend == "threshold" else CELLPOSE_DEFAULTS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for segmentation backend {backend!r}; "
            f"expected {sorted(defaults)}"
        )
    if int(min_size) != min_size or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
    image = _check_image(image)
    params = {**defaults, **options}

    if np.ptp(image) == 0:  # blank or saturated: nothing to find, and Otsu/normalisation fail
        return np.zeros(image.shape, np.int32)
    if backend == "threshold":
        labels = _segment_threshold(image, min_size=int(min_size), **params)
    else:
        labels = _segment_cellpose(image, min_size=int(min_size), **params)

    labels = _remove_small(labels, int(min_size))
    if remove_edge_objects:
        return clear_edge_objects(labels)
    return _relabel(labels)


def clear_edge_objects(labels: np.ndarray) -> np.ndarray:
    """Remove objects touching the image border and renumber the rest 1..N (int32)."""
    labels = _check_labels(labels)
    return _relabel(segmentation.clear_border(labels))


@dataclass(frozen=True)
class MatchResult:
    """Points matched to objects of a label image (one entry per input point, input order).

    Attributes
    ----------
    label
        Matched object label, 0 when unmatched.
    distance
        Distance in pixels from the point to the nearest pixel of its matched object (0 when
        inside); for unmatched points inside the image, the distance to the nearest object of
        any label (inf when the image has no objects); NaN for points outside the image.
    how
        ``"inside"``, ``"nearest"`` or ``"unmatched"``.
    reason
        Why a point is unmatched: ``"outside_image"``, ``"not_finite"``, ``"no_objects"``,
        ``"beyond_tolerance"``; ``""`` when matched.
    shared
        True when another point was matched to the same label (both keep it).
    """

    label: np.ndarray
    distance: np.ndarray
    how: np.ndarray
    reason: np.ndarray
    shared: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    @property
    def n_matched(self) -> int:
        return int(np.count_nonzero(self.label))

    @property
    def shared_labels(self) -> np.ndarray:
        """Labels that more than one point was matched to."""
        return np.unique(self.label[self.shared])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"label": self.label, "distance": self.distance, "how": self.how,
                             "reason": self.reason, "shared": self.shared})


def match_points(labels: np.ndarray, xy: np.ndarray, tolerance: float = 5.0) -> MatchResult:
    """Match annotated points to the objects of a label image.

    A point gets the label whose mask contains it (the pixel the point falls in); otherwise
    the label of the nearest mask pixel if that lies within ``tolerance`` pixels; otherwise 0.

    Parameters
    ----------
    labels
        2-D integer label image (0 background).
    xy
        (n, 2) array of points as (x = column, y = row), in pixel units; the pixel with
        index (r, c) covers [r - 0.5, r + 0.5) × [c - 0.5, c + 0.5).
    tolerance
        Largest distance (px) from the point to the nearest mask pixel for a ``"nearest"``
        match; 0 keeps only ``"inside"`` matches, ``inf`` matches every point in the image.

    Returns
    -------
    MatchResult
    """
    labels = _check_labels(labels)
    points = np.asarray(xy, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"xy must be an (n, 2) array of (x, y) points, got shape {points.shape}")
    if not tolerance >= 0:  # also rejects NaN; inf matches every point to its nearest object
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")

    n = len(points)
    label = np.zeros(n, np.int64)
    distance = np.full(n, np.nan)
    how = np.full(n, "unmatched", dtype=object)
    reason = np.full(n, "", dtype=object)

    finite = np.isfinite(points).all(axis=1)
    reason[~finite] = "not_finite"
    rows = np.floor(np.where(finite, points[:, 1], -1) + 0.5).astype(np.int64)
    cols = np.floor(np.where(finite, points[:, 0], -1) + 0.5).astype(np.int64)
    height, width = labels.shape
    in_image = finite & (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    reason[finite & ~in_image] = "outside_image"

    idx = np.flatnonzero(in_image)
    hit = labels[rows[idx], cols[idx]]
    inside = idx[hit > 0]
    label[inside] = hit[hit > 0]
    distance[inside] = 0.0
    how[inside] = "inside"

    rest = idx[hit == 0]
    if rest.size:
        # The nearest mask pixel of an outside point is always on an object's inner boundary.
        boundary = segmentation.find_boundaries(labels, mode="inner") & (labels > 0)
        br, bc = np.nonzero(boundary)
        if br.size == 0:
            distance[rest] = np.inf
            reason[rest] = "no_objects"
        else:
            tree = cKDTree(np.column_stack([bc, br]).astype(float))
            dist, nearest = tree.query(points[rest])
            distance[rest] = dist
            near = dist <= tolerance
            label[rest[near]] = labels[br[nearest[near]], bc[nearest[near]]]
            how[rest[near]] = "nearest"
            reason[rest[~near]] = "beyond_tolerance"

    matched = label[label > 0]
    values, counts = np.unique(matched, return_counts=True)
    shared = np.isin(label, values[counts > 1]) & (label > 0)
    if shared.any():
        logger.info("%d points share %d objects with another point", int(shared.sum()),
                    int((counts > 1).sum()))
    return MatchResult(label=label, distance=distance, how=how.astype(str),
                       reason=reason.astype(str), shared=shared)


def cellpose_model_files(
    model_type: str = "cyto",
    pretrained_model: str | os.PathLike | None = None,
    *,
    need_size_model: bool = True,
) -> tuple[Path, Path | None]:
    """Locate Cellpose weights locally (never downloads).

    Parameters
    ----------
    model_type
        A Cellpose 3.1 built-in model name, used when ``pretrained_model`` is None.
    pretrained_model
        Path of a trained model file; its size model, if any, is ``<path>_size.npy``.
    need_size_model
        Raise when the size model (diameter estimation) is missing.

    Returns
    -------
    (weights, size_model)
        ``size_model`` is None when absent and not needed.

    Raises
    ------
    CellposeWeightsError
        A needed file is missing; the message says where to put it and how to fetch it.
    """
    if pretrained_model is not None:
        weights = Path(pretrained_model).expanduser()
        if not weights.is_file():
            raise CellposeWeightsError(
                f"Cellpose model file {weights} does not exist (pretrained_model option); "
                "pass the path of a Cellpose 3 model file"
            )
        size = Path(f"{weights}_size.npy")
        if not size.is_file():
            if need_size_model:
                raise CellposeWeightsError(
                    f"no size model {size} for {weights}: diameter=0 needs one; pass an "
                    "explicit diameter (pixels) instead"
                )
            size = None
        return weights, size

    if model_type not in _BUILTIN_WEIGHTS:
        raise ValueError(
            f"unknown Cellpose model_type {model_type!r}; expected one of "
            f"{sorted(_BUILTIN_WEIGHTS)} or a pretrained_model path"
        )
    folder = cellpose_models_dir()
    needed = [_BUILTIN_WEIGHTS[model_type]]
    if need_size_model:
        needed.append(_BUILTIN_SIZE[model_type])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        urls = " ".join(f"{CELLPOSE_MODEL_URL}/{name}" for name in missing)
        why = (" (diameter=0 estimates the diameter with the size model; pass an explicit "
               "diameter to run without it)" if _BUILTIN_SIZE[model_type] in missing else "")
        raise CellposeWeightsError(
            f"Cellpose '{model_type}' weights not found: missing {', '.join(missing)} in "
            f"{folder}{why}. Weights are never downloaded here. On a machine with internet run "
            "`python -c \"from cellpose import models; "
            f"models.Cellpose(model_type='{model_type}')\"` "
            f"(fills ~/.cellpose/models) or download {urls}; then copy the files into {folder} "
            f"or point ${CELLPOSE_MODELS_ENV} at the folder that holds them."
        )
    size = folder / _BUILTIN_SIZE[model_type]
    return folder / _BUILTIN_WEIGHTS[model_type], (size if size.is_file() else None)


def cellpose_models_dir() -> Path:
    """Cellpose's local model cache: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    env = os.environ.get(CELLPOSE_MODELS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _segment_threshold(image: np.ndarray, *, min_size: int, sigma: float, min_distance: int,
                       h: float, dim_objects: bool, split_touching: bool) -> np.ndarray:
    if sigma < 0 or min_distance < 1 or h < 0:
        raise ValueError(
            f"threshold options need sigma >= 0, min_distance >= 1, h >= 0; got sigma={sigma}, "
            f"min_distance={min_distance}, h={h}"
        )
    smooth = filters.gaussian(image, sigma=sigma, preserve_range=True) if sigma > 0 else image
    if np.ptp(smooth) == 0:
        return np.zeros(image.shape, np.int32)
    foreground = smooth > filters.threshold_otsu(smooth)
    if dim_objects:
        log_smooth = np.log1p(smooth - smooth.min())
        low, _ = ndi.label(log_smooth > filters.threshold_otsu(log_smooth))
        dim = np.setdiff1d(np.unique(low), np.unique(low[foreground]))
        foreground |= np.isin(low, dim[dim > 0])
    foreground = ndi.binary_fill_holes(foreground)
    foreground = morphology.remove_small_objects(foreground, max_size=max(min_size - 1, 0))
    if not foreground.any():
        return np.zeros(image.shape, np.int32)

    components, _ = ndi.label(foreground)
    if not split_touching:
        return components.astype(np.int32)
    distance = ndi.distance_transform_edt(foreground)
    markers = np.zeros(image.shape, np.int32)
    n_markers = 0
    # Seeds per connected component, on its bounding box (whole-frame morphology is ~10x slower).
    for index, box in enumerate(ndi.find_objects(components), start=1):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = components[box] == index
        seeds = _watershed_seeds(np.where(inside, distance[box], 0.0), inside, min_distance, h)
        markers[box][seeds > 0] = seeds[seeds > 0] + n_markers
        n_markers += int(seeds.max())
    return segmentation.watershed(-distance, markers, mask=foreground).astype(np.int32)


def _watershed_seeds(distance: np.ndarray, inside: np.ndarray, min_distance: int,
                     h: float) -> np.ndarray:
    """Labelled watershed seeds of one connected foreground component."""
    # Seeds: local maxima of the distance map at least min_distance apart (peak_local_max).
    # With h > 0 a seed is the whole h-dome (pixels within h of a peak that rises >= h above
    # its saddle) holding such a peak: the pixel grid makes an elongated nucleus' ridge a
    # chain of near-equal maxima, and a touching pair has a neck >= h px narrower than both.
    peaks = peak_local_max(distance, min_distance=int(min_distance),
                           footprint=morphology.disk(int(min_distance)),
                           labels=inside.astype(np.int32), exclude_border=False)
    if h > 0:
        dome = distance - morphology.reconstruction(distance - h, distance)
        regions, _ = ndi.label((dome > 1e-6) & inside)
        seeded = np.unique(regions[tuple(peaks.T)])
        seeds = np.where(np.isin(regions, seeded[seeded > 0]), regions, 0)
    else:
        seeds = np.zeros(distance.shape, np.int32)
        seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    if not seeds.any():  # no significant peak (thin or flat object): one object as a whole
        seeds = inside.astype(np.int32)
    return seeds


def _segment_cellpose(image: np.ndarray, *, min_size: int, model_type: str,
                      pretrained_model: Any, diameter: float, flow_threshold: float,
                      cellprob_threshold: float, channels: Any, gpu: bool, batch_size: int,
                      torch_threads: int | None, diam_mean: float) -> np.ndarray:
    import torch  # deferred: the threshold backend must not pay torch's import time

    if diameter is None or diameter < 0:
        raise ValueError(f"cellpose diameter must be >= 0 (0 = estimate), got {diameter!r}")
    threads = _torch_threads(torch_threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)

    if pretrained_model is False:
        weights, size, builtin_diam = None, None, None
    else:
        if pretrained_model is not None and not isinstance(pretrained_model, (str, os.PathLike)):
            raise ValueError(
                f"pretrained_model must be None, False or a path, got {pretrained_model!r}"
            )
        # Built-in models are only valid with their size model when estimating (the paper's
        # diameter 0); a user-trained model falls back to its own training diameter.
        need_size = diameter == 0 and pretrained_model is None
        weights, size = cellpose_model_files(model_type, pretrained_model,
                                             need_size_model=need_size)
        builtin_diam = _BUILTIN_DIAM_MEAN[model_type] if pretrained_model is None else None
    model, size_model = _load_cellpose(
        None if weights is None else str(weights), None if size is None else str(size),
        bool(gpu), float(diam_mean), builtin_diam,
    )

    channels = list(channels)
    with _quiet_cellpose():
        if diameter == 0 and size_model is not None:
            diameter, _ = size_model.eval(image, channels=channels, batch_size=batch_size)
            logger.debug("cellpose estimated diameter %.1f px", diameter)
        elif diameter == 0:
            # Random network: diam_mean; trained model: the mean diameter of its training masks.
            diameter = float(model.diam_labels) if weights is not None else float(model.diam_mean)
        masks = model.eval(
            image, channels=channels, diameter=float(diameter), flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold, min_size=min_size, batch_size=batch_size,
        )[0]
    return np.asarray(masks, dtype=np.int32)


@functools.lru_cache(maxsize=4)
def _load_cellpose(weights: str | None, size: str | None, gpu: bool, diam_mean: float,
                   builtin_diam: float | None):
    """Build (and cache per process) a CellposeModel and its optional SizeModel."""
    import torch

    with _quiet_cellpose():
        from cellpose import models

    if weights is None:
        # Seeded so a random network (tests, benchmarks) is the same in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = models.CellposeModel(gpu=gpu, pretrained_model=False, diam_mean=diam_mean)
    else:
        # An existing file path: cellpose loads it and never consults its download cache.
        model = models.CellposeModel(gpu=gpu, pretrained_model=weights,
                                     diam_mean=builtin_diam or 30.0)
        if builtin_diam is not None:  # as cellpose does for built-in models
            model.diam_mean = builtin_diam
    if gpu and not model.gpu:
        logger.warning("gpu=True but no usable GPU was found; Cellpose runs on the CPU")
    size_model = None if size is None else models.SizeModel(model, pretrained_size=size)
    return model, size_model


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_cellpose():
    """Silence known, harmless warnings from cellpose and torch (one per frame otherwise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
        # SizeModel averages an empty mask list when a frame has no objects.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")
        yield


def _torch_threads(option: int | None) -> int:
    value: Any = option if option is not None else os.environ.get(TORCH_THREADS_ENV, 1)
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        source = "torch_threads option" if option is not None else f"${TORCH_THREADS_ENV}"
        raise ValueError(f"{source} must be a positive integer, got {value!r}")
    return threads


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
            or image.dtype == bool):
        raise ValueError(f"expected a numeric image, got dtype {image.dtype}")
    image = image.astype(np.float32, copy=False) if image.dtype == bool else image
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected an integer label image, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("label image has negative labels")
    return labels


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or not labels.any():
        return labels
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero(sizes < min_size)
    if small.size:
        labels = np.where(np.isin(labels, small), 0, labels)
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # relabel_sequential warns about dtype narrowing only
        relabelled = segmentation.relabel_sequential(labels)[0]
    return relabelled.astype(np.int32, copy=False)
