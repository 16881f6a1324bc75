"""MitoCheck / IDR streaming: sources, samplesheets, readers, robust fetching, frame cache.

Every network test talks to servers started here on 127.0.0.1 (an HTTP server with injected
faults, an FTP server); movies are synthetic CellH5 / OME-Zarr files written by the tests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from morphotype import idr, pipeline
from morphotype.download import md5_for
from morphotype.illumination import context_window, correct_window
from morphotype.io import MorphotypeInputError
from morphotype.io import write_mask
from morphotype.samplesheet import read_samplesheet
from morphotype.testing import LoopbackFileServer, synthetic_movie

# Fast retries for loopback servers; the timeout must exceed a normal loopback answer on a
# loaded 2-core machine and be shorter than the injected slow answer.
FAST = idr.FetchOptions(timeout=1.0, retries=7, backoff=0.01, max_backoff=0.05, workers=2, batch_size=2)
SLOW_SECONDS = 2.5
ALL_FAULTS = ["503", "drop", "truncate", "500", "slow"]


@pytest.fixture(autouse=True)
def _quiet_retries(caplog):
    caplog.set_level(logging.ERROR, logger="morphotype.idr")
    caplog.set_level(logging.ERROR, logger="morphotype.download")


@pytest.fixture(scope="module")
def movies():
    """Three small synthetic movies (8 frames of 96x128) with known shading."""
    return [synthetic_movie(8, (96, 128), n_nuclei=8, seed=seed) for seed in range(3)]


@pytest.fixture()
def served(tmp_path, movies):
    """A server root with the movies as CellH5 (wells 1-3) and OME-Zarr 0.4/0.5 (wells 1, 2)."""
    root = tmp_path / "srv"
    for well, movie in enumerate(movies, start=1):
        idr.write_cellh5(root / "P1" / f"{well:05d}_01.ch5", movie["movie"], plate="P1", well=well)
    idr.write_ome_zarr(root / "P1" / "00001.zarr", movies[0]["movie"], version="0.4")
    idr.write_ome_zarr(root / "P1" / "00002.zarr", movies[1]["movie"], version="0.5")
    return root


def _sheet(base: str, entries: list[tuple[str, int, list[int]]]) -> pd.DataFrame:
    rows = []
    for name, well, frames in entries:
        for frame in frames:
            rows.append({"image": f"{base}/P1/{name}#frame={frame}", "plate": "P1", "well": well, "site": 1,
                         "frame": frame})
    return pd.DataFrame(rows)


# --- sources and samplesheets ------------------------------------------------------------------


def test_assets_are_derived_from_the_shared_metadata(shared_dir, tmp_path):
    written = idr.derive_idr0013_assets(shared_dir / "data", tmp_path)
    shipped = {"plates.tsv": idr.read_plates(), "labelled_cells.tsv": idr.read_labelled_cells(),
               "control_wells.tsv": idr.read_control_wells()}
    for name, table in shipped.items():
        pd.testing.assert_frame_equal(table, pd.read_csv(written[name], sep="\t", dtype={"plate": str}))
    assert len(shipped["plates.tsv"]) == 510
    assert not shipped["plates.tsv"]["screen"].str.contains(r"\.screen$|/").any()
    cells = shipped["labelled_cells.tsv"]
    assert len(cells) == 2779 and cells.groupby(["plate", "well", "frame"]).ngroups == 232
    controls = shipped["control_wells.tsv"]
    assert controls["control"].value_counts().to_dict() == {"negative": 3853, "positive": 2890}
    assert 1 not in set(controls["well"]) and "A1" not in set(controls["well_name"])


def test_well_numbering_is_row_by_row_from_a1():
    assert idr.well_number("A1") == 1 and idr.well_name(1) == "A1"
    assert idr.well_number("B2") == 26 and idr.well_number("C1") == 49  # as in the IDR metadata
    assert idr.well_name(384) == "P24" and idr.well_number("a04") == 4
    assert all(idr.well_number(idr.well_name(n)) == n for n in range(1, 385))
    for bad in ("Q1", "A25", "A0", "1"):
        with pytest.raises(ValueError, match="384-well"):
            idr.well_number(bad)
    with pytest.raises(ValueError):
        idr.well_name(385)


def test_movie_urls_follow_the_idr_layout():
    url = idr.movie_url("LT0001_02", 2)
    assert url == (
        "https://ftp.ebi.ac.uk/pub/databases/IDR/idr0013-neumann-mitocheck/20150916-mitocheck-analysis/"
        "mitocheck/LT0001_02--ex2005_11_16--sp2005_02_17--tt17--c3/hdf5/00002_01.ch5"
    )
    assert idr.movie_url("LT0001_02", 149, base_url=idr.FTP_BASE_URL).startswith("ftp://ftp.ebi.ac.uk/")
    mirrored = idr.movie_url("LT0001_02", 149, base_url="http://mirror/x/")
    assert mirrored == "http://mirror/x/LT0001_02--ex2005_11_16--sp2005_02_17--tt17--c3/hdf5/00149_01.ch5"
    with pytest.raises(MorphotypeInputError, match="LT9999_99"):
        idr.movie_url("LT9999_99", 1)
    location = idr.frame_location(url, 41)
    assert location.endswith("00002_01.ch5#frame=41")
    assert idr.split_frame_location(location) == (url, 41)
    assert idr.split_frame_location(url) == (url, None)
    assert idr.movie_format(location.split("#")[0]) == "cellh5"
    assert idr.movie_format("http://h/a/6001240.zarr/") == "ome-zarr" and idr.movie_format("a.png") is None


def test_labelled_samplesheet_is_a_valid_samplesheet(tmp_path):
    sheet = idr.labelled_samplesheet()
    assert len(sheet) == 2779 and sheet["image"].nunique() == 232
    assert sheet["movie"].nunique() == 74
    fragments = sheet["image"].map(lambda loc: idr.split_frame_location(loc)[1])
    assert (fragments == sheet["frame"]).all()
    # the one labelled control well keeps its control type; all others are treated wells
    assert set(sheet.loc[(sheet.plate == "LT0109_38") & (sheet.well == 381), "control"]) == {"positive"}
    assert (sheet["control"] == "treated").sum() == 2779 - 56
    path = tmp_path / "labelled.csv"
    sheet.to_csv(path, index=False)
    table = read_samplesheet(path)  # URLs: the schema and uniqueness checks apply, not file checks
    assert len(table) == 2779 and table["image_id"].nunique() == 232

    subset = idr.labelled_samplesheet(["LT0003_40"], exclude_phenotypes=["Folded"])
    assert set(subset["plate"]) == {"LT0003_40"} and "Folded" not in set(subset["phenotype"])
    with pytest.raises(MorphotypeInputError, match="NOPE"):
        idr.labelled_samplesheet(["NOPE"])


def test_control_frames_are_drawn_per_well_with_a_seed(tmp_path):
    sheet = idr.control_samplesheet(controls=["negative"], seed=0)
    assert len(sheet) == 3853 and set(sheet["control"]) == {"negative"} and 1 not in set(sheet["well"])
    assert sheet["frame"].between(30, 61).all()  # study frames 31-62, 0-based here
    assert sheet["frame"].nunique() == 32  # the whole range is used
    again = idr.control_samplesheet(controls=["negative"], seed=0)
    assert (again["frame"] == sheet["frame"]).all()
    other = idr.control_samplesheet(controls=["negative"], seed=1)
    assert (other["frame"] != sheet["frame"]).mean() > 0.9
    one_plate = idr.control_samplesheet(["LT0001_02"], controls=["negative", "positive"])
    merged = one_plate.merge(sheet, on=["plate", "well"], suffixes=("", "_all"))
    assert len(merged) == (one_plate["control"] == "negative").sum() > 0
    assert (merged["frame"] == merged["frame_all"]).all()  # a well's frame does not depend on the plates asked
    path = tmp_path / "controls.csv"
    one_plate.to_csv(path, index=False)
    assert read_samplesheet(path)["x"].isna().all()
    with pytest.raises(MorphotypeInputError, match="empty"):
        idr.control_samplesheet(controls=["empty"])


def test_combined_samplesheet_has_distinct_images():
    sheet = idr.idr_samplesheet(["LT0109_38"], labelled=True, controls=["negative", "positive"])
    assert set(sheet["subset"]) == {"labelled", "control"}
    controls = sheet[sheet["subset"] == "control"]
    assert not controls["image"].isin(sheet.loc[sheet["subset"] == "labelled", "image"]).any()
    with pytest.raises(MorphotypeInputError, match="nothing"):
        idr.idr_samplesheet(labelled=False)


# --- readers -----------------------------------------------------------------------------------


def test_cellh5_reader_enumerates_keys(tmp_path, movies):
    import h5py

    movie = movies[0]["movie"]
    path = idr.write_cellh5(tmp_path / "00007_01.ch5", movie, plate="LT0001_02", well=7)
    planes, info = idr.read_cellh5(path, [0, 5], plate="LT0001_02", well=7, site=1)
    assert info.shape == (1, 8, 1, 96, 128) and info.dtype == "uint8" and info.n_frames == 8
    assert np.array_equal(planes[5], movie[5]) and np.array_equal(planes[0], movie[0])
    # a single plate/well/position is used whatever its key; with several, the asked one is found
    planes, _ = idr.read_cellh5(path, [3], plate="other-name", well=None, site=None)
    assert np.array_equal(planes[3], movie[3])
    with h5py.File(path, "a") as h5file:
        extra = h5file.create_group("/sample/0/plate/LT0001_02/experiment/00008/position/1/image")
        extra.create_dataset("channel", data=np.zeros((1, 8, 1, 96, 128), np.uint8))
    planes, _ = idr.read_cellh5(path, [3], well=7)
    assert np.array_equal(planes[3], movie[3])
    planes, _ = idr.read_cellh5(path, [3], well=8)
    assert planes[3].max() == 0
    with pytest.raises(idr.SourceError, match="experiment 9 not among"):
        idr.read_cellh5(path, [3], well=9)
    with pytest.raises(idr.SourceError, match="outside the movie"):
        idr.read_cellh5(path, [8], well=7)


def test_corrupt_or_foreign_cellh5_names_the_file(tmp_path):
    import h5py

    corrupt = tmp_path / "broken.ch5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 20)
    with pytest.raises(idr.SourceError, match="broken.ch5: not a readable CellH5 movie"):
        idr.read_cellh5(corrupt, [0])
    foreign = tmp_path / "foreign.ch5"
    with h5py.File(foreign, "w") as h5file:
        h5file["data"] = np.zeros(3)
    with pytest.raises(idr.SourceError, match="foreign.ch5: not a CellH5 file"):
        idr.read_cellh5(foreign, [0], source="http://example/foreign.ch5")


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_reader_reads_single_planes(tmp_path, movies, version):
    movie = movies[1]["movie"]
    store = idr.write_ome_zarr(tmp_path / "image.zarr", movie, version=version)
    planes, info = idr.read_ome_zarr(str(store), [2, 7])
    assert info.shape == (1, 8, 1, 96, 128) and info.format == "ome-zarr"
    assert np.array_equal(planes[2], movie[2]) and np.array_equal(planes[7], movie[7])
    with pytest.raises(idr.SourceError, match="outside the movie"):
        idr.read_ome_zarr(str(store), [8])


# --- downloading -------------------------------------------------------------------------------


def test_http_download_survives_every_fault_and_resumes(tmp_path, served):
    source = served / "P1" / "00001_01.ch5"
    with LoopbackFileServer(served, faults=ALL_FAULTS, slow_seconds=SLOW_SECONDS) as server:
        result = idr.download(f"{server.url}/P1/00001_01.ch5", tmp_path / "movie.ch5", options=FAST)
        outcomes = [outcome for _, _, outcome in server.requests]
        ranges = [byte_range for _, byte_range, _ in server.requests]
    assert (tmp_path / "movie.ch5").read_bytes() == source.read_bytes()
    assert not (tmp_path / "movie.ch5.part").exists()
    assert {"503", "drop", "truncate", "500"} <= set(outcomes)
    assert result.attempts == len(ALL_FAULTS) + 1
    # the truncated half was kept and resumed with a Range request, not fetched again
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in ranges)
    assert result.bytes_transferred == source.stat().st_size == result.size


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, served):
    source = served / "P1" / "00002_01.ch5"
    data = source.read_bytes()
    dest = tmp_path / "movie.ch5"
    Path(f"{dest}.part").write_bytes(data[:1000])
    with LoopbackFileServer(served) as server:
        result = idr.download(f"{server.url}/P1/00002_01.ch5", dest, options=FAST)
        assert server.requests == [("P1/00002_01.ch5", "bytes=1000-", "206")]
        assert server.bytes_sent == len(data) - 1000
    assert dest.read_bytes() == data and result.resumed


def test_checksums_and_missing_files_give_errors_naming_the_url(tmp_path, served):
    data = (served / "P1" / "00003_01.ch5").read_bytes()
    with LoopbackFileServer(served) as server:
        url = f"{server.url}/P1/00003_01.ch5"
        idr.download(url, tmp_path / "ok.ch5", options=FAST, md5=hashlib.md5(data).hexdigest())
        assert (tmp_path / "ok.ch5").read_bytes() == data
        with pytest.raises(idr.SourceError, match=f"{url}: MD5"):
            idr.download(url, tmp_path / "bad.ch5", options=FAST, md5="0" * 32)
        assert not (tmp_path / "bad.ch5").exists() and not (tmp_path / "bad.ch5.part").exists()
        with pytest.raises(idr.SourceError, match=r"/P1/missing.ch5: not found \(HTTP 404\)"):
            idr.download(f"{server.url}/P1/missing.ch5", tmp_path / "missing.ch5", options=FAST)
    with LoopbackFileServer(served, faults=["503"] * 10) as server:
        url = f"{server.url}/P1/00003_01.ch5"
        options = idr.FetchOptions(timeout=1.0, retries=2, backoff=0.01)
        with pytest.raises(idr.DownloadError, match=f"{url}: download failed after 3 attempts"):
            idr.download(url, tmp_path / "never.ch5", options=options)
        assert len(server.requests) == 3


def test_md5_table_matches_urls_by_suffix(tmp_path):
    table = tmp_path / "md5.txt"
    table.write_text("# md5sum output\n" + "a" * 32 + "  screen/hdf5/00001_01.ch5\n" + "B" * 32 + " *other.ch5\n")
    md5 = idr.read_md5_table(table)
    assert md5_for("https://host/base/screen/hdf5/00001_01.ch5", md5) == "a" * 32
    assert md5_for("https://host/x/other.ch5", md5) == "b" * 32
    assert md5_for("https://host/x/third.ch5", md5) is None
    table.write_text("not-a-checksum file\n")
    with pytest.raises(MorphotypeInputError, match="line 1"):
        idr.read_md5_table(table)


@pytest.fixture()
def ftp_server(served):
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(served))
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer, "passive_ports": None})
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05}, daemon=True)
    thread.start()
    yield f"ftp://127.0.0.1:{server.address[1]}"
    server.close_all()
    thread.join(timeout=5)


@pytest.mark.filterwarnings("ignore:The asyn:DeprecationWarning")  # pyftpdlib on Python 3.11
def test_ftp_download_resumes_and_reports_missing_files(tmp_path, served, ftp_server):
    data = (served / "P1" / "00001_01.ch5").read_bytes()
    dest = tmp_path / "movie.ch5"
    Path(f"{dest}.part").write_bytes(data[:5000])
    result = idr.download(f"{ftp_server}/P1/00001_01.ch5", dest, options=FAST)
    assert dest.read_bytes() == data
    assert result.resumed and result.bytes_transferred == len(data) - 5000  # REST: only the rest came
    with pytest.raises(idr.SourceError, match="missing.ch5: not found on the FTP server"):
        idr.download(f"{ftp_server}/P1/missing.ch5", tmp_path / "missing.ch5", options=FAST)


# --- streaming into the frame cache ------------------------------------------------------------


def test_stream_frames_through_faults_bounds_scratch_and_caches(tmp_path, served, movies):
    entries = [("00001_01.ch5", 1, [0, 4]), ("00002_01.ch5", 2, [7]), ("00003_01.ch5", 3, [2, 3]),
               ("00001.zarr", 1, [5]), ("00002.zarr", 2, [1, 6])]
    sizes = sorted((served / "P1" / f"{w:05d}_01.ch5").stat().st_size for w in (1, 2, 3))
    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    with LoopbackFileServer(served, faults=ALL_FAULTS, slow_seconds=SLOW_SECONDS) as server:
        sheet = _sheet(server.url, entries)
        out, stats = idr.stream_frames(sheet, cache, variant="no_ic", scratch_dir=scratch, options=FAST)
        assert {"drop", "truncate", "500", "503"} <= {outcome for _, _, outcome in server.requests}
    assert len(out) == len(sheet) and (out["source"] == sheet["image"]).all()
    by_well = {1: movies[0]["movie"], 2: movies[1]["movie"], 3: movies[2]["movie"]}
    for row in out.itertuples():
        assert np.array_equal(tifffile.imread(row.image), by_well[row.well][row.frame]), row.source
        assert Path(row.image).name == f"P1_{row.well}_1_{row.frame}.tiff"
    assert stats.movies == stats.movies_fetched == 5 and stats.frames_written == 8
    # scratch: at most one batch (2 movies) at a time, never all three, and empty at the end
    assert 0 < stats.peak_scratch_bytes <= sizes[-1] + sizes[-2] < sum(sizes)
    assert list(scratch.iterdir()) == []
    assert not list(cache.rglob("*.ch5")) and not list(cache.rglob("*.zarr"))  # planes, not movies

    # a re-run with the same cache fetches nothing, not even metadata
    with LoopbackFileServer(served, faults=ALL_FAULTS) as server:
        sheet = _sheet(server.url, entries)
        again, stats = idr.stream_frames(sheet, cache, variant="no_ic", scratch_dir=scratch, options=FAST)
        assert server.requests == []
    assert stats.frames_from_cache == 8 and stats.movies_fetched == 0 and stats.bytes_downloaded == 0
    assert list(again["image"]) == list(out["image"])


def test_stream_frames_corrects_illumination_from_neighbouring_planes(tmp_path, served, movies):
    cache = tmp_path / "cache"
    with LoopbackFileServer(served) as server:
        sheet = _sheet(server.url, [("00001.zarr", 1, [0, 7])])
        out, stats = idr.stream_frames(sheet, cache, variant="ic", options=FAST)
        chunks = {path for path, _, outcome in server.requests
                  if outcome == "200" and "/0/" in path and not Path(path).name.startswith(".")}
    movie = movies[0]["movie"]
    assert stats.planes_fetched == 6  # frames 0-2 for the first frame, 5-7 for the last
    assert len(chunks) == 6  # only the six planes' chunks travelled
    for row in out.itertuples():
        window, position = context_window(row.frame, 8)
        expected = correct_window(movie[window], position)
        corrected = tifffile.imread(row.image)
        assert corrected.dtype == np.uint8 and np.array_equal(corrected, expected)
        assert row.illumination == "ic" and "/frames/ic/" in row.image
    # the raw variant of the same frames comes from the plane cache, without a server
    raw, stats = idr.stream_frames(sheet, cache, variant="no_ic", options=FAST)
    assert stats.movies_fetched == 0
    assert np.array_equal(tifffile.imread(raw.loc[1, "image"]), movie[7])


def test_corrupt_or_missing_movies_raise_or_are_skipped(tmp_path, served):
    (served / "P1" / "00009_01.ch5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0garbage" * 500)
    with LoopbackFileServer(served) as server:
        corrupt = _sheet(server.url, [("00009_01.ch5", 9, [1])])
        with pytest.raises(idr.SourceError, match=rf"{server.url}/P1/00009_01.ch5: not a readable CellH5 movie"):
            idr.stream_frames(corrupt, tmp_path / "cache", variant="no_ic", options=FAST)
        missing = _sheet(server.url, [("00004_01.ch5", 4, [1]), ("00001_01.ch5", 1, [1])])
        with pytest.raises(idr.SourceError, match=r"00004_01.ch5: not found \(HTTP 404\)"):
            idr.stream_frames(missing, tmp_path / "cache", variant="no_ic", options=FAST)
        both = pd.concat([corrupt, missing], ignore_index=True)
        out, stats = idr.stream_frames(both, tmp_path / "cache", variant="no_ic", options=FAST, on_error="skip")
    assert list(out["well"]) == [1]
    assert sorted(f["well"] for f in stats.failed) == ["4", "9"]
    assert list((tmp_path / "cache" / ".scratch").iterdir()) == []


def test_fragment_and_frame_column_must_agree(tmp_path):
    sheet = pd.DataFrame([{"image": "http://127.0.0.1:9/P1/00001_01.ch5#frame=3", "plate": "P1", "well": 1,
                           "site": 1, "frame": 4}])
    with pytest.raises(MorphotypeInputError, match="row 2: .* addresses frame 3 but the frame column says 4"):
        idr.stream_frames(sheet, tmp_path)


def test_plane_reads_transfer_a_fraction_of_the_movie(tmp_path, served):
    with LoopbackFileServer(served) as server:
        idr.stream_frames(_sheet(server.url, [("00001_01.ch5", 1, [4])]), tmp_path / "a", variant="no_ic", options=FAST)
        whole = server.bytes_sent
        server.reset_counters()
        idr.stream_frames(_sheet(server.url, [("00001.zarr", 1, [4])]), tmp_path / "b", variant="no_ic", options=FAST)
        planes = server.bytes_sent
    assert 0 < planes < whole / 4  # one plane of eight, plus metadata


# --- label transfer (pipeline.measure_samplesheet) on streamed frames ----------------------------


def _measure_annotated(folder: Path, image: np.ndarray, labels: np.ndarray, xy: np.ndarray):
    """Cells and unmatched annotations of one frame with its mask, annotated at points ``xy``."""
    tifffile.imwrite(folder / "frame.tiff", image)
    write_mask(labels, pipeline.mask_path(folder, "frame"))
    sheet = pd.DataFrame({"image": str(folder / "frame.tiff"), "file_id": "frame", "x": xy[:, 0], "y": xy[:, 1]})
    return pipeline.measure_samplesheet(sheet, folder, tolerance=0.0, workers=1)


def test_label_transfer_matches_planted_annotations(tmp_path, movies):
    synthetic = movies[2]
    labels, centres = synthetic["labels"][3], synthetic["centres"][3]
    extra = np.array([[1.0, 1.0], [centres[0, 0] + 1, centres[0, 1]]])  # outside every nucleus; a second in one
    cells, unmatched = _measure_annotated(tmp_path, synthetic["movie"][3], labels, np.vstack([centres, extra]))
    assert list(cells["Metadata_ObjectNumber"]) == list(range(1, len(centres) + 1))
    assert list(unmatched["reason"]) == ["unmatched", "object already labelled by another annotation"]
    assert list(unmatched["Metadata_AnnotatedX"]) == list(extra[:, 0])


def test_label_transfer_on_a_segmented_corrected_frame(tmp_path, movies):
    from morphotype.segment import segment_nuclei

    synthetic = movies[0]
    window, position = context_window(4, 8)
    frame = correct_window(synthetic["movie"][window], position)
    labels = segment_nuclei(frame, "threshold", remove_edge_objects=False)
    centres = synthetic["centres"][4]
    cells, unmatched = _measure_annotated(tmp_path, frame, labels, centres)
    assert unmatched.empty
    assert cells["Metadata_ObjectNumber"].nunique() == len(centres)  # one nucleus per annotation
    truth = synthetic["labels"][4]
    for number, (x, y) in zip(cells["Metadata_ObjectNumber"], centres):
        overlap = truth[labels == number]
        assert np.bincount(overlap).argmax() == truth[int(round(y)), int(round(x))]


def test_one_frame_file_per_plate_well_site_and_frame(tmp_path):
    sheet = pd.DataFrame([
        {"image": "http://127.0.0.1:9/P1/00001_01.ch5#frame=3", "plate": "P1", "well": 1, "site": 1, "frame": 3},
        {"image": "http://127.0.0.1:9/P1/00001.zarr#frame=3", "plate": "P1", "well": 1, "site": 1, "frame": 3},
    ])
    with pytest.raises(MorphotypeInputError, match="row 3: .* comes from two movies"):
        idr.stream_frames(sheet, tmp_path)


def test_stream_command_names_frames_where_the_cache_is_published(tmp_path, served):
    """`morphotype stream --image-root`: the sheet names the frames under the published cache
    (a Nextflow outdir, maybe s3://), with the same layout as the cache the task wrote."""
    from morphotype.cli import main

    cache, out = tmp_path / "task", tmp_path / "frames.csv"
    with LoopbackFileServer(served) as server:
        sheet = tmp_path / "movies.csv"
        _sheet(server.url, [("00001_01.ch5", 1, [0, 3]), ("00002_01.ch5", 2, [1])]).to_csv(sheet, index=False)
        assert main(["stream", "--samplesheet", str(sheet), "--cache", str(cache), "--out", str(out),
                     "--variant", "no_ic", "--image-root", "s3://bucket/results/idr/frames/"]) == 0
    frames = pd.read_csv(out)
    assert list(frames["image"]) == [f"s3://bucket/results/idr/frames/frames/no_ic/P1/P1_{well}_1_{frame}.tiff"
                                     for well, frame in [(1, 0), (1, 3), (2, 1)]]
    for image in frames["image"]:  # the same relative path holds the frame in the task's cache
        assert (cache / image.removeprefix("s3://bucket/results/idr/frames/")).is_file()
