"""Speed and memory of scoring one JUMP plate (morphotype.jump.score_plate) on 2 cores.

Writes a synthetic CPJUMP1-schema SQLite plate (``Image`` + ``Nuclei`` tables, real compound
platemap, 384 wells × 9 sites, default 411,000 nuclei = the CPJUMP1 mean per plate, the 54
AreaShape features the plates carry plus ``--extra-columns`` other Nuclei columns), then runs, each
in a fresh process so peak RSS is its own:

  (a) ``score_plate``: load the two saved models, read in chunks, z-score against negcon, final +
      shuffled model probabilities (55 AreaShape features, 15 classes), per-well KS tests, profiles;
  (b) the reference: the same plate read into pandas and normalised by
      ``pycytominer.normalize(method="standardize", samples="Metadata_control_type == 'negcon'")``
      (normalisation only: no models, tests or profiles).

Goal for (a): ≤ 60 s wall and ≤ 2 GB peak RSS on 2 cores.

    PYTHONPATH=src python benchmarks/jump.py [--cells 411000] [--chunk-size 100000] [--extra-columns 100]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PLATE = "BR00116991"  # compound platemap, A549 24 h
CLASSES = ["ADCCM", "Anaphase", "Apoptosis", "Binuclear", "Elongated", "Grape", "Hole", "Interphase", "Large",
           "Metaphase", "MetaphaseAlignment", "OutOfFocus", "Polylobed", "Prometaphase", "SmallIrregular"]
PLATE_LACKS = "Nuclei_AreaShape_ConvexArea"


def area_shape_features() -> list[str]:
    from morphotype.io import asset_path

    names = [line.strip() for line in asset_path("cp_nucleus_features.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return [name for name in names if name.startswith("Nuclei_AreaShape_")]


def write_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Final and shuffled 15-class AreaShape models (morphotype.models) fitted on random cells."""
    from morphotype import models

    rng = np.random.default_rng(seed)
    features = area_shape_features()
    n = 3000
    x = rng.normal(size=(n, len(features)))
    table = pd.DataFrame(x, columns=features)
    table["Metadata_Phenotype"] = np.array(CLASSES)[np.argmax(x[:, :15] + rng.normal(0, 1, (n, 15)), axis=1)]
    table["Metadata_CellID"] = [f"cell{i}" for i in range(n)]
    table["Metadata_ImageID"] = [f"image{i // 20}" for i in range(n)]
    data = models.prepare_data(table, "CP_areashape")
    dirs = []
    for shuffled in (False, True):
        model = models.train_model(data, np.ones(n, bool), hyperparameters=(0.1, 0.3), shuffled=shuffled,
                                   n_jobs=1, progress=False)
        dirs.append(models.save_model(model, folder / model.model_id))
    return dirs[0], dirs[1]


def write_plate(path: Path, n_cells: int, extra_columns: int, seed: int = 0, block: int = 50_000) -> None:
    """CPJUMP1-schema plate written through DuckDB's SQLite extension, block by block."""
    import duckdb
    from duckdb_extensions import import_extension

    from morphotype.jump import load_metadata

    import_extension("sqlite")
    rng = np.random.default_rng(seed)
    _, wells = load_metadata()
    well_names = wells[wells["Metadata_PlateMap"] == "JUMP-Target-1_compound_platemap"]["Metadata_Well"].to_numpy()
    sites = 9
    images = pd.DataFrame({
        "TableNumber": np.repeat([hashlib.md5(f"{PLATE}/{w}".encode()).hexdigest() for w in well_names], sites),
        "ImageNumber": np.tile(np.arange(1, sites + 1), len(well_names)),
        "Metadata_Plate": PLATE, "Metadata_Well": np.repeat(well_names, sites),
        "Metadata_Site": np.tile(np.arange(1, sites + 1), len(well_names)),
    })
    per_image = rng.multinomial(n_cells, np.full(len(images), 1 / len(images)))
    image_of_cell = np.repeat(np.arange(len(images)), per_image)
    object_number = np.concatenate([np.arange(1, k + 1) for k in per_image])
    features = [f for f in area_shape_features() if f != PLATE_LACKS]
    extras = [f"Nuclei_Intensity_Extra{i}_DNA" for i in range(extra_columns)]
    path.unlink(missing_ok=True)
    con = duckdb.connect()
    con.execute("LOAD sqlite")
    con.execute(f"ATTACH '{path}' AS plate (TYPE sqlite)")
    con.register("images_frame", images)
    con.execute("CREATE TABLE plate.Image AS SELECT * FROM images_frame")
    for start in range(0, n_cells, block):
        rows = slice(start, min(start + block, n_cells))
        n = rows.stop - rows.start
        frame = pd.DataFrame({"TableNumber": images["TableNumber"].to_numpy()[image_of_cell[rows]],
                              "ImageNumber": images["ImageNumber"].to_numpy()[image_of_cell[rows]],
                              "ObjectNumber": object_number[rows]})
        values = rng.lognormal(3.0, 0.3, (n, len(features) + len(extras)))
        frame = pd.concat([frame, pd.DataFrame(values, columns=features + extras)], axis=1)
        con.register("block_frame", frame)
        if start == 0:
            con.execute("CREATE TABLE plate.Nuclei AS SELECT * FROM block_frame")
        else:
            con.execute("INSERT INTO plate.Nuclei SELECT * FROM block_frame")
        con.unregister("block_frame")
    con.close()


