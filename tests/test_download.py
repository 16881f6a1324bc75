"""The one downloader (morphotype.download): which failures are retried, and how failures surface.

Servers run on 127.0.0.1 (morphotype.testing.LoopbackFileServer); nothing leaves the machine.
"""

from __future__ import annotations

import ftplib
import logging

import pandas as pd
import pytest
import requests

from morphotype import download as dl
from morphotype.cli import EXIT_BAD_INPUT, EXIT_FAILURE, main
from morphotype.io import MorphotypeInputError
from morphotype.testing import LoopbackFileServer

FAST = dl.FetchOptions(timeout=2.0, retries=4, backoff=0.01, max_backoff=0.05)


@pytest.fixture(autouse=True)
def _quiet_retries(caplog):
    caplog.set_level(logging.ERROR, logger="morphotype.download")


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    (root / "data.bin").write_bytes(bytes(range(256)) * 2000)  # 512 kB
    return root


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error", response=response)


def test_only_network_and_server_errors_are_transient():
    for error in (ConnectionResetError("reset"), TimeoutError("slow"), ftplib.error_temp("421 busy"),
                  dl.TransferIncomplete("half"), requests.ConnectionError("refused"), _http_error(503),
                  _http_error(429)):
        assert dl.is_transient(error), error
    for error in (TypeError("bug"), KeyError("bug"), AttributeError("bug"), ValueError("bug"),
                  FileNotFoundError("gone"), PermissionError("disk"), ftplib.error_perm("550 no"),
                  _http_error(404), _http_error(403), dl.SourceError("missing"), dl.DownloadError("gave up")):
        assert not dl.is_transient(error), error


def test_a_coding_error_inside_an_attempt_is_raised_at_once(tmp_path, served, monkeypatch):
    calls = []

    def broken_attempt(url, part, options, count):
        calls.append(url)
        return {}["total"]  # a bug: KeyError

    monkeypatch.setattr(dl, "_http_attempt", broken_attempt)
    with LoopbackFileServer(served) as server, pytest.raises(KeyError):
        dl.download(f"{server.url}/data.bin", tmp_path / "out.bin", options=FAST)
    assert len(calls) == 1  # not retried
    actions = []
    with pytest.raises(TypeError):
        dl.with_retries(lambda: actions.append(1) or len(None), "bug", FAST)
    assert actions == [1]


def test_server_errors_are_retried_and_a_404_is_not(tmp_path, served):
    data = (served / "data.bin").read_bytes()
    with LoopbackFileServer(served, faults=["500", "503"]) as server:
        result = dl.download(f"{server.url}/data.bin", tmp_path / "out.bin", options=FAST)
        assert [outcome for _, _, outcome in server.requests] == ["500", "503", "200"]
        server.reset_counters()
        with pytest.raises(dl.SourceError, match=r"/absent.bin: not found \(HTTP 404\)"):
            dl.download(f"{server.url}/absent.bin", tmp_path / "absent.bin", options=FAST)
        assert len(server.requests) == 1
    assert result.attempts == 3 and (tmp_path / "out.bin").read_bytes() == data


def test_exhausted_retries_raise_one_line_naming_the_url(tmp_path, served):
    with LoopbackFileServer(served, faults=["503"] * 10) as server:
        url = f"{server.url}/data.bin"
        with pytest.raises(dl.DownloadError) as raised:
            dl.download(url, tmp_path / "out.bin", options=dl.FetchOptions(retries=2, backoff=0.01))
        assert len(server.requests) == 3
    message = str(raised.value)
    assert message.startswith(f"{url}: download failed after 3 attempts (HTTPError: 503")
    assert "\n" not in message


def test_malformed_or_unsupported_urls_are_bad_input(tmp_path):
    for url in ("http:///no-host.bin", "ftp://", "http://127.0.0.1:port/x.bin", "gopher://host/x.bin"):
        with pytest.raises(MorphotypeInputError, match="malformed URL|unsupported scheme"):
            dl.download(url, tmp_path / "x.bin", options=FAST)


def test_s3_urls_are_read_anonymously_over_https(tmp_path, served, monkeypatch):
    (served / "bucket" / "dir").mkdir(parents=True)
    (served / "bucket" / "dir" / "key.bin").write_bytes(b"plate" * 1000)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert dl.s3_https_url("s3://bucket/dir/key.bin") == "https://bucket.s3.amazonaws.com/dir/key.bin"
    with LoopbackFileServer(served, faults=["truncate"]) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        result = dl.download("s3://bucket/dir/key.bin", tmp_path / "key.bin", options=FAST)
        assert [path for path, _, _ in server.requests] == ["bucket/dir/key.bin"] * 2
    assert (tmp_path / "key.bin").read_bytes() == b"plate" * 1000 and result.attempts == 2


def _movie_sheet(tmp_path, image: str):
    sheet = tmp_path / "movies.csv"
    pd.DataFrame([{"image": image, "plate": "P1", "well": 1, "site": 1, "frame": 0}]).to_csv(sheet, index=False)
    return ["stream", "--samplesheet", str(sheet), "--cache", str(tmp_path / "cache"), "--out",
            str(tmp_path / "frames.csv"), "--variant", "no_ic"]


def test_cli_reports_a_failed_download_in_one_line(tmp_path, served, capsys):
    with LoopbackFileServer(served, faults=["503"] * 10) as server:
        (served / "P1").mkdir()
        (served / "P1" / "00001_01.ch5").write_bytes(b"never served")
        url = f"{server.url}/P1/00001_01.ch5"
        code = main(_movie_sheet(tmp_path, f"{url}#frame=0") + ["--retries", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILURE
    assert f"morphotype stream: error: {url}: download failed after 1 attempt (HTTPError: 503" in err
    assert "Traceback" not in err
    assert not (tmp_path / "frames.csv").exists()


def test_cli_reports_a_malformed_url_as_bad_input(tmp_path, capsys):
    code = main(_movie_sheet(tmp_path, "http:///P1/00001_01.ch5#frame=0"))
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "malformed URL" in err and "Traceback" not in err
