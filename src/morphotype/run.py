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
    "idr_plates": None,  # or: comma-separated idr0013-screenA plates streamed from the IDR ("all": every labelled plate)
    "outdir": "results",
    # IDR streaming
    "idr_labelled": True,  # the frames with MitoCheck annotations
    "idr_controls": "negative",  # comma-separated control kinds: one drawn frame per control well
    "idr_base_url": None,  # IDR file server (HTTP(S) or FTP mirror); None: the IDR's own
    "idr_cache": None,  # frame cache; None: <outdir>/idr/frames
    "illumination_correction": True,  # BaSiC on neighbouring frames (ic); false: raw frames (no_ic)
    "idr_movies_per_batch": 4,  # whole movies held in scratch at a time
    "idr_seed": 0,  # draw of the control frames
    "segmentation_backend": "threshold",  # threshold | cellpose
    "cellpose_model": "cyto",  # model name in Cellpose's cache, or a path to weights
    "cellpose_diameter": 0.0,  # 0: estimated by Cellpose's size model
    "cellpose_flow_threshold": 0.8,
    "cellpose_cellprob_threshold": 0.0,
    "use_gpu": False,
    "min_nucleus_size": 15,
    "remove_edge_objects": True,
    "split_touching_nuclei": True,  # threshold backend: watershed-split touching nuclei
    "annotation_tolerance": 5.0,  # pixels from an annotated centre to the nearest mask
    "batch_size": 500,  # images per Nextflow task
    # deep features (off unless given)
    "deep_weights": None,  # EfficientNet-B0 weights (.h5 / torch) -> DP__ features
    "deep_box_size": 128,
    "ssl_encoder": None,  # encoder folder, or "train": learn one on this run's training split -> SSL__ features
    "encoder_epochs": 30,
    # models (comma-separated lists are strings: Nextflow params are scalars)
    "train_models": True,
    "feature_spaces": "CP,DP,CP_and_DP,CP_areashape,CP_zernike",  # absent spaces are skipped
    "class_balance": "both",  # balanced | unbalanced | both
    "shuffled_baselines": True,
    "binary_models": True,
    "cv_folds": 10,
    "grid_c": "0.001,0.01,0.1,1,10,100,1000",
    "grid_l1_ratio": "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
    "split": "cell",  # cell: the study's 85/15 split; image: whole images held out
    "exclude_phenotypes": "Folded",
    "loio": True,
    "loio_feature_spaces": "",  # comma-separated; empty: every feature space
    "umap": True,
    "random_state": 0,
    # JUMP Cell Painting pilot (off unless given)
    "jump_plates": None,  # text file: one plate SQLite path or URL per line
    "jump_model": "CP_areashape__balanced",  # <model>__final and <model>__shuffled from <outdir>/models; "recommended": models/recommended.json
    "jump_min_cells": 50,
    "jump_top_n": 10,
    "report": True,  # <outdir>/report/index.html
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
    "loio_chunks": 8,  # LOIO tasks per feature space
}

# The order of the stages; workflows/morphotype.nf runs them in the same order.
STAGES = ["samplesheet", "stream", "segment", "features", "deep_features", "train", "jump", "report"]


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
    sources = [name for name in ("input", "mitocheck_crops", "idr_plates") if params[name]]
    if len(sources) != 1:
        raise MorphotypeInputError("give exactly one of 'input' (a samplesheet), 'mitocheck_crops' (a crops folder) "
                                   f"or 'idr_plates' (IDR plates); got {sources or 'none'}")
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

    from morphotype.segment import BUILTIN_CELLPOSE_MODELS

    backend = params["segmentation_backend"]
    extra: dict[str, object] = {}
    if backend == "cellpose":
        model = str(params["cellpose_model"])
        # A built-in name is looked up in Cellpose's local cache; anything else is a weights file.
        extra = {
            **({"model_type": model} if model in BUILTIN_CELLPOSE_MODELS else {"pretrained_model": model}),
            "diameter": float(params["cellpose_diameter"]),
            "flow_threshold": float(params["cellpose_flow_threshold"]),
            "cellprob_threshold": float(params["cellpose_cellprob_threshold"]),
            "gpu": bool(params["use_gpu"]),
        }
    elif not params["split_touching_nuclei"]:
        extra = {"split_touching": False}
    return SegmentationOptions(
        backend=backend,
        remove_edge_objects=bool(params["remove_edge_objects"]),
        min_size=int(params["min_nucleus_size"]),
        backend_options=tuple(sorted(extra.items())),
    )


