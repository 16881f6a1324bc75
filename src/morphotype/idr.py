"""Stream MitoCheck movies (IDR idr0013, screen A) into local frames.

Sources and metadata
--------------------
``assets/idr0013/`` holds three small tables derived from the shared metadata
(:func:`derive_idr0013_assets` rebuilds them): ``plates.tsv`` (510 plates → screen directory),
``labelled_cells.tsv`` (the 2,779 annotated nuclei: plate, well, site, frame, x, y, phenotype)
and ``control_wells.tsv`` (6,743 control wells: negative / positive, well A1 excluded).
A movie of well ``w`` of ``plate`` is
``<base>/<screen>/hdf5/<w:05d>_01.ch5`` with ``<base>`` = :data:`DEFAULT_BASE_URL` (HTTPS) or
:data:`FTP_BASE_URL`, or any mirror. Wells are numbered row by row on the 384-well plate
(16 rows A–P × 24 columns): A1 = 1, A24 = 24, B1 = 25, P24 = 384.

Frame addressing
----------------
A samplesheet row addresses one plane of a movie by its ``image`` column:
``<movie URL or path>#frame=<t>``, t the 0-based time index, equal to the row's ``frame``
column (the study's frame number is t + 1; MitoCheck's file names use t as well). The fragment
is never sent to a server; it makes each frame a distinct ``image``. ``site`` is the CellH5
position; channel 0 (H2B-GFP) and z 0 are read. Movies are CellH5 (``.ch5``: downloaded whole
into a scratch folder, cut into planes, deleted) or OME-Zarr (``.zarr``: planes read one by
one over HTTP, only their chunks travel).

Streaming
---------
:func:`stream_frames` turns such a samplesheet into one of local TIFF frames (``ic``:
BaSiC-corrected uint8, or ``no_ic``: raw), keeping a persistent cache of the planes it
extracted, so a re-run with the same cache directory fetches nothing. Downloads use
``requests`` (HTTP/HTTPS: timeouts, retries with exponential back-off, resume with Range,
Content-Length and optional MD5 checks) and the standard library's ``ftplib`` (FTP: REST
resume, SIZE check); OME-Zarr uses ``zarr`` 3 over ``fsspec``/``aiohttp``.
"""

from __future__ import annotations

import asyncio
import ftplib
import functools
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from morphotype.io import MorphotypeInputError, asset_path, atomic_path

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- sources and metadata ----------------------------------------------------------------------

IDR0013_MOVIES_PATH = "idr0013-neumann-mitocheck/20150916-mitocheck-analysis/mitocheck"
DEFAULT_BASE_URL = f"https://ftp.ebi.ac.uk/pub/databases/IDR/{IDR0013_MOVIES_PATH}"
FTP_BASE_URL = f"ftp://ftp.ebi.ac.uk/pub/databases/IDR/{IDR0013_MOVIES_PATH}"
ASSETS = "idr0013"
WELL_COLUMNS = 24  # 384-well plates: 16 rows (A-P) x 24 columns, numbered row by row
EXCLUDED_WELLS = (1,)  # A1: irregular illumination, excluded by the study
CONTROL_FRAME_RANGE = (31, 62)  # study frame numbers (1-based, inclusive) a control frame is drawn from
CONTROL_TYPES = ("negative", "positive")
SAMPLESHEET_COLUMNS = [
    "image", "plate", "well", "site", "frame", "phenotype", "x", "y", "control",
    "well_name", "subset", "movie",
]


def well_name(number: int) -> str:
    """MitoCheck well number (1..384, row by row) → name: 1 → 'A1', 26 → 'B2', 384 → 'P24'."""
    number = int(number)
    if not 1 <= number <= 16 * WELL_COLUMNS:
        raise ValueError(f"well number {number} is outside 1..{16 * WELL_COLUMNS}")
    row, column = divmod(number - 1, WELL_COLUMNS)
    return f"{chr(ord('A') + row)}{column + 1}"


def well_number(name: str) -> int:
    """Well name → MitoCheck well number: 'A1' → 1, 'B2' → 26, 'P24' → 384."""
    match = re.fullmatch(r"([A-Pa-p])0?(\d{1,2})", str(name).strip())
    if not match or not 1 <= int(match.group(2)) <= WELL_COLUMNS:
        raise ValueError(f"{name!r} is not a 384-well name (A1..P24)")
    return (ord(match.group(1).upper()) - ord("A")) * WELL_COLUMNS + int(match.group(2))


def _read_asset(name: str, path: str | Path | None, columns: list[str]) -> pd.DataFrame:
    path = Path(path) if path is not None else asset_path(f"{ASSETS}/{name}")
    if not path.exists():
        raise MorphotypeInputError(f"{path}: table does not exist")
    table = pd.read_csv(path, sep="\t", dtype={"plate": str})
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MorphotypeInputError(f"{path}: missing column(s) {missing}; expected {columns}")
    return table


def read_plates(path: str | Path | None = None) -> pd.DataFrame:
    """Plate → screen directory of the idr0013 movies (columns ``plate``, ``screen``)."""
    return _read_asset("plates.tsv", path, ["plate", "screen"])


def read_labelled_cells(path: str | Path | None = None) -> pd.DataFrame:
    """Annotated nuclei: ``plate, well, site, frame`` (0-based), ``x, y`` (frame pixels), ``phenotype``."""
    return _read_asset("labelled_cells.tsv", path, ["plate", "well", "site", "frame", "x", "y", "phenotype"])


def read_control_wells(path: str | Path | None = None) -> pd.DataFrame:
    """Control wells: ``plate, well`` (number), ``well_name``, ``control`` (negative/positive), ``gene_target``."""
    return _read_asset("control_wells.tsv", path, ["plate", "well", "well_name", "control", "gene_target"])


