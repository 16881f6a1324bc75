"""Samplesheet images given as URLs are fetched through the downloader (faults included)."""

import numpy as np
import pandas as pd

from morphotype.cli import EXIT_BAD_INPUT, main
from morphotype.testing.servers import LoopbackFileServer


def _image(path):
    import imageio.v3 as iio

    image = np.zeros((48, 48), np.uint8)
    yy, xx = np.mgrid[:48, :48]
    image[(yy - 24) ** 2 + (xx - 24) ** 2 < 64] = 200
    iio.imwrite(path, image)


def test_url_images_are_fetched_through_faults_and_cached(tmp_path, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    _image(served / "nucleus.png")
    monkeypatch.setenv("MORPHOTYPE_IMAGE_CACHE", str(tmp_path / "cache"))
    with LoopbackFileServer(served, faults=["503", "truncate"]) as server:
        sheet = tmp_path / "sheet.csv"
        pd.DataFrame([{"image": f"{server.url}/nucleus.png", "plate": "P", "well": 1, "site": 1, "frame": 0}]
                     ).to_csv(sheet, index=False)
        assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(tmp_path / "masks"),
                     "--keep-edge-objects", "--workers", "1"]) == 0
        fetched = len(server.requests)
        assert fetched >= 3  # a 503, a truncated body, then the resumed rest
        summary = pd.read_csv(tmp_path / "masks" / "segmentation_summary.csv")
        assert summary["objects"].tolist() == [1] and summary["file_id"].tolist() == ["nucleus"]
        assert main(["features", "--samplesheet", str(sheet), "--masks", str(tmp_path / "masks"),
                     "--out", str(tmp_path / "cells.parquet"), "--workers", "1"]) == 0
        assert len(server.requests) == fetched  # the cached copy serves the second step
        missing = tmp_path / "missing.csv"
        pd.DataFrame([{"image": f"{server.url}/absent.png", "plate": "P", "well": 1, "site": 1, "frame": 0}]
                     ).to_csv(missing, index=False)
        capsys.readouterr()
        assert main(["segment", "--samplesheet", str(missing), "--outdir", str(tmp_path / "m2")]) == EXIT_BAD_INPUT
        assert "absent.png" in capsys.readouterr().err
        assert not (tmp_path / "m2").exists()
