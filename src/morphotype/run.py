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

from morphotype import idr, jump
from morphotype.columns import CELL_ID
from morphotype.domain import pixel_size_of, record_acquisition
from morphotype.io import MorphotypeInputError, atomic_path
from morphotype.params import default_workers, names, training_settings
from morphotype.pipeline import (
    SegmentationOptions,
    fetch_images,
    measure_samplesheet,
    segment_samplesheet,
    write_features,
)
from morphotype.report import write_report
from morphotype.samplesheet import from_mitocheck_crops, is_url, read_samplesheet, write_samplesheet
from morphotype.segment import BUILTIN_CELLPOSE_MODELS
from morphotype.selection import train_families_for_run
from morphotype.training import check_cv_folds, train_all, write_results
from morphotype.versions import write_versions

log = logging.getLogger(__name__)
# deep (and with it torch) is imported by the stage that uses it: torch takes seconds to load.

# The order of the stages; workflows/morphotype.nf runs them in the same order.
STAGES = ["samplesheet", "stream", "segment", "features", "deep_features", "train", "jump", "report"]


def segmentation_options(params: dict) -> SegmentationOptions:
    """The segmentation options that the params stand for (the segment command's too)."""
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
        channel=None if params["image_channel"] is None else int(params["image_channel"]),
    )


def run(params: dict, *, workers: int | None = None) -> dict[str, Path]:
    """Run every stage of :data:`STAGES` that the params switch on; return the main outputs by name.

    ``workers``: processes (and joblib workers for training); None: every core.
    """
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
        plates = None if str(params["idr_plates"]) == "all" else names(params["idr_plates"])
        extra = {"base_url": params["idr_base_url"]} if params["idr_base_url"] else {}
        sheet_path = write_samplesheet(
            idr.idr_samplesheet(plates, labelled=bool(params["idr_labelled"]), controls=names(params["idr_controls"]),
                                seed=int(params["idr_seed"]), **extra),
            outdir / "samplesheet" / "samplesheet.csv")
    outputs["samplesheet"] = sheet_path

    # stream: movie frames from the IDR into the frame cache, illumination-corrected
    if params["idr_plates"]:
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
    _check_before_segmentation(params, sheet)
    sheet = fetch_images(sheet, outdir / "images" if any(sheet["image"].map(is_url)) else None)
    stage_done("samplesheet")

    # segment
    masks_dir = outdir / "segmentation"
    segment_samplesheet(sheet, masks_dir, segmentation_options(params), workers=workers)
    outputs["masks"] = masks_dir
    stage_done("segment")

    # features
    cells, unmatched = measure_samplesheet(
        sheet, masks_dir, tolerance=float(params["annotation_tolerance"]), workers=workers,
        channel=segmentation_options(params).channel,
    )
    stage_done("features")

    # deep_features: DP__ (EfficientNet-B0) and/or SSL__ (in-domain encoder) columns
    if params["deep_weights"] or params["ssl_encoder"]:
        from morphotype import deep

        if params["deep_weights"]:
            added = deep.deep_features(cells, weights=params["deep_weights"], box_size=int(params["deep_box_size"]),
                                       random_state=int(params["random_state"]))
            cells = cells.merge(added, on=CELL_ID, how="left", validate="one_to_one")
        if params["ssl_encoder"]:
            encoder_dir = Path(params["ssl_encoder"])
            if str(params["ssl_encoder"]) == "train":
                encoder_dir = outdir / "encoder"
                encoder = deep.train_encoder_on_training_split(
                    cells, split=str(params["split"]), exclude_phenotypes=names(params["exclude_phenotypes"]),
                    epochs=int(params["encoder_epochs"]), seed=int(params["random_state"]))
                deep.save_encoder(encoder, encoder_dir)
                outputs["encoder"] = encoder_dir
            added = deep.ssl_features(cells, deep.load_encoder(encoder_dir))
            cells = cells.merge(added, on=CELL_ID, how="left", validate="one_to_one")
    outputs["features"], outputs["unmatched"] = write_features(
        cells, unmatched, outdir / "features" / "single_cells.parquet")
    stage_done("deep_features")

    # train (+ evaluate)
    if params["train_models"]:
        results = train_all(cells, n_jobs=workers or default_workers(), **training_settings(params))
        # as `morphotype train` records it (the Nextflow fan-out's cards must equal these)
        record_acquisition(results.models.values(), pixel_size_um=pixel_size_of(cells))
        evaluation = write_results(results, outdir)
        outputs["models"] = outdir / "models"
        outputs["evaluation"] = outdir / "evaluation"
        log.info("trained %d models; evaluation tables: %s", len(results.models), ", ".join(sorted(evaluation)))
        stage_done("train")
        if params["model_families"]:
            outputs.update(train_families_for_run(cells, results, outdir, n_jobs=workers or default_workers()))
            stage_done("model_families")

    # jump: one plate at a time, then the summary across plates
    if params["jump_plates"]:
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


def _check_before_segmentation(params: dict, sheet) -> None:
    """What the samplesheet already tells about later steps, checked before any image is read."""
    if params["train_models"] and "phenotype" in sheet.columns:
        labelled = sheet.dropna(subset=["phenotype"])
        labelled = labelled[~labelled["phenotype"].isin(names(params["exclude_phenotypes"]))]
        check_cv_folds(labelled["phenotype"].value_counts(), int(params["cv_folds"]),
                       what=f"annotations in the samplesheet {params['input'] or 'of this run'}", test_size=0.15)
    if params["jump_plates"]:
        jump_plate_list(params["jump_plates"])


def _write_stage_times(stage_times: dict[str, float], outdir: Path) -> None:
    """Log each stage's wall time (s) and keep them in pipeline_info/stage_times.json."""
    log.info("stage times: %s; total %.0f s", ", ".join(f"{k} {v:.0f} s" for k, v in stage_times.items()),
             sum(stage_times.values()))
    with atomic_path(outdir / "pipeline_info" / "stage_times.json") as tmp:
        tmp.write_text(json.dumps({k: round(v, 2) for k, v in stage_times.items()}, indent=2) + "\n")



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
    write_versions(info / "versions.json")
