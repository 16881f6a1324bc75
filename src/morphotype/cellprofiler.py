"""Read any CellProfiler single-cell output into one standard form.

Layouts read (all through DuckDB, so plates larger than memory are streamed):

- **CellProfiler ExportToDatabase** SQLite: ``Per_Image`` / ``Per_<Object>`` tables, optionally
  with a table prefix (``MyExpt_Per_Image``); image columns ``Image_Metadata_Well``, key
  ``ImageNumber``; object number ``<Object>_Number_Object_Number``.
- **cytominer-database** SQLite (JUMP, pycytominer test data): ``Image`` / ``<Object>`` tables,
  ``Metadata_Well`` or ``Image_Metadata_Well``, ``TableNumber`` + ``ImageNumber``, ``ObjectNumber``.
- **CytoTable** Parquet: one joined table per plate, keys ``Metadata_ImageNumber`` (and
  ``Metadata_TableNumber``), image metadata ``Image_Metadata_*`` or ``Metadata_*``, object number
  ``Metadata_<Object>_Number_Object_Number`` / ``Metadata_ObjectNumber`` /
  ``<Object>_Number_Object_Number``; object features prefixed ``<Object>_``.
- **ExportToSpreadsheet** CSVs: a folder with ``Image.csv`` and ``<Object>.csv`` (optionally with
  a prefix, CellProfiler's default ``MyExpt_``); object columns without the object prefix
  (``AreaShape_Area``), keys ``ImageNumber`` and ``ObjectNumber``.

Standard form (:class:`CellTable`): an image table with ``TableNumber`` (text, ``''`` when the
layout has none), ``ImageNumber``, ``Metadata_Well`` (normalised: ``a1`` -> ``A01``),
``Metadata_Plate`` (or None), ``Metadata_Site`` and every other image metadata column; and nuclei
read in chunks as (TableNumber, ImageNumber, ObjectNumber, features) with feature names mapped onto
the model's convention: object ``Nuclei``, DNA stain ``DNA`` (``--nuclei-object``, ``--dna-stain``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from morphotype.io import MorphotypeInputError

log = logging.getLogger(__name__)

MODEL_OBJECT = "Nuclei"  # the object and stain names the models' features use
MODEL_STAIN = "DNA"
_WELL = re.compile(r"^\s*([A-Za-z]{1,2})0*(\d{1,3})\s*$")


def normalise_well(name: object) -> str | None:
    """``A1``, ``a01``, ``A001`` -> ``A01``; None for anything that is not a well name."""
    match = _WELL.match(str(name))
    if match is None:
        return None
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def map_feature_name(column: str, nuclei_object: str = MODEL_OBJECT, dna_stain: str = MODEL_STAIN) -> str | None:
    """The model's name for an input feature column, or None when it is not a nuclei feature.

    ``<nuclei_object>_X`` -> ``Nuclei_X``, and the stain token ``<dna_stain>`` (a whole
    ``_``-separated part, as CellProfiler writes it in Intensity, Texture, Granularity,
    RadialDistribution and Location names) -> ``DNA``.
    """
    prefix = f"{nuclei_object}_"
    if not column.startswith(prefix):
        return None
    parts = column[len(prefix):].split("_")
    if dna_stain != MODEL_STAIN:
        parts = [MODEL_STAIN if part == dna_stain else part for part in parts]
    return f"{MODEL_OBJECT}_{'_'.join(parts)}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass
class CellTable:
    """One plate (or file) of CellProfiler output in the standard form; see the module docstring."""

    source: str
    layout: str
    images: pd.DataFrame
    nuclei_table: str  # how messages name it (file / table)
    features: dict[str, str]  # model name -> input column
    _con: object = field(repr=False, default=None)
    _nuclei_sql: str = field(repr=False, default="")
    _keys: tuple[str, str, str] = field(repr=False, default=("", "", ""))  # SQL of the three keys

    def iter_nuclei(self, features: Sequence[str], chunk_size: int
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (TableNumber, ImageNumber, ObjectNumber, float64 features) chunks."""
        table_number, image_number, object_number = self._keys
        select = [f"CAST({table_number} AS VARCHAR)", f"CAST({image_number} AS BIGINT)",
                  f"CAST({object_number} AS BIGINT)"]
        select += [f"CAST({_quote(self.features[f])} AS DOUBLE)" for f in features]
        reader = self._con.execute(f"SELECT {', '.join(select)} FROM {self._nuclei_sql}").to_arrow_reader(chunk_size)
        for batch in reader:
            columns = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(batch.num_columns)]
            values = (np.column_stack(columns[3:]).astype(np.float64, copy=False) if features
                      else np.empty((batch.num_rows, 0)))
            yield columns[0].astype(str), columns[1].astype(np.int64), columns[2].astype(np.int64), values

    def read_features(self, features: Sequence[str] | None = None) -> pd.DataFrame:
        """All nuclei with image metadata and ``features`` (default: all) as one frame (small inputs)."""
        features = list(self.features) if features is None else list(features)
        parts = [pd.DataFrame(v, columns=features).assign(TableNumber=t, ImageNumber=i, ObjectNumber=o)
                 for t, i, o, v in self.iter_nuclei(features, 100_000)]
        cells = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=features)
        return cells.merge(self.images, on=["TableNumber", "ImageNumber"], how="left", validate="many_to_one")

    def close(self) -> None:
        try:
            self._con.close()
        except Exception:  # already closed
            pass