def derive_idr0013_assets(shared_data_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Rebuild the ``assets/idr0013`` tables from the shared metadata.

    ``shared_data_dir`` holds ``idr0013_metadata/`` and ``mitocheck_crops/manifest.csv``.
    Control wells: well A1 and empty wells are dropped; labelled cells keep every class
    (``Folded`` included: excluding it is a modelling choice).
    """
    shared = Path(shared_data_dir)
    out = Path(out_dir)
    plates_file = shared / "idr0013_metadata" / "idr0013-screenA-plates.tsv"
    controls_file = shared / "idr0013_metadata" / "control_wells_frame50.tsv"
    manifest_file = shared / "mitocheck_crops" / "manifest.csv"
    for path in (plates_file, controls_file, manifest_file):
        if not path.exists():
            raise MorphotypeInputError(f"{path}: expected file of the shared idr0013 metadata is missing")

    plates = pd.read_csv(plates_file, sep="\t", header=None, names=["plate", "screen"], dtype=str)
    plates["screen"] = plates["screen"].str.replace(r"^(\.\./)?screens/", "", regex=True)
    plates["screen"] = plates["screen"].str.replace(r"\.screen$", "", regex=True)
    plates = plates.sort_values("plate").reset_index(drop=True)

    manifest = pd.read_csv(manifest_file, dtype={"plate": str})
    cells = manifest.rename(columns={"field": "site"})[["plate", "well", "site", "frame", "x", "y", "phenotype"]]
    cells = cells.sort_values(["plate", "well", "frame", "y", "x"]).reset_index(drop=True)

    controls = pd.read_csv(controls_file, sep="\t", index_col=0, dtype={"Plate": str})
    controls = controls[controls["Control Type"].str.contains("control", na=False)]
    numbers = controls["Well Number"].astype(int)
    if not (controls["Well"].map(well_number) == numbers).all():
        raise MorphotypeInputError(
            f"{controls_file}: 'Well' and 'Well Number' disagree with A1 = 1 row-by-row numbering"
        )
    controls = pd.DataFrame({
        "plate": controls["Plate"],
        "well": numbers,
        "well_name": controls["Well"],
        "control": controls["Control Type"].str.replace(" control", "", regex=False),
        "gene_target": controls["Original Gene Target"],
    })
    controls = controls[~controls["well"].isin(EXCLUDED_WELLS)]
    controls = controls.sort_values(["plate", "well"]).reset_index(drop=True)

    written = {}
    for name, table in (("plates.tsv", plates), ("labelled_cells.tsv", cells), ("control_wells.tsv", controls)):
        path = out / name
        with atomic_path(path) as tmp:
            table.to_csv(tmp, sep="\t", index=False)
        written[name] = path
    return written


def movie_url(plate: str, well: int, *, base_url: str = DEFAULT_BASE_URL, plates: pd.DataFrame | None = None) -> str:
    """URL of the CellH5 movie of ``well`` (number) of ``plate`` under ``base_url``."""
    return movie_urls([plate], [well], base_url=base_url, plate_table=plates)[0]


def movie_urls(plates: Sequence[str], wells: Sequence[int], *, base_url: str = DEFAULT_BASE_URL,
               plate_table: pd.DataFrame | None = None) -> list[str]:
    """:func:`movie_url` for many (plate, well) pairs."""
    table = read_plates() if plate_table is None else plate_table
    screens = dict(zip(table["plate"], table["screen"]))
    unknown = sorted({p for p in plates if p not in screens})
    if unknown:
        raise MorphotypeInputError(f"plate(s) {unknown[:10]} are not idr0013 screen A plates")
    base = base_url.rstrip("/")
    return [f"{base}/{screens[p]}/hdf5/{int(w):05d}_01.ch5" for p, w in zip(plates, wells)]


def frame_location(movie: str, frame: int) -> str:
    """The ``image`` of one movie frame: ``<movie>#frame=<t>``."""
    return f"{movie}#frame={int(frame)}"


def split_frame_location(location: str) -> tuple[str, int | None]:
    """``<movie>#frame=<t>`` → (movie, t); a location without the fragment → (location, None)."""
    match = re.fullmatch(r"(.*)#frame=(\d+)", str(location))
    return (match.group(1), int(match.group(2))) if match else (str(location), None)


def _check_plates(plates: Iterable[str] | None, known: pd.Series, what: str) -> list[str]:
    if plates is None:
        return sorted(known.unique())
    plates = list(dict.fromkeys(str(p) for p in plates))
    unknown = [p for p in plates if p not in set(read_plates()["plate"])]
    if unknown:
        raise MorphotypeInputError(f"unknown idr0013 plate(s) {unknown[:10]}; plate names look like 'LT0001_02'")
    absent = [p for p in plates if p not in set(known)]
    if absent:
        log.info("%d requested plate(s) have no %s: %s", len(absent), what, absent[:10])
    return plates


def labelled_samplesheet(
    plates: Iterable[str] | None = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    cells: pd.DataFrame | None = None,
    exclude_phenotypes: Sequence[str] = (),
) -> pd.DataFrame:
    """One samplesheet row per annotated nucleus of ``plates`` (default: every labelled plate)."""
    cells = read_labelled_cells() if cells is None else cells
    plates = _check_plates(plates, cells["plate"], "labelled cells")
    cells = cells[cells["plate"].isin(plates) & ~cells["phenotype"].isin(exclude_phenotypes)]
    control_type = {
        (p, w): c for p, w, c in read_control_wells()[["plate", "well", "control"]].itertuples(index=False)
    }
    movies = movie_urls(list(cells["plate"]), list(cells["well"]), base_url=base_url)
    sheet = pd.DataFrame({
        "image": [frame_location(m, f) for m, f in zip(movies, cells["frame"])],
        "plate": cells["plate"].to_numpy(),
        "well": cells["well"].astype(int).to_numpy(),
        "site": cells["site"].astype(int).to_numpy(),
        "frame": cells["frame"].astype(int).to_numpy(),
        "phenotype": cells["phenotype"].to_numpy(),
        "x": cells["x"].astype(float).to_numpy(),
        "y": cells["y"].astype(float).to_numpy(),
        "control": [control_type.get((p, int(w)), "treated") for p, w in zip(cells["plate"], cells["well"])],
        "well_name": [well_name(w) for w in cells["well"]],
        "subset": "labelled",
        "movie": movies,
    })
    return sheet[SAMPLESHEET_COLUMNS].reset_index(drop=True)


def draw_control_frame(
    plate: str, well: int, *, seed: int = 0, frame_range: tuple[int, int] = CONTROL_FRAME_RANGE
) -> int:
    """The 0-based frame drawn for a control well: uniform over the study frames ``frame_range``.

    Each well has its own random stream (seed, plate, well), so a well gets the same frame
    whichever other plates are requested.
    """
    first, last = frame_range
    rng = np.random.default_rng([int(seed), zlib.crc32(f"{plate}/{int(well)}".encode())])
    return int(rng.integers(first, last + 1)) - 1


def control_samplesheet(
    plates: Iterable[str] | None = None,
    *,
    controls: Sequence[str] = ("negative",),
    seed: int = 0,
    frame_range: tuple[int, int] = CONTROL_FRAME_RANGE,
    base_url: str = DEFAULT_BASE_URL,
    wells: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One samplesheet row (one frame, no annotation) per control well of ``plates``.

    ``controls``: which control types (``negative``, ``positive``). Well A1 never appears.
    """
    unknown = sorted(set(controls) - set(CONTROL_TYPES))
    if unknown:
        raise MorphotypeInputError(f"unknown control type(s) {unknown}; expected some of {CONTROL_TYPES}")
    wells = read_control_wells() if wells is None else wells
    plates = _check_plates(plates, wells["plate"], "control wells")
    wells = wells[wells["plate"].isin(plates) & wells["control"].isin(controls) & ~wells["well"].isin(EXCLUDED_WELLS)]
    frames = [draw_control_frame(p, w, seed=seed, frame_range=frame_range)
              for p, w in zip(wells["plate"], wells["well"])]
    movies = movie_urls(list(wells["plate"]), list(wells["well"]), base_url=base_url)
    sheet = pd.DataFrame({
        "image": [frame_location(m, f) for m, f in zip(movies, frames)],
        "plate": wells["plate"].to_numpy(),
        "well": wells["well"].astype(int).to_numpy(),
        "site": 1,
        "frame": frames,
        "phenotype": None,
        "x": np.nan,
        "y": np.nan,
        "control": wells["control"].to_numpy(),
        "well_name": wells["well_name"].to_numpy(),
        "subset": "control",
        "movie": movies,
    })
    return sheet[SAMPLESHEET_COLUMNS].reset_index(drop=True)


def idr_samplesheet(
    plates: Iterable[str] | None = None,
    *,
    labelled: bool = True,
    controls: Sequence[str] = (),
    seed: int = 0,
    base_url: str = DEFAULT_BASE_URL,
) -> pd.DataFrame:
    """Samplesheet of labelled-cell frames and/or one drawn frame per control well.

    A drawn control frame that is also a labelled frame of the same well is dropped (the
    pipeline keeps only annotated nuclei of an image that has annotations).
    """
    parts = []
    if labelled:
        parts.append(labelled_samplesheet(plates, base_url=base_url))
    if controls:
        sheet = control_samplesheet(plates, controls=controls, seed=seed, base_url=base_url)
        if labelled:
            taken = set(parts[0]["image"])
            clash = sheet["image"].isin(taken)
            if clash.any():
                log.info("dropped %d control frame(s) that are labelled frames", int(clash.sum()))
            sheet = sheet[~clash]
        parts.append(sheet)
    if not parts:
        raise MorphotypeInputError("nothing to put in the samplesheet: ask for labelled cells and/or controls")
    return pd.concat(parts, ignore_index=True)


# --- readers -----------------------------------------------------------------------------------

MOVIE_FORMATS = {".ch5": "cellh5", ".h5": "cellh5", ".hdf5": "cellh5", ".zarr": "ome-zarr"}


def movie_format(location: str) -> str | None:
    """``"cellh5"``, ``"ome-zarr"`` or None (not a movie) from a location's suffix."""
    path = urlsplit(str(location)).path if "://" in str(location) else str(location)
    return MOVIE_FORMATS.get(Path(path.rstrip("/")).suffix.lower())


@dataclass(frozen=True)
class MovieInfo:
    """What a movie holds: ``shape`` in (c, t, z, y, x) order, pixel ``dtype``."""

    location: str
    format: str
    shape: tuple[int, int, int, int, int]
    dtype: str

    @property
    def n_frames(self) -> int:
        return self.shape[1]

    def to_json(self) -> str:
        return json.dumps({"location": self.location, "format": self.format, "shape": list(self.shape),
                           "dtype": self.dtype})

    @classmethod
    def from_json(cls, text: str) -> "MovieInfo":
        data = json.loads(text)
        return cls(data["location"], data["format"], tuple(int(n) for n in data["shape"]), data["dtype"])


class SourceError(MorphotypeInputError):
    """A source is missing or corrupt; the message names its URL or path."""


class DownloadError(OSError):
    """A source could not be fetched within the retries; the message names its URL."""


def _choose_key(group, wanted, what: str, source: str) -> str:
    """The key of ``group`` for ``wanted`` (compared as numbers when both are numeric)."""
    keys = sorted(group.keys())
    if not keys:
        raise SourceError(f"{source}: CellH5 group {group.name} has no {what}")
    if wanted is not None:
        numeric = str(wanted).isdigit()
        hits = [k for k in keys if k == str(wanted) or (numeric and k.isdigit() and int(k) == int(wanted))]
        if len(hits) == 1:
            return hits[0]
    if len(keys) == 1:
        if wanted is not None:
            log.debug("%s: %s %r not found, using the only one, %r", source, what, wanted, keys[0])
        return keys[0]
    raise SourceError(f"{source}: {what} {wanted!r} not among {keys[:10]} in CellH5 group {group.name}")


def cellh5_image_path(h5file, *, plate: str | None = None, well: int | str | None = None, site: int | None = None,
                      source: str | None = None) -> str:
    """Path of the raw pixels, ``/sample/<s>/plate/<p>/experiment/<w>/position/<n>/image/channel``.

    Keys are enumerated (never assumed); a requested plate/well/site that is absent is accepted
    only when the file holds a single one.
    """
    source = source or h5file.filename
    if "sample" not in h5file:
        raise SourceError(f"{source}: not a CellH5 file (no /sample group; top-level keys {list(h5file.keys())[:10]})")
    sample = _choose_key(h5file["sample"], "0", "sample", source)
    node = h5file["sample"][sample]
    path = f"/sample/{sample}"
    for level, wanted in (("plate", plate), ("experiment", well), ("position", site)):
        if level not in node:
            raise SourceError(f"{source}: CellH5 group {path} has no '{level}' group")
        key = _choose_key(node[level], wanted, level, source)
        node = node[level][key]
        path = f"{path}/{level}/{key}"
    path = f"{path}/image/channel"
    if path not in h5file:
        raise SourceError(f"{source}: CellH5 file has no raw image dataset {path}")
    return path


def read_cellh5(path: str | Path, frames: Iterable[int], *, plate: str | None = None, well: int | str | None = None,
                site: int | None = None, channel: int = 0, z: int = 0,
                source: str | None = None) -> tuple[dict[int, np.ndarray], MovieInfo]:
    """Read planes ``frames`` (time indices) of a CellH5 movie; only their chunks are read."""
    import h5py

    source = source or str(path)
    try:
        with h5py.File(path, "r") as h5file:
            image_path = cellh5_image_path(h5file, plate=plate, well=well, site=site, source=source)
            dataset = h5file[image_path]
            if dataset.ndim != 5:
                raise SourceError(f"{source}: {image_path} has shape {dataset.shape}; expected 5-D (c, t, z, y, x)")
            info = MovieInfo(source, "cellh5", tuple(int(n) for n in dataset.shape), str(dataset.dtype))
            _check_plane_index(info, frames, channel, z)
            planes = {int(t): np.asarray(dataset[channel, int(t), z]) for t in sorted(set(frames))}
    except SourceError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as error:  # h5py: corrupt or truncated file
        raise SourceError(f"{source}: not a readable CellH5 movie ({error})") from error
    return planes, info


def _check_plane_index(info: MovieInfo, frames: Iterable[int], channel: int, z: int) -> None:
    c, t, zs, _, _ = info.shape
    bad = [f for f in frames if not 0 <= int(f) < t]
    if bad:
        raise SourceError(f"{info.location}: frame(s) {sorted(bad)[:5]} outside the movie's {t} frames")
    if not 0 <= channel < c or not 0 <= z < zs:
        raise SourceError(f"{info.location}: channel {channel} / z {z} outside the movie's {c} channels / {zs} planes")


def _as_tczyx(movie: np.ndarray) -> np.ndarray:
    movie = np.asarray(movie)
    if movie.ndim == 3:  # (t, y, x)
        return movie[:, None, None]
    if movie.ndim == 5:
        return movie
    raise ValueError(f"expected a (t, y, x) or (t, c, z, y, x) movie, got shape {movie.shape}")


def write_cellh5(path: str | Path, movie: np.ndarray, *, plate: str, well: int, site: int = 1,
                 compression: str | None = "gzip") -> Path:
    """Write a movie ((t, y, x) or (t, c, z, y, x)) as a minimal CellH5 file, one chunk per plane."""
    import h5py

    data = np.moveaxis(_as_tczyx(movie), 1, 0)  # CellH5 stores (c, t, z, y, x)
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5file:
            name = f"/sample/0/plate/{plate}/experiment/{int(well):05d}/position/{int(site)}/image"
            group = h5file.create_group(name)
            group.create_dataset("channel", data=data, chunks=(1, 1, 1, *data.shape[-2:]), compression=compression)
            h5file.create_group("/definition")
    return path


def _fsspec_options(options: "FetchOptions") -> dict:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.timeout, sock_read=options.timeout)
    return {"client_kwargs": {"timeout": timeout}}


@functools.lru_cache(maxsize=None)
def _retrying_store(options: "FetchOptions"):
    """A zarr ``FsspecStore`` whose every key read is retried with back-off (one class per options)."""
    from zarr.storage import FsspecStore

    class RetryingFsspecStore(FsspecStore):
        async def get(self, key, prototype, byte_range=None):
            for attempt in range(options.retries + 1):
                try:
                    return await super().get(key, prototype, byte_range)
                except Exception as error:  # aiohttp raises many types; a missing key is not one (None)
                    if attempt == options.retries:
                        raise
                    log.warning("%s/%s: attempt %d failed (%s: %s); retrying in %.2g s", self.path, key,
                                attempt + 1, type(error).__name__, error, options.delay(attempt))
                    await asyncio.sleep(options.delay(attempt))

    return RetryingFsspecStore


def _open_ome_zarr(location: str, options: "FetchOptions", level: int = 0):
    """(array, axis names) of resolution ``level`` of an OME-Zarr image (NGFF 0.4 or 0.5)."""
    import zarr

    if "://" in location and not location.startswith("file://"):
        store = _retrying_store(options).from_url(location, storage_options=_fsspec_options(options), read_only=True)
    else:
        store = location.removeprefix("file://")
    group = zarr.open_group(store=store, mode="r")
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests its metadata under "ome"
    if not ome.get("multiscales"):
        raise SourceError(f"{location}: not an OME-Zarr image (no 'multiscales' metadata)")
    multiscale = ome["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscale.get("axes", ["t", "c", "z", "y", "x"])]
    try:
        array = group[multiscale["datasets"][level]["path"]]
    except (KeyError, IndexError) as error:
        raise SourceError(f"{location}: OME-Zarr resolution level {level} is missing ({error})") from error
    if len(axes) != array.ndim or axes[-2:] != ["y", "x"]:
        raise SourceError(f"{location}: axes {axes} do not fit the array's shape {array.shape}")
    return array, axes


def _plane_index(axes: list[str], t: int, channel: int, z: int) -> tuple:
    position = {"t": t, "c": channel, "z": z}
    for name, value in position.items():
        if name not in axes and value != 0:
            raise SourceError(f"image has no '{name}' axis but {name} = {value} was asked for")
    return tuple(position.get(name, slice(None)) if name not in ("y", "x") else slice(None) for name in axes)


def _ome_zarr_info(location: str, array, axes: list[str]) -> MovieInfo:
    sizes = dict(zip(axes, array.shape))
    shape = (sizes.get("c", 1), sizes.get("t", 1), sizes.get("z", 1), sizes["y"], sizes["x"])
    return MovieInfo(location, "ome-zarr", tuple(int(n) for n in shape), str(array.dtype))


def read_ome_zarr(location: str, frames: Iterable[int], *, channel: int = 0, z: int = 0, level: int = 0,
                  options: "FetchOptions | None" = None) -> tuple[dict[int, np.ndarray], MovieInfo]:
    """Read planes ``frames`` of an OME-Zarr image (local or HTTP): only their chunks are fetched.

    Every metadata and plane read is retried with back-off (see :class:`FetchOptions`).
    """
    options = options or FetchOptions()
    array, axes = _retry(lambda: _open_ome_zarr(location, options, level), location, options)
    info = _ome_zarr_info(location, array, axes)
    frames = sorted({int(t) for t in frames})
    _check_plane_index(info, frames, channel, z)
    planes = {}
    for t in frames:
        index = _plane_index(axes, t, channel, z)
        planes[t] = _retry(lambda: np.asarray(array[index]), f"{location} (frame {t})", options)
    return planes, info


def write_ome_zarr(path: str | Path, movie: np.ndarray, *, version: str = "0.4") -> Path:
    """Write a movie ((t, y, x) or (t, c, z, y, x)) as an OME-Zarr image, one gzip chunk per plane.

    ``version`` "0.4" writes Zarr v2 (what IDR serves today); "0.5" writes Zarr v3.
    """
    import zarr

    if version not in ("0.4", "0.5"):
        raise ValueError(f"OME-NGFF version must be '0.4' or '0.5', got {version!r}")
    data = _as_tczyx(movie)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
            {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    dataset = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 5}]}
    if version == "0.4":
        import numcodecs

        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, *data.shape[-2:]),
                                   compressors=numcodecs.GZip(level=4))
        group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [dataset]}]
    else:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        array = group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 1, *data.shape[-2:]),
                                   compressors=zarr.codecs.GzipCodec(level=4), dimension_names=list("tczyx"))
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [dataset]}]}
    array[...] = data
    return Path(path)


