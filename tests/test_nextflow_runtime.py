"""The pipeline under the real Nextflow runtime (tests/nextflow/runtime.py): the crops demo on the
test profile end to end after a killed run and -resume, its outputs against `morphotype run`'s on
the same params, -stub-run, and wiring mutations of a copy of the pipeline, each caught.

Needs `make nextflow-runtime` (Maven Central); without it these tests are skipped with that
command. About 4 minutes on 2 cores: the real run ~2.5 min, `morphotype run` ~40 s, stub runs
~15 s each.
"""

from __future__ import annotations

import filecmp
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent / "nextflow"))
import runtime  # tests/nextflow/runtime.py

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not runtime.available(), reason="no Nextflow runtime: run `make nextflow-runtime`")]

# Four phenotypes, every 8th crop: 122 crops on 36 plates, enough cells per class to train.
PHENOTYPES = ("Interphase", "Large", "Prometaphase", "Apoptosis")
CROP_STEP = 8
# On top of -profile test: three SEGMENT / FEATURES batches, two LOIO chunks.
PARAMS = {"batch_size": 60, "loio_chunks": 2}


@pytest.fixture(scope="session")
def runtime_crops(tmp_path_factory, crops_dir) -> Path:
    """A crops folder (links) laid out like the shared one."""
    folder = tmp_path_factory.mktemp("runtime-crops") / "mitocheck_crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv", dtype=str)
    manifest = manifest[manifest["phenotype"].isin(PHENOTYPES)].iloc[::CROP_STEP]
    for phenotype, name in zip(manifest["phenotype"], manifest["file"]):
        (folder / phenotype).mkdir(parents=True, exist_ok=True)
        (folder / phenotype / name).symlink_to(crops_dir / phenotype / name)
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    return runtime.pipeline_copy(tmp_path_factory.mktemp("pipeline") / "morphotype")


@pytest.fixture(scope="session")
def test_params(runtime_crops, tmp_path_factory) -> dict:
    return {**PARAMS, "mitocheck_crops": str(runtime_crops)}


@pytest.fixture(scope="session")
def resumed_run(tmp_path_factory, pipeline, test_params) -> dict:
    """-profile test killed once its first FEATURES task is submitted, then run again with -resume."""
    launch = tmp_path_factory.mktemp("nextflow-real")
    params = {**test_params, "outdir": str(launch / "results")}
    killed = runtime.run_until(pipeline, launch, params, "MORPHOTYPE_FEATURES (batch_", "-profile", "test")
    resumed = runtime.run(pipeline, launch, params, "-profile", "test", "-resume")
    return {"outdir": launch / "results", "killed": killed, "resumed": resumed}


@pytest.fixture(scope="session")
def stub_run(tmp_path_factory, pipeline, test_params) -> Path:
    launch = tmp_path_factory.mktemp("nextflow-stub")
    runtime.run(pipeline, launch, {**test_params, "outdir": str(launch / "results")}, "-profile", "test", "-stub-run")
    return launch / "results"


def test_a_killed_run_resumes_from_its_cached_tasks(resumed_run):
    table = runtime.trace(resumed_run["outdir"])
    cached = table.loc[table["status"] == "CACHED", "name"]
    assert cached.str.contains("MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS").any()
    assert cached.str.contains("MORPHOTYPE_SEGMENT").any()
    assert "Succeeded" in resumed_run["resumed"].stdout or "Cached" in resumed_run["resumed"].stdout
    # every task of the test profile: three batches, two feature spaces, LOIO of one in two chunks
    names = [process.split(":")[-1] for process, _tag in runtime.tasks(resumed_run["outdir"])]
    assert names.count("MORPHOTYPE_SEGMENT") == names.count("MORPHOTYPE_FEATURES") == 3
    assert names.count("MORPHOTYPE_TRAIN") == 2 and names.count("MORPHOTYPE_LOIO") == 2
    assert names.count("MORPHOTYPE_EVALUATE") == names.count("MORPHOTYPE_REPORT") == 1


