"""The ``morphotype`` command: one subcommand per pipeline step, plus ``run`` for the whole.

Exit codes: 0 success, 2 bad input (arguments, samplesheet, params, tables), 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from morphotype import __version__, domain, idr, jump, normalize
from morphotype.cellprofiler import restrict_to_features_of
from morphotype.columns import IMAGE
from morphotype.domain import record_acquisition
from morphotype.download import DownloadError
from morphotype.estimators import load_any_model
from morphotype.evaluate import (
    data_as_trained,
    evaluate_models,
    leave_one_image_out,
    loio_image_chunk,
)
from morphotype.io import MorphotypeInputError, merge_tables, read_table, write_table
from morphotype.models import combine_results, load_models, predict_table, write_models
from morphotype.params import (
    CLASS_BALANCES,
    PARAM_DEFAULTS,
    SEGMENTATION_BACKENDS,
    SPLIT_METHODS,
    default_workers,
    load_params,
    training_settings,
)
from morphotype.pipeline import (
    fetch_images,
    measure_samplesheet,
    segment_samplesheet,
    write_features,
)
from morphotype.report import write_report
from morphotype.run import run, segmentation_options
from morphotype.samplesheet import from_mitocheck_crops, read_samplesheet, write_samplesheet
from morphotype.score import score
from morphotype.training import train_all, train_models, write_results

log = logging.getLogger("morphotype")
# deep (and with it torch) is imported by the two commands that use it: torch takes seconds to load.
D = PARAM_DEFAULTS  # every option that stands for a pipeline param takes the param's default

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        # A --no-X switch's "default: True" would read as "X is off by default": say nothing.
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="processes to use (default: every core)")


def _add_segmentation_options(parser: argparse.ArgumentParser) -> None:
    d = PARAM_DEFAULTS
    parser.add_argument("--backend", choices=SEGMENTATION_BACKENDS, default=d["segmentation_backend"],
                        help="segmentation backend")
    parser.add_argument("--cellpose-model", default=d["cellpose_model"],
                        help="cellpose: model name in Cellpose's model cache, or a path to weights")
    parser.add_argument("--diameter", type=float, default=d["cellpose_diameter"],
                        help="cellpose: nucleus diameter in pixels (0 = estimate)")
    parser.add_argument("--flow-threshold", type=float, default=d["cellpose_flow_threshold"], help="cellpose")
    parser.add_argument("--cellprob-threshold", type=float, default=d["cellpose_cellprob_threshold"],
                        help="cellpose")
    parser.add_argument("--gpu", action="store_true", help="cellpose: run on the GPU")
    parser.add_argument("--min-size", type=int, default=d["min_nucleus_size"], help="smallest nucleus in pixels")
    parser.add_argument("--keep-edge-objects", action="store_true",
                        help="keep nuclei that touch the image border (removed by default)")
    parser.add_argument("--no-split-touching", dest="split_touching", action="store_false",
                        help="threshold: keep touching nuclei as one object (a cell's chromatin stays whole)")
    _add_channel(parser)


def _add_channel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--channel", type=int, default=None,
                        help="multi-channel (RGB) images: 0-based channel holding the nuclei; without it an "
                        "RGB image whose channels differ is refused")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    d = PARAM_DEFAULTS
    parser.add_argument("--features", type=Path, required=True, help="single-cell table (Parquet)")
    parser.add_argument("--outdir", type=Path, required=True, help="writes <outdir>/models and <outdir>/evaluation")
    parser.add_argument("--feature-spaces", nargs="+", default=d["feature_spaces"].split(","),
                        help="CP, DP, CP_and_DP, CP_areashape, CP_zernike, SSL, CP_and_SSL (absent ones are skipped)")
    parser.add_argument("--class-balance", choices=list(CLASS_BALANCES), default=d["class_balance"])
    parser.add_argument("--no-shuffled", dest="shuffled", action="store_false", help="skip shuffled baselines")
    parser.add_argument("--no-binary", dest="binary", action="store_false", help="skip one-vs-rest models")
    parser.add_argument("--cv-folds", type=int, default=d["cv_folds"])
    parser.add_argument("--grid-c", default=d["grid_c"], help="comma-separated inverse regularisation strengths")
    parser.add_argument("--grid-l1-ratio", default=d["grid_l1_ratio"], help="comma-separated L1 ratios")
    parser.add_argument("--split", choices=SPLIT_METHODS, default=d["split"],
                        help="cell: the study's 85/15 stratified split; image: whole images held out")
    parser.add_argument("--exclude-phenotypes", default=d["exclude_phenotypes"], help="comma-separated")
    parser.add_argument("--no-loio", dest="loio", action="store_false", help="skip leave-one-image-out")
    parser.add_argument("--loio-feature-spaces", default=d["loio_feature_spaces"],
                        help="comma-separated; LOIO only for these (default: all)")
    parser.add_argument("--no-umap", dest="umap", action="store_false", help="skip UMAP embeddings")
    parser.add_argument("--seed", type=int, default=d["random_state"], help="random state")
    parser.add_argument("--no-evaluation", dest="evaluation", action="store_false",
                        help="write <outdir>/models only ('morphotype evaluate' follows, as in the Nextflow fan-out)")


def train_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`morphotype.training.train_all` from the train options: the
    options name pipeline params, which :func:`morphotype.params.training_settings` turns into settings."""
    return training_settings({
        "feature_spaces": ",".join(str(item) for item in args.feature_spaces), "class_balance": args.class_balance,
        "shuffled_baselines": args.shuffled, "binary_models": args.binary, "cv_folds": args.cv_folds,
        "grid_c": args.grid_c, "grid_l1_ratio": args.grid_l1_ratio, "split": args.split,
        "exclude_phenotypes": args.exclude_phenotypes, "loio": args.loio,
        "loio_feature_spaces": args.loio_feature_spaces, "umap": args.umap, "random_state": args.seed,
    })


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphotype",
        description="Predict single-cell phenotypes from nucleus morphology.",
        epilog="Example: morphotype run examples/mitocheck_crops.yaml --outdir results",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"morphotype {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sheet = commands.add_parser(
        "samplesheet", help="build or check samplesheets", formatter_class=_Formatter,
        epilog="Example: morphotype samplesheet mitocheck-crops ../shared/data/mitocheck_crops --out sheet.csv",
    )
    sheet_commands = sheet.add_subparsers(dest="samplesheet_command", required=True, metavar="KIND")
    crops = sheet_commands.add_parser(
        "mitocheck-crops",
        help="samplesheet from a folder of MitoCheck crops (class folders + manifest.csv)",
        epilog="Example: morphotype samplesheet mitocheck-crops ../shared/data/mitocheck_crops --out sheet.csv",
        formatter_class=_Formatter,
    )
    crops.add_argument("crops_dir", type=Path, help="folder with manifest.csv and one folder per phenotype")
    crops.add_argument("--out", type=Path, required=True, help="samplesheet CSV to write")
    idr = sheet_commands.add_parser(
        "idr",
        help="samplesheet of MitoCheck movie frames in the IDR (idr0013-screenA): labelled frames and/or controls",
        epilog="Example: morphotype samplesheet idr --plates LT0003_40 --controls negative --out idr.csv",
        formatter_class=_Formatter,
    )
    idr.add_argument("--plates", nargs="+", default=None, help="plates (default: every plate with labelled cells)")
    idr.add_argument("--no-labelled", dest="labelled", action="store_false", help="leave out the labelled frames")
    idr.add_argument("--controls", nargs="*", default=[], choices=["negative", "positive"],
                     help="add one drawn frame (31-62) per control well of these kinds")
    idr.add_argument("--seed", type=int, default=D["idr_seed"], help="seed of the control-frame draw")
    idr.add_argument("--base-url", default=None, help="IDR file-server base URL (HTTP(S) or FTP mirror)")
    idr.add_argument("--out", type=Path, required=True, help="samplesheet CSV to write")
    check = sheet_commands.add_parser("validate", help="validate a samplesheet", formatter_class=_Formatter,
                                      epilog="Example: morphotype samplesheet validate sheet.csv")
    check.add_argument("samplesheet", type=Path)

    segment = commands.add_parser(
        "segment",
        help="segment nuclei in every image of a samplesheet",
        epilog="Example: morphotype segment --samplesheet sheet.csv --outdir masks --backend threshold",
        formatter_class=_Formatter,
    )
    segment.add_argument("--samplesheet", type=Path, required=True)
    segment.add_argument("--outdir", type=Path, required=True, help="folder for <file_id>.mask.tiff files")
    _add_segmentation_options(segment)
    _add_workers(segment)

    features = commands.add_parser(
        "features",
        help="measure the 157 CellProfiler nucleus features of every segmented image",
        epilog="Example: morphotype features --samplesheet sheet.csv --masks masks --out single_cells.parquet",
        formatter_class=_Formatter,
    )
    features.add_argument("--samplesheet", type=Path, required=True)
    features.add_argument("--masks", type=Path, required=True, help="folder written by 'morphotype segment'")
    features.add_argument("--out", type=Path, required=True,
                          help="single-cell Parquet table to write; unmatched annotations go to <out>.unmatched.csv")
    features.add_argument("--tolerance", type=float, default=D["annotation_tolerance"],
                          help="max distance in pixels from an annotated centre to its nucleus")
    _add_channel(features)
    _add_workers(features)

    stream = commands.add_parser(
        "stream",
        help="fetch the movie frames of a samplesheet (CellH5 or OME-Zarr), correct illumination, cache them",
        epilog="Example: morphotype stream --samplesheet idr.csv --cache frames --out frames.csv --variant ic",
        formatter_class=_Formatter,
    )
    stream.add_argument("--samplesheet", type=Path, required=True)
    stream.add_argument("--cache", type=Path, required=True, help="persistent frame cache (re-runs fetch nothing)")
    stream.add_argument("--out", type=Path, required=True, help="samplesheet of local frames to write")
    stream.add_argument("--variant", choices=["ic", "no_ic"], default="ic",
                        help="ic: BaSiC illumination correction on neighbouring frames; no_ic: raw frame")
    stream.add_argument("--scratch", type=Path, default=None, help="scratch folder for whole movies (one batch)")
    stream.add_argument("--fetch-workers", type=int, default=4, help="concurrent transfers")
    stream.add_argument("--batch-size", type=int, default=D["idr_movies_per_batch"], help="movies per scratch batch")
    stream.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    stream.add_argument("--retries", type=int, default=6, help="further attempts after the first")
    stream.add_argument("--md5", type=Path, default=None, help="md5sum-style table of expected checksums")
    stream.add_argument("--skip-missing", action="store_true", help="report and skip missing/corrupt movies")
    stream.add_argument("--image-root", default=None,
                        help="write each frame's image as IMAGE_ROOT/<its path under --cache>: where the cache "
                        "is published (a pipeline's outdir), not where this task wrote it")

    normalize = commands.add_parser(
        "normalize",
        help="z-score features against negative-control cells (pycytominer)",
        epilog="Example: morphotype normalize --features cells.parquet --out cells_normalized.parquet "
        "--scaler-out scaler.parquet",
        formatter_class=_Formatter,
    )
    normalize.add_argument("--features", type=Path, required=True, help="single-cell table to normalise")
    normalize.add_argument("--out", type=Path, required=True, help="normalised table to write")
    normalize.add_argument("--controls", type=Path, default=None,
                           help="table holding the control cells (default: the --features table itself)")
    normalize.add_argument("--samples", default="Metadata_Control == 'negative'",
                           help="pandas query selecting the control cells")
    normalize.add_argument("--group-by", nargs="*", default=[], help="fit one scaler per group, e.g. Metadata_Plate")
    normalize.add_argument("--scaler", type=Path, default=None, help="apply this saved scaler instead of fitting")
    normalize.add_argument("--scaler-out", type=Path, default=None, help="save the fitted scaler here")

    jump = commands.add_parser("jump", help="apply phenotype models to the JUMP Cell Painting pilot (CPJUMP1)",
                               formatter_class=_Formatter,
                               epilog="Example: morphotype jump score --sqlite BR00116991.sqlite --model m "
                               "--shuffled-model s --outdir jump")
    jump_commands = jump.add_subparsers(dest="jump_command", required=True, metavar="STEP")
    score = jump_commands.add_parser(
        "score",
        help="score one plate: per-plate z-scores, probabilities, KS tests per well, profiles",
        epilog="Example: morphotype jump score --sqlite s3://cellpainting-gallery/.../BR00116991.sqlite "
        "--model models/CP_areashape__balanced__final --shuffled-model models/CP_areashape__balanced__shuffled "
        "--outdir jump",
        formatter_class=_Formatter,
    )
    score.add_argument("--sqlite", required=True, help="plate SQLite: path, http(s):// or s3:// URL")
    score.add_argument("--model", type=Path, required=True, help="final model directory")
    score.add_argument("--shuffled-model", type=Path, required=True, help="shuffled-baseline model directory")
    score.add_argument("--outdir", type=Path, required=True)
    score.add_argument("--plate", default=None, help="plate barcode (default: from the file name)")
    score.add_argument("--chunk-size", type=int, default=100_000, help="cells read at a time")
    score.add_argument("--min-cells", type=int, default=D["jump_min_cells"],
                       help="wells with at most this many cells are skipped")
    score.add_argument("--seed", type=int, default=D["random_state"])
    score.add_argument("--cache-dir", type=Path, default=None, help="where remote plates are downloaded")
    score.add_argument("--keep-cells", action="store_true", help="also write per-cell probabilities")
    summarise = jump_commands.add_parser(
        "summarise",
        help="combine scored plates: q-values, per-treatment enrichment, top hits, profiles",
        epilog="Example: morphotype jump summarise --outdir jump/summary jump/*.summary.json",
        formatter_class=_Formatter,
    )
    summarise.add_argument("plate_outputs", type=Path, nargs="+", help="<plate>.summary.json files from 'jump score'")
    summarise.add_argument("--outdir", type=Path, required=True)
    summarise.add_argument("--top-n", type=int, default=D["jump_top_n"])
    summarise.add_argument("--treatment-key", default="Metadata_broad_sample")
    summarise.add_argument("--alpha", type=float, default=0.05, help="q-value threshold")
    summarise.add_argument("--min-shift", type=float, default=0.1,
                           help="smallest median-probability shift that counts as enrichment")

    score = commands.add_parser(
        "score",
        help="apply phenotype models to any CellProfiler single-cell output (SQLite, CytoTable Parquet, CSVs)",
        description="Per plate: z-score the model's features against the negative-control cells, predict, KS-test "
        "every well against the controls, write per-well profiles and domain_shift.json. Inputs: CellProfiler "
        "ExportToDatabase / cytominer-database SQLite, CytoTable Parquet, or a folder with ExportToSpreadsheet "
        "Image.csv + Nuclei.csv; local path or http(s)/s3 URL.",
        epilog="Example: morphotype score --input plate1.sqlite --model models/CP__balanced__final "
        "--platemap platemap.csv --dna-stain DAPI --outdir scored",
        formatter_class=_Formatter,
    )
    score.add_argument("--input", required=True, help="CellProfiler output: file, folder of CSVs or URL")
    score.add_argument("--model", type=Path, required=True, help="final model directory")
    score.add_argument("--shuffled-model", type=Path, default=None, help="shuffled-baseline model directory")
    controls = score.add_mutually_exclusive_group(required=True)
    controls.add_argument("--platemap", type=Path, help="CSV with columns well, treatment, control "
                          "(negative|positive|treated|empty), optional plate")
    controls.add_argument("--controls", help="pandas query on the image metadata selecting the negative-control "
                          "images, e.g. \"Metadata_Well in ['A01', 'A02']\"")
    score.add_argument("--plate", default=None, help="plate name (default: the image table's, else the file name)")
    score.add_argument("--nuclei-object", default="Nuclei", help="name of the nuclei object in the input")
    score.add_argument("--dna-stain", default="DNA", help="name of the DNA stain in the input (DAPI, Hoechst, H2B, ...)")
    score.add_argument("--fill-missing", action="store_true",
                       help="fill model features the input lacks with the negative-control mean (the study's "
                       "behaviour) instead of refusing when they carry more than --max-missing-weight")
    score.add_argument("--max-missing-weight", type=float, default=0.05,
                       help="largest share of the model's squared coefficient norm allowed on missing features")
    score.add_argument("--shift-threshold", type=float, default=0.10,
                       help="domain_shift.json flags the input above this weighted fraction of out-of-range values")
    score.add_argument("--chunk-size", type=int, default=100_000, help="cells read at a time")
    score.add_argument("--min-cells", type=int, default=50, help="wells with at most this many cells are skipped")
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--cache-dir", type=Path, default=None, help="where remote inputs are downloaded")
    score.add_argument("--keep-cells", action="store_true", help="also write per-cell probabilities")
    score.add_argument("--outdir", type=Path, required=True)

    train = commands.add_parser(
        "train",
        help="train and evaluate the phenotype models of a single-cell table",
        description="Multinomial elastic-net logistic regression per feature space, class-balanced or not, "
        "with shuffled baselines and one-vs-rest models; grid search with stratified CV; evaluation on the "
        "held-out split, leave-one-image-out, silhouette and UMAP.",
        epilog="Example: morphotype train --features results/features/single_cells.parquet --outdir results "
        "--feature-spaces CP CP_areashape --cv-folds 5",
        formatter_class=_Formatter,
    )
    _add_training_options(train)
    train.add_argument("--features-of", default=None,
                       help="train only on the features this table has (any input 'score' reads, or a Parquet)")
    train.add_argument("--nuclei-object", default="Nuclei", help="--features-of: nuclei object name there")
    train.add_argument("--dna-stain", default="DNA", help="--features-of: DNA stain name there")
    train.add_argument("--pixel-size", type=float, default=None,
                       help="pixel size of the training images in µm, recorded in the model cards "
                       "(default: MitoCheck's when the table is MitoCheck, else unrecorded)")
    _add_workers(train)

    predict = commands.add_parser(
        "predict",
        help="predict phenotypes with a saved model: from a single-cell table, or segment+measure a samplesheet",
        epilog="Example: morphotype predict --model results/models/CP__balanced__final --samplesheet sheet.csv "
        "--out predictions.parquet",
        formatter_class=_Formatter,
    )
    predict.add_argument("--model", type=Path, required=True,
                         help="model directory (with model_card.json), or a models folder: its recommended model")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--samplesheet", type=Path, help="images to segment, measure and predict")
    source.add_argument("--features", type=Path, help="a single-cell table that already has the features")
    predict.add_argument("--out", type=Path, required=True, help="predictions Parquet to write")
    predict.add_argument("--tolerance", type=float, default=D["annotation_tolerance"],
                         help="max distance in pixels from an annotated centre to its nucleus")
    predict.add_argument("--pixel-size", type=float, default=None,
                         help="pixel size of the samplesheet's images in µm; they are rescaled to the model's")
    predict.add_argument("--shift-threshold", type=float, default=0.10,
                         help="domain_shift.json flags the cells above this weighted fraction of out-of-range values")
    _add_segmentation_options(predict)
    _add_workers(predict)

    loio = commands.add_parser(
        "loio",
        help="leave-one-image-out for one chunk of the images (a Nextflow fan-out task)",
        description="For each image of the chunk, refit every multiclass model of MODELS with its selected "
        "hyper-parameters on all other images and predict the held-out image's cells.",
        epilog="Example: morphotype loio --features single_cells.parquet --models models --chunk 0 --chunks 8 "
        "--out loio_0.parquet",
        formatter_class=_Formatter,
    )
    loio.add_argument("--features", type=Path, required=True, help="single-cell table the models were trained on")
    loio.add_argument("--models", type=Path, required=True, help="models folder written by 'morphotype train'")
    loio.add_argument("--chunk", type=int, default=0, help="which chunk of images (0-based)")
    loio.add_argument("--chunks", type=int, default=1, help="how many chunks the images are cut into")
    loio.add_argument("--out", type=Path, required=True, help="per-cell LOIO predictions (Parquet) to write")
    _add_workers(loio)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate trained models: F1, PR curves, confusion, coefficients, silhouette, UMAP, LOIO",
        description="Joins one or more models folders into OUTDIR/models and writes OUTDIR/evaluation. "
        "LOIO comes from --loio files ('morphotype loio' chunks); without them LOIO tables are computed here "
        "unless --no-loio.",
        epilog="Example: morphotype evaluate --features single_cells.parquet --models CP/models CP_areashape/models "
        "--loio loio_*.parquet --outdir results",
        formatter_class=_Formatter,
    )
    evaluate.add_argument("--features", type=Path, required=True, help="single-cell table the models were trained on")
    evaluate.add_argument("--models", type=Path, nargs="+", required=True, help="models folders, in feature-space order")
    evaluate.add_argument("--loio", type=Path, nargs="*", default=None, help="LOIO prediction files of every chunk")
    evaluate.add_argument("--no-loio", dest="run_loio", action="store_false", help="no LOIO tables")
    evaluate.add_argument("--loio-feature-spaces", default=D["loio_feature_spaces"],
                          help="comma-separated; LOIO only for these (default: all)")
    evaluate.add_argument("--no-umap", dest="umap", action="store_false", help="skip UMAP embeddings")
    evaluate.add_argument("--seed", type=int, default=D["random_state"], help="random state (UMAP, silhouette)")
    evaluate.add_argument("--outdir", type=Path, required=True, help="writes <outdir>/models and <outdir>/evaluation")
    _add_workers(evaluate)

    deep = commands.add_parser(
        "deep-features",
        help="add deep features to a single-cell table: EfficientNet-B0 (DeepProfiler) or a trained encoder",
        description="DP__efficientnet_0..1279 from EfficientNet-B0's avg_pool on a box around each nucleus "
        "(--weights: Keras .h5 in DeepProfiler's or the Keras-applications layout, or a torch state dict; nothing "
        "is downloaded; --recipe: 'deepprofiler' reproduces DeepProfiler's input pipeline), or SSL__* from an "
        "encoder written by 'morphotype encoder train' (--encoder). Columns are joined by Metadata_CellID; "
        "OUT.card.json records the recipe and weights.",
        epilog="Example: morphotype deep-features --features single_cells.parquet --weights "
        "efficientnetb0_notop.h5 --out single_cells.dp.parquet",
        formatter_class=_Formatter,
    )
    deep.add_argument("--features", type=Path, required=True, help="single-cell table (with Metadata_Image)")
    extractor = deep.add_mutually_exclusive_group(required=True)
    extractor.add_argument("--weights", help="EfficientNet-B0 weights file ('random' only for tests)")
    extractor.add_argument("--encoder", type=Path, help="encoder folder (encoder.json + encoder.pt)")
    deep.add_argument("--out", type=Path, required=True, help="table with the deep columns added")
    deep.add_argument("--images", type=Path, default=None,
                      help="read each image by file name from this folder instead of Metadata_Image's path "
                      "(staged task folders, object-store work directories)")
    deep.add_argument("--recipe", choices=["deepprofiler", "keras-applications"], default=None,
                      help="EfficientNet input recipe (default: deepprofiler for DeepProfiler-layout weights, "
                      "else keras-applications)")
    deep.add_argument("--box-size", type=int, default=D["deep_box_size"], help="EfficientNet: box around each nucleus in pixels")
    deep.add_argument("--pad-mode", choices=["constant", "edge", "reflect", "symmetric"], default="constant",
                      help="how boxes reaching past the image border are filled")
    deep.add_argument("--batch-size", type=int, default=32, help="boxes per forward pass")
    deep.add_argument("--seed", type=int, default=D["random_state"])
    _add_workers(deep)

    encoder = commands.add_parser("encoder", help="the in-domain self-supervised nucleus encoder",
                                  formatter_class=_Formatter,
                                  epilog="Example: morphotype encoder train --features single_cells.parquet "
                                  "--outdir encoder")
    encoder_commands = encoder.add_subparsers(dest="encoder_command", required=True, metavar="STEP")
    encoder_train = encoder_commands.add_parser(
        "train",
        help="train the encoder (SimCLR) on nucleus crops of the training split only, without labels",
        epilog="Example: morphotype encoder train --features single_cells.parquet --outdir encoder --epochs 30",
        formatter_class=_Formatter,
    )
    encoder_train.add_argument("--features", type=Path, required=True, help="single-cell table (with Metadata_Image)")
    encoder_train.add_argument("--outdir", type=Path, required=True, help="writes encoder.pt and encoder.json")
    encoder_train.add_argument("--images", type=Path, default=None,
                               help="read each image by file name from this folder instead of Metadata_Image's path")
    encoder_train.add_argument("--split", choices=SPLIT_METHODS, default=D["split"],
                               help="the models' split: held-out cells and images are never seen")
    encoder_train.add_argument("--exclude-phenotypes", default=D["exclude_phenotypes"],
                               help="comma-separated, as for train")
    encoder_train.add_argument("--crop-size", type=int, default=64)
    encoder_train.add_argument("--epochs", type=int, default=D["encoder_epochs"])
    encoder_train.add_argument("--batch-size", type=int, default=128)
    encoder_train.add_argument("--seed", type=int, default=D["random_state"])
    _add_workers(encoder_train)

    report = commands.add_parser(
        "report",
        help="write the HTML report (every figure, tables beside them) of a run's output folder",
        epilog="Example: morphotype report results   # writes results/report/index.html",
        formatter_class=_Formatter,
    )
    report.add_argument("outdir", type=Path, help="a run's output folder (models/, evaluation/, jump/, ...)")
    report.add_argument("--report-dir", type=Path, default=None, help="where to write (default: OUTDIR/report)")

    merge = commands.add_parser(
        "merge",
        help="concatenate tables of the same kind (per-batch outputs) in the given order",
        epilog="Example: morphotype merge --out single_cells.parquet batch_0.parquet batch_1.parquet",
        formatter_class=_Formatter,
    )
    merge.add_argument("--out", type=Path, required=True, help="table to write (.parquet or .csv)")
    merge.add_argument("tables", type=Path, nargs="+", help="tables with identical columns")

    run = commands.add_parser(
        "run",
        help="run the whole pipeline from a params file (same file as nextflow -params-file)",
        description="Any pipeline parameter can be overridden as --<name> VALUE, as with Nextflow.",
        epilog="Example: morphotype run examples/mitocheck_crops.yaml --outdir results "
        "--mitocheck_crops ../shared/data/mitocheck_crops",
        formatter_class=_Formatter,
    )
    run.add_argument("params_file", type=Path, nargs="?", help="YAML params file")
    run.add_argument("--outdir", type=str, default=None, help="output folder (overrides the params file)")
    _add_workers(run)
    return parser


