"""Stream the movie frames of a samplesheet into local TIFF frames: :func:`stream_frames`.

Steps: plan (which movies, which frames; :func:`_plan`), look in the cache (:func:`_movies_to_fetch`),
fetch what is missing (OME-Zarr and local movies plane by plane, :func:`_read_direct_movies`;
remote CellH5 movies downloaded whole in scratch batches, :func:`_download_movies`), write the
output frames (:func:`_write_frames`) and rewrite the samplesheet (:func:`_rewritten_sheet`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from morphotype.download import (
    ByteCounter,
    DownloadError,
    FetchOptions,
    SourceError,
    download,
    md5_for,
)
from morphotype.idr.cache import (
    MovieRequest,
    frame_path,
    missing_planes,
    planes_dir,
    store_planes,
    write_frame,
)
from morphotype.idr.movies import (
    MovieInfo,
    _check_plane_index,
    _ome_zarr_info,
    _open_ome_zarr,
    _read_zarr_plane,
    _retry,
    movie_format,
    read_cellh5,
)
from morphotype.idr.screen import split_frame_location
from morphotype.io import MorphotypeInputError

log = logging.getLogger(__name__)

FETCH_ERRORS = (SourceError, DownloadError)  # what makes one movie fail (skipped with on_error="skip")


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
class _Stream:
    """One call of :func:`stream_frames`: its settings, what it did, the movies that failed."""

    cache_dir: Path
    scratch: Path
    variant: str
    channel: int
    z: int
    options: FetchOptions
    md5: dict[str, str] | None
    on_error: str
    stats: StreamStats = field(default_factory=StreamStats)
    failed: set[str] = field(default_factory=set)
    counter: ByteCounter = field(default_factory=ByteCounter)

    def fail(self, movie: MovieRequest, error: Exception) -> None:
        """Raise ``error``, or (``on_error="skip"``) record the movie as failed."""
        if self.on_error == "raise":
            raise error
        log.error("skipping movie %s: %s", movie.location, error)
        self.failed.add(movie.location)
        self.stats.failed.append({"movie": movie.location, "plate": movie.plate, "well": movie.well,
                                  "error": str(error)})

    def store(self, movie: MovieRequest, planes: dict[int, np.ndarray], info: MovieInfo) -> None:
        self.stats.planes_fetched += store_planes(movie, planes, info, self.channel, self.z)
        self.stats.movies_fetched += 1


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
    column) get ``image`` = :func:`~morphotype.idr.cache.frame_path` of the ``variant`` (``ic``:
    BaSiC-corrected uint8 from three neighbouring frames; ``no_ic``: the raw plane) and
    ``source`` = the original location; other rows pass unchanged.

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
    cache_dir = Path(cache_dir).resolve()  # the returned samplesheet holds absolute paths
    job = _Stream(cache_dir, Path(scratch_dir) if scratch_dir is not None else cache_dir / ".scratch", variant,
                  channel, z, options or FetchOptions(), md5, on_error)
    movies, row_movie, row_frame = _plan(sheet, cache_dir)
    job.stats.movies = len(movies)
    _fetch_movies(job, _movies_to_fetch(job, movies))
    _write_frames(job, movies)
    out = _rewritten_sheet(job, sheet, row_movie, row_frame)
    stats = job.stats
    stats.seconds = time.perf_counter() - started
    log.info("streamed %d frames of %d movies (%d fetched, %d frames from cache, %.1f MB downloaded, "
             "peak scratch %.1f MB)",
             stats.frames_written, stats.movies, stats.movies_fetched, stats.frames_from_cache,
             stats.bytes_downloaded / 1e6, stats.peak_scratch_bytes / 1e6)
    return out, stats


# --- plan: which movies and frames -------------------------------------------------------------


def _row_frame(number: int, row) -> tuple[str, str, int] | None:
    """(movie location, format, frame) of a samplesheet row, or None when its image is no movie."""
    location, fragment = split_frame_location(row.image)
    fmt = movie_format(location)
    if fmt is None:
        return None
    if fragment is not None and int(row.frame) != fragment:
        raise MorphotypeInputError(f"samplesheet row {number}: image {row.image!r} addresses frame {fragment} "
                                   f"but the frame column says {row.frame}")
    return location, fmt, int(row.frame) if fragment is None else fragment


def _plan(sheet: pd.DataFrame, cache_dir: Path) -> tuple[dict[str, MovieRequest], list, list]:
    """The movies of ``sheet`` with their frames, and each row's (movie, frame) (None: not a movie)."""
    movies: dict[str, MovieRequest] = {}
    claimed: dict[tuple, str] = {}  # output frame -> movie: one frame file per plate/well/site/frame
    row_movie: list[str | None] = []
    row_frame: list[int | None] = []
    for number, row in enumerate(sheet.itertuples(index=False), start=2):
        parsed = _row_frame(number, row)
        location, fmt, frame = parsed if parsed is not None else (None, None, None)
        row_movie.append(location)
        row_frame.append(frame)
        if parsed is None:
            continue
        output = (str(row.plate), str(row.well), int(row.site), frame)
        if claimed.setdefault(output, location) != location:
            raise MorphotypeInputError(
                f"samplesheet row {number}: plate {output[0]}, well {output[1]}, site {output[2]}, frame {frame} "
                f"comes from two movies: {claimed[output]} and {location}"
            )
        if location not in movies:
            movies[location] = MovieRequest(location, fmt, str(row.plate), str(row.well), int(row.site), set(),
                                            planes_dir(cache_dir, str(row.plate), location))
        movies[location].frames.add(frame)
    return movies, row_movie, row_frame


