"""Speed of the nucleus feature step (morphotype.features.measure_nuclei), per CPU core.

Prints nuclei per second on one core for
  (a) shared MitoCheck crops (64x64, one Otsu-masked nucleus each), and
  (b) synthetic 1344x1024 frames with ~80 textured nuclei (the study's frame size),
plus, for (b), the time of cp-measure 0.3.0's own whole-image functions for the same families
(the route measure_nuclei replaces for granularity, radial distribution and neighbours), and,
where the optional CellProfiler venv exists (``make cellprofiler-venv``), CellProfiler's time
and per-family agreement through ``benchmarks/cellprofiler_parity.py``.

Goal: >= 100 nuclei/s per core on full frames.

    PYTHONPATH=src python benchmarks/features.py [--crops 300] [--frames 5]
"""

from __future__ import annotations

import os

# one core: set before numpy / numba start their thread pools
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import imageio.v3 as iio  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402
from skimage.draw import ellipse  # noqa: E402
from skimage.filters import threshold_otsu  # noqa: E402
from skimage.measure import label  # noqa: E402

from morphotype.features import FEATURE_NAMES, measure_nuclei  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CELLPROFILER = REPO / ".venv-cellprofiler" / "bin" / "cellprofiler"
PARITY_SCRIPT = REPO / "benchmarks" / "cellprofiler_parity.py"


def synthetic_frame(seed: int, n_nuclei: int = 80, shape: tuple[int, int] = (1024, 1344)):
    """A frame of textured elliptic nuclei on a noisy background, 8-bit, and its labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    count = 0
    for _ in range(20 * n_nuclei):
        if count == n_nuclei:
            break
        centre = rng.uniform(20, np.array(shape) - 20)
        rr, cc = ellipse(*centre, rng.uniform(8, 18), rng.uniform(6, 14), shape=shape, rotation=rng.uniform(0, np.pi))
        if labels[rr, cc].any():
            continue
        count += 1
        labels[rr, cc] = count
    brightness = np.concatenate(([0.0], rng.uniform(0.3, 0.7, count)))
    texture = ndi.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    image = brightness[labels] * (1 + 0.5 * texture) + rng.normal(0.05, 0.01, shape)
    image = np.clip(ndi.gaussian_filter(image, 1), 0, 1)
    return (image * 255).astype(np.uint8), labels


def otsu_nucleus(image: np.ndarray) -> np.ndarray:
    """The Otsu component under the crop centre (the annotated nucleus), else the largest."""
    components = label(image > threshold_otsu(image))
    keep = components[image.shape[0] // 2, image.shape[1] // 2]
    if keep == 0:
        keep = np.bincount(components.ravel())[1:].argmax() + 1
    return (components == keep).astype(np.int32)


def timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def cp_measure_whole_image(image: np.ndarray, labels: np.ndarray) -> None:
    """The same families with cp-measure's own whole-image functions (reference route)."""
    from cp_measure.bulk import get_core_measurements, get_multimask_measurements

    core = get_core_measurements(legacy=True)
    pixels = image / 255.0
    core["sizeshape"](labels, pixels, calculate_advanced=False, new_features=False)
    core["feret"](labels, pixels)
    core["zernike"](labels, pixels)
    core["intensity"](labels, pixels)
    core["texture"](labels, pixels)
    core["granularity"](labels, pixels)
    core["radial_distribution"](labels, pixels)
    get_multimask_measurements()["neighbors"](labels, labels, distance_method="Adjacent")


def bench_crops(crops_dir: Path, n_crops: int) -> None:
    manifest = pd.read_csv(crops_dir / "manifest.csv")
    chosen = manifest.sample(n=min(n_crops, len(manifest)), random_state=0)
    data = []
    for row in chosen.itertuples():
        image = iio.imread(crops_dir / row.phenotype / row.file)
        data.append((image, otsu_nucleus(image)))
    measure_nuclei(*data[0])  # compile / warm caches
    wall = cpu = 0.0
    non_finite = 0
    for image, labels in data:
        table, w, c = timed(measure_nuclei, image, labels)
        wall, cpu = wall + w, cpu + c
        non_finite += int(~np.isfinite(table[FEATURE_NAMES].to_numpy()).all())
    n = len(data)
    print(f"(a) MitoCheck crops: {n} crops of 64x64, one Otsu nucleus each")
    print(f"    {n / cpu:7.1f} nuclei/s per core (CPU time), {n / wall:7.1f} nuclei/s wall; "
          f"{1000 * cpu / n:.1f} ms per crop; crops with any NaN: {non_finite}")


def bench_frames(n_frames: int, reference: bool) -> list[tuple[np.ndarray, np.ndarray, pd.DataFrame]]:
    frames = [synthetic_frame(seed) for seed in range(n_frames)]
    measure_nuclei(*frames[0])  # compile / warm caches
    wall = cpu = 0.0
    nuclei = 0
    results = []
    for image, labels in frames:
        table, w, c = timed(measure_nuclei, image, labels)
        wall, cpu, nuclei = wall + w, cpu + c, nuclei + len(table)
        results.append((image, labels, table))
    print(f"(b) synthetic frames: {n_frames} frames of 1344x1024, {nuclei} nuclei")
    print(f"    {nuclei / cpu:7.1f} nuclei/s per core (CPU time), {nuclei / wall:7.1f} nuclei/s wall; "
          f"{cpu / n_frames:.3f} s per frame (goal >= 100 nuclei/s per core)")
    if reference:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, w, c = timed(cp_measure_whole_image, *frames[0][:2])
        n0 = int(frames[0][1].max())
        print(f"    cp-measure 0.3.0 whole-image calls, same families: {c:.3f} s per frame CPU "
              f"({n0 / c:.1f} nuclei/s per core)")
    return results


