"""The report page as the Jinja2 templates render it: text from the run is escaped, tables show
the run's numbers, and the templates ship inside the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from morphotype.report import write_report

HOSTILE = '<script>alert("x")</script> & <b>bold</b>'


class _Page(HTMLParser):
    """Tags, text nodes and, per table, the cell texts of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.tables: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if data.strip():
            self.text.append(data.strip())
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture
def small_run(tmp_path) -> Path:
    """A run folder without training: params, two model cards and their models table."""
    out = tmp_path / "run"
    (out / "pipeline_info").mkdir(parents=True)
    params = {"input": HOSTILE, "grid": {"C": [0.1, 1.0]}, "cv_folds": 3}
    (out / "pipeline_info" / "params.yaml").write_text(json.dumps(params))
    models = pd.DataFrame(
        {
            "model_id": ["CP__balanced__final", "CP__balanced__shuffled"],
            "C": [0.123456789, 1.0],
            "cv_score": [0.87654321, np.nan],
            "n_features": [12, 12],
        }
    )
    (out / "evaluation").mkdir()
    models.to_csv(out / "evaluation" / "models.csv", index=False)
    for model_id in models["model_id"]:
        card = {"model_id": model_id, "classes": ["A", HOSTILE], "model_type": "multiclass"}
        (out / "models" / model_id).mkdir(parents=True)
        (out / "models" / model_id / "model_card.json").write_text(json.dumps(card))
    return out


def test_text_from_the_run_is_escaped_not_markup(small_run):
    page = _parse(write_report(small_run))
    assert "script" not in page.tags and "b" not in page.tags
    assert HOSTILE in page.text  # shown to the reader as written
    parameters = page.tables[0]
    assert parameters == ["input", HOSTILE, "grid", '{"C": [0.1, 1.0]}', "cv_folds", "3"]


def test_models_table_shows_the_run_numbers(small_run):
    page = _parse(write_report(small_run))
    models = pd.read_csv(small_run / "evaluation" / "models.csv")
    header = list(models.columns)
    shown = next(cells for cells in page.tables if cells[: len(header)] == header)
    rows = [shown[i : i + len(header)] for i in range(len(header), len(shown), len(header))]
    assert len(rows) == len(models)
    for row, (_, expected) in zip(rows, models.iterrows(), strict=True):
        assert row[0] == expected["model_id"]
        assert row[1] == f"{expected['C']:.4g}"
        assert row[2] == ("" if np.isnan(expected["cv_score"]) else f"{expected['cv_score']:.4g}")
        assert row[3] == str(expected["n_features"])
    assert "2 models:" in page.text
    for model_id in models["model_id"]:
        assert f"Model {model_id}" in page.text
    assert page.text.count("LOIO was not run for this model.") == len(models)


@pytest.mark.slow
def test_templates_ship_in_the_wheel(tmp_path):
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the code
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*build, "-w", str(wheels), str(source)], check=True, capture_output=True)
    (wheel,) = wheels.glob("morphotype-*.whl")
    templates = root / "src" / "morphotype" / "templates" / "report"
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"morphotype/templates/report/{p.name}" for p in templates.iterdir()}
    assert len(expected) >= 2 and expected <= shipped