def _movies_to_fetch(job: _Stream, movies: dict[str, MovieRequest]) -> list[MovieRequest]:
    """Drop the frames already in the cache; the movies that still miss planes (length from the cache)."""
    to_fetch = []
    for movie in movies.values():
        pending = {t for t in movie.frames if not movie.frame_path(job.cache_dir, job.variant, t).exists()}
        job.stats.frames_from_cache += len(movie.frames) - len(pending)
        movie.frames = pending
        if not pending:
            continue
        if movie.load_info() and not missing_planes(movie, job.variant, pending, job.channel, job.z):
            continue
        to_fetch.append(movie)
    return to_fetch


# --- fetch: read planes, or download whole movies in scratch batches ---------------------------


def _is_remote(location: str) -> bool:
    return urlsplit(location).scheme.lower() in ("http", "https", "ftp", "s3")


def _fetch_movies(job: _Stream, to_fetch: list[MovieRequest]) -> None:
    downloads = [m for m in to_fetch if m.format == "cellh5" and _is_remote(m.location)]
    direct = [m for m in to_fetch if m not in downloads]
    with tqdm(total=len(to_fetch), desc="fetch movies", unit="movie", disable=None) as progress:
        try:
            if direct:
                _read_direct_movies(job, direct, progress)
            if downloads:
                _download_movies(job, downloads, progress)
        finally:
            job.stats.bytes_downloaded = job.counter.value


def _read_planes(job: _Stream, movie: MovieRequest, path: str | Path) -> tuple[dict[int, np.ndarray], MovieInfo]:
    """Read the planes ``movie`` still needs from a local CellH5 file or an OME-Zarr location."""
    channel, z = job.channel, job.z
    if movie.format == "cellh5":
        where = {"plate": movie.plate, "well": movie.well, "site": movie.site, "channel": channel, "z": z,
                 "source": movie.location}
        _, movie.info = read_cellh5(path, [], **where)
        return read_cellh5(path, missing_planes(movie, job.variant, movie.frames, channel, z), **where)
    array, axes = _retry(lambda: _open_ome_zarr(str(path), job.options), movie.location, job.options)
    movie.info = info = _ome_zarr_info(movie.location, array, axes)
    needed = sorted(missing_planes(movie, job.variant, movie.frames, channel, z))
    _check_plane_index(info, needed, channel, z)
    planes = {t: _read_zarr_plane(array, axes, t, channel, z, movie.location, job.options) for t in needed}
    return planes, info


