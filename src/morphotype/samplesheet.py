"""Samplesheets: one CSV row per image (and annotated nucleus), validated against
``assets/schema_input.json`` — the same schema the Nextflow pipeline validates with.

Columns: ``image`` (path or URL), ``plate``, ``well``, ``site``, ``frame`` and optionally
``phenotype``, ``x``, ``y`` (annotated nucleus centre in that image's pixels) and ``control``.
Extra columns are kept and become ``Metadata_<Column>`` in the single-cell table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import lru_cache
from pathlib import Path

import pandas as pd
from jsonschema import Draft202012Validator

from morphotype.io import MorphotypeInputError, asset_path, read_image, write_table

log = logging.getLogger(__name__)

URL_SCHEMES = ("http://", "https://", "ftp://", "s3://")
KEY_COLUMNS = ["image", "x", "y"]  # a duplicated row repeats the same image and annotation


@lru_cache(maxsize=1)
def input_schema() -> dict:
    return json.loads(asset_path("schema_input.json").read_text())


def is_url(location: str) -> bool:
    return str(location).startswith(URL_SCHEMES)


def _cast(value: str, types: list[str]) -> object:
    """Cast a CSV string to the first schema type it parses as (like nf-schema does)."""
    for kind in types:
        try:
            if kind == "integer":
                number = float(value)
                if number.is_integer() and re.fullmatch(r"[+-]?\d+(\.0*)?", value.strip()):
                    return int(number)
            elif kind == "number":
                return float(value)
            elif kind == "string":
                return value
        except ValueError:
            continue
    return value


def _describe_error(error, row_number: int, path: Path, properties: dict) -> str:
    column = error.path[0] if error.path else None
    if error.validator == "required":
        missing = re.findall(r"'([^']+)' is a required property", error.message)
        column = missing[0] if missing else column
        return f"{path}, row {row_number}: missing required column {column!r}"
    if error.validator == "dependentRequired":
        return f"{path}, row {row_number}: {error.message}"
    hint = properties.get(column, {}).get("errorMessage", "")
    value = error.instance
    return f"{path}, row {row_number}, column {column!r}: {value!r} is not valid ({hint or error.message})"


def read_samplesheet(path: str | Path, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a samplesheet; raise :class:`MorphotypeInputError` listing every problem.

    Returns a data frame with typed columns plus ``file_id``, a stable, unique, file-name-safe
    id per distinct image file (its stem, with a short hash where stems collide), and
    ``image_id``, the biological image ``<plate>_<well>_<site>_<frame>`` that held-out-image
    evaluation groups by (several crops can come from one image).
    Relative local image paths are resolved against the current directory (as Nextflow does
    against its launch directory).
    """
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: samplesheet does not exist")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    schema = input_schema()
    item_schema = schema["items"]
    properties = item_schema["properties"]
    header_missing = [c for c in item_schema["required"] if c not in raw.columns]
    if header_missing:
        raise MorphotypeInputError(
            f"{path}: missing required column(s) {header_missing}; found columns {list(raw.columns)}"
        )
    validator = Draft202012Validator(item_schema)
    errors: list[str] = []
    records: list[dict] = []
    for index, row in raw.iterrows():
        row_number = index + 2  # 1-based, after the header line: what a spreadsheet shows
        record = {}
        for column, value in row.items():
            value = value.strip()
            if value == "":
                continue
            types = properties.get(column, {}).get("type", "string")
            record[column] = _cast(value, types if isinstance(types, list) else [types])
        for error in sorted(validator.iter_errors(record), key=lambda e: list(e.path)):
            errors.append(_describe_error(error, row_number, path, properties))
        if check_files and "image" in record and not is_url(record["image"]):
            if not Path(str(record["image"]).split("#", 1)[0]).exists():  # "#frame=t" addresses a movie frame
                errors.append(f"{path}, row {row_number}, column 'image': file {record['image']!r} does not exist")
        records.append(record)
    table = pd.DataFrame.from_records(records, columns=list(raw.columns))
    for column in ("x", "y"):
        if column not in table.columns:
            table[column] = float("nan")
    duplicated = table.duplicated(KEY_COLUMNS, keep="first")
    for index in table.index[duplicated]:
        errors.append(
            f"{path}, row {index + 2}: duplicates an earlier row (same image, x, y: "
            f"{table.at[index, 'image']!r}, {table.at[index, 'x']}, {table.at[index, 'y']})"
        )
    if errors:
        raise MorphotypeInputError("invalid samplesheet:\n  " + "\n  ".join(errors))
    table["image"] = [loc if is_url(loc) else str(Path(loc).resolve()) for loc in table["image"]]
    table["well"] = table["well"].astype(str)
    table["file_id"] = file_ids(table["image"])
    table["image_id"] = (
        table["plate"].astype(str) + "_" + table["well"] + "_" + table["site"].astype(str) + "_" + table["frame"].astype(str)
    )
    log.info("read samplesheet %s: %d rows, %d image files", path, len(table), table["file_id"].nunique())
    return table


