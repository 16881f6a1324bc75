"""The morphotype command end to end: samplesheet → segment → features, and run."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphotype.cli import EXIT_BAD_INPUT, main
from morphotype.features import FEATURE_NAMES
from morphotype.io import atomic_path, read_mask, write_table
from morphotype.params import PARAM_DEFAULTS, load_params


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
    for command in ["samplesheet", "segment", "features", "stream", "normalize", "jump", "train", "predict", "loio",
                    "evaluate", "deep-features", "encoder", "report", "merge", "run"]:
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
    params.write_text(yaml.safe_dump({"mitocheck_crops": str(crops_subset), "remove_edge_objects": False,
                                      "train_models": False, "report": False}))
    outdir = tmp_path / "out"
    assert main(["run", str(params), "--outdir", str(outdir), "--workers", "2"]) == 0
    cells = pd.read_parquet(outdir / "features" / "single_cells.parquet")
    assert 7 <= len(cells) <= 9
    assert not (outdir / "models").exists() and not (outdir / "report").exists()  # switched off
    recorded = yaml.safe_load((outdir / "pipeline_info" / "params.yaml").read_text())
    assert recorded["outdir"] == str(outdir) and recorded["remove_edge_objects"] is False


def test_params_precedence_and_errors(tmp_path):
    params = tmp_path / "p.yaml"
    (tmp_path / "crops").mkdir()
    params.write_text(f"mitocheck_crops: {tmp_path / 'crops'}\nmin_nucleus_size: 20\n")
    loaded = load_params(params, {"min_nucleus_size": "30", "remove_edge_objects": "false"})
    assert loaded["min_nucleus_size"] == 30 and loaded["remove_edge_objects"] is False
    assert loaded["segmentation_backend"] == PARAM_DEFAULTS["segmentation_backend"]
    params.write_text(f"mitocheck_crops: {tmp_path / 'crops'}\nsegmentaton_backend: cellpose\n")
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


# ------------------------------------------------------------------ models, deep features, report

TINY_GRID = ["--grid-c", "0.1,1", "--grid-l1-ratio", "0.5", "--cv-folds", "3", "--class-balance", "balanced",
             "--no-binary", "--no-umap"]


@pytest.fixture(scope="module")
def labelled_cells(crops_dir, tmp_path_factory) -> Path:
    """Features of 12 crops of each of 6 phenotypes (plus Folded, which training leaves out)."""
    root = tmp_path_factory.mktemp("labelled")
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    classes = ["Interphase", "Prometaphase", "Apoptosis", "Binuclear", "Polylobed", "OutOfFocus", "Folded"]
    subset = manifest[manifest["phenotype"].isin(classes)].groupby("phenotype").head(12)
    crops = root / "crops"
    for row in subset.itertuples():
        (crops / row.phenotype).mkdir(parents=True, exist_ok=True)
        (crops / row.phenotype / row.file).symlink_to(crops_dir / row.phenotype / row.file)
    subset.to_csv(crops / "manifest.csv", index=False)
    sheet, masks, cells = root / "sheet.csv", root / "masks", root / "cells.parquet"
    assert main(["samplesheet", "mitocheck-crops", str(crops), "--out", str(sheet)]) == 0
    assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(masks), "--keep-edge-objects",
                 "--workers", "2"]) == 0
    assert main(["features", "--samplesheet", str(sheet), "--masks", str(masks), "--out", str(cells),
                 "--workers", "2"]) == 0
    return cells


def test_segment_options_reach_the_backends(crops_subset, tmp_path, monkeypatch):
    """Cellpose by built-in name (local cache) or by weights file, and unsplit threshold masks."""
    import torch
    from cellpose.resnet_torch import CPnet

    sheet = tmp_path / "sheet.csv"
    assert main(["samplesheet", "mitocheck-crops", str(crops_subset), "--out", str(sheet)]) == 0
    cache = tmp_path / "cellpose"
    cache.mkdir()
    torch.manual_seed(1)
    torch.save(CPnet([2, 32, 64, 128, 256], 3, sz=3, diam_mean=30.0).state_dict(), cache / "cytotorch_0")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(cache))
    common = ["--samplesheet", str(sheet), "--keep-edge-objects", "--workers", "1"]
    for name, options in {"builtin": ["--cellpose-model", "cyto", "--diameter", "30"],
                          "file": ["--cellpose-model", str(cache / "cytotorch_0"), "--diameter", "30"]}.items():
        assert main(["segment", *common, "--outdir", str(tmp_path / name), "--backend", "cellpose", *options]) == 0
        assert len(list((tmp_path / name).glob("*.mask.tiff"))) == 9
    missing = ["--cellpose-model", str(tmp_path / "nope.pt"), "--diameter", "30"]
    assert main(["segment", *common, "--outdir", str(tmp_path / "x"), "--backend", "cellpose", *missing]) == EXIT_BAD_INPUT
    assert main(["segment", *common, "--outdir", str(tmp_path / "split")]) == 0
    assert main(["segment", *common, "--outdir", str(tmp_path / "whole"), "--no-split-touching"]) == 0
    split = [read_mask(path) for path in sorted((tmp_path / "split").glob("*.mask.tiff"))]
    whole = [read_mask(path) for path in sorted((tmp_path / "whole").glob("*.mask.tiff"))]
    assert all(np.array_equal(a > 0, b > 0) for a, b in zip(split, whole))  # same foreground
    assert sum(int(m.max()) for m in whole) <= sum(int(m.max()) for m in split)


def _tables(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.name: (pd.read_csv(p) if p.suffix == ".csv" else pd.read_parquet(p))
            for p in sorted(folder.iterdir()) if p.suffix in (".csv", ".parquet") and p.stat().st_size > 1}


@pytest.mark.slow
def test_fan_out_train_loio_evaluate_equals_train(labelled_cells, tmp_path):
    """Per-space training, LOIO in image chunks and one evaluate give what one train gives."""
    spaces = ["CP_zernike", "DP", "CP_areashape"]  # DP is absent: skipped, not an error
    whole = tmp_path / "whole"
    assert main(["train", "--features", str(labelled_cells), "--outdir", str(whole), "--feature-spaces", *spaces,
                 *TINY_GRID, "--workers", "2"]) == 0
    loio_files = []
    for space in spaces:
        assert main(["train", "--features", str(labelled_cells), "--outdir", str(tmp_path / space), "--feature-spaces",
                     space, *TINY_GRID, "--no-evaluation", "--workers", "1"]) == 0
        assert not (tmp_path / space / "evaluation").exists()
        for chunk in range(3):
            loio_files.append(tmp_path / f"loio_{space}_{chunk}.parquet")
            assert main(["loio", "--features", str(labelled_cells), "--models", str(tmp_path / space / "models"),
                         "--chunk", str(chunk), "--chunks", "3", "--out", str(loio_files[-1]), "--workers", "1"]) == 0
    chunk_images = [set(pd.read_parquet(f)["Metadata_ImageID"]) for f in loio_files[:3]]
    assert all(chunk_images) and not chunk_images[0] & chunk_images[1]  # each image in one chunk
    fanned = tmp_path / "fanned"
    assert main(["evaluate", "--features", str(labelled_cells), "--models", *[str(tmp_path / s / "models") for s in spaces],
                 "--loio", *map(str, loio_files), "--no-umap", "--outdir", str(fanned)]) == 0
    expected, found = _tables(whole / "evaluation"), _tables(fanned / "evaluation")
    assert set(found) == set(expected) and len(expected["loio_predictions.parquet"]) > 0
    for name, table in expected.items():
        pd.testing.assert_frame_equal(found[name], table, obj=name)
    assert (whole / "models" / "training.json").read_text() == (fanned / "models" / "training.json").read_text()
    # a missing chunk is refused, naming what is missing
    code = main(["evaluate", "--features", str(labelled_cells), "--models", str(tmp_path / "CP_zernike" / "models"),
                 "--loio", str(loio_files[0]), "--outdir", str(tmp_path / "partial")])
    assert code == EXIT_BAD_INPUT


def test_training_on_too_few_cells_is_bad_input(labelled_cells, tmp_path, capsys):
    few = tmp_path / "few.parquet"
    write_table(pd.read_parquet(labelled_cells).groupby("Metadata_Phenotype").head(2), few)
    code = main(["train", "--features", str(few), "--outdir", str(tmp_path / "out"), "--feature-spaces", "CP",
                 *TINY_GRID])
    assert code == EXIT_BAD_INPUT
    assert "label more cells" in capsys.readouterr().err


def test_deep_features_join_by_cell_and_refuse_without_weights(labelled_cells, tmp_path, capsys):
    cells = pd.read_parquet(labelled_cells)
    out = tmp_path / "deep.parquet"
    code = main(["deep-features", "--features", str(labelled_cells), "--weights", str(tmp_path / "none.h5"),
                 "--out", str(out)])
    assert code == EXIT_BAD_INPUT and not out.exists()
    assert "none.h5" in capsys.readouterr().err
    code = main(["deep-features", "--features", str(labelled_cells), "--weights", "random", "--images",
                 str(tmp_path), "--out", str(out)])  # images looked up by file name in an empty folder
    assert code == EXIT_BAD_INPUT and f"not in {tmp_path}" in capsys.readouterr().err
    assert main(["deep-features", "--features", str(labelled_cells), "--weights", "random", "--out", str(out),
                 "--box-size", "64", "--batch-size", "16", "--workers", "2"]) == 0
    deep = pd.read_parquet(out)
    added = [c for c in deep.columns if c.startswith("DP__efficientnet_")]
    assert len(added) == 1280 and len(deep) == len(cells)
    pd.testing.assert_frame_equal(deep[cells.columns], cells)  # the table itself is unchanged
    assert np.isfinite(deep[added].to_numpy()).all() and deep[added].to_numpy().std(axis=0).max() > 0


@pytest.mark.slow
def test_encoder_never_sees_held_out_cells_and_gives_ssl_features(labelled_cells, tmp_path):
    from morphotype.deep import load_encoder
    from morphotype.deep import encoder_held_out_cells

    encoder_dir, out = tmp_path / "encoder", tmp_path / "ssl.parquet"
    assert main(["encoder", "train", "--features", str(labelled_cells), "--outdir", str(encoder_dir),
                 "--epochs", "2", "--batch-size", "16", "--workers", "2"]) == 0
    card = load_encoder(encoder_dir).card
    cells = pd.read_parquet(labelled_cells)
    held_out = encoder_held_out_cells(cells, split="cell", exclude_phenotypes=["Folded"])
    assert card["held_out_cells"] == len(held_out) > 0
    assert card["training_crops"] == len(cells) - len(held_out)  # Folded cells are unlabelled pixels: seen
    assert main(["deep-features", "--features", str(labelled_cells), "--encoder", str(encoder_dir),
                 "--out", str(out)]) == 0
    ssl = pd.read_parquet(out)
    assert sum(c.startswith("SSL__") for c in ssl.columns) == card["architecture"]["dim"]


@pytest.mark.slow
def test_run_trains_evaluates_and_reports(labelled_cells, crops_dir, tmp_path):
    crops = labelled_cells.parent / "crops"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "mitocheck_crops": str(crops), "remove_edge_objects": False, "feature_spaces": "CP,CP_areashape",
        "class_balance": "balanced", "grid_c": "0.1,1", "grid_l1_ratio": "0.5", "cv_folds": 3,
        "binary_models": False, "loio_feature_spaces": "CP_areashape", "umap": False}))
    outdir = tmp_path / "out"
    assert main(["run", str(params), "--outdir", str(outdir), "--workers", "2"]) == 0
    models = pd.read_csv(outdir / "evaluation" / "models.csv")
    assert set(models["model_id"]) == {f"{s}__balanced__{k}" for s in ("CP", "CP_areashape")
                                       for k in ("final", "shuffled")}
    loio = pd.read_parquet(outdir / "evaluation" / "loio_predictions.parquet")
    assert set(loio["feature_space"]) == {"CP_areashape"}
    html = (outdir / "report" / "index.html").read_text()
    assert all(model_id in html for model_id in models["model_id"])
    # the report command alone rewrites it
    (outdir / "report" / "index.html").unlink()
    assert main(["report", str(outdir)]) == 0 and (outdir / "report" / "index.html").stat().st_size > 10_000


@pytest.mark.slow
def test_run_starts_from_the_idr_and_rerun_fetches_nothing(tmp_path):
    """idr_plates: samplesheet of control frames, streamed (with BaSiC) from a loopback IDR mirror."""
    from morphotype import idr
    from morphotype.testing import LoopbackFileServer, synthetic_movie

    plate = "LT0030_18"
    remote = idr.idr_samplesheet([plate], labelled=False, controls=["negative"], base_url="http://mirror")
    root = tmp_path / "mirror"
    for number, movie in enumerate(sorted(set(remote["movie"]))):
        path = root / movie.removeprefix("http://mirror/")
        well = int(path.name.split("_")[0])
        synthetic = synthetic_movie(64, (256, 320), n_nuclei=4, seed=number)
        idr.write_cellh5(path, synthetic["movie"], plate=plate, well=well)
    outdir, cache = tmp_path / "out", tmp_path / "frames"
    params = tmp_path / "params.yaml"
    with LoopbackFileServer(root) as server:
        params.write_text(yaml.safe_dump({
            "idr_plates": plate, "idr_labelled": False, "idr_controls": "negative", "idr_base_url": server.url,
            "idr_cache": str(cache), "remove_edge_objects": False, "train_models": False, "report": False}))
        assert main(["run", str(params), "--outdir", str(outdir), "--workers", "2"]) == 0
        assert server.requests  # the movies came from the mirror
    frames = pd.read_csv(outdir / "idr" / "frames.csv")
    assert len(frames) == len(remote) == 7 and all(Path(image).is_file() for image in frames["image"])
    cells = pd.read_parquet(outdir / "features" / "single_cells.parquet")
    assert len(cells) > 0 and set(cells["Metadata_Control"]) == {"negative"}
    assert set(cells["Metadata_Plate"]) == {plate}
    with LoopbackFileServer(root) as server:  # same cache, new server address: nothing fetched
        params.write_text(params.read_text().replace(str(outdir), "").replace(
            yaml.safe_load(params.read_text())["idr_base_url"], server.url))
        assert main(["run", str(params), "--outdir", str(tmp_path / "again"), "--workers", "2"]) == 0
        assert server.requests == []
    located = ["Metadata_Image", "Metadata_Movie", "Metadata_Source"]  # paths and mirror URLs differ
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / "features" / "single_cells.parquet")
                                  .drop(columns=located, errors="ignore"), cells.drop(columns=located, errors="ignore"))
