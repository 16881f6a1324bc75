"""``morphotype run PARAMS.yaml``: the whole pipeline on one machine.

Same steps, same order, same params file and output layout as
``nextflow run main.nf -params-file PARAMS.yaml``. It is the embedded default, not a second
workflow engine: no scheduling, no retries, no caching beyond what each step does itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import yaml

from morphotype import __version__
from morphotype.io import MorphotypeInputError, atomic_path

log = logging.getLogger(__name__)

# Every pipeline parameter with its default; nextflow.config and nextflow_schema.json hold the
# same names and defaults (a test keeps them in step).
PARAM_DEFAULTS: dict[str, object] = {
    "input": None,  # samplesheet CSV (assets/schema_input.json)
    "mitocheck_crops": None,  # or: a folder of MitoCheck crops (class folders + manifest.csv)
    "outdir": "results",
    "segmentation_backend": "threshold",  # threshold | cellpose
    "cellpose_model": "cyto",  # model name in Cellpose's cache, or a path to weights
    "cellpose_diameter": 0.0,  # 0: estimated by Cellpose's size model
    "cellpose_flow_threshold": 0.8,
    "cellpose_cellprob_threshold": 0.0,
    "use_gpu": False,
    "min_nucleus_size": 15,
    "remove_edge_objects": True,
    "annotation_tolerance": 5.0,  # pixels from an annotated centre to the nearest mask
    "batch_size": 500,  # images per Nextflow task
}

# Parameters for Nextflow's infrastructure only (executors, staging); morphotype run accepts
# and ignores them so that one params file serves both.
INFRASTRUCTURE_PARAMS: dict[str, object] = {
    "cellpose_models_dir": None,
    "publish_dir_mode": "copy",
    "slurm_queue": None,
    "slurm_cluster_options": None,
    "aws_queue": None,
    "aws_region": "eu-west-1",
    "aws_workdir": None,
}

# The order of the stages; workflows/morphotype.nf runs them in the same order.
STAGES = ["samplesheet", "segment", "features"]


def load_params(params_file: str | Path | None, overrides: dict[str, object] | None = None) -> dict:
    """Defaults, then the params file, then command-line overrides; unknown names are an error."""
    params = dict(PARAM_DEFAULTS)
    if params_file is not None:
        path = Path(params_file)
        if not path.exists():
            raise MorphotypeInputError(f"{path}: params file does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise MorphotypeInputError(f"{path}: expected a mapping of parameter names to values")
        unknown = sorted(set(loaded) - set(PARAM_DEFAULTS) - set(INFRASTRUCTURE_PARAMS))
        if unknown:
            raise MorphotypeInputError(f"{path}: unknown parameter(s) {unknown}; known: {sorted(PARAM_DEFAULTS)}")
        params.update({k: v for k, v in loaded.items() if k in PARAM_DEFAULTS})
    for name, value in (overrides or {}).items():
        if name in INFRASTRUCTURE_PARAMS:
            continue
        if name not in PARAM_DEFAULTS:
            raise MorphotypeInputError(f"unknown parameter --{name}; known: {sorted(PARAM_DEFAULTS)}")
        params[name] = _coerce(value, PARAM_DEFAULTS[name])
    if not params["input"] and not params["mitocheck_crops"]:
        raise MorphotypeInputError("give either 'input' (a samplesheet) or 'mitocheck_crops' (a crops folder)")
    return params


def _coerce(value: object, default: object) -> object:
    """Command-line strings to the default's type, as Nextflow does for --param value."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise MorphotypeInputError(f"expected true or false, got {value!r}")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def segmentation_options(params: dict):
    from morphotype.pipeline import SegmentationOptions

    backend = params["segmentation_backend"]
    extra: dict[str, object] = {}
    if backend == "cellpose":
        extra = {
            "model": params["cellpose_model"],
            "diameter": float(params["cellpose_diameter"]),
            "flow_threshold": float(params["cellpose_flow_threshold"]),
            "cellprob_threshold": float(params["cellpose_cellprob_threshold"]),
            "gpu": bool(params["use_gpu"]),
        }
    return SegmentationOptions(
        backend=backend,
        remove_edge_objects=bool(params["remove_edge_objects"]),
        min_size=int(params["min_nucleus_size"]),
        backend_options=tuple(sorted(extra.items())),
    )


def run(params: dict, *, workers: int | None = None) -> dict[str, Path]:
    """Run every stage; return the main outputs by name."""
    from morphotype.pipeline import measure_samplesheet, segment_samplesheet, write_features
    from morphotype.samplesheet import from_mitocheck_crops, read_samplesheet, write_samplesheet

    outdir = Path(params["outdir"])
    outputs: dict[str, Path] = {}
    started = time.perf_counter()
    _write_run_info(params, outdir)

    # samplesheet
    if params["input"]:
        sheet_path = Path(params["input"])
    else:
        sheet_path = write_samplesheet(
            from_mitocheck_crops(params["mitocheck_crops"]), outdir / "samplesheet" / "samplesheet.csv"
        )
    sheet = read_samplesheet(sheet_path)
    outputs["samplesheet"] = sheet_path

    # segment
    masks_dir = outdir / "segmentation"
    segment_samplesheet(sheet, masks_dir, segmentation_options(params), workers=workers)
    outputs["masks"] = masks_dir

    # features
    cells, unmatched = measure_samplesheet(
        sheet, masks_dir, tolerance=float(params["annotation_tolerance"]), workers=workers
    )
    outputs["features"], outputs["unmatched"] = write_features(
        cells, unmatched, outdir / "features" / "single_cells.parquet"
    )
    annotated = int(sheet[["x", "y"]].notna().all(axis=1).sum())
    log.info(
        "run finished in %.0f s: %d cells; %d of %d annotations matched a nucleus, %d reported in %s",
        time.perf_counter() - started, len(cells), annotated - len(unmatched), annotated, len(unmatched),
        outputs["unmatched"],
    )
    return outputs


def _write_run_info(params: dict, outdir: Path) -> None:
    info = outdir / "pipeline_info"
    info.mkdir(parents=True, exist_ok=True)
    with atomic_path(info / "params.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(params, sort_keys=True))
    with atomic_path(info / "versions.json") as tmp:
        tmp.write_text(json.dumps(software_versions(), indent=2, sort_keys=True))


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"morphotype": __version__}
    for package in ("numpy", "scipy", "pandas", "scikit-image", "scikit-learn", "cp-measure", "cellpose",
                    "basicpy", "pycytominer", "pyarrow", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
