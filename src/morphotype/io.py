"""Reading and writing: atomic writes, Parquet tables, images, asset lookup."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile

from morphotype.columns import CELL_ID

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class MorphotypeInputError(ValueError):
    """Bad user input: names the file, the row or column, and what was expected."""


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``assets/`` (installed with the package)."""
    path = ASSETS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"asset {name!r} not found in {ASSETS_DIR}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file: on error the temporary file is removed
    and any previous ``path`` stays untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600 files; give the final file normal permissions
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_path` left in ``folder`` when a run was killed.

    Call it when a step starts writing into a folder that no other process writes into.
    """
    folder = Path(folder)
    stale = [path for path in folder.glob(".*.tmp") if path.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a data frame atomically as Parquet (or CSV when the suffix is .csv)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Parquet or CSV table, with an error naming the file when it is unreadable."""
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: file does not exist")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, low_memory=False)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:  # write_table writes a frame without columns as a bare newline
        return pd.DataFrame()
    except Exception as error:  # pyarrow/pandas raise many types; name the file either way
        raise MorphotypeInputError(f"{path}: cannot be read as a table ({error})") from error


def read_image(path: str | os.PathLike, channel: int | None = None) -> np.ndarray:
    """Read one 2-D image (PNG, TIFF, ...) as a numpy array: the one image reader of the package.

    The channel rule: a single-channel image is returned as it is. A multi-channel image (RGB or
    RGBA, channels last) needs ``channel`` (0-based) to say which channel holds the nuclei, unless
    its colour channels are equal (a grey image saved as RGB), which is read as that grey image.
    Any other shape is an error naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: image file does not exist")
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            image = tifffile.imread(path)
        else:
            image = iio.imread(path)
    except Exception as error:  # imageio and tifffile raise many types; name the file either way
        raise MorphotypeInputError(f"{path}: cannot be read as an image ({error})") from error
    image = np.squeeze(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        if channel is not None:
            if not 0 <= channel < image.shape[-1]:
                raise MorphotypeInputError(f"{path}: channel {channel} asked for, the image has {image.shape[-1]}")
            image = image[..., channel]
        elif np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            image = image[..., 0]  # grey saved as RGB(A)
        else:
            raise MorphotypeInputError(f"{path}: an RGB image whose channels differ; name the channel that holds "
                                       "the nuclei")
    elif channel not in (None, 0):
        raise MorphotypeInputError(f"{path}: channel {channel} asked for, the image has one channel")
    if image.ndim != 2:
        raise MorphotypeInputError(f"{path}: expected a 2-D single-channel image, got shape {image.shape}")
    _check_pixels(image, path)
    return image


def _check_pixels(image: np.ndarray, path: Path) -> None:
    """The pixel values the features can measure: uint8, uint16, or finite floats in [0, 1].

    Checked where an image is first read, so a bad image stops segmentation, not features.
    """
    if image.dtype in (np.uint8, np.uint16):
        return
    if not np.issubdtype(image.dtype, np.floating):
        raise MorphotypeInputError(f"{path}: pixel type {image.dtype} is not supported "
                                   "(expected uint8, uint16 or floating point in [0, 1])")
    finite = np.isfinite(image)
    if not finite.all():
        raise MorphotypeInputError(f"{path}: {int((~finite).sum())} pixel(s) are NaN or infinite")
    if image.size and (image.min() < 0 or image.max() > 1):
        raise MorphotypeInputError(f"{path}: floating-point pixels must lie in [0, 1], got "
                                   f"{float(image.min()):.4g} to {float(image.max()):.4g}")


def write_mask(labels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an integer label image as a compressed TIFF, atomically."""
    path = Path(path)
    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib")
    return path


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image written by :func:`write_mask`."""
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: mask file does not exist")
    return tifffile.imread(path).astype(np.int32)


def merge_tables(paths: list[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Concatenate tables with identical columns, in the given order, into ``out``.

    Used to gather per-batch outputs; refuses tables whose columns differ and duplicated
    ``Metadata_CellID`` values, naming the offending file.
    """
    tables = []
    for path in paths:
        table = read_table(path)
        reference = next((t for t in tables if len(t)), None)  # empty tables may lack columns
        if reference is not None and len(table) and list(table.columns) != list(reference.columns):
            raise MorphotypeInputError(
                f"{path}: columns differ from an earlier table "
                f"(extra {sorted(set(table.columns) - set(reference.columns))}, "
                f"missing {sorted(set(reference.columns) - set(table.columns))})"
            )
        tables.append(table)
    non_empty = [t for t in tables if len(t)] or tables[:1]
    merged = pd.concat(non_empty, ignore_index=True)
    if CELL_ID in merged.columns:
        duplicated = merged[CELL_ID][merged[CELL_ID].duplicated()]
        if len(duplicated):
            raise MorphotypeInputError(f"duplicated {CELL_ID} across inputs, e.g. {duplicated.iloc[0]!r}")
    write_table(merged, out)
    return merged