def run_score(sqlite: Path, outdir: Path, chunk_size: int) -> dict:
    from morphotype.jump import score_plate

    folder = sqlite.parent / "models"
    (final,), (shuffled,) = folder.glob("*__final"), folder.glob("*__shuffled")
    start = time.perf_counter()
    summary = score_plate(sqlite, final, shuffled, outdir, chunk_size=chunk_size)
    return {"seconds": time.perf_counter() - start, "cells": summary["n_cells_scored"],
            "wells_tested": summary["n_wells_tested"]}


def run_pycytominer(sqlite: Path) -> dict:
    import sqlite3

    from pycytominer import normalize

    from morphotype.jump import load_metadata

    features = [f for f in area_shape_features() if f != PLATE_LACKS]
    start = time.perf_counter()
    with sqlite3.connect(sqlite) as connection:
        cells = pd.read_sql(
            "SELECT i.Metadata_Plate, i.Metadata_Well, i.Metadata_Site, n.TableNumber, n.ImageNumber, n.ObjectNumber, "
            + ", ".join(f"n.{f}" for f in features)
            + " FROM Nuclei n JOIN Image i ON n.TableNumber = i.TableNumber AND n.ImageNumber = i.ImageNumber",
            connection)
    connection.close()
    _, wells = load_metadata()
    cells = cells.merge(wells[wells["Metadata_PlateMap"] == "JUMP-Target-1_compound_platemap"]
                        [["Metadata_Well", "Metadata_control_type"]], on="Metadata_Well", how="left")
    loaded = time.perf_counter()
    normalize(profiles=cells, features=features, meta_features=[c for c in cells.columns if c not in features],
              samples="Metadata_control_type == 'negcon'", method="standardize")
    done = time.perf_counter()
    return {"seconds": done - start, "load_seconds": loaded - start, "normalize_seconds": done - loaded,
            "cells": len(cells)}


def in_child(step: str, *args: str) -> dict:
    """Run one step in a fresh interpreter; wall time and its own peak RSS (ru_maxrss of children)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{result.stderr[-3000:]}")
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    payload["process_wall_seconds"] = wall
    return payload


def report(payload: dict) -> None:
    """Print a step's result with the process's own peak RSS (Linux: ru_maxrss in KiB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    payload["peak_rss_mb"] = usage.ru_maxrss / 1024
    payload["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole process, imports included
    print(json.dumps(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=411_000)
    parser.add_argument("--chunk-size", type=int, default=100_000)
    parser.add_argument("--extra-columns", type=int, default=100, help="other Nuclei columns (real plates: hundreds)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--step", choices=["write", "score", "pycytominer"], help=argparse.SUPPRESS)
    parser.add_argument("--sqlite", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.step == "write":
        start = time.perf_counter()
        write_plate(args.sqlite, args.cells, args.extra_columns)
        write_models(args.sqlite.parent / "models")
        report({"seconds": time.perf_counter() - start})
        return
    if args.step == "score":
        report(run_score(args.sqlite, args.sqlite.parent / "out", args.chunk_size))
        return
    if args.step == "pycytominer":
        report(run_pycytominer(args.sqlite))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        sqlite = Path(work) / f"{PLATE}.sqlite"
        written = in_child("write", "--sqlite", str(sqlite), "--cells", str(args.cells),
                           "--extra-columns", str(args.extra_columns))
        size_mb = sqlite.stat().st_size / 2**20
        print(f"plate: {args.cells:,} nuclei, {args.extra_columns + 57} Nuclei columns, {size_mb:,.0f} MB SQLite "
              f"(written in {written['seconds']:.1f} s)")
        score = in_child("score", "--sqlite", str(sqlite), "--chunk-size", str(args.chunk_size))
        print(f"score_plate (chunk {args.chunk_size:,}): {score['seconds']:.1f} s "
              f"({score['cells'] / score['seconds']:,.0f} cells/s; process CPU {score['cpu_seconds']:.1f} s), "
              f"peak RSS {score['peak_rss_mb']:,.0f} MB, "
              f"{score['wells_tested']} wells tested  [goal <= 60 s, <= 2048 MB]")
        reference = in_child("pycytominer", "--sqlite", str(sqlite))
        print(f"reference, pandas read + pycytominer.normalize: {reference['seconds']:.1f} s "
              f"(read {reference['load_seconds']:.1f} s, normalize {reference['normalize_seconds']:.1f} s; "
              f"process CPU {reference['cpu_seconds']:.1f} s), "
              f"peak RSS {reference['peak_rss_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
