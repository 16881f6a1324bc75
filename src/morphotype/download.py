"""Fetch one file from HTTP(S), FTP, S3 or a local path, robustly: the package's one downloader.

Used by the IDR movie stream (:mod:`morphotype.idr`) and the JUMP plates (:mod:`morphotype.jump`).

- HTTP(S) through ``requests``: connect/read timeouts, resume with ``Range``, ``Content-Length``
  check. FTP through the standard library's ``ftplib``: ``REST`` resume, ``SIZE`` check.
- ``s3://bucket/key`` is read anonymously over HTTPS (``https://bucket.s3.amazonaws.com/key``,
  or ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` path-style), which is how the public
  buckets this package reads (Cell Painting Gallery) are served; it needs no S3 client and gets
  the same resume and retries as any HTTPS file.
- Optional MD5 check; a mismatch is downloaded once more from scratch, then reported.
- Retries with exponential back-off catch only network and server trouble (:func:`is_transient`:
  connection errors, timeouts, HTTP 5xx / 408 / 425 / 429, truncated bodies, FTP 4xx replies).
  Anything else, a coding error included, surfaces at once from the first attempt.

Errors: :class:`SourceError` (bad input, exit 2) when the source does not exist, is refused or is
corrupt; :class:`DownloadError` (exit 1) when transient failures outlast the retries; a
malformed or unsupported URL is a :class:`~morphotype.io.MorphotypeInputError`.
"""

from __future__ import annotations

import asyncio
import ftplib
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, TypeVar
from urllib.parse import quote, unquote, urlsplit

from morphotype.io import MorphotypeInputError

log = logging.getLogger(__name__)

T = TypeVar("T")

REMOTE_SCHEMES = ("http", "https", "ftp", "s3")
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429})  # and every 5xx


class SourceError(MorphotypeInputError):
    """A source is missing, refused or corrupt; the message names its URL or path."""


class DownloadError(OSError):
    """A source could not be fetched within the retries; the message names its URL and the last error."""


@dataclass(frozen=True)
class FetchOptions:
    """How sources are fetched.

    timeout: seconds to connect and between bytes received; retries: further attempts after
    the first; backoff: first wait in seconds, doubled after each failure up to max_backoff;
    chunk_bytes: read size. For callers that fetch many files (:func:`morphotype.idr.stream_frames`):
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


class ByteCounter:
    """Bytes received, summed over threads."""

    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


class TransferIncomplete(Exception):
    """A transfer ended before the announced size, or its checksum failed once: fetch again."""


# --- which failures are worth another attempt --------------------------------------------------


@functools.lru_cache(maxsize=None)
def _library_transient_types() -> tuple[type, ...]:
    """Connection, timeout and truncation errors of the HTTP libraries (imported when needed)."""
    import http.client

    import aiohttp
    import requests
    import urllib3

    return (
        requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, urllib3.exceptions.IncompleteRead,
        http.client.IncompleteRead, http.client.RemoteDisconnected,
        aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
    )


def _transient_status(status: int | None) -> bool:
    return status is not None and (status >= 500 or status in TRANSIENT_HTTP_STATUS)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is network or server trouble that another attempt may not meet.

    Connection errors, timeouts, truncated bodies, HTTP 5xx / 408 / 425 / 429 and FTP temporary
    (4xx) replies are; everything else (missing or refused sources, malformed URLs, full disks,
    coding errors) is not.
    """
    import aiohttp
    import requests

    if isinstance(error, requests.HTTPError):
        return _transient_status(getattr(error.response, "status_code", None))
    if isinstance(error, aiohttp.ClientResponseError):
        return _transient_status(error.status)
    transient = (TransferIncomplete, ConnectionError, TimeoutError, socket.gaierror, ftplib.error_temp, EOFError)
    return isinstance(error, transient + _library_transient_types())


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _failed(what: str, attempts: int, error: BaseException) -> DownloadError:
    return DownloadError(f"{what} failed after {attempts} attempt{'s' * (attempts > 1)} ({_one_line(error)})")


def _log_retry(what: str, attempt: int, error: BaseException, options: FetchOptions) -> None:
    log.warning("%s: attempt %d failed (%s); retrying in %.2g s", what, attempt + 1, _one_line(error),
                options.delay(attempt))


