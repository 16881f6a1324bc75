"""Bad input is refused before any work starts, with exit 2 and one message naming what is wrong."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from morphotype import params as params_module
from morphotype.cli import EXIT_BAD_INPUT, EXIT_FAILURE, build_parser, main
from morphotype.io import MorphotypeInputError


@pytest.fixture
def sheet(tmp_path) -> Path:
    """A samplesheet of 12 labelled synthetic images (3 classes x 4), each one bright nucleus."""
    import imageio.v3 as iio

    rows = []
    for i in range(12):
        image = np.zeros((48, 48), np.uint8)
        yy, xx = np.mgrid[:48, :48]
        image[(yy - 24) ** 2 + (xx - 24) ** 2 < (6 + i % 4) ** 2] = 200
        path = tmp_path / f"img{i}.png"
        iio.imwrite(path, image)
        rows.append({"image": str(path), "plate": "P", "well": i, "site": 1, "frame": 0,
                     "phenotype": ["Interphase", "Metaphase", "Large"][i % 3], "x": 24, "y": 24})
    path = tmp_path / "sheet.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _run(tmp_path, sheet, **params) -> int:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"input": str(sheet), "outdir": str(tmp_path / "out"), **params}))
    return main(["run", str(params_file), "--workers", "1"])


@pytest.mark.parametrize("bad, message", [
    ({"umap": "no"}, "param 'umap'"),
    ({"grid_c": "-1,1"}, "param 'grid_c'"),
    ({"grid_l1_ratio": "0,2"}, "param 'grid_l1_ratio'"),
    ({"segmentation_backend": "stardist"}, "param 'segmentation_backend'"),
    ({"annotation_tolerance": -1}, "param 'annotation_tolerance'"),
    ({"cv_folds": 1}, "param 'cv_folds'"),
    ({"cv_folds": 5}, "cv_folds 5 is more than"),  # 4 cells per class in the sheet
    ({"min_nucleus_size": 2.5}, "param 'min_nucleus_size'"),
    ({"jump_plates": "nowhere.txt"}, "param 'jump_plates'"),
])
def test_bad_params_stop_the_run_before_segmentation(tmp_path, sheet, capsys, bad, message):
    assert _run(tmp_path, sheet, **bad) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "segmentation").exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("input: a.csv\numap: [true\n")
    assert main(["run", str(params_file)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(params_file) in err and "line" in err and "not valid YAML" in err


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(sorted(params_module.PARAM_DEFAULTS)),
       value=st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
                       st.sampled_from(["", "no", "yes", "true", "1", "-1", "0.5", "abc", "CP,XX", "1,2,3"])))
def test_any_param_value_is_accepted_valid_or_refused_by_name(name, value):
    candidate = {**params_module.PARAM_DEFAULTS, "mitocheck_crops": "crops", name: value}
    try:
        params_module.check_params(candidate, source="p.yaml")
    except MorphotypeInputError as error:
        assert "p.yaml" in str(error)
        return
    schema = params_module.pipeline_schema()["properties"].get(name, {})
    if value is not None and schema.get("type") == "boolean":
        assert isinstance(value, bool)
    if value is not None and schema.get("type") == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)


def test_train_refuses_unknown_feature_spaces_and_empty_tables(tmp_path, capsys):
    table = tmp_path / "cells.parquet"
    pd.DataFrame({"Metadata_CellID": ["a"], "Metadata_Phenotype": ["Large"], "Nuclei_AreaShape_Area": [1.0]}
                 ).to_parquet(table)
    assert main(["train", "--features", str(table), "--outdir", str(tmp_path / "o"),
                 "--feature-spaces", "CP", "Cp_areashape"]) == EXIT_BAD_INPUT
    assert "unknown feature space(s) ['Cp_areashape']" in capsys.readouterr().err
    pd.DataFrame({"Metadata_CellID": pd.Series([], dtype=str)}).to_parquet(table)
    assert main(["train", "--features", str(table), "--outdir", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert "no rows" in capsys.readouterr().err
    assert not (tmp_path / "o" / "evaluation").exists()


def test_rgb_images_need_a_channel_and_bad_pixels_stop_segmentation(tmp_path, capsys):
    import imageio.v3 as iio

    rgb = np.zeros((48, 48, 3), np.uint8)
    yy, xx = np.mgrid[:48, :48]
    rgb[..., 1][(yy - 24) ** 2 + (xx - 24) ** 2 < 64] = 220  # the nucleus is in the green channel
    iio.imwrite(tmp_path / "rgb.png", rgb)
    nan = np.full((48, 48), 0.2, np.float32)
    nan[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    tifffile.imwrite(tmp_path / "bright.tif", np.full((48, 48), 3.0, np.float32))
    for name, message in (("rgb.png", "channels differ"), ("nan.tif", "NaN"), ("bright.tif", "[0, 1]")):
        sheet = tmp_path / f"{name}.csv"
        pd.DataFrame([{"image": str(tmp_path / name), "plate": "P", "well": 1, "site": 1, "frame": 0}]
                     ).to_csv(sheet, index=False)
        assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(tmp_path / f"m_{name}")]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert name in err and message in err
    sheet = tmp_path / "rgb.png.csv"
    assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(tmp_path / "green"), "--channel", "1",
                 "--keep-edge-objects"]) == 0
    assert pd.read_csv(tmp_path / "green" / "segmentation_summary.csv")["objects"].tolist() == [1]


def test_failures_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from morphotype import cli

    def broken(args):
        raise KeyError("a coding error")

    monkeypatch.setattr(cli, "_command_report", broken)
    assert main(["report", str(tmp_path)]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert "failed: KeyError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main(["--debug", "report", str(tmp_path)])


def test_options_in_either_spelling_true_defaults_and_summary_on_stdout(sheet, tmp_path, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: True)" not in help_text and "(default: False)" not in help_text
    assert main(["samplesheet", "validate", str(sheet)]) == 0
    out, err = capsys.readouterr()
    assert "is valid" in out and "is valid" not in err
    assert main(["features", "--samplesheet", str(sheet), "--masks", str(tmp_path / "nomasks"),
                 "--out", str(tmp_path / "c.parquet"), "--workers=1", "--tolerance", "3"]) != 0
    capsys.readouterr()
    assert main(["segment", "--samplesheet", str(sheet), "--outdir", str(tmp_path / "m"), "--keep_edge_objects",
                 "--min_size", "5", "--workers", "1"]) == 0
