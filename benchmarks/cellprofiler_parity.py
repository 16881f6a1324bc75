"""Feature parity with real CellProfiler: morphotype.features.measure_nuclei against CellProfiler 5.

CellProfiler runs headless from its own venv (``.venv-cellprofiler``, never the main venv: the
5.0 nightlies pin numpy<2, scipy<1.11 and scikit-image 0.24, which cp-measure does not accept),
as a subprocess, on the pipeline ``assets/cellprofiler/nuclei_features.cppipe``: LoadData (one
CSV row per image: the grey image as ``DNA``, a 16-bit label TIFF as the objects ``Nuclei``) and
the study's measurement modules and settings, then ExportToSpreadsheet.

Build the CellProfiler venv (``make cellprofiler-venv`` runs exactly these lines from the
repository root; ``rapidfuzz``, ``Jinja2``, ``docutils`` and ``sentry-sdk`` are imports of the
GUI-less code that the ``--no-deps`` install leaves out; mysqlclient and wxPython are not needed
headless)::

    python3 -m venv .venv-cellprofiler
    .venv-cellprofiler/bin/pip install cellprofiler-core-nightly==5.0.0.dev784 \\
        cellprofiler-library-nightly==5.0.0.dev784
    .venv-cellprofiler/bin/pip install --no-deps cellprofiler-nightly==5.0.0.dev784
    .venv-cellprofiler/bin/pip install docutils==0.15.2 Jinja2 "sentry-sdk~=2.8.0" rapidfuzz

Run the comparison (main venv; prints per-family agreement and nuclei/s of both)::

    PYTHONPATH=src python benchmarks/cellprofiler_parity.py [--frames 3] [--crops 40]

Regenerate the pipeline file (CellProfiler venv; writes the .cppipe through CellProfiler's own
Pipeline API, so the file is valid for this CellProfiler version)::

    .venv-cellprofiler/bin/python benchmarks/cellprofiler_parity.py --write-pipeline

CellProfiler is started as::

    .venv-cellprofiler/bin/cellprofiler -c -r -p PIPELINE -o OUT -e imageio_reader --data-file LOADDATA.csv

(``-e imageio_reader``: without it CellProfiler starts a JVM for Bio-Formats, which tries Maven.)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    import pandas as pd
except ImportError:  # the CellProfiler venv has no pandas; only write_pipeline() runs there
    pd = None

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CELLPROFILER = REPO / ".venv-cellprofiler" / "bin" / "cellprofiler"
CELLPROFILER_PYTHON = CELLPROFILER.with_name("python")
PIPELINE = REPO / "assets" / "cellprofiler" / "nuclei_features.cppipe"
IMAGE_NAME = "DNA"
OBJECTS_NAME = "Nuclei"
KEYS = ["ImageNumber", "ObjectNumber"]

# Compared families: name -> test on the feature name (without the Nuclei_ prefix).
FAMILIES = {
    "AreaShape": lambda name: name.startswith("AreaShape_") and "_Zernike_" not in name,
    "Zernike": lambda name: name.startswith("AreaShape_Zernike_"),
    "Granularity": lambda name: name.startswith("Granularity_"),
    "Intensity": lambda name: name.startswith("Intensity_"),
    "Neighbors": lambda name: name.startswith("Neighbors_"),
    "RadialDistribution": lambda name: name.startswith("RadialDistribution_"),
    "Texture": lambda name: name.startswith("Texture_"),
}


# --------------------------------------------------------------------------------------------
# the pipeline (runs in the CellProfiler venv)


def write_pipeline(path: Path = PIPELINE) -> None:
    """Write the study's measurement pipeline with CellProfiler's Pipeline API (CellProfiler venv).

    Settings (paper, CellProfiler 4.2.4): MeasureGranularity (subsample 0.25, background
    subsample 0.25, element radius 10, range 16), MeasureObjectIntensity, MeasureObjectNeighbors
    (Adjacent, distance 5), MeasureObjectIntensityDistribution (4 scaled bins, maximum radius
    100, no Zernikes), MeasureObjectSizeShape (Zernike on, advanced off), MeasureTexture (scale 3,
    256 grey levels; objects only), ExportToSpreadsheet (every table, ``Nuclei.csv`` among them).
    """
    import cellprofiler_core.preferences as preferences

    preferences.set_headless()
    from cellprofiler.modules.exporttospreadsheet import ExportToSpreadsheet
    from cellprofiler.modules.measuregranularity import MeasureGranularity
    from cellprofiler.modules.measureobjectintensity import MeasureObjectIntensity
    from cellprofiler.modules.measureobjectintensitydistribution import MeasureObjectIntensityDistribution
    from cellprofiler.modules.measureobjectneighbors import MeasureObjectNeighbors
    from cellprofiler.modules.measureobjectsizeshape import MeasureObjectSizeShape
    from cellprofiler.modules.measuretexture import MeasureTexture
    from cellprofiler_core.modules.loaddata import LoadData
    from cellprofiler_core.pipeline import Pipeline

    pipeline = Pipeline()

    def add(module):
        module.set_module_num(len(pipeline.modules()) + 1)
        pipeline.add_module(module)
        return module

    load = add(LoadData())
    load.csv_file_name.value = "loaddata.csv"  # replaced by --data-file at run time
    load.wants_images.value = True
    load.rescale.value = True  # 8-bit images -> [0, 1], as measure_nuclei scales them

    granularity = add(MeasureGranularity())
    granularity.images_list.value = IMAGE_NAME
    granularity.wants_objects.value = True
    granularity.objects_list.value = OBJECTS_NAME
    granularity.subsample_size.value = 0.25
    granularity.image_sample_size.value = 0.25
    granularity.element_size.value = 10
    granularity.granular_spectrum_length.value = 16

    intensity = add(MeasureObjectIntensity())
    intensity.images_list.value = IMAGE_NAME
    intensity.objects_list.value = OBJECTS_NAME

    neighbors = add(MeasureObjectNeighbors())
    neighbors.object_name.value = OBJECTS_NAME
    neighbors.neighbors_name.value = OBJECTS_NAME
    neighbors.distance_method.value = "Adjacent"
    neighbors.distance.value = 5

    radial = add(MeasureObjectIntensityDistribution())
    radial.images_list.value = IMAGE_NAME
    radial.wants_zernikes.value = "None"
    radial.objects[0].object_name.value = OBJECTS_NAME
    radial.bin_counts[0].wants_scaled.value = True
    radial.bin_counts[0].bin_count.value = 4
    radial.bin_counts[0].maximum_radius.value = 100

    size_shape = add(MeasureObjectSizeShape())
    size_shape.objects_list.value = OBJECTS_NAME
    size_shape.calculate_zernikes.value = True
    size_shape.calculate_advanced.value = False

    texture = add(MeasureTexture())
    texture.images_list.value = IMAGE_NAME
    texture.objects_list.value = OBJECTS_NAME
    texture.gray_levels.value = 256
    texture.images_or_objects.value = "Objects"
    texture.scale_groups[0].scale.value = 3

    export = add(ExportToSpreadsheet())
    export.wants_prefix.value = False
    export.wants_overwrite_without_warning.value = True
    export.wants_everything.value = True

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as stream:
        pipeline.dump(stream, save_image_plane_details=False)
    temporary.replace(path)


# --------------------------------------------------------------------------------------------
# running CellProfiler (main venv)


def run_cellprofiler(
    images: Sequence[Path] | np.ndarray,
    masks: Sequence[Path] | np.ndarray,
    workdir: Path,
    *,
    cellprofiler: Path = CELLPROFILER,
    pipeline: Path = PIPELINE,
    timings: dict | None = None,
) -> pd.DataFrame:
    """Measure image/mask pairs with CellProfiler; one row per nucleus.

    Parameters
    ----------
    images
        Grey image files (8-bit PNG or TIFF; CellProfiler scales them to [0, 1]). A single
        2-D array is also accepted (one frame, written to ``workdir`` as PNG/TIFF first).
    masks
        Label images, one per image: 16-bit TIFF, 0 = background, objects numbered 1..N with no
        gaps (CellProfiler renumbers other ids). A single 2-D array goes with an array image.
    workdir
        Folder for the LoadData CSV, CellProfiler's output (``cellprofiler_output/``) and log
        (``cellprofiler.log``), and arrays given as arrays.
    cellprofiler
        The ``cellprofiler`` executable of the CellProfiler venv.
    pipeline
        The ``.cppipe`` to run.
    timings
        If given, filled with ``wall_s`` (whole subprocess) and ``module_cpu_s`` (the CPU time
        CellProfiler logs for its modules, start-up excluded).

    Returns
    -------
    pandas.DataFrame
        ``ImageNumber`` (1-based position in ``images``), ``ObjectNumber`` (the mask id), then
        CellProfiler's ``Nuclei`` measurements with the ``Nuclei_`` prefix
        (``Nuclei_AreaShape_Area``, ...).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(images, np.ndarray) or isinstance(masks, np.ndarray):  # one frame given as arrays
        image_path, mask_path = write_frame(np.asarray(images), np.asarray(masks), workdir, "frame")
        images, masks = [image_path], [mask_path]
    images, masks = [Path(p).resolve() for p in images], [Path(p).resolve() for p in masks]
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    if not images:
        raise ValueError("no images given")
    for mask in masks:
        _check_mask(mask)
    if not Path(cellprofiler).exists():
        raise FileNotFoundError(f"{cellprofiler} not found: build it with `make cellprofiler-venv`")

    rows = ["Image_FileName_DNA,Image_PathName_DNA,Image_ObjectsFileName_Nuclei,Image_ObjectsPathName_Nuclei"]
    for image, mask in zip(images, masks):
        for path in (image, mask):
            if not path.exists():
                raise FileNotFoundError(path)
            if "," in str(path) or '"' in str(path):
                raise ValueError(f"{path}: LoadData CSV paths must not contain commas or quotes")
        rows.append(f"{image.name},{image.parent},{mask.name},{mask.parent}")
    data_file = workdir / "loaddata.csv"
    data_file.write_text("\n".join(rows) + "\n")
    output = workdir / "cellprofiler_output"
    output.mkdir(exist_ok=True)
    (output / "Nuclei.csv").unlink(missing_ok=True)

    command = [str(cellprofiler), "-c", "-r", "-p", str(pipeline), "-o", str(output),
               "-e", "imageio_reader", "--data-file", str(data_file), "-t", str(workdir)]
    environment = dict(os.environ, MPLCONFIGDIR=str(workdir / "mpl"))
    log.info("running %s", " ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=workdir)
    wall = time.perf_counter() - start
    (workdir / "cellprofiler.log").write_text(result.stdout + result.stderr)
    table_path = output / "Nuclei.csv"
    if result.returncode != 0 or not table_path.exists():
        raise RuntimeError(
            f"CellProfiler failed (exit {result.returncode}, {table_path} "
            f"{'written' if table_path.exists() else 'missing'}):\n{result.stderr[-4000:]}"
        )
    if timings is not None:
        timings["wall_s"] = wall
        timings["module_cpu_s"] = sum(
            float(value) for value in re.findall(r"CPU_time = ([0-9.]+) secs", result.stderr + result.stdout)
        )
    table = pd.read_csv(table_path)
    table = table.rename(columns={c: f"{OBJECTS_NAME}_{c}" for c in table.columns if c not in KEYS})
    return table.sort_values(KEYS, ignore_index=True)


def write_frame(image: np.ndarray, labels: np.ndarray, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write an 8-bit image as PNG and its labels as 16-bit TIFF (``<stem>.png``, ``<stem>_labels.tif``)."""
    import imageio.v3 as iio
    import tifffile

    if image.dtype != np.uint8:
        raise ValueError(f"{stem}: image must be uint8 (both sides scale it by 1/255), got {image.dtype}")
    if image.shape != labels.shape or image.ndim != 2:
        raise ValueError(f"{stem}: image {image.shape} and labels {labels.shape} must be equal 2-D shapes")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{stem}: labels must lie in 0..65535")
    image_path, labels_path = Path(folder) / f"{stem}.png", Path(folder) / f"{stem}_labels.tif"
    iio.imwrite(image_path, image)
    tifffile.imwrite(labels_path, labels.astype(np.uint16))
    return image_path, labels_path


def _check_mask(path: Path) -> None:
    import tifffile

    labels = tifffile.imread(path) if path.suffix.lower() in (".tif", ".tiff") else None
    if labels is None:
        raise ValueError(f"{path}: masks must be 16-bit TIFF label images")
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected a 2-D integer label image, got {labels.dtype} {labels.shape}")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) and (ids[0] != 1 or ids[-1] != len(ids)):
        raise ValueError(f"{path}: object ids must be 1..N without gaps (CellProfiler renumbers them); "
                         f"got {len(ids)} ids from {ids[0]} to {ids[-1]}")


# --------------------------------------------------------------------------------------------
# comparison


def relative_difference(ours: np.ndarray, theirs: np.ndarray, atol: float = 1e-7) -> np.ndarray:
    """|a - b| / max(|a|, |b|); 0 where both are NaN or |a - b| <= atol, inf where one side is NaN.

    ``atol`` (default: float32 resolution at 1) absorbs round-off around values that are 0 in
    exact arithmetic: CellProfiler holds pixels as float32, so e.g. the RadialCV of a ring of
    equal pixels comes out as 1.6e-8 instead of 0. +-inf counts as NaN on both sides
    (measure_nuclei reports CellProfiler's infinities as NaN).
    """
    a = np.where(np.isinf(ours), np.nan, ours).astype(float)
    b = np.where(np.isinf(theirs), np.nan, theirs).astype(float)
    difference = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(difference <= atol, 0.0, difference / scale)
    both_nan = np.isnan(a) & np.isnan(b)
    one_nan = np.isnan(a) ^ np.isnan(b)
    relative[both_nan] = 0.0
    relative[one_nan] = np.inf
    return relative


def compare(ours: pd.DataFrame, theirs: pd.DataFrame, feature_names: Sequence[str]) -> pd.DataFrame:
    """Per-family agreement of two per-nucleus tables.

    Parameters
    ----------
    ours, theirs
        Tables with ``ObjectNumber`` (and ``ImageNumber`` when comparing several images; it is
        used as a key when both have it) and ``Nuclei_*`` feature columns.
    feature_names
        The features to compare (e.g. ``morphotype.features.FEATURE_NAMES``); missing in either
        table raises ``ValueError``.

    Returns
    -------
    pandas.DataFrame
        One row per family (AreaShape without Zernike, Zernike, Granularity, Intensity,
        Neighbors, RadialDistribution, Texture): ``features``, ``nuclei``, ``median_rel`` and
        ``max_rel`` (relative difference, see :func:`relative_difference`; NaN on one side only
        counts as inf; ``max_rel`` is over finite values), ``max_abs``, ``within_1e-6`` and
        ``within_1e-3`` (fraction of values), ``objects_off_1e-3`` (nuclei with any value of the
        family off by more than 1e-3), ``nan_mismatch`` (values NaN on one side only) and
        ``worst`` (feature and ImageNumber/ObjectNumber of the largest difference).
    """
    keys = [k for k in KEYS if k in ours.columns and k in theirs.columns]
    if "ObjectNumber" not in keys:
        raise ValueError("both tables need an ObjectNumber column")
    for side, table in (("ours", ours), ("theirs", theirs)):
        missing = [n for n in feature_names if n not in table.columns]
        if missing:
            raise ValueError(f"{side} lacks {len(missing)} features, e.g. {missing[:3]}")
        if table.duplicated(keys).any():
            raise ValueError(f"{side} has duplicate {keys}")
    merged = ours[keys + list(feature_names)].merge(
        theirs[keys + list(feature_names)], on=keys, how="inner", suffixes=("", "__cp")
    )
    if len(merged) != len(ours) or len(merged) != len(theirs):
        raise ValueError(f"objects differ: ours {len(ours)}, CellProfiler {len(theirs)}, matched {len(merged)}")
    rows = []
    for family, member in FAMILIES.items():
        columns = [n for n in feature_names if member(n.removeprefix(f"{OBJECTS_NAME}_"))]
        if not columns:
            continue
        a = merged[columns].to_numpy(float)
        b = merged[[c + "__cp" for c in columns]].to_numpy(float)
        relative = relative_difference(a, b)
        finite = relative[np.isfinite(relative)]
        absolute = np.abs(a - b)
        absolute = absolute[np.isfinite(absolute)]
        worst = np.unravel_index(np.argmax(relative), relative.shape) if relative.size else None
        worst_name = ""
        if worst is not None and relative[worst] > 0:
            where = "/".join(str(int(merged[k].iat[worst[0]])) for k in keys)
            worst_name = f"{columns[worst[1]].removeprefix(OBJECTS_NAME + '_')} @{where}"
        rows.append({
            "family": family,
            "features": len(columns),
            "nuclei": len(merged),
            "median_rel": float(np.median(relative)) if relative.size else np.nan,
            "max_rel": float(finite.max()) if finite.size else np.nan,
            "max_abs": float(absolute.max()) if absolute.size else np.nan,
            "within_1e-6": float((relative <= 1e-6).mean()),
            "within_1e-3": float((relative <= 1e-3).mean()),
            "objects_off_1e-3": int((relative > 1e-3).any(axis=1).sum()),
            "nan_mismatch": int(np.isinf(relative).sum()),
            "worst": worst_name,
        })
    return pd.DataFrame(rows)


def differing_objects(ours: pd.DataFrame, theirs: pd.DataFrame, columns: Sequence[str],
                      tolerance: float = 1e-3) -> pd.DataFrame:
    """Long table of the values of ``columns`` that differ by more than ``tolerance`` relative."""
    keys = [k for k in KEYS if k in ours.columns and k in theirs.columns]
    merged = ours[keys + list(columns)].merge(theirs[keys + list(columns)], on=keys, suffixes=("", "__cp"))
    records = []
    for column in columns:
        relative = relative_difference(merged[column].to_numpy(float), merged[column + "__cp"].to_numpy(float))
        for i in np.flatnonzero(relative > tolerance):
            records.append({**{k: int(merged[k].iat[i]) for k in keys}, "feature": column,
                            "ours": merged[column].iat[i], "cellprofiler": merged[column + "__cp"].iat[i],
                            "relative": relative[i]})
    return pd.DataFrame(records, columns=keys + ["feature", "ours", "cellprofiler", "relative"])


def cellprofiler_centres(masks: Sequence[Path], *, python: Path = CELLPROFILER_PYTHON) -> pd.DataFrame:
    """Which RadialDistribution centre CellProfiler picks, per nucleus, on this machine.

    MeasureObjectIntensityDistribution centres an object on a pixel farthest from its edge,
    chosen by ``scipy.ndimage.maximum_position`` over the whole image: among tied pixels the
    pick follows NumPy's unstable sort, so it varies with the CPU (and the rest of the image).
    measure_nuclei takes the first tied pixel in row-major order. This runs CellProfiler's own
    functions (centriole ``distance_to_edge`` and ``maximum_position_of_labels``) in its venv.

    Returns
    -------
    pandas.DataFrame
        ``ImageNumber`` (1-based position in ``masks``), ``ObjectNumber``, ``ties`` (pixels at
        the largest distance from the edge) and ``same_centre`` (CellProfiler's pick is the
        first tied pixel in row-major order).
    """
    command = [str(python), str(Path(__file__).resolve()), "--cellprofiler-centres", *map(str, masks)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"centre computation failed in {python}:\n{result.stderr[-3000:]}")
    rows = [line.split(",") for line in result.stdout.splitlines() if line.count(",") == 3]
    table = pd.DataFrame(rows, columns=["ImageNumber", "ObjectNumber", "ties", "same_centre"]).astype(int)
    return table.astype({"same_centre": bool})


def _print_cellprofiler_centres(masks: Sequence[str]) -> None:
    """CellProfiler venv side of :func:`cellprofiler_centres` (CSV lines on stdout)."""
    import centriole.cpmorphology as cpmorphology
    import tifffile

    for image_number, mask in enumerate(masks, start=1):
        labels = tifffile.imread(mask).astype(int)
        numbers = np.arange(1, labels.max() + 1)
        distance = cpmorphology.distance_to_edge(labels)
        centre_i, centre_j = cpmorphology.maximum_position_of_labels(distance, labels, numbers)
        for number, i, j in zip(numbers, centre_i, centre_j):
            rows, cols = np.nonzero(labels == number)
            values = distance[rows, cols]
            tied = np.flatnonzero(values == values.max())
            first = (rows[tied[0]], cols[tied[0]])
            print(f"{image_number},{number},{len(tied)},{int(first == (i, j))}")


def cellprofiler4_mad(image: np.ndarray, labels: np.ndarray) -> pd.Series:
    """MADIntensity as CellProfiler 4.2 computes it (the study used 4.2.4), per object id.

    CellProfiler 4.2 takes, from the sorted |x - median| of an object's n pixels, the value at
    fractional index n/2 (interpolated), the median itself at index n/2 the same way;
    CellProfiler 5.0 (dev784) switched to a true median, so its MADIntensity is no reference for
    the study's features. Hand-written (15 lines) because no maintained package ships the 4.2
    formula; ``image`` is scaled as CellProfiler does (uint8 / 255, as float32).
    """
    pixels = (image / 255.0).astype(np.float32) if image.dtype == np.uint8 else image

    def at_half(values: np.ndarray) -> float:
        index = len(values) / 2
        low = int(index)
        if low >= len(values) - 1:  # no upper neighbour (n <= 2)
            return float(values[low])
        return float(values[low] * (1 - (index - low)) + values[low + 1] * (index - low))

    result = {}
    for number in np.unique(labels[labels > 0]):
        values = np.sort(pixels[labels == number])
        result[int(number)] = at_half(np.sort(np.abs(values - at_half(values))))
    return pd.Series(result, name="MADIntensity_CellProfiler4", dtype=float)


# --------------------------------------------------------------------------------------------
# synthetic data


def synthetic_frame(seed: int, n_nuclei: int = 80, shape: tuple[int, int] = (1024, 1344),
                    touching: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 frame of textured elliptic nuclei and its labels (1..N, no gaps).

    About a ``touching`` share of the nuclei are placed next to an earlier one, so that
    Neighbors has adjacent pairs to measure; the others at random. A new nucleus fills only free
    pixels (earlier ones stay whole) and is dropped if more than 30 % of it is taken.
    """
    import scipy.ndimage as ndi
    from skimage.draw import ellipse
    from skimage.segmentation import relabel_sequential

    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    centres: list[np.ndarray] = []
    count = 0
    for _ in range(50 * n_nuclei):
        if count == n_nuclei:
            break
        radii = rng.uniform(8, 18), rng.uniform(6, 14)
        if centres and rng.random() < touching:  # next to an earlier nucleus: may touch or overlap it
            angle = rng.uniform(0, 2 * np.pi)
            offset = rng.uniform(14, 24) * np.array([np.sin(angle), np.cos(angle)])
            centre = centres[rng.integers(len(centres))] + offset
        else:
            centre = rng.uniform(20, np.array(shape) - 20)
        rr, cc = ellipse(*centre, *radii, shape=shape, rotation=rng.uniform(0, np.pi))
        if len(rr) < 20:
            continue
        taken = labels[rr, cc] > 0
        if taken.mean() > 0.3:
            continue
        count += 1
        free = ~taken
        labels[rr[free], cc[free]] = count  # earlier nuclei stay whole; the new one fills around them
        centres.append(np.asarray(centre))
    labels, _, _ = relabel_sequential(labels)
    brightness = np.concatenate(([0.0], rng.uniform(0.3, 0.7, labels.max())))
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    image = brightness[labels] * (1 + 0.5 * texture) + rng.normal(0.05, 0.01, shape)
    image = np.clip(ndi.gaussian_filter(image, 1), 0, 1)
    return (image * 255).round().astype(np.uint8), labels.astype(np.int32)


def otsu_crop(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shared 64x64 MitoCheck crop and the Otsu component under its centre (else the largest)."""
    import imageio.v3 as iio
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    image = iio.imread(path)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"{path}: expected an 8-bit grey crop, got {image.dtype} {image.shape}")
    components = label(image > threshold_otsu(image))
    keep = components[image.shape[0] // 2, image.shape[1] // 2]
    if keep == 0:
        keep = np.bincount(components.ravel())[1:].argmax() + 1
    return image, (components == keep).astype(np.int32)


# --------------------------------------------------------------------------------------------
# script


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-pipeline", action="store_true",
                        help=f"write {PIPELINE.relative_to(REPO)} (run with the CellProfiler venv's python)")
    parser.add_argument("--cellprofiler-centres", nargs="+", metavar="MASK", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=3, help="synthetic 1344x1024 frames")
    parser.add_argument("--nuclei", type=int, default=80, help="nuclei per synthetic frame")
    parser.add_argument("--crops", type=int, default=40, help="shared MitoCheck crops with Otsu masks")
    parser.add_argument("--shared", type=Path,
                        default=Path(os.environ.get("MORPHOTYPE_SHARED", REPO.parent / "shared")))
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and CellProfiler output here")
    parser.add_argument("--show", type=int, default=10, help="differing values to list per family")
    args = parser.parse_args(argv)
    if args.cellprofiler_centres:  # CellProfiler venv side of cellprofiler_centres()
        _print_cellprofiler_centres(args.cellprofiler_centres)
        return
    if args.write_pipeline:
        write_pipeline(PIPELINE)
        print(f"wrote {PIPELINE}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import tempfile

    from morphotype.features import FEATURE_NAMES, measure_nuclei

    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        inputs = []  # (stem, image, labels, image path, labels path); frames first, then crops
        for seed in range(args.frames):
            image, labels = synthetic_frame(seed, args.nuclei)
            inputs.append((f"frame{seed}", image, labels, *write_frame(image, labels, workdir, f"frame{seed}")))
        frame_count = len(inputs)
        manifest = args.shared / "data" / "mitocheck_crops" / "manifest.csv"
        if args.crops and manifest.exists():
            chosen = pd.read_csv(manifest).sample(n=args.crops, random_state=0)
            for row in chosen.itertuples():
                image, labels = otsu_crop(manifest.parent / row.phenotype / row.file)
                stem = f"crop{len(inputs) - frame_count}"
                inputs.append((stem, image, labels, *write_frame(image, labels, workdir, stem)))
        elif args.crops:
            print(f"crops skipped: {manifest} not found (set MORPHOTYPE_SHARED)", file=sys.stderr)

        measure_nuclei(*inputs[0][1:3])  # compile / warm caches before timing
        ours, ours_float32, mad4 = [], [], []
        cpu_ours = [0.0, 0.0]  # frames, crops
        for number, (_, image, labels, _, _) in enumerate(inputs, start=1):
            start = time.process_time()
            table = measure_nuclei(image, labels)
            cpu_ours[number > frame_count] += time.process_time() - start
            ours.append(table.assign(ImageNumber=number))
            # CellProfiler's own pixels: (uint8 / 255) stored as float32
            pixels = (image / 255.0).astype(np.float32).astype(np.float64)
            ours_float32.append(measure_nuclei(pixels, labels).assign(ImageNumber=number))
            mad = cellprofiler4_mad(image, labels)
            mad4.append(pd.DataFrame({"ImageNumber": number, "ObjectNumber": mad.index, "mad4": mad.to_numpy()}))
        ours, ours_float32, mad4 = (pd.concat(t, ignore_index=True) for t in (ours, ours_float32, mad4))

        timings = [{}, {}]
        theirs = run_cellprofiler([i[3] for i in inputs[:frame_count]], [i[4] for i in inputs[:frame_count]],
                                  workdir / "cp_frames", timings=timings[0])
        if frame_count < len(inputs):
            crops = run_cellprofiler([i[3] for i in inputs[frame_count:]], [i[4] for i in inputs[frame_count:]],
                                     workdir / "cp_crops", timings=timings[1])
            theirs = pd.concat([theirs, crops.assign(ImageNumber=crops["ImageNumber"] + frame_count)],
                               ignore_index=True)
        centres = cellprofiler_centres([i[4] for i in inputs])

    n_nuclei = [int((ours["ImageNumber"] <= frame_count).sum()), int((ours["ImageNumber"] > frame_count).sum())]
    print(f"{frame_count} synthetic 1344x1024 frames ({n_nuclei[0]} nuclei, "
          f"{int((ours.loc[ours.ImageNumber <= frame_count, 'Nuclei_Neighbors_NumberOfNeighbors_Adjacent'] > 0).sum())}"
          f" touching another), {len(inputs) - frame_count} shared crops with Otsu masks ({n_nuclei[1]} nuclei)")
    print("speed, CPU seconds of one process (CellProfiler: its logged module times, start-up excluded):")
    for part, name in enumerate(("frames", "crops")):
        if n_nuclei[part]:
            rate = n_nuclei[part] / timings[part]["module_cpu_s"]
            print(f"  {name:6s} CellProfiler 5.0.0.dev784 {rate:7.1f} nuclei/s"
                  f" (wall incl. start-up {n_nuclei[part] / timings[part]['wall_s']:.1f} nuclei/s);"
                  f" morphotype {n_nuclei[part] / cpu_ours[part]:7.1f} nuclei/s")

    pd.set_option("display.width", 250)
    show = {"float_format": lambda v: f"{v:.3g}", "index": False}
    mad_name = "Nuclei_Intensity_MADIntensity_DNA"
    features = [n for n in FEATURE_NAMES if n != mad_name]
    print("\n(1) ours on the 8-bit image (as the pipeline runs) vs CellProfiler; 156 features (MAD below):")
    print(compare(ours, theirs, features).to_string(**show))
    print("\n(2) ours on CellProfiler's float32 pixels vs CellProfiler (algorithmic differences only):")
    print(compare(ours_float32, theirs, features).to_string(**show))

    centred = ours_float32.merge(centres, on=KEYS)
    radial = [n for n in features if FAMILIES["RadialDistribution"](n.removeprefix("Nuclei_"))]
    for same, label in ((True, "same centre as ours"), (False, "another tied centre")):
        subset = centred.loc[centred["same_centre"] == same, KEYS]
        if len(subset):
            row = compare(ours_float32.merge(subset), theirs.merge(subset), radial).iloc[0]
            print(f"    RadialDistribution, nuclei where CellProfiler picked {label}: {len(subset)} nuclei, "
                  f"{row['objects_off_1e-3']} off by > 1e-3, max rel {row['max_rel']:.3g}")
    print(f"    (tied centres: {int((centres.ties > 1).sum())} of {len(centres)} nuclei; CellProfiler picked another "
          f"pixel than ours for {int((~centres.same_centre).sum())}, all of them tied: "
          f"{bool((centres.loc[~centres.same_centre, 'ties'] > 1).all())})")

    mad = ours.merge(theirs[KEYS + [mad_name]], on=KEYS, suffixes=("", "_cp")).merge(mad4, on=KEYS)
    vs_cp5 = relative_difference(mad[mad_name].to_numpy(), mad[mad_name + "_cp"].to_numpy())
    vs_cp4 = relative_difference(mad[mad_name].to_numpy(), mad["mad4"].to_numpy())
    print(f"\n(3) MADIntensity: vs CellProfiler 5 (true median): {np.mean(vs_cp5 <= 1e-6):.1%} within 1e-6, "
          f"max rel {vs_cp5.max():.3g}; vs the CellProfiler 4.2 formula (the study's): max rel {vs_cp4.max():.3g}")

    for family in ("Neighbors", "RadialDistribution"):
        columns = [n for n in features if FAMILIES[family](n.removeprefix("Nuclei_"))]
        off = differing_objects(ours_float32, theirs, columns).merge(centres, on=KEYS, how="left")
        nuclei = off.groupby(KEYS).ngroups if len(off) else 0
        print(f"\n{family}: {len(off)} values off by > 1e-3 in {nuclei} nuclei (float32 pixels)")
        if len(off):
            print(off.sort_values("relative", ascending=False).head(args.show).to_string(**show))


if __name__ == "__main__":
    main()