def _duckdb(path: Path):
    import duckdb

    try:  # offline: the extension ships as a wheel and must be registered once per HOME
        from duckdb_extensions import import_extension

        import_extension("sqlite")
    except ImportError:  # pragma: no cover - online installs fetch it on LOAD
        pass
    return duckdb.connect()


def _describe(con, relation: str) -> list[str]:
    return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def _first(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c.lower()] for c in candidates if c.lower() in lowered), None)


def _require(columns: Sequence[str], candidates: Sequence[str], where: str, what: str) -> str:
    found = _first(columns, candidates)
    if found is None:
        raise MorphotypeInputError(f"{where}: no {what} column; expected one of {list(candidates)}")
    return found


def _find_table(tables: Sequence[str], object_name: str, path: Path) -> str:
    """``<object>``, ``Per_<object>`` or ``<prefix>_Per_<object>`` / ``<prefix>_<object>``."""
    pattern = re.compile(rf"^(?:.*_)?(?:per_)?{re.escape(object_name.lower())}$")
    exact = [t for t in tables if t.lower() in (object_name.lower(), f"per_{object_name.lower()}")]
    found = exact or [t for t in tables if pattern.match(t.lower())]
    if not found:
        raise MorphotypeInputError(
            f"{path}: no {object_name} table; expected a table named {object_name}, Per_{object_name} or "
            f"<prefix>_Per_{object_name} (tables: {sorted(tables)})")
    if len(found) > 1:
        raise MorphotypeInputError(f"{path}: several {object_name} tables {found}; keep one experiment per file")
    return found[0]


def _image_frame(con, relation: str, where: str, distinct: bool = False) -> pd.DataFrame:
    """Standard image table from a relation that has the image keys and metadata."""
    columns = _describe(con, relation)
    number = _require(columns, ["ImageNumber", "Metadata_ImageNumber"], where, "image number")
    table_number = _first(columns, ["TableNumber", "Metadata_TableNumber"])
    well = _require(columns, ["Metadata_Well", "Image_Metadata_Well", "Metadata_well_position"], where, "well")
    plate = _first(columns, ["Metadata_Plate", "Image_Metadata_Plate"])
    site = _first(columns, ["Metadata_Site", "Image_Metadata_Site", "Metadata_Field", "Image_Metadata_Field"])
    # a joined (per-cell) table keeps only image-level metadata, or images would repeat per cell
    metadata = [c for c in columns if ("Metadata_" in c and not distinct or c.startswith("Image_Metadata_"))
                and c not in (number, table_number, well, plate, site)]
    select = [f"CAST({_quote(table_number)} AS VARCHAR) AS TableNumber" if table_number else "'' AS TableNumber",
              f"CAST({_quote(number)} AS BIGINT) AS ImageNumber",
              f"CAST({_quote(well)} AS VARCHAR) AS Metadata_Well",
              f"CAST({_quote(plate)} AS VARCHAR) AS Metadata_Plate" if plate else "NULL AS Metadata_Plate",
              f"CAST({_quote(site)} AS VARCHAR) AS Metadata_Site" if site else "'1' AS Metadata_Site"]
    select += [f"{_quote(c)} AS {_quote(c.removeprefix('Image_'))}" for c in metadata
               if c.removeprefix("Image_") not in ("Metadata_Well", "Metadata_Plate", "Metadata_Site")]
    images = con.execute(f"SELECT {'DISTINCT ' if distinct else ''}{', '.join(select)} FROM {relation}").df()
    images = images.loc[:, ~images.columns.duplicated()]
    wells = images["Metadata_Well"].map(normalise_well)
    bad = images.loc[wells.isna(), "Metadata_Well"]
    if len(bad):
        raise MorphotypeInputError(f"{where}: column {well}: {bad.iloc[0]!r} is not a well name (expected e.g. A01)")
    images["Metadata_Well"] = wells
    repeated = images[images.duplicated(["TableNumber", "ImageNumber"], keep=False)]
    if len(repeated):
        raise MorphotypeInputError(
            f"{where}: image rows are not unique per (TableNumber, ImageNumber), e.g. "
            f"{repeated.iloc[0][['TableNumber', 'ImageNumber']].to_dict()}")
    return images