# --- downloading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchOptions:
    """How sources are fetched.

    timeout: seconds to connect and between bytes received; retries: further attempts after
    the first; backoff: first wait in seconds, doubled after each failure up to max_backoff;
    workers: concurrent fetches (threads); batch_size: CellH5 movies per scratch batch (the
    scratch folder holds at most one batch of movies at a time).
    """

    timeout: float = 60.0
    retries: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    workers: int = 4
    batch_size: int = 4
    chunk_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("timeout", "backoff", "max_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"FetchOptions.{name} must be >= 0")
        for name in ("workers", "batch_size", "chunk_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchOptions.{name} must be >= 1")
        if self.retries < 0:
            raise ValueError("FetchOptions.retries must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.max_backoff, self.backoff * 2.0**attempt)


@dataclass
class DownloadResult:
    url: str
    path: Path
    size: int
    bytes_transferred: int
    attempts: int
    resumed: bool


class _Incomplete(Exception):
    """A transfer ended before the announced size: resume it."""


class _Counter:
    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _retry(action: Callable[[], T], what: str, options: FetchOptions) -> T:
    """Run ``action``; on a transient failure wait (exponential back-off) and try again."""
    for attempt in range(options.retries + 1):
        try:
            return action()
        except (SourceError, MemoryError):
            raise
        except FileNotFoundError as error:
            raise SourceError(f"{what}: not found ({error})") from error
        except Exception as error:  # aiohttp, zarr codecs and sockets raise many types; all are retried
            if attempt == options.retries:
                raise DownloadError(
                    f"{what}: failed after {attempt + 1} attempts ({type(error).__name__}: {error})"
                ) from error
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.2g s", what, attempt + 1,
                        type(error).__name__, error, options.delay(attempt))
            time.sleep(options.delay(attempt))
    raise AssertionError("unreachable")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _http_attempt(url: str, part: Path, options: FetchOptions, counter: _Counter) -> int | None:
    """One HTTP(S) transfer into ``part``, resuming from its size; returns the expected total."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=(options.timeout, options.timeout)) as response:
        status = response.status_code
        if status == 416 and offset:
            _, total = _content_range(response.headers.get("Content-Range"))
            if total == offset:
                return total
            part.unlink()
            raise _Incomplete(f"partial file of {offset} bytes does not fit the source; starting again")
        if status in (404, 410):
            raise SourceError(f"{url}: not found (HTTP {status})")
        if 400 <= status < 500 and status not in (408, 425, 429):
            raise SourceError(f"{url}: refused (HTTP {status} {response.reason})")
        response.raise_for_status()  # 5xx and 408/429: retried by the caller
        if status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                part.unlink()
                raise _Incomplete(f"server resumed at byte {first}, not {offset}; starting again")
            mode = "ab"
        else:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(part, mode) as handle:
            while True:
                # read1 hands over whatever has arrived, so a transfer cut mid-way keeps its bytes
                block = response.raw.read1(options.chunk_bytes, decode_content=False)
                if not block:
                    break
                handle.write(block)
                counter.add(len(block))
    return total


def _ftp_attempt(url: str, part: Path, options: FetchOptions, counter: _Counter) -> int | None:
    """One FTP transfer into ``part``, resuming (REST) from its size; returns the expected total."""
    parts = urlsplit(url)
    offset = part.stat().st_size if part.exists() else 0
    with ftplib.FTP(timeout=options.timeout) as ftp:
        ftp.connect(parts.hostname or "", parts.port or 21)
        ftp.login(unquote(parts.username or "anonymous"), unquote(parts.password or "anonymous@"))
        ftp.voidcmd("TYPE I")
        path = unquote(parts.path)
        try:
            total = ftp.size(path)
        except ftplib.error_perm as error:
            raise SourceError(f"{url}: not found on the FTP server ({error})") from error
        if total is not None and offset > total:
            part.unlink()
            offset = 0
        if total is not None and offset == total:
            return total
        with open(part, "ab" if offset else "wb") as handle:
            def write(block: bytes) -> None:
                handle.write(block)
                counter.add(len(block))

            ftp.retrbinary(f"RETR {path}", write, blocksize=options.chunk_bytes, rest=offset or None)
    return total


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | Path, *, options: FetchOptions | None = None, md5: str | None = None,
             counter: _Counter | None = None) -> DownloadResult:
    """Fetch ``url`` (http, https, ftp, file) to ``dest``, robustly.

    The transfer goes to ``dest.part``; a failed attempt (connection dropped, timeout, 5xx,
    truncated body) is retried after an exponential back-off and resumes where the partial file
    ends (HTTP Range / FTP REST), so a ``.part`` left by an interrupted run is resumed too. The
    result must have the announced size (Content-Length / SIZE) and, when given, the MD5; a
    mismatching MD5 is downloaded once more from scratch. ``dest`` appears only when complete.

    Raises
    ------
    SourceError
        The source does not exist (HTTP 404/410, FTP 550), is refused (other 4xx), or its MD5
        differs twice.
    DownloadError
        Transient failures outlasted ``options.retries``.
    """
    options = options or FetchOptions()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    counter = counter or _Counter()
    before = counter.value
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("", "file"):
        source = Path(unquote(urlsplit(url).path) if scheme == "file" else url)
        if not source.exists():
            raise SourceError(f"{url}: file does not exist")
        shutil.copyfile(source, part)
        counter.add(part.stat().st_size)
        attempt_once = None
    elif scheme in ("http", "https"):
        attempt_once = _http_attempt
    elif scheme == "ftp":
        attempt_once = _ftp_attempt
    else:
        raise MorphotypeInputError(f"{url}: unsupported scheme {scheme!r} (http, https, ftp, file)")
    resumed = part.exists() and part.stat().st_size > 0 and attempt_once is not None
    md5_failures = 0
    last_error: Exception | None = None
    for attempt in range(options.retries + 1):
        try:
            total = attempt_once(url, part, options, counter) if attempt_once else part.stat().st_size
            size = part.stat().st_size
            if total is not None and size != total:
                raise _Incomplete(f"received {size} of {total} bytes")
            if md5 is not None and _md5(part) != md5.lower():
                md5_failures += 1
                part.unlink()
                if md5_failures > 1 or attempt_once is None:
                    raise SourceError(
                        f"{url}: MD5 of the downloaded file differs from the expected {md5}; the source is corrupt"
                    )
                raise _Incomplete("MD5 mismatch; downloading again")
            os.replace(part, dest)
            return DownloadResult(url, dest, size, counter.value - before, attempt + 1, resumed)
        except SourceError:
            raise
        except Exception as error:  # requests, ftplib and sockets raise many types; all transient
            last_error = error
            if attempt == options.retries:
                break
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.2g s", url, attempt + 1,
                        type(error).__name__, error, options.delay(attempt))
            time.sleep(options.delay(attempt))
    raise DownloadError(f"{url}: download failed after {options.retries + 1} attempts "
                        f"({type(last_error).__name__}: {last_error})")


def read_md5_table(path: str | Path) -> dict[str, str]:
    """Read ``md5sum``-style lines (``<md5>  <path or URL>``); keys are the paths/URLs as written."""
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: MD5 table does not exist")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(\S.*)", line.strip())
        if not match:
            raise MorphotypeInputError(f"{path}, line {number}: expected '<32 hex digits>  <path or URL>'")
        table[match.group(2).strip()] = match.group(1).lower()
    return table


def _md5_for(url: str, table: dict[str, str] | None) -> str | None:
    """The table's MD5 for ``url``: an exact key, or the longest key the URL ends with."""
    if not table:
        return None
    if url in table:
        return table[url]
    hits = [key for key in table if url.endswith("/" + key.lstrip("./"))]
    return table[max(hits, key=len)] if hits else None


# --- streaming into a frame cache --------------------------------------------------------------


@dataclass
class StreamStats:
    """What :func:`stream_frames` did."""

    movies: int = 0
    movies_fetched: int = 0
    planes_fetched: int = 0
    frames_written: int = 0
    frames_from_cache: int = 0
    bytes_downloaded: int = 0
    peak_scratch_bytes: int = 0
    seconds: float = 0.0
    failed: list[dict] = field(default_factory=list)


@dataclass
class _Movie:
    location: str
    format: str
    plate: str
    well: str
    site: int
    frames: set[int]
    planes_dir: Path
    info: MovieInfo | None = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))


