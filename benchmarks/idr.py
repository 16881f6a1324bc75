"""Streaming MitoCheck frames: bytes and seconds per labelled frame, CellH5 movies vs OME-Zarr planes.

Writes synthetic movies of the study's size (default 95 frames of 1024x1344 uint8, ~60 drifting
nuclei under a shading field) as CellH5 (gzip, one chunk per plane) and OME-Zarr 0.4 (gzip, one
chunk per plane), serves them from a loopback HTTP server (morphotype.testing.LoopbackFileServer),
and streams a few labelled frames per movie through morphotype.idr.stream_frames, for

  * ``no_ic``: the frame's plane only (transfer cost), and
  * ``ic``: BaSiC on the frame and its two neighbours (what the pipeline uses),

printing the bytes the server sent and the wall-clock seconds per labelled frame. Goal: the
OME-Zarr route moves <= 1/10 of the CellH5 route's bytes. Then frames per second of
correction + segmentation (threshold backend) + features, on one core and on ``--workers``
processes.

    PYTHONPATH=src python benchmarks/idr.py [--movies 2] [--frames-per-movie 3] [--length 95]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402


def _process_frame(task: tuple[np.ndarray, int]) -> tuple[int, float, float, float]:
    """Correct, segment and measure one frame; return (nuclei, seconds per stage)."""
    from morphotype.features import measure_nuclei
    from morphotype.illumination import correct_window
    from morphotype.segment import segment_nuclei

    window, position = task
    start = time.perf_counter()
    frame = correct_window(window, position)
    corrected = time.perf_counter()
    labels = segment_nuclei(frame, "threshold")
    segmented = time.perf_counter()
    table = measure_nuclei(frame, labels)
    measured = time.perf_counter()
    return len(table), corrected - start, segmented - corrected, measured - segmented


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--movies", type=int, default=2)
    parser.add_argument("--frames-per-movie", type=int, default=3, help="labelled frames per movie (study: 3.1)")
    parser.add_argument("--length", type=int, default=95, help="frames per movie")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1344)
    parser.add_argument("--nuclei", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="processes for correction+segmentation+features")
    parser.add_argument("--process-frames", type=int, default=4, help="frames for the processing rate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(1)
    from morphotype import idr
    from morphotype.testing import LoopbackFileServer, synthetic_movie
    from morphotype.illumination import context_window
    from morphotype.pipeline import parallel_map

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-idr-") as folder:
        root = Path(folder) / "srv"
        movies = []
        started = time.perf_counter()
        for well in range(1, args.movies + 1):
            synthetic = synthetic_movie(args.length, (args.height, args.width), n_nuclei=args.nuclei,
                                            radius=9.0, seed=well)
            idr.write_cellh5(root / "P1" / f"{well:05d}_01.ch5", synthetic["movie"], plate="P1", well=well)
            idr.write_ome_zarr(root / "P1" / f"{well:05d}.zarr", synthetic["movie"])
            movies.append(synthetic["movie"])
        print(f"wrote {args.movies} movies of {args.length} x {args.height}x{args.width} in "
              f"{time.perf_counter() - started:.1f} s")
        ch5_bytes = sum(f.stat().st_size for f in (root / "P1").glob("*.ch5"))
        zarr_bytes = sum(f.stat().st_size for f in (root / "P1").rglob("*") if f.is_file() and ".zarr" in str(f))
        print(f"on disk: CellH5 {ch5_bytes / 1e6:.1f} MB, OME-Zarr {zarr_bytes / 1e6:.1f} MB "
              f"({args.movies} movies)")

        # frame processing first: forked workers must not inherit streaming's HTTP sessions
        tasks = []
        movie = movies[0]
        for t in np.linspace(1, len(movie) - 2, args.process_frames).astype(int):
            window, position = context_window(int(t), len(movie))
            tasks.append((movie[window], position))
        _process_frame(tasks[0])  # warm-up: imports, torch
        began = time.perf_counter()
        single = [_process_frame(task) for task in tasks]
        one_core = time.perf_counter() - began
        nuclei, correct, segment, measure = (np.mean(values) for values in zip(*single))
        print(f"per frame on 1 core: correction {correct:.2f} s, segmentation {segment:.2f} s, "
              f"features {measure:.2f} s ({nuclei:.0f} nuclei) -> {len(tasks) / one_core:.2f} frames/s")
        began = time.perf_counter()
        list(parallel_map(_process_frame, tasks * 2, workers=args.workers, description="process"))
        elapsed = time.perf_counter() - began
        print(f"correction + segmentation + features on {args.workers} processes: "
              f"{2 * len(tasks) / elapsed:.2f} frames/s")

        frames = {well: sorted(rng.choice(np.arange(1, args.length - 1), args.frames_per_movie, replace=False).tolist())
                  for well in range(1, args.movies + 1)}
        n_labelled = args.movies * args.frames_per_movie
        options = idr.FetchOptions(timeout=30, retries=3, backoff=0.1, workers=2, batch_size=2)
        results = {}
        with LoopbackFileServer(root) as server:
            for variant in ("no_ic", "ic"):
                for kind, name in (("CellH5 movie", "{well:05d}_01.ch5"), ("OME-Zarr planes", "{well:05d}.zarr")):
                    rows = [{"image": f"{server.url}/P1/{name.format(well=w)}#frame={t}", "plate": "P1", "well": w,
                             "site": 1, "frame": t} for w, ts in frames.items() for t in ts]
                    server.reset_counters()
                    cache = Path(folder) / f"cache-{variant}-{kind.split()[0]}"
                    began = time.perf_counter()
                    out, stats = idr.stream_frames(pd.DataFrame(rows), cache, variant=variant, options=options)
                    seconds = time.perf_counter() - began
                    for row in out.itertuples():  # every frame must be the movie's
                        if variant == "no_ic":
                            assert np.array_equal(tifffile.imread(row.image), movies[row.well - 1][row.frame])
                    results[variant, kind] = (server.bytes_sent, seconds)
                    print(f"{variant:6s} {kind:16s}: {server.bytes_sent / n_labelled / 1e6:8.2f} MB and "
                          f"{seconds / n_labelled:6.2f} s per labelled frame ({n_labelled} frames, "
                          f"peak scratch {stats.peak_scratch_bytes / 1e6:.1f} MB)")
                whole = results[variant, "CellH5 movie"][0]
                planes = results[variant, "OME-Zarr planes"][0]
                print(f"{variant:6s} OME-Zarr / CellH5 bytes: 1/{whole / planes:.0f} (goal <= 1/10)")



if __name__ == "__main__":
    main()