def _feature_map(columns: Sequence[str], prefix: str, nuclei_object: str, dna_stain: str,
                 exclude: Sequence[str]) -> dict[str, str]:
    """Model name -> input column for the nuclei feature columns (``prefix`` added first)."""
    mapped: dict[str, str] = {}
    for column in columns:
        if column in exclude:
            continue
        name = map_feature_name(f"{prefix}{column}", nuclei_object, dna_stain)
        if name is None:
            continue
        if name in mapped and name != f"{prefix}{column}":
            continue  # an input already named like the model (e.g. both _DNA and _DAPI): keep it
        mapped[name] = column
    return mapped


def open_cellprofiler(path: str | os.PathLike, *, nuclei_object: str = MODEL_OBJECT,
                      dna_stain: str = MODEL_STAIN) -> CellTable:
    """Open a CellProfiler SQLite, CytoTable Parquet or ExportToSpreadsheet folder (see module)."""
    path = Path(path)
    if path.is_dir():
        return _open_csv_folder(path, nuclei_object, dna_stain)
    if not path.is_file():
        raise MorphotypeInputError(f"{path}: no such file or folder (expected a CellProfiler SQLite, "
                                   "a CytoTable Parquet or a folder of ExportToSpreadsheet CSVs)")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _open_parquet(path, nuclei_object, dna_stain)
    with open(path, "rb") as handle:
        magic = handle.read(16)
    if magic.startswith(b"PAR1"):
        return _open_parquet(path, nuclei_object, dna_stain)
    if not magic.startswith(b"SQLite format 3"):
        raise MorphotypeInputError(f"{path}: not a SQLite database or Parquet file (expected CellProfiler output)")
    return _open_sqlite(path, nuclei_object, dna_stain)


