"""The frame cache of :func:`morphotype.idr.stream_frames`: where planes and frames live on disk.

Layout under the cache directory:

- ``planes/<plate>/<movie stem>-<sha1 of its location>/``: the raw planes extracted from a movie
  (``t<t>_c<c>_z<z>.tiff``) and ``movie.json`` (its :class:`~morphotype.idr.movies.MovieInfo`);
  never whole movies.
- ``frames/<variant>/<plate>/<plate>_<well>_<site>_<frame>.tiff``: the output frames
  (:func:`frame_path`), ``ic`` (BaSiC-corrected from three neighbouring planes) or ``no_ic``.

A frame already there is reused; a plane already there is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import numpy as np

from morphotype.idr.movies import MovieInfo
from morphotype.io import atomic_path


@dataclass
class MovieRequest:
    """One movie of a samplesheet, the frames asked of it and where its planes are cached."""

    location: str
    format: str
    plate: str
    well: str
    site: int
    frames: set[int]
    planes_dir: Path
    info: MovieInfo | None = None

    def frame_path(self, cache_dir: Path, variant: str, t: int) -> Path:
        return frame_path(cache_dir, variant, self.plate, self.well, self.site, t)

    def load_info(self) -> bool:
        """Read the cached :class:`MovieInfo`, if the movie was opened before; whether it was."""
        info_path = self.planes_dir / "movie.json"
        if info_path.exists():
            self.info = MovieInfo.from_json(info_path.read_text())
        return self.info is not None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))


def planes_dir(cache_dir: Path, plate: str, location: str) -> Path:
    """The folder of the planes of the movie at ``location``."""
    name = Path(urlsplit(location).path.rstrip("/") if "://" in location else location.rstrip("/")).stem
    digest = hashlib.sha1(location.encode()).hexdigest()[:10]
    return cache_dir / "planes" / _safe(plate) / f"{_safe(name)}-{digest}"


def plane_path(planes_dir: Path, t: int, channel: int, z: int) -> Path:
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


def needed_planes(movie: MovieRequest, variant: str, frames: Iterable[int]) -> set[int]:
    """The planes that frames ``frames`` of ``variant`` are made from (``ic``: each frame's window)."""
    from morphotype.illumination import context_window

    needed = set()
    for t in frames:
        if variant == "ic":
            needed.update(context_window(t, movie.info.n_frames)[0])
        else:
            needed.add(t)
    return needed


def missing_planes(movie: MovieRequest, variant: str, frames: Iterable[int], channel: int, z: int) -> set[int]:
    """:func:`needed_planes` not yet in the cache."""
    needed = needed_planes(movie, variant, frames)
    return {t for t in needed if not plane_path(movie.planes_dir, t, channel, z).exists()}


def store_planes(movie: MovieRequest, planes: dict[int, np.ndarray], info: MovieInfo, channel: int, z: int) -> int:
    """Cache ``planes`` (and the movie's info); returns how many were written."""
    movie.info = info
    movie.planes_dir.mkdir(parents=True, exist_ok=True)
    info_path = movie.planes_dir / "movie.json"
    if not info_path.exists():
        with atomic_path(info_path) as tmp:
            tmp.write_text(info.to_json())
    for t, plane in planes.items():
        _write_tiff(plane_path(movie.planes_dir, t, channel, z), plane)
    return len(planes)


def write_frame(movie: MovieRequest, t: int, cache_dir: Path, variant: str, channel: int, z: int) -> Path:
    """Make output frame ``t`` from the cached planes: the raw plane, or its BaSiC-corrected window."""
    from morphotype.illumination import context_window, correct_window

    out = movie.frame_path(cache_dir, variant, t)
    if variant == "no_ic":
        plane = plane_path(movie.planes_dir, t, channel, z)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            tmp.unlink()
            try:
                os.link(plane, tmp)  # the raw plane as it is: share the bytes when the disk allows
            except OSError:
                shutil.copyfile(plane, tmp)
        return out
    indices, position = context_window(t, movie.info.n_frames)
    stack = np.stack([_read_tiff(plane_path(movie.planes_dir, i, channel, z)) for i in indices])
    _write_tiff(out, correct_window(stack, position))
    return out
