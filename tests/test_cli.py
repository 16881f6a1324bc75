"""The morphotype command end to end: samplesheet → segment → features, and run."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphotype.cli import EXIT_BAD_INPUT, main
from morphotype.features import FEATURE_NAMES
from morphotype.io import atomic_path, read_mask, write_table
from morphotype.run import PARAM_DEFAULTS, load_params


@pytest.fixture(scope="module")
def crops_subset(crops_dir, tmp_path_factory) -> Path:
    """A crops folder with 3 crops of each of a few classes (symlinked, same layout)."""
    root = tmp_path_factory.mktemp("crops")
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    subset = manifest[manifest["phenotype"].isin(["Interphase", "Metaphase", "Large"])].groupby("phenotype").head(3)
    for row in subset.itertuples():
        (root / row.phenotype).mkdir(exist_ok=True)
        (root / row.phenotype / row.file).symlink_to(crops_dir / row.phenotype / row.file)
    subset.to_csv(root / "manifest.csv", index=False)
    return root


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and "morphotype" in capsys.readouterr().out
    for command in ["segment", "features", "run", "samplesheet"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "Example:" in capsys.readouterr().out


def test_steps_chain_on_real_crops(crops_subset, tmp_path):
    sheet = tmp_path / "sheet.csv"
    assert main(["samplesheet", "mitocheck-crops", str(crops_subset), "--out", str(sheet)]) == 0
    masks = tmp_path / "masks"
    assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(masks), "--keep-edge-objects",
                 "--workers", "2"]) == 0
    mask_files = sorted(masks.glob("*.mask.tiff"))
    assert len(mask_files) == 9
    assert all(read_mask(path).shape == (64, 64) for path in mask_files)
    out = tmp_path / "cells.parquet"
    assert main(["features", "--samplesheet", str(sheet), "--masks", str(masks), "--out", str(out),
                 "--workers", "1"]) == 0
    cells = pd.read_parquet(out)
    unmatched = pd.read_csv(out.with_name("cells.unmatched.csv"))  # always written, maybe empty
    assert len(cells) + len(unmatched) == 9  # every crop gets a nucleus or is reported
    assert cells["Metadata_CellID"].is_unique
    assert list(cells.columns[-157:]) == FEATURE_NAMES
    assert set(cells["Metadata_Phenotype"]) <= {"Interphase", "Metaphase", "Large"}
    assert cells["Metadata_ImageID"].str.match(r"^LT\d+_\d+_\d+_1_\d+$").all()
    # the matched nucleus is the centred one
    assert (np.hypot(cells["Nuclei_Location_Center_X"] - 32, cells["Nuclei_Location_Center_Y"] - 32) < 12).all()


def test_bad_samplesheet_exits_with_input_error(tmp_path, capsys):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("image,plate,well,site\nmissing.png,p,1,0\n")
    code = main(["segment", "--samplesheet", str(sheet), "--outdir", str(tmp_path / "m")])
    assert code == EXIT_BAD_INPUT
    assert "missing required column(s) ['frame']" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_run_writes_features_table(crops_subset, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"mitocheck_crops": str(crops_subset), "remove_edge_objects": False}))
    outdir = tmp_path / "out"
    assert main(["run", str(params), "--outdir", str(outdir), "--workers", "2"]) == 0
    cells = pd.read_parquet(outdir / "features" / "single_cells.parquet")
    assert 7 <= len(cells) <= 9
    recorded = yaml.safe_load((outdir / "pipeline_info" / "params.yaml").read_text())
    assert recorded["outdir"] == str(outdir) and recorded["remove_edge_objects"] is False


def test_params_precedence_and_errors(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("mitocheck_crops: crops\nmin_nucleus_size: 20\n")
    loaded = load_params(params, {"min_nucleus_size": "30", "remove_edge_objects": "false"})
    assert loaded["min_nucleus_size"] == 30 and loaded["remove_edge_objects"] is False
    assert loaded["segmentation_backend"] == PARAM_DEFAULTS["segmentation_backend"]
    params.write_text("mitocheck_crops: crops\nsegmentaton_backend: cellpose\n")
    with pytest.raises(ValueError, match="unknown parameter.*segmentaton_backend"):
        load_params(params)


def test_example_params_file_loads():
    example = Path(__file__).resolve().parents[1] / "examples" / "mitocheck_crops.yaml"
    assert load_params(example)["mitocheck_crops"].endswith("mitocheck_crops")


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "table.parquet"
    write_table(pd.DataFrame({"a": [1]}), target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert pd.read_parquet(target)["a"].tolist() == [1]  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]  # no temporary left behind


def test_merge_concatenates_in_order_and_refuses_mismatches(tmp_path, capsys):
    first, second = tmp_path / "b0.parquet", tmp_path / "b1.parquet"
    write_table(pd.DataFrame({"Metadata_CellID": ["a_1", "a_2"], "f": [1.0, 2.0]}), first)
    write_table(pd.DataFrame({"Metadata_CellID": ["b_1"], "f": [3.0]}), second)
    out = tmp_path / "all.parquet"
    assert main(["merge", "--out", str(out), str(first), str(second)]) == 0
    assert pd.read_parquet(out)["Metadata_CellID"].tolist() == ["a_1", "a_2", "b_1"]
    assert main(["merge", "--out", str(out), str(first), str(first)]) == EXIT_BAD_INPUT
    assert "duplicated Metadata_CellID" in capsys.readouterr().err
    write_table(pd.DataFrame({"Metadata_CellID": ["c_1"], "g": [3.0]}), second)
    assert main(["merge", "--out", str(out), str(first), str(second)]) == EXIT_BAD_INPUT
    assert "b1.parquet: columns differ" in capsys.readouterr().err
