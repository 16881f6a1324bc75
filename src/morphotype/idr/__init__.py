"""Stream MitoCheck movies (IDR idr0013, screen A) into local frames.

The screen's plates, wells, movie URLs and their tables: :mod:`~morphotype.idr.screen`.

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
extracted, so a re-run with the same cache directory fetches nothing. Whole files are fetched by
:mod:`morphotype.download` (HTTP(S), FTP, S3: retries, resume, size and MD5 checks); OME-Zarr
uses ``zarr`` 3 over ``fsspec``/``aiohttp``.

Layout
------
- :mod:`~morphotype.idr.screen`: the idr0013 tables, well numbering, movie URLs, samplesheets.
- :mod:`~morphotype.idr.movies`: CellH5 and OME-Zarr readers and writers.
- :mod:`~morphotype.idr.cache`: where planes and frames are cached.
- :mod:`~morphotype.idr.stream`: :func:`stream_frames`.
"""

from morphotype.download import (
    DownloadError,
    DownloadResult,
    FetchOptions,
    SourceError,
    download,
    read_md5_table,
)
from morphotype.idr.cache import frame_path
from morphotype.idr.movies import (
    MOVIE_FORMATS,
    MovieInfo,
    cellh5_image_path,
    movie_format,
    read_cellh5,
    read_ome_zarr,
    write_cellh5,
    write_ome_zarr,
)
from morphotype.idr.screen import (
    ASSETS,
    CONTROL_FRAME_RANGE,
    CONTROL_TYPES,
    DEFAULT_BASE_URL,
    EXCLUDED_WELLS,
    FTP_BASE_URL,
    IDR0013_MOVIES_PATH,
    SAMPLESHEET_COLUMNS,
    WELL_COLUMNS,
    control_samplesheet,
    derive_idr0013_assets,
    draw_control_frame,
    frame_location,
    idr_samplesheet,
    labelled_samplesheet,
    movie_url,
    movie_urls,
    read_control_wells,
    read_labelled_cells,
    read_plates,
    split_frame_location,
    well_name,
    well_number,
)
from morphotype.idr.stream import StreamStats, stream_frames

__all__ = [
    "ASSETS", "CONTROL_FRAME_RANGE", "CONTROL_TYPES", "DEFAULT_BASE_URL", "EXCLUDED_WELLS", "FTP_BASE_URL",
    "IDR0013_MOVIES_PATH", "MOVIE_FORMATS", "SAMPLESHEET_COLUMNS", "WELL_COLUMNS",
    "DownloadError", "DownloadResult", "FetchOptions", "MovieInfo", "SourceError", "StreamStats",
    "cellh5_image_path", "control_samplesheet", "derive_idr0013_assets", "download", "draw_control_frame",
    "frame_location", "frame_path", "idr_samplesheet", "labelled_samplesheet", "movie_format", "movie_url",
    "movie_urls", "read_cellh5", "read_control_wells", "read_labelled_cells", "read_md5_table",
    "read_ome_zarr", "read_plates", "split_frame_location", "stream_frames", "well_name", "well_number",
    "write_cellh5", "write_ome_zarr",
]