def _open_sqlite(path: Path, nuclei_object: str, dna_stain: str) -> CellTable:
    import duckdb

    con = _duckdb(path)
    try:
        con.execute("LOAD sqlite")
        con.execute(f"ATTACH {_literal(str(path))} AS plate (TYPE sqlite, READ_ONLY)")
        tables = [name for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'plate'").fetchall()]
    except duckdb.Error as error:
        con.close()
        raise MorphotypeInputError(f"{path}: cannot be read as SQLite ({error})") from error
    try:
        image = _find_table(tables, "Image", path)
        nuclei = _find_table(tables, nuclei_object, path)
        images = _image_frame(con, f"plate.{_quote(image)}", f"{path}: table {image}")
        columns = _describe(con, f"plate.{_quote(nuclei)}")
        where = f"{path}: table {nuclei}"
        number = _require(columns, ["ImageNumber"], where, "image number")
        obj = _require(columns, ["ObjectNumber", f"{nuclei_object}_Number_Object_Number"], where, "object number")
        table_number = "TableNumber" if "TableNumber" in columns and (images["TableNumber"] != "").any() else None
        if table_number is None:  # the key is (TableNumber, ImageNumber) only when both tables have it
            images["TableNumber"] = ""
        features = _feature_map(columns, "", nuclei_object, dna_stain, exclude=[obj])
    except MorphotypeInputError:
        con.close()
        raise
    return CellTable(str(path), "sqlite", images, f"{path}: table {nuclei}", features, con,
                     f"plate.{_quote(nuclei)}", (_quote(table_number) if table_number else "''",
                                                 _quote(number), _quote(obj)))


def _open_parquet(path: Path, nuclei_object: str, dna_stain: str) -> CellTable:
    import duckdb

    con = _duckdb(path)
    relation = f"read_parquet({_literal(str(path))})"
    try:
        columns = _describe(con, relation)
    except duckdb.Error as error:
        con.close()
        raise MorphotypeInputError(f"{path}: cannot be read as Parquet ({error})") from error
    where = f"{path}"
    try:
        images = _image_frame(con, relation, where, distinct=True)
        number = _require(columns, ["ImageNumber", "Metadata_ImageNumber"], where, "image number")
        obj = _require(columns, [f"Metadata_{nuclei_object}_Number_Object_Number", "Metadata_ObjectNumber",
                                 f"{nuclei_object}_Number_Object_Number", "ObjectNumber"], where, "object number")
        table_number = _first(columns, ["TableNumber", "Metadata_TableNumber"])
        features = _feature_map(columns, "", nuclei_object, dna_stain, exclude=[obj])
    except MorphotypeInputError:
        con.close()
        raise
    return CellTable(str(path), "parquet", images, str(path), features, con, relation,
                     (_quote(table_number) if table_number else "''", _quote(number), _quote(obj)))


def _open_csv_folder(path: Path, nuclei_object: str, dna_stain: str) -> CellTable:
    csvs = {p.stem: p for p in sorted(path.glob("*.csv"))}
    image = _find_table(list(csvs), "Image", path)
    nuclei = _find_table(list(csvs), nuclei_object, path)
    con = _duckdb(path)
    try:
        def relation(name: str) -> str:
            return f"read_csv({_literal(str(csvs[name]))}, header=true, sample_size=-1)"

        images = _image_frame(con, relation(image), str(csvs[image]))
        columns = _describe(con, relation(nuclei))
        where = str(csvs[nuclei])
        number = _require(columns, ["ImageNumber"], where, "image number")
        obj = _require(columns, ["ObjectNumber", "Number_Object_Number"], where, "object number")
        # ExportToSpreadsheet leaves the object name out of the column names
        features = _feature_map([c for c in columns if c not in (number, obj)], f"{nuclei_object}_",
                                nuclei_object, dna_stain, exclude=[])
    except MorphotypeInputError:
        con.close()
        raise
    return CellTable(str(path), "csv", images, where, features, con, relation(nuclei),
                     ("''", _quote(number), _quote(obj)))


def features_of(path: str | os.PathLike, *, nuclei_object: str = MODEL_OBJECT,
                dna_stain: str = MODEL_STAIN) -> set[str]:
    """The model-convention names of the nuclei features an input has (any layout, or a plain Parquet)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path).names
        except Exception as error:  # pyarrow raises several kinds for a bad file
            raise MorphotypeInputError(f"{path}: cannot be read as Parquet ({error})") from error
        return {name for c in columns if (name := map_feature_name(c, nuclei_object, dna_stain)) is not None}
    table = open_cellprofiler(path, nuclei_object=nuclei_object, dna_stain=dna_stain)
    table.close()
    return set(table.features)


def restrict_to_features_of(table: pd.DataFrame, target: str | os.PathLike, *, nuclei_object: str = MODEL_OBJECT,
                            dna_stain: str = MODEL_STAIN) -> pd.DataFrame:
    """Drop the CellProfiler nucleus features of ``table`` that ``target`` lacks (``train --features-of``)."""
    from morphotype.models import _is_cp

    available = features_of(target, nuclei_object=nuclei_object, dna_stain=dna_stain)
    dropped = [c for c in table.columns if _is_cp(c) and c not in available]
    kept = [c for c in table.columns if _is_cp(c) and c in available]
    if not kept:
        raise MorphotypeInputError(f"{target}: has none of the training table's nucleus features "
                                   "(check --nuclei-object and --dna-stain)")
    log.info("--features-of %s: training on %d features, %d the target lacks left out", target, len(kept),
             len(dropped))
    return table.drop(columns=dropped)
