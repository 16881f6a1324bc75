"""Samplesheet-level steps: apply the per-image science to every image, on every core.

Each function here is what one ``morphotype <step>`` command (and one Nextflow process) does
to the batch of images it is given; :func:`run` chains them on one machine with the same
params and output layout as ``nextflow run main.nf``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pandas as pd
from tqdm.auto import tqdm

from morphotype.columns import (
    CELL_ID,
    CENTRE_X,
    CENTRE_Y,
    FILE_ID,
    IMAGE_ID,
    MATCH_DISTANCE,
    METADATA_PREFIX,
    OBJECT_NUMBER,
)
from morphotype.download import FetchOptions, download
from morphotype.features import FEATURE_NAMES, measure_nuclei
from morphotype.io import (
    MorphotypeInputError,
    read_image,
    read_mask,
    remove_stale_temporaries,
    write_mask,
    write_table,
)
from morphotype.params import default_workers
from morphotype.samplesheet import is_url
from morphotype.segment import match_points, segment_nuclei

log = logging.getLogger(__name__)
# torch is imported where it is used (if installed): importing it costs seconds at start-up.


def _single_threaded_worker() -> None:
    # One worker per core: keep BLAS/torch inside each worker on one thread.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def parallel_map(function: Callable, items: list, *, workers: int, description: str) -> Iterator:
    """Map ``function`` over ``items`` in order, on ``workers`` processes, with a progress bar."""
    workers = max(1, min(workers, len(items))) if items else 1
    progress = dict(total=len(items), desc=description, unit="image", disable=None)
    if workers == 1:
        yield from tqdm(map(function, items), **progress)
        return
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    with ProcessPoolExecutor(workers, initializer=_single_threaded_worker) as pool:
        yield from tqdm(pool.map(function, items, chunksize=chunksize), **progress)


# --- remote images --------------------------------------------------------------------------


def image_cache_dir() -> Path:
    """Where samplesheet images given as URLs are kept: ``$MORPHOTYPE_IMAGE_CACHE``, else
    ``~/.cache/morphotype/images``."""
    default = Path.home() / ".cache" / "morphotype" / "images"
    return Path(os.environ.get("MORPHOTYPE_IMAGE_CACHE") or default)


def fetch_images(sheet: pd.DataFrame, cache_dir: str | Path | None = None,
                 options: FetchOptions | None = None) -> pd.DataFrame:
    """The samplesheet with every image URL (http, https, ftp, s3) replaced by a cached local copy.

    Downloads go through :func:`morphotype.download.download` (resume, size check, retries on
    network and server errors only); a cached copy is reused. A missing or refused URL is bad
    input naming the URL. File ids and image ids stay those of the URL.
    """
    remote = [location for location in sheet["image"].unique() if is_url(location)]
    if not remote:
        return sheet
    cache_dir = Path(cache_dir) if cache_dir is not None else image_cache_dir()
    local = {}
    for location in tqdm(remote, desc="fetch images", unit="image", disable=None):
        name = Path(urlsplit(location).path).name or "image"
        target = cache_dir / f"{hashlib.sha1(location.encode()).hexdigest()[:12]}-{name}"
        if not target.is_file():
            download(location, target, options=options)
        local[location] = str(target)
    log.info("fetched %d remote image(s) into %s", len(remote), cache_dir)
    return sheet.assign(image=sheet["image"].map(lambda location: local.get(location, location)))


# --- segmentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentationOptions:
    backend: str = "threshold"
    remove_edge_objects: bool = True
    min_size: int = 15
    backend_options: tuple[tuple[str, object], ...] = ()
    channel: int | None = None  # of multi-channel images: the one that holds the nuclei (io.read_image)

    def kwargs(self) -> dict:
        return dict(self.backend_options)


def mask_path(masks_dir: Path, file_id: str) -> Path:
    return Path(masks_dir) / f"{file_id}.mask.tiff"


def _segment_one(task: tuple[str, str, Path, SegmentationOptions]) -> dict:
    file_id, location, masks_dir, options = task
    image = read_image(location, options.channel)
    labels = segment_nuclei(
        image,
        options.backend,
        remove_edge_objects=options.remove_edge_objects,
        min_size=options.min_size,
        **options.kwargs(),
    )
    write_mask(labels, mask_path(masks_dir, file_id))
    return {"file_id": file_id, "image": location, "objects": int(labels.max(initial=0))}


SEGMENTATION_SUMMARY = "segmentation_summary.csv"
# Present while a segmentation writes into a folder: a killed run leaves it, and features then
# refuses the folder's mix of old and new masks.
SEGMENTING_MARKER = ".segmenting"


def segment_samplesheet(
    sheet: pd.DataFrame, masks_dir: str | Path, options: SegmentationOptions, *, workers: int | None = None
) -> pd.DataFrame:
    """Segment every distinct image of ``sheet``; write one mask per image; return a summary."""
    masks_dir = Path(masks_dir)
    masks_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(masks_dir)
    marker = masks_dir / SEGMENTING_MARKER
    marker.touch()
    (masks_dir / SEGMENTATION_SUMMARY).unlink(missing_ok=True)
    images = sheet.drop_duplicates("file_id")
    tasks = [(row.file_id, row.image, masks_dir, options) for row in images.itertuples()]
    rows = list(parallel_map(_segment_one, tasks, workers=workers or default_workers(), description="segment"))
    summary = pd.DataFrame(rows, columns=["file_id", "image", "objects"])
    write_table(summary, masks_dir / SEGMENTATION_SUMMARY)
    marker.unlink()
    log.info(
        "segmented %d images with %s: %d nuclei (%d images without any)",
        len(summary), options.backend, summary["objects"].sum(), int((summary["objects"] == 0).sum()),
    )
    empty = summary.loc[summary["objects"] == 0, "file_id"].tolist()
    if empty:
        log.warning("no nuclei found in %d image(s): %s%s", len(empty), ", ".join(empty[:10]),
                    " ..." if len(empty) > 10 else "")
    return summary


# --- features ---------------------------------------------------------------------------------


def _metadata(row: pd.Series) -> dict:
    """Samplesheet columns → ``Metadata_`` columns (CellProfiler style, capitalised)."""
    names = {"image": "Image", "image_id": "ImageID", "file_id": "FileID", "x": "AnnotatedX", "y": "AnnotatedY"}
    out = {}
    for column, value in row.items():
        name = names.get(column) or "".join(part.capitalize() for part in str(column).split("_"))
        out[f"{METADATA_PREFIX}{name}"] = value
    return out


def _segmentation_objects(masks_dir: Path, file_ids) -> dict[str, int]:
    """Objects per mask as the segmentation summary records them; refuses an unfinished folder.

    A folder without a summary (masks staged alone, as Nextflow does) is taken as it is.
    """
    if (masks_dir / SEGMENTING_MARKER).exists():
        raise MorphotypeInputError(
            f"{masks_dir}: a segmentation into this folder did not finish ({SEGMENTING_MARKER} is "
            "present); its masks may mix two runs: segment again")
    summary_path = masks_dir / SEGMENTATION_SUMMARY
    if not summary_path.exists():
        return {}
    summary = pd.read_csv(summary_path, dtype={"file_id": str})
    objects = dict(zip(summary["file_id"], summary["objects"].astype(int)))
    unknown = [f for f in file_ids if f not in objects]
    if unknown:
        raise MorphotypeInputError(
            f"{summary_path}: no row for image(s) {unknown[:3]} of the samplesheet; the masks come "
            "from another segmentation: segment this samplesheet again")
    return objects


def _measure_one(task: tuple[pd.DataFrame, Path, float, int | None, int | None]) -> tuple[list[dict], list[dict]]:
    rows, masks_dir, tolerance, expected_objects, channel = task
    first = rows.iloc[0]
    image = read_image(first["image"], channel)
    labels = read_mask(mask_path(masks_dir, first["file_id"]))
    if expected_objects is not None and int(labels.max(initial=0)) != expected_objects:
        raise MorphotypeInputError(
            f"{mask_path(masks_dir, first['file_id'])}: {int(labels.max(initial=0))} objects, but "
            f"{SEGMENTATION_SUMMARY} records {expected_objects}: the mask comes from another run")
    if labels.shape != image.shape:
        raise MorphotypeInputError(
            f"{mask_path(masks_dir, first['file_id'])}: mask shape {labels.shape} differs from image "
            f"{first['image']} shape {image.shape}"
        )
    measured = measure_nuclei(image, labels)
    by_object = measured.set_index("ObjectNumber", drop=False)
    annotated = rows.dropna(subset=["x", "y"])
    cells, unmatched = [], []
    if annotated.empty:  # unlabelled image: every nucleus is a cell
        for object_number, features in by_object.iterrows():
            cells.append(_cell_record(first, int(object_number), features))
        return cells, unmatched
    match = match_points(labels, annotated[["x", "y"]].to_numpy(float), tolerance=tolerance)
    taken: set[int] = set()
    for (_, row), label, distance, how in zip(annotated.iterrows(), match.label, match.distance, match.how):
        label = int(label)
        reason = None
        if label == 0:
            reason = how
        elif label in taken:
            reason = "object already labelled by another annotation"
        if reason:
            unmatched.append({**_metadata(row), "reason": reason, "distance": float(distance)})
            continue
        taken.add(label)
        record = _cell_record(row, label, by_object.loc[label])
        record[MATCH_DISTANCE] = float(distance)
        cells.append(record)
    return cells, unmatched


def _cell_record(row: pd.Series, object_number: int, features: pd.Series) -> dict:
    record = _metadata(row)
    record[OBJECT_NUMBER] = object_number
    record[CELL_ID] = f"{row['file_id']}_{object_number}"
    record.update(features.drop(labels="ObjectNumber").to_dict())
    return record


def measure_samplesheet(
    sheet: pd.DataFrame, masks_dir: str | Path, *, tolerance: float = 5.0, workers: int | None = None,
    channel: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measure every image's nuclei; keep annotated nuclei where an image has annotations.

    ``channel`` names the channel of multi-channel images that holds the nuclei (as segmentation).

    Returns the single-cell table (``Metadata_*`` columns then features) and the table of
    annotations that matched no nucleus, with the reason.
    """
    objects = _segmentation_objects(Path(masks_dir), sheet["file_id"].unique())
    tasks = [(rows, Path(masks_dir), tolerance, objects.get(file_id), channel)
             for file_id, rows in sheet.groupby("file_id", sort=False)]
    cells: list[dict] = []
    unmatched: list[dict] = []
    for image_cells, image_unmatched in parallel_map(
        _measure_one, tasks, workers=workers or default_workers(), description="features"
    ):
        cells.extend(image_cells)
        unmatched.extend(image_unmatched)
    table = pd.DataFrame.from_records(cells)
    feature_columns = ["Location_Center_X", "Location_Center_Y", *FEATURE_NAMES]
    if table.empty:
        table = pd.DataFrame(columns=[CELL_ID, *feature_columns])
    metadata = [c for c in table.columns if c.startswith(METADATA_PREFIX)]
    table = table[metadata + [c for c in feature_columns if c in table.columns]]
    table = table.rename(columns={"Location_Center_X": CENTRE_X, "Location_Center_Y": CENTRE_Y})
    if table[CELL_ID].duplicated().any():
        raise RuntimeError(f"duplicated {CELL_ID} values: two samplesheet rows share an image file id")
    log.info("measured %d cells in %d images; %d annotations unmatched", len(table), len(tasks), len(unmatched))
    return table, pd.DataFrame.from_records(unmatched)


def write_features(cells: pd.DataFrame, unmatched: pd.DataFrame, out: str | Path) -> tuple[Path, Path]:
    """Write the single-cell table and, beside it, ``<stem>.unmatched.csv`` (always, maybe empty)."""
    out = Path(out)
    report = out.with_name(out.stem + ".unmatched.csv")
    if unmatched.empty:
        unmatched = pd.DataFrame(columns=[FILE_ID, IMAGE_ID, "reason", "distance"])
    return write_table(cells, out), write_table(unmatched, report)
