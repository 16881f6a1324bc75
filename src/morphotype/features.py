"""Nucleus features: the study's 157 CellProfiler measurements, computed with cp-measure.

One call, :func:`measure_nuclei`, measures every labelled nucleus of one grey image and returns
one row per nucleus with the CellProfiler 4 feature names listed in
``assets/cp_nucleus_features.txt`` (:data:`FEATURE_NAMES`), in that order.

Settings are the study's CellProfiler 4.2.4 pipeline: MeasureObjectSizeShape (Zernike on,
advanced off), MeasureObjectIntensity, MeasureGranularity (subsample 0.25, background subsample
0.25, element radius 10, range 16), MeasureTexture (scale 3, 256 grey levels),
MeasureObjectIntensityDistribution (4 scaled bins, no Zernikes) and MeasureObjectNeighbors
(Adjacent).

Where the numbers come from
---------------------------
- AreaShape, Zernike, Feret, Intensity (``legacy=True``: CellProfiler's ``n*q`` quartiles and
  MAD) and Texture come straight from cp-measure 0.3.0, called once on the whole image (texture
  through cp-measure's numba kernel, equal to its mahotas path to ~1e-10 relative).
- Granularity follows cp-measure's port of CellProfiler step by step on the whole image (the
  background opening and the reconstructions are image-wide operations), with two changes that
  leave the numbers unchanged: grey reconstruction runs in a compiled hybrid algorithm (the
  reconstruction is unique, so the result is bit-identical to ``skimage.morphology.reconstruction``,
  ~15x faster), and the up-sampled reconstruction is interpolated only at object pixels.
- RadialDistribution is CellProfiler's algorithm run object by object on its bounding box plus
  one pixel. The result equals a whole-image run (CellProfiler processes objects of one colour at
  a time, so an object never sees another), ~15x faster.
- Neighbors is CellProfiler's MeasureObjectNeighbors (neighbours are the same objects,
  method Adjacent), reimplemented because cp-measure 0.3.0 reports each object as its own
  closest neighbour.

Known, documented differences from CellProfiler
-----------------------------------------------
- RadialDistribution centre: each object's centre is the pixel farthest from its edge, and
  about half of all nuclei have several such pixels. CellProfiler takes the one
  ``scipy.ndimage.maximum_position`` returns, which depends on NumPy's unstable sort of the whole
  image, hence on the CPU: run on one machine with NumPy's AVX-512 sort and with its baseline
  sort, CellProfiler's own code gave different values for 61 of 240 synthetic nuclei (FracAtD up
  to 20 % apart, RadialCV up to 4.7x). We take the first such pixel in row-major order (as
  cp-measure 0.3.0 does): deterministic and independent of the rest of the image. This tie-break
  is the whole RadialDistribution difference between cp-measure and CellProfiler.
- Neighbors, method Adjacent: as in CellProfiler, two nuclei are neighbours when they touch
  (4-connected, i.e. expansion by 1 pixel); the pipeline's "distance 5" setting is only read by
  CellProfiler's "Within a specified distance" method. Closest neighbours are ranked by centre
  distance with ties going to the lower object number (CellProfiler breaks ties in the distances
  and in the object numbers by two different sorts). AngleBetweenNeighbors clips the cosine to
  [-1, 1] (CellProfiler can yield NaN for collinear neighbours on one side, by round-off).
- Values CellProfiler records as +-inf (e.g. FormFactor of a one-pixel object, whose perimeter
  is 0) are NaN here.

Undefined values (NaN)
----------------------
- One-pixel object: the 30 Zernike features (enclosing circle of radius 0) and FormFactor.
- Two-pixel object: FormFactor (perimeter 0).
- Objects with no pair of non-zero pixels 3 apart in one of the 4 directions (thin lines, tiny or
  all-dark objects): the 52 Texture features (CellProfiler ignores grey level 0 in the
  co-occurrence matrices, as cp-measure does).
- Object of zero total intensity: Intensity MassDisplacement, RadialDistribution FracAtD and
  MeanFrac. RadialCV of an all-dark ring is 0, as CellProfiler records it.
- Neighbors keep CellProfiler's values instead of NaN: with no other object in the image the
  closest-object numbers and distances are 0; with one other object, the second closest and the
  angle are 0.
- An image smaller than 8 pixels on a side: Granularity (nothing left after subsampling).
"""