def _planes_dir(cache_dir: Path, plate: str, location: str) -> Path:
    name = Path(urlsplit(location).path.rstrip("/") if "://" in location else location.rstrip("/")).stem
    digest = hashlib.sha1(location.encode()).hexdigest()[:10]
    return cache_dir / "planes" / _safe(plate) / f"{_safe(name)}-{digest}"


def _plane_path(planes_dir: Path, t: int, channel: int, z: int) -> Path:
    return planes_dir / f"t{t:04d}_c{channel}_z{z}.tiff"


def frame_path(cache_dir: str | Path, variant: str, plate: str, well: int | str, site: int, frame: int) -> Path:
    """Where :func:`stream_frames` writes a frame: ``frames/<variant>/<plate>/<plate>_<well>_<site>_<frame>.tiff``.

    The stem equals the frame's ``Metadata_ImageID``.
    """
    name = f"{_safe(plate)}_{_safe(str(well))}_{int(site)}_{int(frame)}.tiff"
    return Path(cache_dir) / "frames" / variant / _safe(plate) / name


def _write_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, compression="zlib")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _empty(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _needed_planes(movie: _Movie, variant: str, frames: Iterable[int]) -> set[int]:
    from morphotype.illumination import context_window

    needed = set()
    for t in frames:
        if variant == "ic":
            needed.update(context_window(t, movie.info.n_frames)[0])
        else:
            needed.add(t)
    return needed


def _missing_planes(movie: _Movie, variant: str, frames: Iterable[int], channel: int, z: int) -> set[int]:
    needed = _needed_planes(movie, variant, frames)
    return {t for t in needed if not _plane_path(movie.planes_dir, t, channel, z).exists()}


def _store_planes(movie: _Movie, planes: dict[int, np.ndarray], info: MovieInfo, channel: int, z: int) -> int:
    movie.info = info
    movie.planes_dir.mkdir(parents=True, exist_ok=True)
    info_path = movie.planes_dir / "movie.json"
    if not info_path.exists():
        with atomic_path(info_path) as tmp:
            tmp.write_text(info.to_json())
    for t, plane in planes.items():
        _write_tiff(_plane_path(movie.planes_dir, t, channel, z), plane)
    return len(planes)


def _is_remote(location: str) -> bool:
    return urlsplit(location).scheme.lower() in ("http", "https", "ftp")


def stream_frames(
    sheet: pd.DataFrame,
    cache_dir: str | Path,
    *,
    variant: str = "ic",
    scratch_dir: str | Path | None = None,
    options: FetchOptions | None = None,
    md5: dict[str, str] | None = None,
    on_error: str = "raise",
    channel: int = 0,
    z: int = 0,
) -> tuple[pd.DataFrame, StreamStats]:
    """Make every movie frame of ``sheet`` a local TIFF; return the rewritten samplesheet.

    Rows whose ``image`` is a movie frame (``<movie>#frame=<t>``, or a movie with the ``frame``
    column) get ``image`` = :func:`frame_path` of the ``variant`` (``ic``: BaSiC-corrected uint8
    from three neighbouring frames; ``no_ic``: the raw plane) and ``source`` = the original
    location; other rows pass unchanged.

    Only what is missing from ``cache_dir`` is fetched: output frames already there are reused,
    and the raw planes extracted from each movie are kept (``planes/``; never whole movies), so
    a re-run, or the other variant, needs no network. CellH5 movies are downloaded whole, in
    batches of ``options.batch_size`` with ``options.workers`` concurrent transfers, into
    ``scratch_dir`` (default ``cache_dir/.scratch``), which is emptied after each batch. OME-Zarr
    movies are read plane by plane. ``md5``: URL (or path suffix) → MD5 of CellH5 files.
    ``on_error="skip"`` drops the rows of a missing or corrupt movie (listed in
    ``stats.failed``) instead of raising.
    """
    from morphotype.illumination import VARIANTS

    if variant not in VARIANTS:
        raise MorphotypeInputError(f"unknown illumination variant {variant!r}; expected one of {VARIANTS}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    started = time.perf_counter()
    options = options or FetchOptions()
    cache_dir = Path(cache_dir).resolve()  # the returned samplesheet holds absolute paths
    scratch = Path(scratch_dir) if scratch_dir is not None else cache_dir / ".scratch"
    stats = StreamStats()

    movies: dict[str, _Movie] = {}
    claimed: dict[tuple, str] = {}  # output frame -> movie: one frame file per plate/well/site/frame
    row_movie: list[str | None] = []
    row_frame: list[int | None] = []
    for number, row in enumerate(sheet.itertuples(index=False), start=2):
        location, fragment = split_frame_location(row.image)
        fmt = movie_format(location)
        if fmt is None:
            row_movie.append(None)
            row_frame.append(None)
            continue
        frame = int(row.frame) if fragment is None else fragment
        if fragment is not None and int(row.frame) != fragment:
            raise MorphotypeInputError(f"samplesheet row {number}: image {row.image!r} addresses frame {fragment} "
                                       f"but the frame column says {row.frame}")
        output = (str(row.plate), str(row.well), int(row.site), frame)
        if claimed.setdefault(output, location) != location:
            raise MorphotypeInputError(
                f"samplesheet row {number}: plate {output[0]}, well {output[1]}, site {output[2]}, frame {frame} "
                f"comes from two movies: {claimed[output]} and {location}"
            )
        movie = movies.get(location)
        if movie is None:
            movie = movies[location] = _Movie(location, fmt, str(row.plate), str(row.well), int(row.site), set(),
                                              _planes_dir(cache_dir, str(row.plate), location))
        movie.frames.add(frame)
        row_movie.append(location)
        row_frame.append(frame)
    stats.movies = len(movies)

    # What is missing: output frames, then the planes they need (movie length from the cache).
    to_fetch: list[_Movie] = []
    for movie in movies.values():
        pending = [t for t in movie.frames
                   if not frame_path(cache_dir, variant, movie.plate, movie.well, movie.site, t).exists()]
        stats.frames_from_cache += len(movie.frames) - len(pending)
        movie.frames = set(pending)
        if not pending:
            continue
        info_path = movie.planes_dir / "movie.json"
        if info_path.exists():
            movie.info = MovieInfo.from_json(info_path.read_text())
            if not _missing_planes(movie, variant, pending, channel, z):
                continue
        to_fetch.append(movie)

    failed: set[str] = set()

    def fail(movie: _Movie, error: Exception) -> None:
        if on_error == "raise":
            raise error
        log.error("skipping movie %s: %s", movie.location, error)
        failed.add(movie.location)
        stats.failed.append({"movie": movie.location, "plate": movie.plate, "well": movie.well, "error": str(error)})

    counter = _Counter()
    downloads = [m for m in to_fetch if m.format == "cellh5" and _is_remote(m.location)]
    direct = [m for m in to_fetch if m not in downloads]
    progress = tqdm(total=len(to_fetch), desc="fetch movies", unit="movie", disable=None)
    try:
        if direct:
            def read_direct(movie: _Movie):
                try:
                    path = movie.location.removeprefix("file://")
                    return movie, _read_needed(movie, path, variant, channel, z, options)
                except (SourceError, DownloadError) as error:
                    return movie, error

            with ThreadPoolExecutor(options.workers) as pool:
                for movie, outcome in pool.map(read_direct, direct):
                    progress.update()
                    if isinstance(outcome, Exception):
                        fail(movie, outcome)
                        continue
                    stats.planes_fetched += _store_planes(movie, *outcome, channel, z)
                    stats.movies_fetched += 1
        if downloads:
            scratch.mkdir(parents=True, exist_ok=True)
            for start in range(0, len(downloads), options.batch_size):
                batch = downloads[start : start + options.batch_size]

                def fetch(movie: _Movie):
                    dest = scratch / f"{movie.planes_dir.name}{Path(urlsplit(movie.location).path).suffix}"
                    try:
                        download(movie.location, dest, options=options, md5=_md5_for(movie.location, md5),
                                 counter=counter)
                        return movie, dest
                    except (SourceError, DownloadError) as error:
                        return movie, error

                with ThreadPoolExecutor(options.workers) as pool:
                    results = list(pool.map(fetch, batch))
                stats.peak_scratch_bytes = max(stats.peak_scratch_bytes, _tree_bytes(scratch))
                try:
                    for movie, outcome in results:
                        progress.update()
                        if isinstance(outcome, Exception):
                            fail(movie, outcome)
                            continue
                        try:
                            planes, info = _read_needed(movie, outcome, variant, channel, z, options)
                        except SourceError as error:
                            fail(movie, error)
                            continue
                        stats.planes_fetched += _store_planes(movie, planes, info, channel, z)
                        stats.movies_fetched += 1
                finally:
                    _empty(scratch)
    finally:
        progress.close()
        stats.bytes_downloaded = counter.value

    # Output frames.
    todo = [(m, t) for m in movies.values() if m.location not in failed for t in sorted(m.frames)]
    for movie, t in tqdm(todo, desc=f"frames ({variant})", unit="frame", disable=None):
        _write_frame(movie, t, cache_dir, variant, channel, z)
        stats.frames_written += 1

    out = sheet.copy()
    sources = out["image"].astype(str).to_numpy()
    images = []
    keep = []
    for location, frame, row in zip(row_movie, row_frame, out.itertuples(index=False)):
        keep.append(location not in failed)
        if location is None:
            images.append(row.image)
        else:
            images.append(str(frame_path(cache_dir, variant, str(row.plate), str(row.well), int(row.site), frame)))
    out["image"] = images
    out["frame"] = [f if f is not None else old for f, old in zip(row_frame, out["frame"])]
    out["source"] = sources
    out["illumination"] = [variant if m is not None else "" for m in row_movie]
    out = out[keep].reset_index(drop=True)
    stats.seconds = time.perf_counter() - started
    log.info("streamed %d frames of %d movies (%d fetched, %d frames from cache, %.1f MB downloaded, "
             "peak scratch %.1f MB)",
             stats.frames_written, stats.movies, stats.movies_fetched, stats.frames_from_cache,
             stats.bytes_downloaded / 1e6, stats.peak_scratch_bytes / 1e6)
    return out, stats


def _read_needed(movie: _Movie, path: str | Path, variant: str, channel: int, z: int,
                 options: FetchOptions) -> tuple[dict[int, np.ndarray], MovieInfo]:
    """Read the planes ``movie`` still needs from a local CellH5 file or an OME-Zarr location."""
    if movie.format == "cellh5":
        _, info = read_cellh5(path, [], plate=movie.plate, well=movie.well, site=movie.site,
                              channel=channel, z=z, source=movie.location)
        movie.info = info
        needed = _missing_planes(movie, variant, movie.frames, channel, z)
        planes, _ = read_cellh5(path, needed, plate=movie.plate, well=movie.well, site=movie.site,
                                channel=channel, z=z, source=movie.location)
        return planes, info
    array, axes = _retry(lambda: _open_ome_zarr(str(path), options), movie.location, options)
    movie.info = info = _ome_zarr_info(movie.location, array, axes)
    needed = sorted(_missing_planes(movie, variant, movie.frames, channel, z))
    _check_plane_index(info, needed, channel, z)
    planes = {t: _retry(lambda: np.asarray(array[_plane_index(axes, t, channel, z)]),
                        f"{movie.location} (frame {t})", options) for t in needed}
    return planes, info


def _write_frame(movie: _Movie, t: int, cache_dir: Path, variant: str, channel: int, z: int) -> Path:
    from morphotype.illumination import context_window, correct_window

    out = frame_path(cache_dir, variant, movie.plate, movie.well, movie.site, t)
    if variant == "no_ic":
        plane = _plane_path(movie.planes_dir, t, channel, z)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.unlink()
            try:
                os.link(plane, tmp)  # the raw plane as it is: share the bytes when the disk allows
            except OSError:
                shutil.copyfile(plane, tmp)
        return out
    indices, position = context_window(t, movie.info.n_frames)
    stack = np.stack([_read_tiff(_plane_path(movie.planes_dir, i, channel, z)) for i in indices])
    _write_tiff(out, correct_window(stack, position))
    return out


# --- label transfer ----------------------------------------------------------------------------


def transfer_labels(
    labels: np.ndarray, annotations: pd.DataFrame, *, tolerance: float = 0.0
) -> tuple[pd.DataFrame, int]:
    """Give each annotated point (``x``, ``y`` columns) the nucleus whose mask contains it.

    Returns ``annotations`` plus ``object_number`` (0 = unmatched), ``match`` (inside / nearest /
    unmatched / shared) and ``distance``, and the number of unmatched annotations. With
    ``tolerance`` > 0 a point outside every mask takes the nearest one within that many pixels.
    When several annotations fall in one nucleus the first keeps it and the others are unmatched
    (``shared``): one label per nucleus.
    """
    from morphotype.segment import match_points

    missing = [c for c in ("x", "y") if c not in annotations.columns]
    if missing:
        raise MorphotypeInputError(f"annotations: missing column(s) {missing}")
    result = match_points(labels, annotations[["x", "y"]].to_numpy(dtype=float), tolerance=tolerance)
    out = annotations.copy()
    numbers = np.asarray(result.label, dtype=np.int64).copy()
    how = np.asarray(result.how, dtype=object).copy()
    seen: set[int] = set()
    for i, label in enumerate(numbers):
        if label and label in seen:
            numbers[i] = 0
            how[i] = "shared"
        elif label:
            seen.add(int(label))
    out["object_number"] = numbers
    out["match"] = how
    out["distance"] = result.distance
    unmatched = int((numbers == 0).sum())
    if unmatched:
        log.info("%d of %d annotations matched no nucleus", unmatched, len(out))
    return out, unmatched


# --- synthetic movies and a loopback server, for offline tests and benchmarks -------------------


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


FAULTS = ("drop", "truncate", "500", "503", "slow")


class LoopbackFileServer:
    """Serve a folder over HTTP on 127.0.0.1 with Range support, byte counting and injected faults.

    ``faults`` is applied per file: the i-th GET of a path suffers ``faults[i]`` (``drop``: close
    without answering; ``truncate``: announce the full length, send half; ``500``/``503``;
    ``slow``: wait ``slow_seconds`` before answering; ``None``: none); later GETs succeed. Use
    as a context manager; ``url`` is the base URL, ``bytes_sent`` the body bytes sent.
    """

    def __init__(self, root: str | Path, *, faults: Sequence[str | None] = (), slow_seconds: float = 2.0):
        unknown = [f for f in faults if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; expected {FAULTS}")
        self.root = Path(root).resolve()
        self.faults = list(faults)
        self.slow_seconds = slow_seconds
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str]] = []  # (path, Range header, outcome)
        self._gets: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.requests.clear()

    def __enter__(self) -> "LoopbackFileServer":
        owner = self

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # clients hang up on purpose in fault tests
                log.debug("loopback server: client %s hung up", client_address)

        self._server = Server(("127.0.0.1", 0), _handler(owner))
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            count = self._gets.get(path, 0)
            self._gets[path] = count + 1
        return self.faults[count] if count < len(self.faults) else None

    # Requests and bytes are recorded *before* the client can see them: a client that returns as
    # soon as it has read the body must find them counted.
    def _record(self, path: str, byte_range: str, outcome: str) -> int:
        with self._lock:
            self.requests.append((path, byte_range, outcome))
            return len(self.requests) - 1

    def _amend(self, index: int, outcome: str) -> None:
        with self._lock:
            if index < len(self.requests):  # reset_counters may have cleared the log meanwhile
                path, byte_range, _ = self.requests[index]
                self.requests[index] = (path, byte_range, outcome)

    def _count(self, sent: int) -> None:
        with self._lock:
            self.bytes_sent += sent


def _handler(owner: LoopbackFileServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output quiet
            log.debug("loopback server: " + format, *args)

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            relative = unquote(urlsplit(self.path).path).lstrip("/")
            target = (owner.root / relative).resolve()
            byte_range = self.headers.get("Range", "")
            if owner.root not in target.parents or not target.is_file():
                owner._record(relative, byte_range, "404")
                self.send_error(404)
                return
            fault = None if head else owner._next_fault(relative)
            if fault == "drop":
                owner._record(relative, byte_range, "drop")
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault in ("500", "503"):
                owner._record(relative, byte_range, fault)
                self.send_error(int(fault))
                return
            if fault == "slow":
                time.sleep(owner.slow_seconds)
            size = target.stat().st_size
            first, last = 0, size - 1
            status = 200
            if byte_range:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())
                if not match or int(match.group(1)) >= size:
                    owner._record(relative, byte_range, "416")
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                first = int(match.group(1))
                last = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
                status = 206
            length = last - first + 1
            index = owner._record(relative, byte_range, "head" if head else fault or str(status))
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                if head:
                    return
                to_send = length // 2 if fault == "truncate" else length
                sent = 0
                with open(target, "rb") as handle:
                    handle.seek(first)
                    while sent < to_send:
                        block = handle.read(min(1 << 16, to_send - sent))
                        if not block:
                            break
                        owner._count(len(block))
                        self.wfile.write(block)
                        sent += len(block)
                self.wfile.flush()
                if fault == "truncate":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): fine
                owner._amend(index, "client-gone")
                self.close_connection = True

    return Handler