def _parse_overrides(extra: list[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` pairs left over by argparse (pipeline params)."""
    overrides: dict[str, str] = {}
    index = 0
    while index < len(extra):
        token = extra[index]
        if not token.startswith("--"):
            raise MorphotypeInputError(f"unexpected argument {token!r}; params are given as --name value")
        name = token[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            index += 1
        elif index + 1 < len(extra) and not extra[index + 1].startswith("--"):
            value = extra[index + 1]
            index += 2
        else:
            value, index = "true", index + 1
        overrides[name] = value
    return overrides


def _segmentation_options(args):
    return segmentation_options({
        "segmentation_backend": args.backend, "cellpose_model": args.cellpose_model,
        "cellpose_diameter": args.diameter, "cellpose_flow_threshold": args.flow_threshold,
        "cellpose_cellprob_threshold": args.cellprob_threshold, "use_gpu": args.gpu,
        "remove_edge_objects": not args.keep_edge_objects, "min_nucleus_size": args.min_size,
        "split_touching_nuclei": args.split_touching, "image_channel": args.channel,
    })


def _command_segment(args) -> str:
    summary = segment_samplesheet(fetch_images(read_samplesheet(args.samplesheet)), args.outdir, _segmentation_options(args),
                                  workers=args.workers)
    return f"{len(summary)} masks ({summary['objects'].sum()} nuclei) in {args.outdir}"


def _command_features(args) -> str:
    cells, unmatched = measure_samplesheet(
        fetch_images(read_samplesheet(args.samplesheet)), args.masks, tolerance=args.tolerance, workers=args.workers,
        channel=args.channel)
    table_path, report = write_features(cells, unmatched, args.out)
    return f"{len(cells)} cells × {cells.shape[1]} columns in {table_path}; {len(unmatched)} unmatched annotations in {report}"


def _command_stream(args) -> str:
    options = idr.FetchOptions(timeout=args.timeout, retries=args.retries, workers=args.fetch_workers,
                               batch_size=args.batch_size)
    sheet = read_samplesheet(args.samplesheet, check_files=False)
    frames, stats = idr.stream_frames(
        sheet, args.cache, variant=args.variant, scratch_dir=args.scratch, options=options,
        md5=idr.read_md5_table(args.md5) if args.md5 else None,
        on_error="skip" if args.skip_missing else "raise",
    )
    if args.image_root:
        cache = Path(args.cache).resolve()
        root = str(args.image_root).rstrip("/")
        frames["image"] = [f"{root}/{Path(image).relative_to(cache).as_posix()}" for image in frames["image"]]
    write_samplesheet(frames.drop(columns=["file_id", "image_id"], errors="ignore"), args.out)
    return (f"{stats.frames_written} frames written, {stats.frames_from_cache} from cache, "
            f"{stats.bytes_downloaded / 1e6:.1f} MB downloaded, {len(stats.failed)} failed; sheet {args.out}")


def _command_normalize(args) -> str:
    cells = read_table(args.features)
    if args.scaler is not None:
        scaler = normalize.read_scaler(args.scaler)
    else:
        reference = read_table(args.controls) if args.controls else cells
        scaler = normalize.fit_scaler(reference, samples=args.samples, group_by=args.group_by)
    if args.scaler_out is not None:
        normalize.write_scaler(scaler, args.scaler_out)
    write_table(normalize.apply_scaler(cells, scaler), args.out)
    return f"{len(cells)} cells z-scored in {args.out}"


def _command_jump(args) -> str:
    if args.jump_command == "score":
        result = jump.score_plate(
            args.sqlite, args.model, args.shuffled_model, args.outdir, plate=args.plate,
            chunk_size=args.chunk_size, min_cells=args.min_cells, seed=args.seed, cache_dir=args.cache_dir,
            keep_cells=args.keep_cells,
        )
        return f"plate scored: {', '.join(f'{k}: {v}' for k, v in result.items() if isinstance(v, (str, int)))}"
    result = jump.summarise(args.plate_outputs, args.outdir, top_n=args.top_n, treatment_key=args.treatment_key,
                            alpha=args.alpha, min_shift=args.min_shift)
    return f"{len(args.plate_outputs)} plates summarised in {args.outdir}"


def _command_score(args) -> str:

    result = score(args.input, args.model, args.outdir, shuffled_model_dir=args.shuffled_model,
                   platemap=args.platemap, controls=args.controls, plate=args.plate,
                   nuclei_object=args.nuclei_object, dna_stain=args.dna_stain, fill_missing=args.fill_missing,
                   max_missing_weight=args.max_missing_weight, shift_threshold=args.shift_threshold,
                   chunk_size=args.chunk_size, min_cells=args.min_cells, seed=args.seed, cache_dir=args.cache_dir,
                   keep_cells=args.keep_cells)
    return (f"plate {result['plate']}: {result['n_cells_scored']} cells, {result['n_wells_tested']} wells tested, "
            f"domain shift {result['domain_shift']['status']}; outputs in {args.outdir}")


def _record_acquisition(results, args, table) -> None:

    pixel_size = args.pixel_size if args.pixel_size is not None else domain.pixel_size_of(table)
    record_acquisition(results.models.values(), pixel_size_um=pixel_size)


def _command_train(args) -> str:
    settings = train_settings(args)
    table = read_table(args.features)
    if args.features_of is not None:

        table = restrict_to_features_of(table, args.features_of, nuclei_object=args.nuclei_object,
                                        dna_stain=args.dna_stain)
    if not args.evaluation:
        for name in ("loio", "loio_feature_spaces", "umap"):
            settings.pop(name)
        results = train_models(table, n_jobs=args.workers or default_workers(), **settings)
        _record_acquisition(results, args, table)
        write_models(results, args.outdir / "models")
        return f"{len(results.models)} models in {args.outdir / 'models'}"
    results = train_all(table, n_jobs=args.workers or default_workers(), **settings)
    _record_acquisition(results, args, table)
    write_results(results, args.outdir)
    skipped = "; skipped: " + ", ".join(results.skipped_feature_spaces) if results.skipped_feature_spaces else ""
    return f"{len(results.models)} models in {args.outdir / 'models'}, evaluation in {args.outdir / 'evaluation'}{skipped}"


def _command_predict(args) -> str:
    model = load_any_model(args.model)  # a model folder of any family, or a models folder: its recommended model
    if args.features is not None:
        cells = read_table(args.features)
    else:
        sheet = fetch_images(read_samplesheet(args.samplesheet))
        with tempfile.TemporaryDirectory(prefix="morphotype-masks-") as masks:
            segment_samplesheet(sheet, masks, _segmentation_options(args), workers=args.workers)
            cells, _ = measure_samplesheet(sheet, masks, tolerance=args.tolerance, workers=args.workers,
                                           channel=args.channel)
    predictions = predict_table(model, cells)
    shift = _domain_guard(model, cells, predictions, args)
    write_table(predictions, args.out)
    return f"{len(predictions)} cells predicted with {model.model_id} in {args.out}; domain shift {shift}"


def _domain_guard(model, cells, predictions, args) -> str:
    """Add Metadata_InDistribution and write <out>.domain_shift.json; predictions are left as they are."""
    import numpy as np
    import pandas as pd


    guard = domain.DomainGuard(model, threshold=args.shift_threshold)
    X = cells[model.features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    predictions[domain.IN_DISTRIBUTION_COLUMN] = guard.update(X, model.features)
    report = guard.report()
    report["input"] = str(args.features or args.samplesheet)
    domain.write_report(report, args.out.with_name(f"{args.out.name.split('.')[0]}.domain_shift.json"),
                        source=report["input"])
    return report["status"]


def _command_loio(args) -> str:
    table = read_table(args.features)
    trained = load_models(args.models)
    frames, images = [], 0
    for space in dict.fromkeys(m.feature_space for m in trained.models.values() if m.model_type == "multiclass"):
        space_models = [m for m in trained.models.values() if m.feature_space == space and m.model_type == "multiclass"]
        data = data_as_trained(table, space_models[0])
        chunk = loio_image_chunk(data, args.chunk, args.chunks)
        images = max(images, len(chunk))
        for model in space_models:
            frames.append(leave_one_image_out(model, data, images=chunk,
                                              n_jobs=args.workers or default_workers()))
    frames = [f for f in frames if len(f)]
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"model_id": []})
    write_table(predictions, args.out)
    return f"LOIO chunk {args.chunk}/{args.chunks}: {images} images, {len(predictions)} predictions in {args.out}"


def _command_evaluate(args) -> str:
    table = read_table(args.features)
    results = combine_results([load_models(folder) for folder in args.models])
    collected = None
    if args.loio:
        chunks = [chunk for chunk in (read_table(path) for path in args.loio) if len(chunk)]
        collected = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame({"model_id": []})
    loio_spaces = [s for s in args.loio_feature_spaces.split(",") if s] or None
    results.tables = evaluate_models(results, table, loio=args.run_loio, loio_feature_spaces=loio_spaces,
                                     umap=args.umap, n_jobs=args.workers or default_workers(),
                                     random_state=args.seed, loio_predictions=collected)
    results.settings.update({"loio": args.run_loio, "loio_feature_spaces": loio_spaces, "umap": args.umap,
                             "silhouette": True})
    write_results(results, args.outdir)
    return f"{len(results.models)} models evaluated; tables in {args.outdir / 'evaluation'}"


def _images_in(table, folder: Path | None, source: Path):
    """The table with ``Metadata_Image`` pointing into ``folder`` by file name (None: unchanged)."""
    if folder is None:
        return table
    column = IMAGE
    if column not in table.columns:
        raise MorphotypeInputError(f"{source}: no {column} column to locate the images by")
    located = table[column].map(lambda path: str(folder / Path(str(path)).name))
    missing = sorted({path for path in located.unique() if not Path(path).is_file()})
    if missing:
        raise MorphotypeInputError(f"{source}: {len(missing)} image(s) of the table are not in {folder}, "
                                   f"e.g. {missing[0]}")
    return table.assign(**{column: located})


def _command_deep_features(args) -> str:
    import torch

    from morphotype import deep

    if args.workers:
        torch.set_num_threads(args.workers)
    table = read_table(args.features)
    located = _images_in(table, args.images, args.features)
    if args.encoder is not None:
        added = deep.ssl_features(located, deep.load_encoder(args.encoder), pad_mode=args.pad_mode,
                                  batch_size=args.batch_size)
    else:
        added = deep.deep_features(located, weights=args.weights, recipe=args.recipe, box_size=args.box_size,
                                   pad_mode=args.pad_mode, batch_size=args.batch_size, random_state=args.seed)
    clash = [c for c in added.columns[1:] if c in table.columns]
    joined = table.drop(columns=clash).merge(added, on=deep.CELL_ID, how="left", validate="one_to_one")
    write_table(joined, args.out)
    if "card" in added.attrs:
        import json

        from morphotype.io import atomic_path

        with atomic_path(Path(f"{args.out}.card.json")) as tmp:
            tmp.write_text(json.dumps(added.attrs["card"], indent=2) + "\n")
        return (f"{added.shape[1] - 1} deep features ({added.attrs['card']['recipe']} recipe) for {len(added)} "
                f"cells in {args.out}; card in {args.out}.card.json")
    return f"{added.shape[1] - 1} deep features for {len(added)} cells in {args.out}"


def _command_encoder(args) -> str:
    import torch

    from morphotype import deep

    if args.workers:
        torch.set_num_threads(args.workers)
    table = _images_in(read_table(args.features), args.images, args.features)
    encoder = deep.train_encoder_on_training_split(
        table, split=args.split, exclude_phenotypes=[p for p in args.exclude_phenotypes.split(",") if p],
        crop_size=args.crop_size, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    deep.save_encoder(encoder, args.outdir)
    card = encoder.card
    return (f"encoder trained on {card['training_crops']} crops of {card['training_images']} images "
            f"({card['held_out_cells']} held-out cells unseen), loss {card['loss_curve'][0]:.3f} -> "
            f"{card['loss_curve'][-1]:.3f}; saved in {args.outdir}")


def _command_report(args) -> str:
    path = write_report(args.outdir, report_dir=args.report_dir)
    return f"report in {path}"


def _command_merge(args) -> str:
    merged = merge_tables(args.tables, args.out)
    return f"{len(merged)} rows from {len(args.tables)} tables in {args.out}"


def _command_samplesheet(args) -> str:
    if args.samplesheet_command == "idr":
        extra = {"base_url": args.base_url} if args.base_url else {}
        sheet = idr.idr_samplesheet(args.plates, labelled=args.labelled, controls=args.controls, seed=args.seed,
                                    **extra)
        write_samplesheet(sheet, args.out)
        return f"{len(sheet)} rows ({sheet['image'].nunique()} frames) in {args.out}"
    if args.samplesheet_command == "mitocheck-crops":
        sheet = from_mitocheck_crops(args.crops_dir)
        write_samplesheet(sheet, args.out)
        read_samplesheet(args.out)  # what we write must pass our own validation
        return f"{len(sheet)} rows in {args.out}"
    sheet = read_samplesheet(args.samplesheet)
    return f"{args.samplesheet} is valid: {len(sheet)} rows, {sheet['file_id'].nunique()} image files"


def _command_run(args, extra: list[str]) -> str:
    overrides = _parse_overrides(extra)
    if args.outdir is not None:
        overrides["outdir"] = args.outdir
    params = load_params(args.params_file, overrides)
    outputs = run(params, workers=args.workers)
    return "wrote " + ", ".join(f"{name}: {path}" for name, path in outputs.items())


def _one_spelling(argv: list[str]) -> list[str]:
    """Options in either spelling: ``run`` takes params as ``--cv_folds`` (Nextflow's), the step
    commands ``--cv-folds``; each also accepts the other's."""
    command = next((token for token in argv if not token.startswith("-")), None)
    spelled = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, equals, value = token[2:].partition("=")
            name = name.replace("-", "_") if command == "run" else name.replace("_", "-")
            token = f"--{name}{equals}{value}"
        spelled.append(token)
    # --debug and --verbose are the program's, wherever they stand
    program = [token for token in spelled if token in ("--debug", "--verbose", "-v")]
    return program + [token for token in spelled if token not in program]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _one_spelling(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    started = time.perf_counter()
    handlers = {
        "samplesheet": _command_samplesheet,
        "segment": _command_segment,
        "features": _command_features,
        "merge": _command_merge,
        "stream": _command_stream,
        "normalize": _command_normalize,
        "jump": _command_jump,
        "score": _command_score,
        "train": _command_train,
        "predict": _command_predict,
        "loio": _command_loio,
        "evaluate": _command_evaluate,
        "deep-features": _command_deep_features,
        "encoder": _command_encoder,
        "report": _command_report,
    }
    try:
        summary = _command_run(args, extra) if args.command == "run" else handlers[args.command](args)
    except MorphotypeInputError as error:
        if args.debug:
            raise
        print(f"morphotype {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DownloadError as error:  # the network, not the input: the message names the URL and the last error
        print(f"morphotype {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a failure that is not the input's: one line, the traceback with --debug
        if args.debug:
            raise
        print(f"morphotype {args.command}: failed: {type(error).__name__}: {error} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    print(f"morphotype {args.command}: {summary} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
