"""The idr0013 screen (MitoCheck, screen A): plates, wells, movie URLs, samplesheets.

``assets/idr0013/`` holds three small tables derived from the shared metadata
(:func:`derive_idr0013_assets` rebuilds them): ``plates.tsv`` (510 plates → screen directory),
``labelled_cells.tsv`` (the 2,779 annotated nuclei: plate, well, site, frame, x, y, phenotype)
and ``control_wells.tsv`` (6,743 control wells: negative / positive, well A1 excluded).
A movie of well ``w`` of ``plate`` is
``<base>/<screen>/hdf5/<w:05d>_01.ch5`` with ``<base>`` = :data:`DEFAULT_BASE_URL` (HTTPS) or
:data:`FTP_BASE_URL`, or any mirror. Wells are numbered row by row on the 384-well plate
(16 rows A–P × 24 columns): A1 = 1, A24 = 24, B1 = 25, P24 = 384.

A samplesheet row addresses one plane of a movie by its ``image`` column:
``<movie URL or path>#frame=<t>`` (:func:`frame_location`), t the 0-based time index, equal to
the row's ``frame`` column (the study's frame number is t + 1).
"""

from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from morphotype.io import MorphotypeInputError, asset_path, atomic_path

log = logging.getLogger(__name__)

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