def with_retries(action: Callable[[], T], what: str, options: FetchOptions) -> T:
    """Run ``action``; after a transient failure (:func:`is_transient`) wait and try again.

    Raises the first non-transient error as it is, or, when every attempt failed, a
    :class:`DownloadError` of one line: ``<what> failed after <n> attempts (<last error>)``
    (``what`` names the source and the step, e.g. ``"<url>: download"``).
    """
    for attempt in range(options.retries + 1):
        try:
            return action()
        except Exception as error:
            time.sleep(_wait_after(error, attempt, what, options))
    raise AssertionError("unreachable")


def _wait_after(error: Exception, attempt: int, what: str, options: FetchOptions) -> float:
    """Seconds to wait before retrying after ``error``; raises it when it is not transient, or
    a :class:`DownloadError` when it was the last attempt."""
    if not is_transient(error):
        raise error
    if attempt == options.retries:
        raise _failed(what, attempt + 1, error) from error
    _log_retry(what, attempt, error, options)
    return options.delay(attempt)


async def with_retries_async(action: Callable[[], Awaitable[T]], what: str, options: FetchOptions) -> T:
    """:func:`with_retries` for a coroutine (reads of an asynchronous store)."""
    for attempt in range(options.retries + 1):
        try:
            return await action()
        except Exception as error:
            await asyncio.sleep(_wait_after(error, attempt, what, options))
    raise AssertionError("unreachable")


# --- one attempt per protocol ------------------------------------------------------------------


