"""Outputs a later step trusts: features refuse masks that a killed or another segmentation left."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphotype.cli import EXIT_BAD_INPUT, main
from morphotype.io import read_mask, write_mask


@pytest.fixture
def segmented(crops_dir, tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    subset = manifest[manifest["phenotype"].isin(["Interphase", "Binuclear"])].groupby("phenotype").head(2)
    for row in subset.itertuples():
        (root / row.phenotype).mkdir(parents=True, exist_ok=True)
        (root / row.phenotype / row.file).symlink_to(crops_dir / row.phenotype / row.file)
    subset.to_csv(root / "manifest.csv", index=False)
    sheet, masks = tmp_path / "sheet.csv", tmp_path / "masks"
    assert main(["samplesheet", "mitocheck-crops", str(root), "--out", str(sheet)]) == 0
    assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(masks), "--keep-edge-objects",
                 "--workers", "1"]) == 0
    assert not (masks / ".segmenting").exists()
    return sheet, masks


def _features(sheet: Path, masks: Path, out: Path) -> int:
    return main(["features", "--samplesheet", str(sheet), "--masks", str(masks), "--out", str(out), "--workers", "1"])


def test_features_refuse_an_unfinished_segmentation(segmented, tmp_path, capsys):
    sheet, masks = segmented
    (masks / ".segmenting").touch()  # what a segmentation killed midway leaves
    assert _features(sheet, masks, tmp_path / "cells.parquet") == EXIT_BAD_INPUT
    assert "did not finish" in capsys.readouterr().err
    assert not (tmp_path / "cells.parquet").exists()


def test_features_refuse_a_mask_from_another_run(segmented, tmp_path, capsys):
    sheet, masks = segmented
    mask = sorted(masks.glob("*.mask.tiff"))[0]
    labels = read_mask(mask)
    extra = np.zeros_like(labels)
    extra[:3, :3] = labels.max() + 1  # one object more than the summary records
    write_mask(np.maximum(labels, extra), mask)
    assert _features(sheet, masks, tmp_path / "cells.parquet") == EXIT_BAD_INPUT
    assert "segmentation_summary.csv records" in capsys.readouterr().err


def test_features_refuse_a_summary_of_other_images(segmented, tmp_path, capsys):
    sheet, masks = segmented
    summary = pd.read_csv(masks / "segmentation_summary.csv")
    summary.iloc[1:].to_csv(masks / "segmentation_summary.csv", index=False)
    assert _features(sheet, masks, tmp_path / "cells.parquet") == EXIT_BAD_INPUT
    assert "no row for image" in capsys.readouterr().err


def test_masks_staged_without_a_summary_are_measured(segmented, tmp_path):
    sheet, masks = segmented
    (masks / "segmentation_summary.csv").unlink()  # Nextflow stages the masks alone
    assert _features(sheet, masks, tmp_path / "cells.parquet") == 0
    assert len(pd.read_parquet(tmp_path / "cells.parquet")) > 0