def file_ids(locations: pd.Series) -> pd.Series:
    """A file-name-safe id per distinct image location: the stem, plus a hash where stems collide."""
    unique = pd.Series(locations.unique())
    stems = unique.map(lambda loc: re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(loc).split("?")[0]).stem))
    collide = stems.duplicated(keep=False)
    hashed = unique.map(lambda loc: hashlib.sha1(str(loc).encode()).hexdigest()[:8])
    ids = stems.where(~collide, stems + "-" + hashed)
    return locations.map(dict(zip(unique, ids)))


def from_mitocheck_crops(crops_dir: str | Path) -> pd.DataFrame:
    """Samplesheet for a folder laid out like the shared MitoCheck crops.

    The folder holds one sub-folder per phenotype and ``manifest.csv`` with columns
    ``phenotype,file,plate,well,field,frame,x,y``. Each crop is centred on its annotated
    nucleus, so the annotation is the crop centre; the original frame coordinates are kept
    as ``frame_x``/``frame_y``.
    """
    crops_dir = Path(crops_dir)
    manifest_path = crops_dir / "manifest.csv"
    if not manifest_path.exists():
        raise MorphotypeInputError(f"{crops_dir}: no manifest.csv (expected class folders + manifest.csv)")
    manifest = pd.read_csv(manifest_path)
    expected = ["phenotype", "file", "plate", "well", "field", "frame", "x", "y"]
    missing = [c for c in expected if c not in manifest.columns]
    if missing:
        raise MorphotypeInputError(f"{manifest_path}: missing column(s) {missing}; expected {expected}")
    images = [crops_dir / phenotype / name for phenotype, name in zip(manifest["phenotype"], manifest["file"])]
    missing_files = [(i + 2, str(p)) for i, p in enumerate(images) if not p.exists()]
    if missing_files:
        row, name = missing_files[0]
        raise MorphotypeInputError(
            f"{manifest_path}, row {row}: crop {name} does not exist ({len(missing_files)} missing in all)"
        )
    centre = _crop_centre(images[0]) if images else (0.0, 0.0)
    sheet = pd.DataFrame(
        {
            "image": [str(p.resolve()) for p in images],
            "plate": manifest["plate"].astype(str),
            "well": manifest["well"],
            "site": manifest["field"],
            "frame": manifest["frame"],
            "phenotype": manifest["phenotype"],
            "x": centre[0],
            "y": centre[1],
            "frame_x": manifest["x"],
            "frame_y": manifest["y"],
        }
    )
    return sheet


def _crop_centre(image_path: Path) -> tuple[float, float]:
    """The annotated point of a crop cut as image[y-h/2:y+h/2, x-w/2:x+w/2]."""
    height, width = read_image(image_path).shape
    return float(width // 2), float(height // 2)


def write_samplesheet(sheet: pd.DataFrame, path: str | Path) -> Path:
    return write_table(sheet, Path(path))