def s3_https_url(url: str) -> str:
    """Anonymous HTTPS URL of ``s3://bucket/key``: ``https://bucket.s3.amazonaws.com/key``, or
    ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` + ``/bucket/key`` (path style) when set."""
    parsed = urlsplit(url)
    key = quote(parsed.path.lstrip("/"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        return f"{endpoint.rstrip('/')}/{parsed.netloc}/{key}"
    return f"https://{parsed.netloc}.s3.amazonaws.com/{key}"


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes a-b/total`` header."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _check_http_status(url: str, response, part: Path, offset: int) -> int | None:
    """Raise for a status that ends this attempt; the total size when the file is already whole."""
    status = response.status_code
    if status == 416 and offset:
        _, total = _content_range(response.headers.get("Content-Range"))
        if total == offset:
            return total
        part.unlink()
        raise TransferIncomplete(f"partial file of {offset} bytes does not fit the source; starting again")
    if status in (404, 410):
        raise SourceError(f"{url}: not found (HTTP {status})")
    if 400 <= status < 500 and not _transient_status(status):
        raise SourceError(f"{url}: refused (HTTP {status} {response.reason})")
    response.raise_for_status()  # 5xx and 408/425/429: transient, retried
    return None


def _http_attempt(url: str, part: Path, options: FetchOptions, count: Callable[[int], None]) -> int | None:
    """One HTTP(S) transfer into ``part``, resuming from its size; returns the expected total."""
    import requests

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=(options.timeout, options.timeout))
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as error:
        raise MorphotypeInputError(f"{url}: malformed URL ({error})") from error
    with response:
        whole = _check_http_status(url, response, part, offset)
        if whole is not None:
            return whole
        if response.status_code == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != offset:
                part.unlink()
                raise TransferIncomplete(f"server resumed at byte {first}, not {offset}; starting again")
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
                count(len(block))
    return total


def _ftp_attempt(url: str, part: Path, options: FetchOptions, count: Callable[[int], None]) -> int | None:
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
                count(len(block))

            try:
                ftp.retrbinary(f"RETR {path}", write, blocksize=options.chunk_bytes, rest=offset or None)
            except ftplib.error_perm as error:
                raise SourceError(f"{url}: refused by the FTP server ({error})") from error
    return total


def _attempt_for(url: str) -> Callable[[str, Path, FetchOptions, Callable[[int], None]], int | None]:
    """The transfer function for ``url``'s scheme (looked up at call time, so tests can replace one)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _http_attempt
    if scheme == "ftp":
        return _ftp_attempt
    raise MorphotypeInputError(f"{url}: unsupported scheme {scheme!r} (http, https, ftp, s3, file)")


def _checked_url(url: str) -> str:
    """``url`` as fetched (``s3://`` → HTTPS); a malformed remote URL is bad input."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as error:
        raise MorphotypeInputError(f"{url}: malformed URL ({error})") from error
    if parts.scheme.lower() in REMOTE_SCHEMES and not parts.hostname:
        raise MorphotypeInputError(f"{url}: malformed URL (no host)")
    return s3_https_url(url) if parts.scheme.lower() == "s3" else url


# --- the downloader ----------------------------------------------------------------------------


def md5_of(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_local(url: str, part: Path, dest: Path, md5: str | None, count: Callable[[int], None]) -> DownloadResult:
    scheme = urlsplit(url).scheme.lower()
    source = Path(unquote(urlsplit(url).path) if scheme == "file" else url)
    if not source.exists():
        raise SourceError(f"{url}: file does not exist")
    shutil.copyfile(source, part)
    size = part.stat().st_size
    count(size)
    if md5 is not None and md5_of(part) != md5.lower():
        part.unlink()
        raise SourceError(f"{url}: MD5 of the downloaded file differs from the expected {md5}; the source is corrupt")
    os.replace(part, dest)
    return DownloadResult(url, dest, size, size, 1, False)


def download(url: str, dest: str | Path, *, options: FetchOptions | None = None, md5: str | None = None,
             counter: ByteCounter | None = None, progress: bool = False) -> DownloadResult:
    """Fetch ``url`` (http, https, ftp, s3, file or a path) to ``dest``, robustly.

    The transfer goes to ``dest.part``; a transient failure (:func:`is_transient`) is retried
    after an exponential back-off and resumes where the partial file ends (HTTP Range / FTP
    REST), so a ``.part`` left by an interrupted run is resumed too. The result must have the
    announced size (Content-Length / SIZE) and, when given, the MD5; a mismatching MD5 is
    downloaded once more from scratch. ``dest`` appears only when complete. ``counter`` sums the
    bytes received; ``progress`` shows a byte progress bar.

    Raises
    ------
    SourceError
        The source does not exist (HTTP 404/410, FTP 550), is refused (other 4xx), or its MD5
        differs twice.
    DownloadError
        Transient failures outlasted ``options.retries``.
    MorphotypeInputError
        The URL is malformed or its scheme unsupported.
    """
    from tqdm.auto import tqdm

    options = options or FetchOptions()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    counter = counter or ByteCounter()
    before = counter.value
    with tqdm(unit="B", unit_scale=True, desc=dest.name, disable=True if not progress else None) as bar:
        def count(n: int) -> None:
            counter.add(n)
            bar.update(n)

        if urlsplit(url).scheme.lower() in ("", "file"):
            return _copy_local(url, part, dest, md5, count)
        fetched = _checked_url(url)
        transfer = _attempt_for(fetched)
        resumed = part.exists() and part.stat().st_size > 0
        attempts = []
        md5_failures = []

        def attempt() -> int:
            attempts.append(1)
            total = transfer(fetched, part, options, count)
            size = part.stat().st_size
            if total is not None and size != total:
                raise TransferIncomplete(f"received {size} of {total} bytes")
            if md5 is not None and md5_of(part) != md5.lower():
                part.unlink()
                md5_failures.append(1)
                if len(md5_failures) > 1:
                    raise SourceError(
                        f"{url}: MD5 of the downloaded file differs from the expected {md5}; the source is corrupt"
                    )
                raise TransferIncomplete("MD5 mismatch; downloading again")
            return size

        size = with_retries(attempt, f"{url}: download", options)
    os.replace(part, dest)
    return DownloadResult(url, dest, size, counter.value - before, len(attempts), resumed)


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


def md5_for(url: str, table: dict[str, str] | None) -> str | None:
    """The table's MD5 for ``url``: an exact key, or the longest key the URL ends with."""
    if not table:
        return None
    if url in table:
        return table[url]
    hits = [key for key in table if url.endswith("/" + key.lstrip("./"))]
    return table[max(hits, key=len)] if hits else None
