"""Segmentation speed and crop coverage.

Prints
- seconds per 1344 x 1024 synthetic frame (~60 nuclei) for the ``threshold`` backend and for
  ``cellpose`` with a randomly initialised network (``pretrained_model=False``; the real
  ``cyto`` weights run the same network, so the network cost is the same; mask dynamics cost
  more with real weights because a random network marks almost no pixel as cell);
- crops per second for ``threshold`` on the shared MitoCheck crops, and the fraction of crops
  with an object containing (or within 3 / 5 px of) the annotated centre (32, 32), with and
  without edge-object removal, overall and per class.
- with ``--cv``: each threshold setting judged by what it is for, the phenotype model. All crops
  are segmented and measured; the CP model's 10-fold CV weighted F1 (balanced, C in 0.01, 0.1,
  1, l1_ratio 0) is computed on the crops of the study's 85 % training split only: the test
  split is never read, so choosing a setting here does not tune on it.

Usage::

    PYTHONPATH=src python benchmarks/segment.py [--shared DIR] [--torch-threads N] [--gpu]
        [--repeats 3] [--skip-cellpose] [--skip-crops] [--cv]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.draw import ellipse
from tqdm import tqdm

from morphotype.segment import clear_edge_objects, match_points, segment_nuclei

REPO = Path(__file__).resolve().parents[1]


def synthetic_frame(shape=(1024, 1344), n_nuclei=60, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A MitoCheck-sized frame of blurred, noisy ellipses (radii 7-16 px), some touching."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, np.int32)
    placed = 0
    while placed < n_nuclei:
        a, b = rng.uniform(8, 16), rng.uniform(7, 12)
        r, c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        if placed % 6 == 5 and placed:  # every sixth nucleus touches the previous one
            pr, pc = ndi.center_of_mass(truth == placed)
            angle = rng.uniform(0, 2 * np.pi)
            r, c, a, b = pr + 22 * np.sin(angle), pc + 22 * np.cos(angle), 10, 10
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(0, np.pi))
        if len(rr) and not truth[rr, cc].any():
            placed += 1
            truth[rr, cc] = placed
    brightness = np.concatenate([[0], rng.uniform(70, 200, placed)])
    image = ndi.gaussian_filter(brightness[truth], 1.0) + 12 + rng.normal(0, 4, shape)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def seconds_per_call(function, repeats: int) -> float:
    function()  # warm-up: imports, model build, first-call kernels
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def mean_matched_iou(truth: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    ious = []
    for t in range(1, truth.max() + 1):
        mask = truth == t
        ids, counts = np.unique(labels[mask], return_counts=True)
        best = max(((inter / (mask.sum() + (labels == p).sum() - inter)) for p, inter in
                    zip(ids, counts) if p), default=0.0)
        ious.append(best)
    ious = np.array(ious)
    return float((ious > 0.5).mean()), float(ious[ious > 0.5].mean())


def frames(args) -> None:
    image, truth = synthetic_frame()
    interior = clear_edge_objects(truth)
    print(f"synthetic frame {image.shape[1]}x{image.shape[0]}, {interior.max()} interior nuclei")
    labels = segment_nuclei(image)
    found, iou = mean_matched_iou(interior, labels)
    t = seconds_per_call(lambda: segment_nuclei(image), args.repeats)
    print(f"  threshold: {t:.2f} s/frame; {labels.max()} objects, {found:.1%} of true nuclei "
          f"matched (IoU > 0.5), mean matched IoU {iou:.3f}")
    if args.skip_cellpose:
        return
    options = dict(backend="cellpose", pretrained_model=False, diameter=args.diameter,
                   torch_threads=args.torch_threads, gpu=args.gpu)
    t = seconds_per_call(lambda: segment_nuclei(image, **options), args.repeats)
    print(f"  cellpose (random network, diameter {args.diameter:g}, {args.torch_threads} torch "
          f"thread(s), gpu={args.gpu}): {t:.2f} s/frame")


def crops(args) -> None:
    folder = Path(args.shared) / "data" / "mitocheck_crops"
    manifest = pd.read_csv(folder / "manifest.csv")
    images = [iio.imread(folder / p / f) for p, f in zip(manifest.phenotype, manifest.file)]
    centre = np.array([[32.0, 32.0]])
    rows = []
    for remove_edge in (True, False):
        start = time.perf_counter()
        distances = []
        for image in tqdm(images, desc=f"crops (edge removal {remove_edge})", leave=False):
            labels = segment_nuclei(image, remove_edge_objects=remove_edge)
            match = match_points(labels, centre, tolerance=np.inf)
            distances.append(match.distance[0] if match.label[0] else np.inf)
        rate = len(images) / (time.perf_counter() - start)
        distances = np.array(distances)
        rows.append(pd.DataFrame({"phenotype": manifest.phenotype, "edge_removal": remove_edge,
                                  "distance": distances}))
        print(f"threshold on {len(images)} crops, edge removal {remove_edge}: {rate:.0f} crops/s; "
              f"centre object inside {np.mean(distances == 0):.1%}, within 3 px "
              f"{np.mean(distances <= 3):.1%}, within 5 px {np.mean(distances <= 5):.1%}")
    table = pd.concat(rows)
    per_class = (table.assign(found=table.distance <= 3)
                 .pivot_table(index="phenotype", columns="edge_removal", values="found"))
    print("centre object within 3 px, by class (columns: edge removal)")
    print(per_class.round(3).to_string())


CV_SETTINGS = {  # name: threshold options
    "watershed h=2.5 (default)": {},
    "watershed h=4": {"h": 4.0},
    "watershed h=6": {"h": 6.0},
    "no split (split_touching=False)": {"split_touching": False},
}


def segmentation_cv(args) -> None:
    import tempfile
    import warnings

    from morphotype import models, pipeline
    from morphotype.samplesheet import from_mitocheck_crops, read_samplesheet, write_samplesheet

    with tempfile.TemporaryDirectory() as folder:  # as `morphotype run` reads it
        path = write_samplesheet(from_mitocheck_crops(Path(args.shared) / "data" / "mitocheck_crops"),
                                 Path(folder) / "samplesheet.csv")
        sheet = read_samplesheet(path)
    training_files = None
    print(f"\nsegmentation settings by the CP model's CV weighted F1 on the training split ({len(sheet)} crops)")
    for name, options in CV_SETTINGS.items():
        segmentation = pipeline.SegmentationOptions("threshold", remove_edge_objects=False,
                                                    backend_options=tuple(sorted(options.items())))
        with tempfile.TemporaryDirectory() as masks:
            pipeline.segment_samplesheet(sheet, masks, segmentation, workers=args.workers)
            cells, unmatched = pipeline.measure_samplesheet(sheet, masks, workers=args.workers)
        if training_files is None:  # the study's split, drawn once, by crop: same crops for every setting
            data = models.prepare_data(cells, "CP")
            split = models.split_cells(data.metadata)
            training_files = set(data.metadata.loc[split == "train", "Metadata_FileID"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = models.prepare_data(cells[cells["Metadata_FileID"].isin(training_files)], "CP")
        X = (data.X - data.X.mean(axis=0)) / data.X.std(axis=0)
        classes, y = np.unique(data.labels, return_inverse=True)
        result = models.grid_search(X, y, n_classes=len(classes), grid={"C": [0.01, 0.1, 1], "l1_ratio": [0.0]},
                                    cv_folds=10, n_jobs=args.workers, progress=False)
        print(f"  {name:<34} {len(unmatched):3d} unmatched; CV weighted F1 {result.score:.4f} (C={result.C:g}) "
              f"on {len(y)} training cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared",
                        default=os.environ.get("MORPHOTYPE_SHARED", REPO.parent / "shared"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--diameter", type=float, default=17.0,
                        help="cellpose diameter (px); cyto's diam_mean is 30, so 17 upsamples "
                             "the frame by 30/17 as for MitoCheck nuclei")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--skip-cellpose", action="store_true")
    parser.add_argument("--skip-crops", action="store_true")
    parser.add_argument("--skip-frames", action="store_true")
    parser.add_argument("--cv", action="store_true", help="judge threshold settings by the CP model's CV F1")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not args.skip_frames:
        frames(args)
    if not args.skip_crops:
        crops(args)
    if args.cv:
        segmentation_cv(args)


if __name__ == "__main__":
    main()