from __future__ import annotations

import logging
import re
import warnings

import centrosome.outline
import centrosome.propagate
import numpy as np
import pandas as pd
import scipy.ndimage as ndi
import skimage.morphology
from cp_measure.bulk import get_core_measurements
from cp_measure.core.numba.measuretexture import get_texture as _numba_texture
from numba import njit

from morphotype.io import asset_path

log = logging.getLogger(__name__)

__all__ = ["FEATURE_NAMES", "measure_nuclei"]

DEFAULT_CHANNEL = "DNA"
OBJECT_COLUMNS = ["ObjectNumber", "Location_Center_X", "Location_Center_Y"]

ZERNIKE_DEGREE = 9
TEXTURE_SCALE = 3
TEXTURE_GRAY_LEVELS = 256
RADIAL_BIN_COUNT = 4  # scaled bins; CellProfiler's "maximum radius 100" only applies to unscaled bins
GRANULARITY_SUBSAMPLE = 0.25
GRANULARITY_BACKGROUND_SUBSAMPLE = 0.25
GRANULARITY_ELEMENT_RADIUS = 10
GRANULARITY_SPECTRUM_LENGTH = 16


def _load_feature_names() -> list[str]:
    lines = asset_path("cp_nucleus_features.txt").read_text().splitlines()
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if len(names) != 157 or len(set(names)) != len(names):
        raise RuntimeError(f"cp_nucleus_features.txt: expected 157 unique names, got {len(names)}")
    return names


FEATURE_NAMES: list[str] = _load_feature_names()
"""The 157 feature names (channel ``DNA``), in output order."""


def measure_nuclei(
    image: np.ndarray, labels: np.ndarray, *, channel: str = DEFAULT_CHANNEL
) -> pd.DataFrame:
    """Measure the 157 CellProfiler features of every labelled nucleus.

    Parameters
    ----------
    image
        2-D grey image. Intensities are scaled to [0, 1] as CellProfiler does when it loads a
        file: ``uint8`` / 255, ``uint16`` / 65535; floating-point images are used as they are and
        must lie in [0, 1].
    labels
        2-D integer label image of the same shape, 0 = background. Object ids need not be
        consecutive; each id is one object (pixels of one id need not be connected).
    channel
        Image name used in the feature names (``Nuclei_Intensity_MeanIntensity_<channel>``);
        letters and digits only.

    Returns
    -------
    pandas.DataFrame
        One row per object, ordered by id: ``ObjectNumber`` (the id in ``labels``),
        ``Location_Center_X`` / ``Location_Center_Y`` (mean column / row of the object's pixels),
        then the 157 features in :data:`FEATURE_NAMES` order (with ``DNA`` replaced by
        ``channel``); all columns float64. ``Neighbors_*ClosestObjectNumber`` are ids of
        ``labels`` (0 = none). No objects: an empty frame with these columns.
    """
    pixels = _scale_image(image)
    labels = _check_labels(labels, pixels.shape)
    names = _feature_names(channel)
    relabelled, object_ids = _relabel(labels)
    n = len(object_ids)
    if n == 0:
        return pd.DataFrame({name: pd.Series(dtype=np.float64) for name in OBJECT_COLUMNS + names})

    rows, cols = np.nonzero(relabelled)
    index = relabelled[rows, cols] - 1
    counts = np.bincount(index, minlength=n)
    centres = np.column_stack(
        (np.bincount(index, rows, n) / counts, np.bincount(index, cols, n) / counts)
    )
    slices = ndi.find_objects(relabelled)

    values: dict[str, np.ndarray] = {}
    for family, compute in (
        ("AreaShape", _area_shape),
        ("Intensity", _intensity),
        ("Texture", _texture),
        ("Granularity", _granularity),
        ("RadialDistribution", _radial_distribution),
    ):
        for name, column in compute(relabelled, pixels, slices).items():
            values[_cellprofiler_name(family, name, channel)] = column
    for name, column in _neighbors_adjacent(relabelled, slices, centres).items():
        values[f"Nuclei_Neighbors_{name}_Adjacent"] = column
    for name in ("FirstClosestObjectNumber", "SecondClosestObjectNumber"):
        column = f"Nuclei_Neighbors_{name}_Adjacent"
        numbers = values[column].astype(np.int64)
        values[column] = np.where(numbers > 0, object_ids[np.maximum(numbers, 1) - 1], 0)

    missing = [name for name in names if name not in values]
    log.debug("measured %d nuclei", n)
    if missing:  # a cp-measure upgrade renamed something: fail loudly, never emit a short table
        raise RuntimeError(f"features not computed: {missing[:5]} ({len(missing)} in all)")
    columns = [object_ids, centres[:, 1], centres[:, 0]] + [values[name] for name in names]
    matrix = np.column_stack(columns).astype(np.float64)
    matrix[np.isinf(matrix)] = np.nan  # see the module notes: +-inf is reported as NaN
    return pd.DataFrame(matrix, columns=OBJECT_COLUMNS + names)