def _read_direct(job: _Stream, movie: MovieRequest):
    """(movie, (planes, info)) or (movie, the error that makes it fail)."""
    try:
        return movie, _read_planes(job, movie, movie.location.removeprefix("file://"))
    except FETCH_ERRORS as error:
        return movie, error


def _read_direct_movies(job: _Stream, movies: list[MovieRequest], progress) -> None:
    """OME-Zarr (local or remote) and local CellH5 movies: read the missing planes in place."""
    with ThreadPoolExecutor(job.options.workers) as pool:
        for movie, outcome in pool.map(functools.partial(_read_direct, job), movies):
            progress.update()
            if isinstance(outcome, Exception):
                job.fail(movie, outcome)
            else:
                job.store(movie, *outcome)


def _download_one(job: _Stream, movie: MovieRequest):
    """(movie, local path) or (movie, the error that makes it fail)."""
    dest = job.scratch / f"{movie.planes_dir.name}{Path(urlsplit(movie.location).path).suffix}"
    try:
        download(movie.location, dest, options=job.options, md5=md5_for(movie.location, job.md5),
                 counter=job.counter)
        return movie, dest
    except FETCH_ERRORS as error:
        return movie, error


def _download_movies(job: _Stream, movies: list[MovieRequest], progress) -> None:
    """Remote CellH5 movies: download a batch whole into scratch, extract its planes, empty scratch."""
    job.scratch.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(movies), job.options.batch_size):
        batch = movies[start : start + job.options.batch_size]
        with ThreadPoolExecutor(job.options.workers) as pool:
            results = list(pool.map(functools.partial(_download_one, job), batch))
        job.stats.peak_scratch_bytes = max(job.stats.peak_scratch_bytes, _tree_bytes(job.scratch))
        try:
            for movie, outcome in results:
                progress.update()
                _extract(job, movie, outcome)
        finally:
            _empty(job.scratch)


def _extract(job: _Stream, movie: MovieRequest, downloaded: Path | Exception) -> None:
    if isinstance(downloaded, Exception):
        job.fail(movie, downloaded)
        return
    try:
        planes, info = _read_planes(job, movie, downloaded)
    except SourceError as error:
        job.fail(movie, error)
        return
    job.store(movie, planes, info)


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


# --- output frames and the rewritten samplesheet -----------------------------------------------


def _write_frames(job: _Stream, movies: dict[str, MovieRequest]) -> None:
    todo = [(m, t) for m in movies.values() if m.location not in job.failed for t in sorted(m.frames)]
    for movie, t in tqdm(todo, desc=f"frames ({job.variant})", unit="frame", disable=None):
        write_frame(movie, t, job.cache_dir, job.variant, job.channel, job.z)
        job.stats.frames_written += 1


def _rewritten_sheet(job: _Stream, sheet: pd.DataFrame, row_movie: list, row_frame: list) -> pd.DataFrame:
    """``sheet`` with movie frames replaced by the local frames; rows of failed movies dropped."""
    out = sheet.copy()
    sources = out["image"].astype(str).to_numpy()
    images = []
    keep = []
    for location, frame, row in zip(row_movie, row_frame, out.itertuples(index=False)):
        keep.append(location not in job.failed)
        if location is None:
            images.append(row.image)
        else:
            images.append(str(frame_path(job.cache_dir, job.variant, str(row.plate), str(row.well), int(row.site),
                                         frame)))
    out["image"] = images
    out["frame"] = [f if f is not None else old for f, old in zip(row_frame, out["frame"])]
    out["source"] = sources
    out["illumination"] = [job.variant if m is not None else "" for m in row_movie]
    return out[keep].reset_index(drop=True)
