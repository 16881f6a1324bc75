"""A loopback HTTP file server with Range support and injected faults, for offline tests and benchmarks."""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)


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