def tied_centres(labels: np.ndarray) -> set[int]:
    """Objects with several pixels farthest from their edge (RadialDistribution centre ties)."""
    tied = set()
    for number, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, size)) for b, size in zip(box, labels.shape))
        mask = labels[box] == number
        distance = ndi.distance_transform_edt(mask)[mask]
        if np.count_nonzero(distance == distance.max()) > 1:
            tied.add(number)
    return tied


def agreement(ours: pd.DataFrame, theirs: pd.DataFrame, tied: set[int]) -> pd.DataFrame:
    """Per family: share of values within 1e-3 relative (or 1e-9 absolute) and worst difference.

    RadialDistribution is also shown for nuclei whose centre is unique: CellProfiler breaks
    centre ties by an unstable sort (see morphotype.features), so only those should agree.
    """
    merged = ours.merge(theirs, on="ObjectNumber", suffixes=("", "_cp"))
    unique_centre = ~merged["ObjectNumber"].astype(int).isin(tied)
    rows = []
    families = ("AreaShape_Zernike", "AreaShape", "Granularity", "Intensity", "Neighbors", "RadialDistribution",
                "RadialDistribution (unique centre)", "Texture")
    for family in families:
        key = family.split(" ")[0]
        columns = [c for c in FEATURE_NAMES if f"_{key}_" in c and c + "_cp" in merged]
        if family == "AreaShape":
            columns = [c for c in columns if "_Zernike_" not in c]
        if not columns:
            continue
        subset = merged[unique_centre] if "unique" in family else merged
        a = subset[columns].to_numpy(float)
        b = subset[[c + "_cp" for c in columns]].to_numpy(float)
        difference = np.abs(a - b)
        close = (difference <= 1e-3 * np.abs(b)) | (difference <= 1e-9) | (np.isnan(a) & np.isnan(b))
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(np.abs(b) > 1e-9, difference / np.abs(b), difference)
        rows.append({"family": family, "features": len(columns), "nuclei": len(subset), "agree": close.mean(),
                     "worst_relative": np.nanmax(relative) if np.isfinite(relative).any() else np.nan})
    return pd.DataFrame(rows)


def bench_cellprofiler(results) -> None:
    """Hook: CellProfiler timing and agreement, when the optional venv and parity script exist."""
    if not CELLPROFILER.exists() or not PARITY_SCRIPT.exists():
        print(f"(c) CellProfiler: skipped ({CELLPROFILER.relative_to(REPO)} or "
              f"{PARITY_SCRIPT.relative_to(REPO)} missing; `make cellprofiler-venv`)")
        return
    spec = importlib.util.spec_from_file_location("cellprofiler_parity", PARITY_SCRIPT)
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    # Expected contract: run_cellprofiler(image, labels, workdir) -> per-nucleus table with
    # ObjectNumber and CellProfiler's Nuclei_* columns, for the study's measurement modules.
    run = getattr(parity, "run_cellprofiler", None)
    if run is None:
        public = [name for name in dir(parity) if not name.startswith("_") and callable(getattr(parity, name))]
        print(f"(c) CellProfiler: {PARITY_SCRIPT.name} has no run_cellprofiler(image, labels, workdir); "
              f"its functions: {public}")
        return
    image, labels, ours = results[0]
    with tempfile.TemporaryDirectory() as workdir:
        theirs, wall, _ = timed(run, image, labels, Path(workdir))
    print(f"(c) CellProfiler: {wall:.2f} s wall for one frame ({len(ours) / wall:.1f} nuclei/s, "
          "including process start)")
    table = agreement(ours, theirs, tied_centres(labels))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=300, help="number of shared crops to measure")
    parser.add_argument("--frames", type=int, default=5, help="number of synthetic full frames")
    parser.add_argument("--no-reference", action="store_true", help="skip the cp-measure whole-image timing")
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("MORPHOTYPE_SHARED", REPO.parent / "shared")))
    args = parser.parse_args(argv)
    print(f"one core: OMP/NUMBA threads = {os.environ['OMP_NUM_THREADS']}/{os.environ['NUMBA_NUM_THREADS']}; "
          "rates use this process's CPU time, so other load on the machine matters less")
    crops_dir = args.shared / "data" / "mitocheck_crops"
    if (crops_dir / "manifest.csv").exists():
        bench_crops(crops_dir, args.crops)
    else:
        print(f"(a) skipped: {crops_dir} not found (set MORPHOTYPE_SHARED)", file=sys.stderr)
    results = bench_frames(args.frames, reference=not args.no_reference)
    bench_cellprofiler(results)


if __name__ == "__main__":
    main()
