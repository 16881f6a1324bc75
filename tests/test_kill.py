"""A killed run leaves nothing that looks finished: the report refuses a mixed folder, a re-run
cleans up and gives the results of a clean run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphotype.cli import EXIT_BAD_INPUT, main
from morphotype.training import check_results_consistent


@pytest.fixture(scope="module")
def small_run(crops_dir, tmp_path_factory) -> Path:
    """A params file for a run of 36 shared crops (3 classes) that trains in seconds."""
    root = tmp_path_factory.mktemp("kill")
    crops = root / "crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    subset = manifest[manifest["phenotype"].isin(["Interphase", "Metaphase", "Apoptosis"])].groupby("phenotype").head(12)
    for row in subset.itertuples():
        (crops / row.phenotype).mkdir(parents=True, exist_ok=True)
        (crops / row.phenotype / row.file).symlink_to(crops_dir / row.phenotype / row.file)
    subset.to_csv(crops / "manifest.csv", index=False)
    params = {"mitocheck_crops": str(crops), "feature_spaces": "CP,CP_areashape", "class_balance": "balanced",
              "binary_models": False, "cv_folds": 3, "grid_c": "0.1,1", "grid_l1_ratio": "0,1", "loio": False,
              "umap": False, "remove_edge_objects": False, "split_touching_nuclei": False}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _command(params: Path, outdir: Path) -> list[str]:
    return [sys.executable, "-m", "morphotype", "run", str(params), "--outdir", str(outdir), "--workers", "1"]


def _leftovers(outdir: Path) -> list[Path]:
    return [p for p in outdir.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".results-staging-")
            or p.name == ".segmenting"]


def test_runs_killed_at_random_points_never_leave_a_folder_that_looks_finished(small_run, tmp_path):
    clean = tmp_path / "clean"
    started = time.perf_counter()
    subprocess.run(_command(small_run, clean), check=True, capture_output=True)
    duration = time.perf_counter() - started
    reference = {p.relative_to(clean): p.read_bytes() for p in (clean / "models").rglob("coefficients.npz")}

    outdir = tmp_path / "killed"
    subprocess.run(_command(small_run, outdir), check=True, capture_output=True)  # a finished earlier run
    rng = np.random.default_rng(0)
    for fraction in sorted(rng.uniform(0.3, 0.95, size=3)):
        process = subprocess.Popen(_command(small_run, outdir), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(fraction * duration)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        # Whatever was killed: the models and evaluation agree, or the report refuses the folder.
        code = main(["report", str(outdir), "--report-dir", str(tmp_path / "report")])
        assert code in (0, EXIT_BAD_INPUT)
        if code == 0:
            check_results_consistent(outdir)
    subprocess.run(_command(small_run, outdir), check=True, capture_output=True)
    assert not _leftovers(outdir)
    assert {p.relative_to(outdir): p.read_bytes() for p in (outdir / "models").rglob("coefficients.npz")} == reference


def test_report_refuses_models_and_evaluation_of_different_runs(small_run, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    params = yaml.safe_load(small_run.read_text())
    for outdir, grid in ((first, "0.1,1"), (second, "1")):
        path = tmp_path / f"{outdir.name}.yaml"
        path.write_text(yaml.safe_dump({**params, "grid_c": grid, "report": False}))
        assert main(["run", str(path), "--outdir", str(outdir), "--workers", "1"]) == 0
    ids = {json.loads((d / "evaluation" / "summary.json").read_text())["results_id"] for d in (first, second)}
    assert len(ids) == 2
    (first / "evaluation").rename(tmp_path / "kept")
    (second / "evaluation").rename(first / "evaluation")  # what a kill between the two renames leaves
    capsys.readouterr()
    assert main(["report", str(first)]) == EXIT_BAD_INPUT
    assert "different runs" in capsys.readouterr().err
    (first / "report").mkdir(exist_ok=True)
    (first / "report" / ".index.html.abc.tmp").write_text("half")  # a killed report's leftover
    (first / "evaluation").rename(second / "evaluation")
    (tmp_path / "kept").rename(first / "evaluation")
    assert main(["report", str(first)]) == 0
    assert not _leftovers(first)