def training_settings(params: dict) -> dict:
    """Keyword arguments of :func:`morphotype.models.train_all` from the params."""
    from morphotype.cli import build_parser, train_settings

    argv = ["train", "--features", "-", "--outdir", "-", *training_options(params)]
    return train_settings(build_parser().parse_args(argv))


def training_options(params: dict) -> list[str]:
    """The ``morphotype train`` options that the params stand for (Nextflow passes the same)."""
    options = [
        "--feature-spaces", *str(params["feature_spaces"]).split(","),
        "--class-balance", str(params["class_balance"]),
        "--cv-folds", str(params["cv_folds"]),
        "--grid-c", str(params["grid_c"]),
        "--grid-l1-ratio", str(params["grid_l1_ratio"]),
        "--split", str(params["split"]),
        "--exclude-phenotypes", str(params["exclude_phenotypes"]),
        "--seed", str(params["random_state"]),
    ]
    if params["loio_feature_spaces"]:
        options += ["--loio-feature-spaces", str(params["loio_feature_spaces"])]
    options += [] if params["shuffled_baselines"] else ["--no-shuffled"]
    options += [] if params["binary_models"] else ["--no-binary"]
    options += [] if params["loio"] else ["--no-loio"]
    options += [] if params["umap"] else ["--no-umap"]
    return options


