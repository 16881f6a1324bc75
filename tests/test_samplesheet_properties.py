"""Property-based attacks on the samplesheet parser: any CSV either reads into rows that satisfy
the schema, or is refused with MorphotypeInputError naming the file; never another exception."""

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from morphotype.io import MorphotypeInputError
from morphotype.samplesheet import read_samplesheet

CELL = st.one_of(
    st.sampled_from(["", "nan", "NaN", "inf", "-1", "0", "1.5", "3", " 7 ", "1e3", "A01", "x y",
                     "Interphase", "Folded", "negative", "treated", "-0", "+2"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=6),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 10**6).map(str),
)
COLUMNS = ["image", "plate", "well", "site", "frame", "phenotype", "x", "y", "control", "extra"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=10, unique=True),
       cells=st.lists(st.lists(CELL, min_size=10, max_size=10), min_size=0, max_size=4))
def test_any_csv_is_read_validly_or_refused_by_name(tmp_path_factory, columns, cells):
    folder = tmp_path_factory.mktemp("sheet")
    image = folder / "img.png"
    import imageio.v3 as iio

    iio.imwrite(image, np.zeros((8, 8), np.uint8))
    rows = [[str(image) if column == "image" and value in ("", "img") else value
             for column, value in zip(columns, row)] for row in cells]
    path = folder / "sheet.csv"
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)
    try:
        sheet = read_samplesheet(path, check_files=False)
    except MorphotypeInputError as error:
        assert str(path) in str(error)
        return
    assert len(sheet) >= 1
    for column in ("x", "y"):
        values = sheet[column].dropna()
        assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values)
    assert all(isinstance(v, int) and v >= 0 for v in sheet["frame"])
    assert all(isinstance(v, int) and v >= 0 for v in sheet["site"])
    assert sheet["file_id"].notna().all()


@settings(max_examples=60, deadline=None)
@given(x=st.floats(allow_nan=True, allow_infinity=True), y=st.floats(-10, 1e4))
def test_coordinates_are_finite_and_non_negative_or_refused(tmp_path_factory, x, y):
    folder = tmp_path_factory.mktemp("xy")
    path = folder / "sheet.csv"
    pd.DataFrame([{"image": "img.png", "plate": "P", "well": 1, "site": 1, "frame": 0,
                   "phenotype": "Interphase", "x": repr(x), "y": repr(y)}]).to_csv(path, index=False)
    ok = math.isfinite(x) and x >= 0 and y >= 0
    if ok:
        sheet = read_samplesheet(path, check_files=False)
        assert sheet.loc[0, "x"] == pytest.approx(x) and sheet.loc[0, "y"] == pytest.approx(y)
    else:
        with pytest.raises(MorphotypeInputError, match=r"row 2, column '[xy]'"):
            read_samplesheet(path, check_files=False)