def compare_trees(ours: Path, reference: Path) -> None:
    """Every file under `reference` is under `ours` with equal content (tables read as tables)."""
    assert sorted(p.relative_to(ours) for p in ours.rglob("*")) == \
        sorted(p.relative_to(reference) for p in reference.rglob("*")), ours
    for path in sorted(reference.rglob("*")):
        mine = ours / path.relative_to(reference)
        if path.is_dir():
            continue
        if path.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(mine), pd.read_parquet(path))
        elif path.suffix == ".csv":
            pd.testing.assert_frame_equal(pd.read_csv(mine), pd.read_csv(path))
        elif path.suffix == ".json":
            assert json.loads(mine.read_text()) == json.loads(path.read_text()), path
        else:
            assert filecmp.cmp(mine, path, shallow=False), path


def test_published_outputs_equal_morphotype_run_on_the_same_params(resumed_run, tmp_path):
    """`morphotype run` on the params.yaml the Nextflow run published: the same tables and models."""
    from morphotype.run import run

    outdir = resumed_run["outdir"]
    params = yaml.safe_load((outdir / "pipeline_info" / "params.yaml").read_text())
    assert params["feature_spaces"] == "CP_areashape,CP_zernike" and params["batch_size"] == 60
    reference = tmp_path / "results"
    run({**params, "outdir": str(reference)}, workers=2)

    for table in ("samplesheet/samplesheet.csv", "segmentation/segmentation_summary.csv",
                  "features/single_cells.unmatched.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(outdir / table), pd.read_csv(reference / table))
    cells = pd.read_parquet(outdir / "features" / "single_cells.parquet")
    assert len(cells) >= 100
    pd.testing.assert_frame_equal(cells, pd.read_parquet(reference / "features" / "single_cells.parquet"))
    assert sorted(p.name for p in (outdir / "segmentation").glob("*.mask.tiff")) == \
        sorted(p.name for p in (reference / "segmentation").glob("*.mask.tiff"))
    compare_trees(outdir / "models", reference / "models")
    compare_trees(outdir / "evaluation", reference / "evaluation")
    assert sorted(p.name for p in (outdir / "report" / "figures").iterdir()) == \
        sorted(p.name for p in (reference / "report" / "figures").iterdir())
    assert "morphotype:" in (outdir / "pipeline_info" / "software_versions.yml").read_text()


def test_stub_run_runs_the_tasks_of_the_real_run(stub_run, resumed_run):
    """The same tasks, but per batch: the stub samplesheet holds one image, so one batch."""
    def unbatched(outdir):
        return {(process, "" if tag.startswith("batch_") else tag) for process, tag in runtime.tasks(outdir)}

    assert unbatched(stub_run) == unbatched(resumed_run["outdir"])
    top = {path.split("/")[0] for path in runtime.published(stub_run)}
    assert top == {path.split("/")[0] for path in runtime.published(resumed_run["outdir"])}


# Wiring bugs, each applied alone to a copy of the pipeline and run with -stub-run: the run must
# fail, or run other tasks, or publish other files than the unchanged pipeline's stub run.
MUTATIONS = {
    "features join with swapped operands": {
        "subworkflows/local/features/main.nf": ("ch_batches.join(ch_masks)", "ch_masks.join(ch_batches)")},
    "LOIO join with swapped operands": {
        "subworkflows/local/train/main.nf": (".join(ch_spaces)\n", ".join(ch_spaces).map { m, a, b -> [m, b, a] }\n")},
    "report without ifEmpty on an optional input": {
        "subworkflows/local/report/main.nf": ("ch_jump_summary.map { _meta, summary -> [summary] }.ifEmpty([[]])",
                                              "ch_jump_summary.map { _meta, summary -> [summary] }")},
    "a dropped input": {
        "workflows/morphotype.nf": ("FEATURES(STREAM.out.batches, SEGMENT.out.masks)",
                                    "FEATURES(STREAM.out.batches)")},
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_wiring_mutation_is_caught_by_a_stub_run(mutation, tmp_path, stub_run, test_params):
    pipeline = runtime.pipeline_copy(tmp_path / "morphotype", MUTATIONS[mutation])
    launch = tmp_path / "launch"
    params = {**test_params, "outdir": str(launch / "results")}
    result = runtime.run(pipeline, launch, params, "-profile", "test", "-stub-run", check=False, timeout=300)
    caught = result.returncode != 0 or runtime.tasks(launch / "results") != runtime.tasks(stub_run) \
        or runtime.published(launch / "results") != runtime.published(stub_run)
    assert caught, f"{mutation}: the stub run succeeded with the same tasks and outputs"
