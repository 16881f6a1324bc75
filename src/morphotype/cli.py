"""The ``morphotype`` command: one subcommand per pipeline step, plus ``run`` for the whole.

Exit codes: 0 success, 2 bad input (arguments, samplesheet, params, tables), 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from morphotype import __version__
from morphotype.io import MorphotypeInputError

log = logging.getLogger("morphotype")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="processes to use (default: every core)")


def _add_segmentation_options(parser: argparse.ArgumentParser) -> None:
    from morphotype.run import PARAM_DEFAULTS as d

    parser.add_argument("--backend", choices=["threshold", "cellpose"], default=d["segmentation_backend"],
                        help="segmentation backend")
    parser.add_argument("--model", default=d["cellpose_model"],
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morphotype",
        description="Predict single-cell phenotypes from nucleus morphology.",
        epilog="Example: morphotype run examples/mitocheck_crops.yaml --outdir results",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"morphotype {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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
    idr.add_argument("--seed", type=int, default=0, help="seed of the control-frame draw")
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
    features.add_argument("--tolerance", type=float, default=5.0,
                          help="max distance in pixels from an annotated centre to its nucleus")
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
    stream.add_argument("--batch-size", type=int, default=4, help="movies per scratch batch")
    stream.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    stream.add_argument("--retries", type=int, default=6, help="further attempts after the first")
    stream.add_argument("--md5", type=Path, default=None, help="md5sum-style table of expected checksums")
    stream.add_argument("--skip-missing", action="store_true", help="report and skip missing/corrupt movies")

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
        "--model models/CP_areashape__balanced --shuffled-model models/CP_areashape__balanced__shuffled --outdir jump",
        formatter_class=_Formatter,
    )
    score.add_argument("--sqlite", required=True, help="plate SQLite: path, http(s):// or s3:// URL")
    score.add_argument("--model", type=Path, required=True, help="final model directory")
    score.add_argument("--shuffled-model", type=Path, required=True, help="shuffled-baseline model directory")
    score.add_argument("--outdir", type=Path, required=True)
    score.add_argument("--plate", default=None, help="plate barcode (default: from the file name)")
    score.add_argument("--chunk-size", type=int, default=100_000, help="cells read at a time")
    score.add_argument("--min-cells", type=int, default=50, help="wells with at most this many cells are skipped")
    score.add_argument("--seed", type=int, default=0)
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
    summarise.add_argument("--top-n", type=int, default=10)
    summarise.add_argument("--treatment-key", default="Metadata_broad_sample")
    summarise.add_argument("--alpha", type=float, default=0.05, help="q-value threshold")
    summarise.add_argument("--min-shift", type=float, default=0.1,
                           help="smallest median-probability shift that counts as enrichment")

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


def _command_segment(args) -> str:
    from morphotype.pipeline import SegmentationOptions, segment_samplesheet
    from morphotype.samplesheet import read_samplesheet

    extra = {}
    if args.backend == "cellpose":
        extra = {"model": args.model, "diameter": args.diameter, "flow_threshold": args.flow_threshold,
                 "cellprob_threshold": args.cellprob_threshold, "gpu": args.gpu}
    options = SegmentationOptions(args.backend, not args.keep_edge_objects, args.min_size, tuple(sorted(extra.items())))
    summary = segment_samplesheet(read_samplesheet(args.samplesheet), args.outdir, options, workers=args.workers)
    return f"{len(summary)} masks ({summary['objects'].sum()} nuclei) in {args.outdir}"


def _command_features(args) -> str:
    from morphotype.pipeline import measure_samplesheet
    from morphotype.samplesheet import read_samplesheet

    from morphotype.pipeline import write_features

    cells, unmatched = measure_samplesheet(
        read_samplesheet(args.samplesheet), args.masks, tolerance=args.tolerance, workers=args.workers
    )
    table_path, report = write_features(cells, unmatched, args.out)
    return f"{len(cells)} cells × {cells.shape[1]} columns in {table_path}; {len(unmatched)} unmatched annotations in {report}"


def _command_stream(args) -> str:
    from morphotype import idr
    from morphotype.samplesheet import read_samplesheet, write_samplesheet

    options = idr.FetchOptions(timeout=args.timeout, retries=args.retries, workers=args.fetch_workers,
                               batch_size=args.batch_size)
    sheet = read_samplesheet(args.samplesheet, check_files=False)
    frames, stats = idr.stream_frames(
        sheet, args.cache, variant=args.variant, scratch_dir=args.scratch, options=options,
        md5=idr.read_md5_table(args.md5) if args.md5 else None,
        on_error="skip" if args.skip_missing else "raise",
    )
    write_samplesheet(frames.drop(columns=["file_id", "image_id"], errors="ignore"), args.out)
    return (f"{stats.frames_written} frames written, {stats.frames_from_cache} from cache, "
            f"{stats.bytes_downloaded / 1e6:.1f} MB downloaded, {len(stats.failed)} failed; sheet {args.out}")


def _command_normalize(args) -> str:
    from morphotype import normalize
    from morphotype.io import read_table, write_table

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
    from morphotype import jump

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


def _command_merge(args) -> str:
    from morphotype.io import merge_tables

    merged = merge_tables(args.tables, args.out)
    return f"{len(merged)} rows from {len(args.tables)} tables in {args.out}"


def _command_samplesheet(args) -> str:
    from morphotype.samplesheet import from_mitocheck_crops, read_samplesheet, write_samplesheet

    if args.samplesheet_command == "idr":
        from morphotype import idr

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
    from morphotype.run import load_params, run

    overrides = _parse_overrides(extra)
    if args.outdir is not None:
        overrides["outdir"] = args.outdir
    params = load_params(args.params_file, overrides)
    outputs = run(params, workers=args.workers)
    return "wrote " + ", ".join(f"{name}: {path}" for name, path in outputs.items())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    }
    try:
        summary = _command_run(args, extra) if args.command == "run" else handlers[args.command](args)
    except MorphotypeInputError as error:
        print(f"morphotype {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    print(f"morphotype {args.command}: {summary} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
