"""Speed and quality of model training: the study's grid search against morphotype's solver.

On a single-cell features table (default: ``results/features/single_cells.parquet`` as written by
``make demo``), for one feature space (default CP), on the study's 85/15 cell-level training split:

  1. the reference procedure, ``GridSearchCV(LogisticRegression(solver="saga", max_iter=100))``
     with StratifiedKFold(10) and weighted-F1 scoring, on a reduced grid (3 C x 3 l1_ratio);
  2. morphotype's grid search on the same grid and the same folds, every fit converged to the
     grid-search tolerance (goal: >= 30x faster at >= the reference's CV weighted F1);
  3. morphotype on the full 7 x 11 x 10-fold = 770-fit grid (goal: <= 10 min on 2 cores);
  4. leave-one-image-out for the selected model, refits converged to the model tolerance
     (goal: <= 5 min), and for its shuffled baseline at the shortcut tolerance and iteration cap
     (``evaluate.SHUFFLED_LOIO_TOL`` / ``SHUFFLED_LOIO_MAX_ITER``);
  5. each model family's fit time (morphotype.selection grids, first point) on the training split,
     the trees with ``--jobs`` OpenMP threads.

Wall-clock seconds, both on ``--jobs`` worker processes (default 2) with one BLAS thread each.

    PYTHONPATH=src python benchmarks/train.py [TABLE] [--feature-space CP] [--skip-reference]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # one BLAS thread per worker process

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from morphotype import evaluate, models  # noqa: E402
from morphotype.normalize import fit_zscore  # noqa: E402
from morphotype.io import read_table  # noqa: E402

REDUCED_GRID = {"C": [1e-3, 1.0, 1e3], "l1_ratio": [0.0, 0.5, 1.0]}  # every 3rd C, every 5th l1_ratio


def reference_grid_search(X, y, grid, folds, jobs):
    """The study's procedure: saga, max_iter=100, GridSearchCV on weighted F1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    search = GridSearchCV(LogisticRegression(solver="saga", max_iter=100, class_weight="balanced"),
                          param_grid={"C": grid["C"], "l1_ratio": grid["l1_ratio"]},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=0), scoring="f1_weighted",
                          n_jobs=jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        start = time.perf_counter()
        search.fit(X, y)
        # The grid search alone, as ours is timed: GridSearchCV's final refit is not part of it.
        seconds = time.perf_counter() - start - search.refit_time_
    best = search.best_estimator_
    return seconds, search.best_params_, search.best_score_, int(np.max(best.n_iter_))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", default="results/features/single_cells.parquet")
    parser.add_argument("--feature-space", default="CP")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-full-grid", action="store_true")
    parser.add_argument("--skip-loio", action="store_true")
    parser.add_argument("--skip-families", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = models.prepare_data(read_table(args.table), args.feature_space)
    split = models.split_cells(data.metadata)
    train = split == "train"
    scaler = fit_zscore(data.negcon_X if data.negcon_X is not None else data.X[train], "reference")
    keep = ~scaler.constant
    X = (data.X[train][:, keep] - scaler.mean[keep]) / scaler.scale[keep]
    classes = sorted(set(data.labels))
    y = np.searchsorted(classes, data.labels[train])
    print(f"{args.table}: {args.feature_space}, {X.shape[0]} training cells x {X.shape[1]} features, "
          f"{len(classes)} classes, {args.folds} folds, {args.jobs} worker(s)")

    def ours(grid):
        start = time.perf_counter()
        result = models.grid_search(X, y, n_classes=len(classes), grid=grid, cv_folds=args.folds,
                                    class_weight="balanced", random_state=0, n_jobs=args.jobs, progress=False)
        return time.perf_counter() - start, result

    # Start the worker processes and their imports once, outside every timing: a run pays that
    # once for all its grid searches, and the reference reuses the same joblib workers.
    warm = slice(None, None, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models.grid_search(X[warm], y[warm], n_classes=len(classes), grid={"C": [1.0], "l1_ratio": [0.0]},
                           cv_folds=2, n_jobs=args.jobs, progress=False)
        if not args.skip_reference:
            reference_grid_search(X[warm], data.labels[train][warm], {"C": [1.0], "l1_ratio": [0.0]}, 2, args.jobs)

    n_reduced = len(REDUCED_GRID["C"]) * len(REDUCED_GRID["l1_ratio"]) * args.folds
    print(f"\nreduced grid {REDUCED_GRID} ({n_reduced} fits)")
    print(f"{'procedure':<34}{'wall s':>9}{'CV wF1':>9}  selected")
    seconds, result = ours(REDUCED_GRID)
    fits = result.table
    smooth = fits["l1_ratio"] == 0
    print(f"{f'morphotype (KKT tol {models.DEFAULT_CV_TOL:g})':<34}{seconds:>9.1f}{result.score:>9.4f}  C={result.C:g} "
          f"l1_ratio={result.l1_ratio:g}; iterations/fit mean {fits['mean_n_iter'].mean():.0f} "
          f"(l1_ratio 0, K-FAC L-BFGS: {fits.loc[smooth, 'mean_n_iter'].mean():.0f}; l1_ratio > 0, L-BFGS-B: "
          f"{fits.loc[~smooth, 'mean_n_iter'].mean():.0f}), all converged: {bool(fits['all_converged'].all())}")
    if not args.skip_reference:
        ref_seconds, params, score, n_iter = reference_grid_search(X, data.labels[train], REDUCED_GRID,
                                                                   args.folds, args.jobs)
        print(f"{'reference (saga, max_iter=100)':<34}{ref_seconds:>9.1f}{score:>9.4f}  C={params['C']:g} "
              f"l1_ratio={params['l1_ratio']:g}; refit stopped at {n_iter} epochs")
        print(f"speed-up {ref_seconds / seconds:.1f}x (goal >= 30x), CV weighted F1 difference "
              f"{result.score - score:+.4f} (goal >= 0)")

    C, l1_ratio = result.C, result.l1_ratio
    if not args.skip_full_grid:
        n_full = len(models.DEFAULT_GRID["C"]) * len(models.DEFAULT_GRID["l1_ratio"]) * args.folds
        seconds, full = ours(None)
        fits = full.table
        print(f"\nfull grid ({n_full} fits): {seconds:.1f} s wall (goal <= 600 s); CV weighted F1 {full.score:.4f} "
              f"at C={full.C:g} l1_ratio={full.l1_ratio:g}; iterations/fit mean {fits['mean_n_iter'].mean():.0f} "
              f"max {fits['max_n_iter'].max():.0f}; all converged: {bool(fits['all_converged'].all())}")
        C, l1_ratio = full.C, full.l1_ratio

    if not args.skip_loio:
        model = models.train_model(data, train, hyperparameters=(C, l1_ratio), progress=False)
        start = time.perf_counter()
        predictions = evaluate.leave_one_image_out(model, data, n_jobs=args.jobs, progress=False)
        seconds = time.perf_counter() - start
        fraction = evaluate.loio_pass_fraction(evaluate.loio_summary(predictions))["pass_fraction"].iloc[0]
        refits = predictions.drop_duplicates("Metadata_ImageID")
        print(f"\nLOIO ({refits.shape[0]} images, C={C:g}, l1_ratio={l1_ratio:g}, balanced, KKT tol "
              f"{models.DEFAULT_TOL:g}): {seconds:.1f} s wall "
              f"(goal <= 300 s); iterations/refit mean {refits['n_iter'].mean():.0f}; all converged: "
              f"{bool(predictions['converged'].all())}; image x phenotype groups with mean rank < 2: {fraction:.1%}")
        shuffled = models.train_model(data, train, hyperparameters=(10.0, 1.0), shuffled=True, progress=False)
        start = time.perf_counter()
        predictions = evaluate.leave_one_image_out(shuffled, data, n_jobs=args.jobs, progress=False)
        seconds = time.perf_counter() - start
        fraction = evaluate.loio_pass_fraction(evaluate.loio_summary(predictions))["pass_fraction"].iloc[0]
        print(f"LOIO of the shuffled baseline (C=10, l1_ratio=1, tol {evaluate.SHUFFLED_LOIO_TOL:g}, at most "
              f"{evaluate.SHUFFLED_LOIO_MAX_ITER} iterations): {seconds:.1f} s wall; pass fraction {fraction:.1%} "
              "(chance by construction)")

    if not args.skip_families:
        from threadpoolctl import threadpool_limits

        from morphotype.estimators import make_estimator
        from morphotype.selection import FAMILY_GRIDS

        print(f"\nmodel families: fit on {X.shape[0]} training cells (first grid point)")
        for family, grid in FAMILY_GRIDS.items():
            with threadpool_limits(limits=args.jobs, user_api="openmp"):
                start = time.perf_counter()
                make_estimator(family, grid[0]).fit(X, data.labels[train])
                print(f"  {family:<10}{time.perf_counter() - start:>8.2f} s  {grid[0]}")


if __name__ == "__main__":
    main()
