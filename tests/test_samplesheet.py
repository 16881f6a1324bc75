import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from morphotype.io import MorphotypeInputError, asset_path
from morphotype.samplesheet import file_ids, from_mitocheck_crops, read_samplesheet


@pytest.fixture
def image_file(tmp_path) -> Path:
    import imageio.v3 as iio

    path = tmp_path / "frame_0001.png"
    iio.imwrite(path, np.zeros((16, 16), np.uint8))
    return path


def write_sheet(tmp_path, rows: list[dict], name="sheet.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_row(image_file, **changes) -> dict:
    row = {"image": str(image_file), "plate": "LT0001_02", "well": "15", "site": 1, "frame": 3,
           "phenotype": "Interphase", "x": 5, "y": 7}
    row.update(changes)
    return row


def test_schema_is_valid_json_schema():
    Draft202012Validator.check_schema(json.loads(asset_path("schema_input.json").read_text()))


def test_valid_sheet_is_typed_and_gets_ids(tmp_path, image_file):
    sheet = read_samplesheet(write_sheet(tmp_path, [good_row(image_file), good_row(image_file, x=9, y=9)]))
    assert len(sheet) == 2
    assert sheet["frame"].tolist() == [3, 3] and sheet["x"].tolist() == [5.0, 9.0]
    assert sheet["file_id"].nunique() == 1 and sheet["file_id"].iloc[0] == "frame_0001"
    assert sheet["image_id"].iloc[0] == "LT0001_02_15_1_3"


def test_missing_required_column_is_named(tmp_path, image_file):
    row = good_row(image_file)
    del row["plate"]
    with pytest.raises(MorphotypeInputError, match=r"missing required column.*plate"):
        read_samplesheet(write_sheet(tmp_path, [row]))


def test_empty_required_value_names_row_and_column(tmp_path, image_file):
    rows = [good_row(image_file), good_row(image_file, x=1, plate="")]
    with pytest.raises(MorphotypeInputError, match=r"row 3: missing required column 'plate'"):
        read_samplesheet(write_sheet(tmp_path, rows))


def test_bad_path_is_named(tmp_path, image_file):
    rows = [good_row(image_file, image=str(tmp_path / "nope.png"))]
    with pytest.raises(MorphotypeInputError, match=r"row 2, column 'image': file .*nope.png.* does not exist"):
        read_samplesheet(write_sheet(tmp_path, rows))


def test_urls_are_not_checked_on_disk(tmp_path):
    sheet = read_samplesheet(write_sheet(tmp_path, [{"image": "https://example.org/a.tif", "plate": "p",
                                                     "well": "A01", "site": 0, "frame": 0}]))
    assert sheet["image"].iloc[0] == "https://example.org/a.tif"


def test_unknown_phenotype_label(tmp_path, image_file):
    with pytest.raises(MorphotypeInputError, match=r"row 2, column 'phenotype': 'Mitotic' is not valid"):
        read_samplesheet(write_sheet(tmp_path, [good_row(image_file, phenotype="Mitotic")]))


def test_wrong_type_is_named(tmp_path, image_file):
    with pytest.raises(MorphotypeInputError, match=r"row 2, column 'frame': 'late' is not valid"):
        read_samplesheet(write_sheet(tmp_path, [good_row(image_file, frame="late")]))


def test_duplicated_rows(tmp_path, image_file):
    rows = [good_row(image_file), good_row(image_file, phenotype="Large")]
    with pytest.raises(MorphotypeInputError, match=r"row 3: duplicates an earlier row"):
        read_samplesheet(write_sheet(tmp_path, rows))


def test_phenotype_needs_coordinates(tmp_path, image_file):
    row = good_row(image_file)
    del row["x"], row["y"]
    with pytest.raises(MorphotypeInputError, match=r"row 2"):
        read_samplesheet(write_sheet(tmp_path, [row]))


def test_every_error_is_reported_at_once(tmp_path, image_file):
    rows = [good_row(image_file, frame=-1), good_row(image_file, x=3, phenotype="Nope")]
    with pytest.raises(MorphotypeInputError) as raised:
        read_samplesheet(write_sheet(tmp_path, rows))
    assert "row 2, column 'frame'" in str(raised.value) and "row 3, column 'phenotype'" in str(raised.value)


def test_file_ids_are_unique_when_stems_collide():
    ids = file_ids(pd.Series(["/a/img.png", "/b/img.png", "/a/img.png", "/c/other.tif"]))
    assert ids[0] == ids[2] and ids[0] != ids[1] and ids[3] == "other"
    assert ids[0].startswith("img-")


def test_mitocheck_crops_sheet(crops_dir, tmp_path):
    sheet = from_mitocheck_crops(crops_dir)
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    assert len(sheet) == len(manifest) == 2779
    assert (sheet[["x", "y"]] == 32.0).all().all()  # 64x64 crops centred on the annotation
    assert sheet["frame_x"].tolist() == manifest["x"].tolist()
    path = tmp_path / "sheet.csv"
    sheet.to_csv(path, index=False)
    validated = read_samplesheet(path)
    assert validated["image_id"].nunique() == manifest.groupby(["plate", "well", "frame"]).ngroups == 232
    assert validated["file_id"].is_unique


def test_mitocheck_crops_needs_manifest(tmp_path):
    with pytest.raises(MorphotypeInputError, match="manifest.csv"):
        from_mitocheck_crops(tmp_path)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_coordinates_are_refused(tmp_path, image_file, value):
    # "nan" parses as a float and passes `minimum: 0`; left in, every nucleus got the label
    with pytest.raises(MorphotypeInputError, match=r"row 2, column 'x'"):
        read_samplesheet(write_sheet(tmp_path, [good_row(image_file, x=value)]))


@pytest.mark.parametrize("content, message", [("", "is empty"),
                                              ("image,plate,well,site,frame\n", "no rows")])
def test_empty_or_header_only_samplesheet_is_refused(tmp_path, content, message):
    path = tmp_path / "sheet.csv"
    path.write_text(content)
    with pytest.raises(MorphotypeInputError, match=message):
        read_samplesheet(path)


def test_crops_of_several_sizes_each_get_their_own_centre(tmp_path):
    import imageio.v3 as iio

    rows = []
    for name, shape in (("small.png", (64, 64)), ("large.png", (100, 80))):
        (tmp_path / "Interphase").mkdir(exist_ok=True)
        iio.imwrite(tmp_path / "Interphase" / name, np.zeros(shape, np.uint8))
        rows.append({"phenotype": "Interphase", "file": name, "plate": "P", "well": 1, "field": 1,
                     "frame": 0, "x": 10, "y": 10})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    sheet = from_mitocheck_crops(tmp_path)
    assert sheet[["x", "y"]].to_numpy().tolist() == [[32.0, 32.0], [40.0, 50.0]]