# --------------------------------------------------------------------------------------------
# input checks and names


def _scale_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        pixels = image.astype(np.float64)
        if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError(
                "floating-point image must be finite and within [0, 1] "
                f"(got min {np.nanmin(pixels):.4g}, max {np.nanmax(pixels):.4g})"
            )
        return pixels
    raise ValueError(f"image dtype must be uint8, uint16 or floating point in [0, 1], got {image.dtype}")


def _check_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"labels shape {labels.shape} differs from image shape {shape}")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative (0 = background)")
    return labels.astype(np.int64, copy=False)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 1..N in ascending id order, and the original id of each number."""
    if labels.max(initial=0) > labels.size:  # huge ids: bincount would not fit
        ids, inverse = np.unique(labels, return_inverse=True)
        relabelled = inverse.reshape(labels.shape) + (0 if ids[0] == 0 else 1)
        return relabelled.astype(np.int64), ids[ids > 0]
    present = np.bincount(labels.ravel(), minlength=1) > 0
    present[0] = False
    ids = np.flatnonzero(present)
    if len(ids) == len(present) - 1:  # already 1..N
        return labels, ids
    lookup = np.zeros(len(present), np.int64)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return lookup[labels], ids


def _feature_names(channel: str) -> list[str]:
    if not re.fullmatch(r"[A-Za-z0-9]+", channel):
        raise ValueError(f"channel must be letters and digits only, got {channel!r}")
    if channel == DEFAULT_CHANNEL:
        return list(FEATURE_NAMES)
    return [re.sub(r"_DNA(?=_|$)", f"_{channel}", name) for name in FEATURE_NAMES]


def _cellprofiler_name(family: str, name: str, channel: str) -> str:
    """cp-measure's short name -> CellProfiler's ``Nuclei_...`` name."""
    if family == "AreaShape":
        return f"Nuclei_AreaShape_{name}"
    if family == "Intensity":  # Intensity_MeanIntensity, Location_CenterMassIntensity_X, ...
        return f"Nuclei_{name}_{channel}"
    if family == "Texture":  # Contrast_3_00_256 -> Texture_Contrast_DNA_3_00_256
        feature, rest = name.split("_", 1)
        return f"Nuclei_Texture_{feature}_{channel}_{rest}"
    if family == "Granularity":  # Granularity_3
        return f"Nuclei_{name}_{channel}"
    # RadialDistribution_FracAtD_1of4 -> RadialDistribution_FracAtD_DNA_1of4
    category, feature, scale = name.split("_")
    return f"Nuclei_{category}_{feature}_{channel}_{scale}"


# --------------------------------------------------------------------------------------------
# families computed by cp-measure on the whole image

_CORE = get_core_measurements(legacy=True, sanitize=False)  # labels are relabelled 1..N here


def _area_shape(labels, pixels, slices):
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # centrosome's Zernike table calls numpy.cumproduct (deprecated, same result)
        warnings.filterwarnings("ignore", "`cumproduct` is deprecated", DeprecationWarning)
        result = dict(_CORE["sizeshape"](labels, pixels, calculate_advanced=False, new_features=False))
        result |= _CORE["feret"](labels, pixels)
        result |= _CORE["zernike"](labels, pixels, zernike_numbers=ZERNIKE_DEGREE)
    return result


def _intensity(labels, pixels, slices):
    with np.errstate(divide="ignore", invalid="ignore"):
        result = _CORE["intensity"](labels, pixels)
    return {name: value for name, value in result.items() if name.startswith("Intensity_")}


def _texture(labels, pixels, slices):
    with np.errstate(divide="ignore", invalid="ignore"):
        return _numba_texture(labels, pixels, scale=TEXTURE_SCALE, gray_levels=TEXTURE_GRAY_LEVELS)


# --------------------------------------------------------------------------------------------
# granularity (whole image, as CellProfiler)


def _granularity(labels, pixels, slices):
    """CellProfiler MeasureGranularity, step for step as cp-measure 0.3.0 ports it."""
    n = len(slices)
    length = GRANULARITY_SPECTRUM_LENGTH
    orig_shape = np.array(pixels.shape)
    new_shape = (orig_shape * GRANULARITY_SUBSAMPLE).astype(int)
    if (new_shape < 2).any():
        return {f"Granularity_{g}": np.full(n, np.nan) for g in range(1, length + 1)}
    i, j = np.mgrid[0 : new_shape[0], 0 : new_shape[1]].astype(float) / GRANULARITY_SUBSAMPLE
    small = ndi.map_coordinates(pixels, (i, j), order=1)

    # background: grey opening of an image subsampled once more, interpolated back
    back_shape = new_shape * GRANULARITY_BACKGROUND_SUBSAMPLE
    i, j = np.mgrid[0 : back_shape[0], 0 : back_shape[1]].astype(float) / GRANULARITY_BACKGROUND_SUBSAMPLE
    back = ndi.map_coordinates(small, (i, j), order=1)
    disk = skimage.morphology.disk(GRANULARITY_ELEMENT_RADIUS, dtype=bool)
    back = skimage.morphology.dilation(skimage.morphology.erosion(back, footprint=disk), footprint=disk)
    i, j = np.mgrid[0 : new_shape[0], 0 : new_shape[1]].astype(float)
    i *= (back_shape[0] - 1) / (new_shape[0] - 1)
    j *= (back_shape[1] - 1) / (new_shape[1] - 1)
    small -= ndi.map_coordinates(back, (i, j), order=1)
    small[small < 0] = 0

    # object pixels and where they fall in the subsampled image (CellProfiler up-samples the
    # whole reconstruction each step; interpolating only at object pixels gives the same values)
    rows, cols = np.nonzero(labels)
    index = labels[rows, cols] - 1
    counts = np.bincount(index, minlength=n).astype(float)
    coords = np.vstack(
        (
            rows * (float(new_shape[0] - 1) / float(orig_shape[0] - 1)),
            cols * (float(new_shape[1] - 1) / float(orig_shape[1] - 1)),
        )
    )
    current = np.bincount(index, pixels[rows, cols], n) / counts
    start = np.maximum(current, np.finfo(float).eps)
    cross = skimage.morphology.disk(1, dtype=bool)
    eroded = small.copy()
    result = {}
    for g in range(1, length + 1):
        eroded = skimage.morphology.erosion(eroded, footprint=cross)
        reconstructed = _reconstruct_by_dilation(eroded, small)
        new = np.bincount(index, ndi.map_coordinates(reconstructed, coords, order=1), n) / counts
        result[f"Granularity_{g}"] = (current - new) * 100 / start
        current = new
    return result


@njit(cache=True)
def _reconstruct_by_dilation(seed, mask):  # pragma: no cover - compiled
    """Grey reconstruction by dilation of ``seed`` under ``mask``, 4-connected.

    Hand-written (Vincent 1993, hybrid raster scans + FIFO) because
    ``skimage.morphology.reconstruction`` sorts every pixel on each call and took 95 % of the
    feature time; the reconstruction is unique, so the output is identical.
    """
    n_rows, n_cols = mask.shape
    out = np.minimum(seed, mask)
    for r in range(n_rows):
        for c in range(n_cols):
            v = out[r, c]
            if r > 0 and out[r - 1, c] > v:
                v = out[r - 1, c]
            if c > 0 and out[r, c - 1] > v:
                v = out[r, c - 1]
            out[r, c] = min(v, mask[r, c])
    size = max(n_rows * n_cols, 1)
    queue = np.empty(size, np.int64)
    head = 0
    tail = 0
    count = 0
    for r in range(n_rows - 1, -1, -1):
        for c in range(n_cols - 1, -1, -1):
            v = out[r, c]
            if r < n_rows - 1 and out[r + 1, c] > v:
                v = out[r + 1, c]
            if c < n_cols - 1 and out[r, c + 1] > v:
                v = out[r, c + 1]
            v = min(v, mask[r, c])
            out[r, c] = v
            if (r < n_rows - 1 and out[r + 1, c] < v and out[r + 1, c] < mask[r + 1, c]) or (
                c < n_cols - 1 and out[r, c + 1] < v and out[r, c + 1] < mask[r, c + 1]
            ):
                queue[tail] = r * n_cols + c
                tail = (tail + 1) % size
                count += 1
    while count > 0:
        p = queue[head]
        head = (head + 1) % size
        count -= 1
        r = p // n_cols
        c = p % n_cols
        v = out[r, c]
        for k in range(4):
            rr = r + (k == 1) - (k == 0)
            cc = c + (k == 3) - (k == 2)
            if rr < 0 or rr >= n_rows or cc < 0 or cc >= n_cols:
                continue
            q = out[rr, cc]
            mq = mask[rr, cc]
            if q < v and q != mq:
                out[rr, cc] = min(v, mq)
                if count == size:  # grow the ring buffer
                    bigger = np.empty(2 * size, np.int64)
                    for t in range(count):
                        bigger[t] = queue[(head + t) % size]
                    queue = bigger
                    head = 0
                    tail = count
                    size = 2 * size
                queue[tail] = rr * n_cols + cc
                tail = (tail + 1) % size
                count += 1
    return out


# --------------------------------------------------------------------------------------------
# radial distribution (object by object)


def _padded(slc: tuple[slice, slice], shape: tuple[int, int], pad: int) -> tuple[slice, slice]:
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, size)) for s, size in zip(slc, shape))


def _radial_distribution(labels, pixels, slices):
    """CellProfiler MeasureObjectIntensityDistribution, scaled bins, centre = farthest from edge.

    Per object on its bounding box + 1 pixel: the distance to the edge (Euclidean distance
    transform) and the distance from the centre (CellProfiler's propagation) only ever look at
    the object's own pixels and its 8-neighbours, so the crop gives the whole-image values.
    """
    n = len(slices)
    bins = RADIAL_BIN_COUNT
    frac_at_d = np.zeros((n, bins))
    mean_frac = np.zeros((n, bins))
    radial_cv = np.zeros((n, bins))
    for k, slc in enumerate(slices):
        box = _padded(slc, labels.shape, 1)
        mask = labels[box] == k + 1
        d_to_edge = ndi.distance_transform_edt(mask)
        # centre: the first (row-major) pixel farthest from the edge; see the module notes
        centre = np.unravel_index(np.argmax(np.where(mask, d_to_edge, -1.0)), mask.shape)
        seeds = np.zeros(mask.shape, np.int32)
        seeds[centre] = 1
        reached, d_from_centre = centrosome.propagate.propagate(np.zeros(mask.shape), seeds, mask, 1)
        good = mask & (reached > 0)
        d_c = d_from_centre[good]
        ring = (d_c / (d_c + d_to_edge[good] + 0.001) * bins).astype(int)
        ring[ring > bins] = bins
        values = pixels[box][good]
        intensity_per_ring = np.bincount(ring, values, bins + 1)
        pixels_per_ring = np.bincount(ring, minlength=bins + 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = intensity_per_ring / intensity_per_ring.sum()
            frac_at_d[k] = fraction[:bins]
            mean_frac[k] = (fraction / (pixels_per_ring / pixels_per_ring.sum() + np.finfo(float).eps))[:bins]
        # eight wedges around the centre: CV of the wedge means within each ring
        i, j = np.nonzero(good)
        wedge = (i > centre[0]) + 2 * (j > centre[1]) + 4 * (np.abs(i - centre[0]) > np.abs(j - centre[1]))
        for b in range(bins):
            in_ring = ring == b
            wedge_sum = np.bincount(wedge[in_ring], values[in_ring], 8)
            wedge_count = np.bincount(wedge[in_ring], minlength=8)
            present = wedge_count > 0
            if present.any():
                means = wedge_sum[present] / wedge_count[present]
                mean = means.mean()
                # CellProfiler's masked division keeps the numerator (0) when the mean is 0
                radial_cv[k, b] = means.std() / mean if mean != 0 else means.std()
    result = {}
    for b in range(bins):
        result[f"RadialDistribution_FracAtD_{b + 1}of{bins}"] = frac_at_d[:, b]
        result[f"RadialDistribution_MeanFrac_{b + 1}of{bins}"] = mean_frac[:, b]
        result[f"RadialDistribution_RadialCV_{b + 1}of{bins}"] = radial_cv[:, b]
    return result


# --------------------------------------------------------------------------------------------
# neighbours (CellProfiler MeasureObjectNeighbors, Adjacent, neighbours = same objects)

_STREL_ADJACENT = ndi.generate_binary_structure(2, 1)  # CellProfiler strel_disk(1)
_STREL_TOUCHING = np.ones((3, 3), bool)  # CellProfiler strel_disk(1.5)


def _neighbors_adjacent(labels, slices, centres):
    """Neighbour features; object numbers are 1..N (mapped back to label ids by the caller)."""
    n = len(slices)
    count = np.zeros(n)
    percent = np.zeros(n)
    first = np.zeros(n, np.int64)
    second = np.zeros(n, np.int64)
    first_distance = np.zeros(n)
    second_distance = np.zeros(n)
    angle = np.zeros(n)
    if n > 1:
        for k, slc in enumerate(slices):
            number = k + 1
            patch = labels[_padded(slc, labels.shape, 1)]
            own = patch == number
            touched = np.unique(patch[ndi.binary_dilation(own, _STREL_ADJACENT)])
            count[k] = np.count_nonzero((touched != 0) & (touched != number))
            # perimeter: CellProfiler's outline (8-neighbour changes, image border included);
            # the 1-pixel margin holds every neighbour, and the patch border is the image border
            # wherever the object touches it
            outline = centrosome.outline.outline(patch) == number
            others = ndi.binary_dilation((patch != 0) & ~own, _STREL_TOUCHING)
            percent[k] = 100.0 * np.count_nonzero(outline & others) / np.count_nonzero(outline)
        delta = centres[None, :, :] - centres[:, None, :]
        distance = np.sqrt((delta**2).sum(axis=2))
        np.fill_diagonal(distance, np.inf)
        order = np.argsort(distance, axis=1, kind="stable")
        rank = np.arange(n)
        first = order[:, 0] + 1
        first_distance = distance[rank, order[:, 0]]
        if n > 2:
            second = order[:, 1] + 1
            second_distance = distance[rank, order[:, 1]]
            v1 = delta[rank, order[:, 0]]
            v2 = delta[rank, order[:, 1]]
            cosine = (v1 * v2).sum(axis=1) / np.sqrt((v1**2).sum(axis=1) * (v2**2).sum(axis=1))
            angle = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    return {
        "AngleBetweenNeighbors": angle,
        "FirstClosestDistance": first_distance,
        "FirstClosestObjectNumber": first,
        "NumberOfNeighbors": count,
        "PercentTouching": percent,
        "SecondClosestDistance": second_distance,
        "SecondClosestObjectNumber": second,
    }