def run(params: dict, *, workers: int | None = None) -> dict[str, Path]:
    """Run every stage of :data:`STAGES` that the params switch on; return the main outputs by name."""
    from morphotype.pipeline import measure_samplesheet, segment_samplesheet, write_features
    from morphotype.samplesheet import from_mitocheck_crops, read_samplesheet, write_samplesheet

    outdir = Path(params["outdir"])
    outputs: dict[str, Path] = {}
    started = time.perf_counter()
    stage_times: dict[str, float] = {}
    lap = [started]

    def stage_done(name: str) -> None:
        now = time.perf_counter()
        stage_times[name] = stage_times.get(name, 0.0) + now - lap[0]
        lap[0] = now

    _write_run_info(params, outdir)

    # samplesheet
    if params["input"]:
        sheet_path = Path(params["input"])
    elif params["mitocheck_crops"]:
        sheet_path = write_samplesheet(
            from_mitocheck_crops(params["mitocheck_crops"]), outdir / "samplesheet" / "samplesheet.csv"
        )
    else:
        from morphotype import idr

        plates = None if str(params["idr_plates"]) == "all" else _names(params["idr_plates"])
        extra = {"base_url": params["idr_base_url"]} if params["idr_base_url"] else {}
        sheet_path = write_samplesheet(
            idr.idr_samplesheet(plates, labelled=bool(params["idr_labelled"]), controls=_names(params["idr_controls"]),
                                seed=int(params["idr_seed"]), **extra),
            outdir / "samplesheet" / "samplesheet.csv")
    outputs["samplesheet"] = sheet_path

    # stream: movie frames from the IDR into the frame cache, illumination-corrected
    if params["idr_plates"]:
        from morphotype import idr

        remote = read_samplesheet(sheet_path, check_files=False)
        frames, stats = idr.stream_frames(
            remote, Path(params["idr_cache"] or outdir / "idr" / "frames"),
            variant="ic" if params["illumination_correction"] else "no_ic",
            options=idr.FetchOptions(batch_size=int(params["idr_movies_per_batch"])))
        sheet_path = write_samplesheet(frames.drop(columns=["file_id", "image_id"], errors="ignore"),
                                       outdir / "idr" / "frames.csv")
        outputs["frames"] = sheet_path
        log.info("stream: %d frames written, %d from cache, %.1f MB downloaded", stats.frames_written,
                 stats.frames_from_cache, stats.bytes_downloaded / 1e6)
    sheet = read_samplesheet(sheet_path)
    stage_done("samplesheet")

    # segment
    masks_dir = outdir / "segmentation"
    segment_samplesheet(sheet, masks_dir, segmentation_options(params), workers=workers)
    outputs["masks"] = masks_dir
    stage_done("segment")

    # features
    cells, unmatched = measure_samplesheet(
        sheet, masks_dir, tolerance=float(params["annotation_tolerance"]), workers=workers
    )
    stage_done("features")

    # deep_features: DP__ (EfficientNet-B0) and/or SSL__ (in-domain encoder) columns
    if params["deep_weights"] or params["ssl_encoder"]:
        from morphotype import deep

        if params["deep_weights"]:
            added = deep.deep_features(cells, weights=params["deep_weights"], box_size=int(params["deep_box_size"]),
                                       random_state=int(params["random_state"]))
            cells = cells.merge(added, on=deep.CELL_ID, how="left", validate="one_to_one")
        if params["ssl_encoder"]:
            encoder_dir = Path(params["ssl_encoder"])
            if str(params["ssl_encoder"]) == "train":
                encoder_dir = outdir / "encoder"
                encoder = deep.train_encoder_on_training_split(
                    cells, split=str(params["split"]), exclude_phenotypes=_names(params["exclude_phenotypes"]),
                    epochs=int(params["encoder_epochs"]), seed=int(params["random_state"]))
                deep.save_encoder(encoder, encoder_dir)
                outputs["encoder"] = encoder_dir
            added = deep.ssl_features(cells, deep.load_encoder(encoder_dir))
            cells = cells.merge(added, on=deep.CELL_ID, how="left", validate="one_to_one")
    outputs["features"], outputs["unmatched"] = write_features(
        cells, unmatched, outdir / "features" / "single_cells.parquet")
    stage_done("deep_features")

    # train (+ evaluate)
    if params["train_models"]:
        from morphotype.models import train_all, write_results

        results = train_all(cells, n_jobs=workers or 2, **training_settings(params))
        evaluation = write_results(results, outdir)
        outputs["models"] = outdir / "models"
        outputs["evaluation"] = outdir / "evaluation"
        log.info("trained %d models; evaluation tables: %s", len(results.models), ", ".join(sorted(evaluation)))
        stage_done("train")
        from morphotype.selection import train_families_for_run

        outputs.update(train_families_for_run(cells, results, outdir, n_jobs=workers or 2))
        stage_done("model_families")

    # jump: one plate at a time, then the summary across plates
    if params["jump_plates"]:
        from morphotype import jump

        models_dir = outdir / "models"
        plate_dir = outdir / "jump" / "plates"
        recommended = params["jump_model"] == "recommended"  # the models folder: its recommended model
        for plate in jump_plate_list(params["jump_plates"]):
            jump.score_plate(plate, models_dir if recommended else models_dir / f"{params['jump_model']}__final",
                             models_dir if recommended else models_dir / f"{params['jump_model']}__shuffled",
                             plate_dir,
                             min_cells=int(params["jump_min_cells"]), seed=int(params["random_state"]))
        jump.summarise(sorted(plate_dir.glob("*.summary.json")), outdir / "jump" / "summary",
                       top_n=int(params["jump_top_n"]))
        outputs["jump"] = outdir / "jump"
        stage_done("jump")

    # report
    if params["report"]:
        from morphotype.report import write_report

        outputs["report"] = write_report(outdir)
        stage_done("report")

    annotated = int(sheet[["x", "y"]].notna().all(axis=1).sum())
    log.info(
        "run finished in %.0f s: %d cells; %d of %d annotations matched a nucleus, %d reported in %s",
        time.perf_counter() - started, len(cells), annotated - len(unmatched), annotated, len(unmatched),
        outputs["unmatched"],
    )
    _write_stage_times(stage_times, outdir)
    return outputs


def _write_stage_times(stage_times: dict[str, float], outdir: Path) -> None:
    """Log each stage's wall time (s) and keep them in pipeline_info/stage_times.json."""
    log.info("stage times: %s; total %.0f s", ", ".join(f"{k} {v:.0f} s" for k, v in stage_times.items()),
             sum(stage_times.values()))
    with atomic_path(outdir / "pipeline_info" / "stage_times.json") as tmp:
        tmp.write_text(json.dumps({k: round(v, 2) for k, v in stage_times.items()}, indent=2) + "\n")


def _names(value: object) -> list[str]:
    return [item.strip() for item in str(value or "").split(",") if item.strip()]


def jump_plate_list(path: str | Path) -> list[str]:
    """Plate SQLite paths or URLs, one per line (blank lines and # comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise MorphotypeInputError(f"jump_plates: {path} does not exist (expected a text file, one plate per line)")
    plates = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not plates:
        raise MorphotypeInputError(f"jump_plates: {path} lists no plate")
    return plates


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
