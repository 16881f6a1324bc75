"""Phenotype models: data preparation, splits, a converged elastic-net solver, grid search, artefacts.

The model is the study's multinomial elastic-net logistic regression, with exactly scikit-learn's
objective (``LogisticRegression(C=C, l1_ratio=a, class_weight=...)``)::

    C * sum_i w_i * logloss_i + (1 - a) / 2 * ||W||_F^2 + a * ||W||_1      (intercept unpenalised)

where ``w_i`` are the sample weights (``class_weight="balanced"``: n / (K * n_class)). The study's
saga fits stopped at ``max_iter=100`` without converging (~27 s each); here every fit is solved to
a stated tolerance on the KKT conditions, each grid fit warm-started from its solved neighbour
(previous l1_ratio, or previous C):

- ``l1_ratio > 0``: scipy's L-BFGS-B on the smooth split form ``W = W+ - W-`` (W+, W- >= 0; the
  L1 term becomes linear). It needed 2-3x fewer iterations than accelerated proximal gradient
  (FISTA with backtracking and restarts) on the MitoCheck CP features, for the same tolerance,
  and beat OWL-QN (4-5x the iterations at C = 1, tol 1e-4) and glmnet-style proximal Newton
  with coordinate descent (450-770 sweeps of ~3 ms: the features are too correlated for it).
- ``l1_ratio = 0`` (smooth): L-BFGS whose initial Hessian is a Kronecker-factored (K-FAC) model
  of the softmax curvature, classes x features; 2-3.5x fewer iterations than L-BFGS-B there.
  Preconditioning does not carry over to the split form (its bounds need a diagonal metric), and
  orthant-wise variants with K-FAC stalled on the coordinates the L1 term sets to zero.
Binary (one-vs-rest) models use scikit-learn's binary objective (one coefficient vector).

Everything is deterministic given ``random_state``; models are saved as ``coefficients.npz`` plus
a JSON card (``model_card.json``) and round-trip exactly (:func:`save_model`, :func:`load_model`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.special import log_softmax, softmax
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from morphotype.columns import CELL_ID, IMAGE_ID, METADATA_PREFIX, NEGCON, PHENOTYPE
from morphotype.domain import training_distribution
from morphotype.io import MorphotypeInputError, atomic_path, read_table, write_table
from morphotype.normalize import ZScore, fit_zscore
from morphotype.versions import software_versions

log = logging.getLogger(__name__)
# fit_logistic imports scipy.optimize where it solves (left as the solver was written).
EXCLUDED_PHENOTYPES = ("Folded",)
BINARY_NEGATIVE = "Other"

# The study's grid: C in logspace(-3, 3, 7), l1_ratio in linspace(0, 1, 11) (77 points x 10 folds).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "C": tuple(float(c) for c in np.logspace(-3, 3, 7)),
    "l1_ratio": tuple(round(float(a), 10) for a in np.linspace(0, 1, 11)),
}
# KKT tolerances on the weight-normalised objective (see fit_logistic). Reported models and LOIO
# refits: 1e-6 (on the MitoCheck CP features: objective within 1e-6 relative of a 1e-8 fit,
# probabilities within 1e-3, identical predicted classes). Grid-search fits only rank
# hyper-parameters: scikit-learn's default 1e-4 (2.5x cheaper; 99.7 % identical predictions).
DEFAULT_TOL = 1e-6
DEFAULT_CV_TOL = 1e-4

# The packages a model's numbers depend on (recorded in its card).
MODEL_PACKAGES = ("numpy", "scipy", "scikit-learn", "pandas")

# CellProfiler columns that describe the object, not its morphology (never model features).
_CP_NON_FEATURES = ("Nuclei_Location_", "Nuclei_Number_", "Nuclei_Parent_", "Nuclei_Children_")
# AreaShape features that encode where the nucleus sits in the frame, not its shape. The study
# kept them (paper fidelity, the default); ``drop_positional=True`` removes them.
POSITIONAL_AREASHAPE = (
    "Nuclei_AreaShape_Center_X",
    "Nuclei_AreaShape_Center_Y",
    "Nuclei_AreaShape_BoundingBoxMinimum_X",
    "Nuclei_AreaShape_BoundingBoxMinimum_Y",
    "Nuclei_AreaShape_BoundingBoxMaximum_X",
    "Nuclei_AreaShape_BoundingBoxMaximum_Y",
)


# --------------------------------------------------------------------------------------------
# Feature spaces and data preparation
# --------------------------------------------------------------------------------------------

def _is_cp(column: str) -> bool:
    return column.startswith("Nuclei_") and not column.startswith(_CP_NON_FEATURES)


FEATURE_SPACES: dict[str, Any] = {
    "CP": lambda c: _is_cp(c),
    "DP": lambda c: c.startswith("DP__"),
    "CP_and_DP": lambda c: _is_cp(c) or c.startswith("DP__"),
    "CP_areashape": lambda c: c.startswith("Nuclei_AreaShape_"),
    "CP_zernike": lambda c: c.startswith("Nuclei_AreaShape_Zernike_"),
    "SSL": lambda c: c.startswith("SSL__"),
    "CP_and_SSL": lambda c: _is_cp(c) or c.startswith("SSL__"),
}
# Spaces made of two families need both present (CP_and_DP without DP columns is just CP).
_REQUIRED_FAMILIES = {
    "CP_and_DP": (_is_cp, lambda c: c.startswith("DP__")),
    "CP_and_SSL": (_is_cp, lambda c: c.startswith("SSL__")),
}


def feature_columns(table: pd.DataFrame, feature_space: str, *, drop_positional: bool = False) -> list[str]:
    """The columns of ``table`` that make up ``feature_space``, in table order.

    Returns an empty list when the space's features are absent (the caller skips the space).
    """
    if feature_space not in FEATURE_SPACES:
        raise MorphotypeInputError(
            f"unknown feature space {feature_space!r}; expected one of {sorted(FEATURE_SPACES)}")
    columns = [c for c in table.columns if FEATURE_SPACES[feature_space](c)]
    for family in _REQUIRED_FAMILIES.get(feature_space, ()):
        if not any(family(c) for c in columns):
            return []
    if drop_positional:
        columns = [c for c in columns if c not in POSITIONAL_AREASHAPE]
    return columns


@dataclass
class LabelledData:
    """Labelled cells of one feature space, ready to split and fit.

    ``metadata`` holds the ``Metadata_*`` columns of the kept cells (index 0..n-1, the rows of
    ``X``); ``negcon_X`` the unscaled features of negative-control cells (None when there are none).
    """

    feature_space: str
    features: list[str]
    X: np.ndarray
    metadata: pd.DataFrame
    dropped_features: dict[str, str]
    dropped_cells: list[str]
    negcon_X: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        return self.metadata[PHENOTYPE].to_numpy(dtype=object)

    @property
    def cell_ids(self) -> np.ndarray:
        return self.metadata[CELL_ID].to_numpy(dtype=object)


def check_table(table: pd.DataFrame, *, source: str = "single-cell table") -> None:
    """Raise a clear error when the metadata the models need is missing or inconsistent."""
    missing = [c for c in (CELL_ID, IMAGE_ID, PHENOTYPE) if c not in table.columns]
    if missing:
        raise MorphotypeInputError(f"{source}: missing column(s) {missing}")
    duplicated = table[CELL_ID][table[CELL_ID].duplicated()]
    if len(duplicated):
        raise MorphotypeInputError(
            f"{source}: {CELL_ID} must be unique; duplicated e.g. {duplicated.iloc[:5].tolist()} "
            f"(row {int(duplicated.index[0])})")


def prepare_data(
    table: pd.DataFrame,
    feature_space: str,
    *,
    exclude_phenotypes: Sequence[str] = EXCLUDED_PHENOTYPES,
    max_nonfinite_fraction: float = 0.05,
    drop_positional: bool = False,
) -> LabelledData:
    """Select the labelled cells and the features of ``feature_space``; drop unusable columns.

    A feature is dropped (and reported in ``dropped_features`` and the log) when more than
    ``max_nonfinite_fraction`` of the labelled cells have a non-finite value (pycytominer's
    ``drop_na_columns`` cut-off) or when it is constant over the labelled cells. Cells with a
    non-finite value left in a kept feature are then dropped and reported (``dropped_cells``).
    Cells with a missing phenotype or one in ``exclude_phenotypes`` are not used.
    """
    check_table(table)
    features = feature_columns(table, feature_space, drop_positional=drop_positional)
    if not features:
        raise MorphotypeInputError(
            f"feature space {feature_space!r}: no matching feature columns in the table")
    labelled = table[table[PHENOTYPE].notna() & ~table[PHENOTYPE].isin(list(exclude_phenotypes))]
    if labelled.empty:
        raise MorphotypeInputError(f"no labelled cells left after excluding {list(exclude_phenotypes)}")
    values = labelled[features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    dropped: dict[str, str] = {}
    nonfinite_fraction = 1.0 - finite.mean(axis=0)
    masked = np.where(finite, values, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: reported just below
        spread = np.nanmax(masked, axis=0) - np.nanmin(masked, axis=0)
    keep = np.ones(len(features), dtype=bool)
    for j, name in enumerate(features):
        if nonfinite_fraction[j] > max_nonfinite_fraction:
            dropped[name] = f"non-finite in {nonfinite_fraction[j]:.1%} of labelled cells"
            keep[j] = False
        elif not np.isfinite(spread[j]) or spread[j] == 0:
            dropped[name] = "constant over the labelled cells"
            keep[j] = False
    if dropped:
        log.warning("%s: dropped %d feature(s): %s", feature_space, len(dropped),
                    "; ".join(f"{k} ({v})" for k, v in dropped.items()))
    kept = [f for f, k in zip(features, keep) if k]
    if not kept:
        raise MorphotypeInputError(f"feature space {feature_space!r}: every feature was dropped ({dropped})")
    values = values[:, keep]
    good_rows = np.isfinite(values).all(axis=1)
    dropped_cells = labelled.loc[~good_rows, CELL_ID].astype(str).tolist()
    if dropped_cells:
        log.warning("%s: dropped %d cell(s) with non-finite features, e.g. %s", feature_space,
                    len(dropped_cells), dropped_cells[:5])
    metadata_columns = [c for c in table.columns if c.startswith(METADATA_PREFIX)]
    metadata = labelled.loc[good_rows, metadata_columns].reset_index(drop=True)
    negcon_X = None
    if NEGCON in table.columns and table[NEGCON].fillna(False).astype(bool).any():
        negcon = table.loc[table[NEGCON].fillna(False).astype(bool), kept]
        negcon_X = negcon.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        negcon_X = negcon_X[np.isfinite(negcon_X).all(axis=1)]
        if len(negcon_X) < 2:
            raise MorphotypeInputError(
                f"{NEGCON} marks {len(negcon)} cell(s) but fewer than 2 have finite {feature_space} features")
    return LabelledData(feature_space, kept, values[good_rows], metadata, dropped, dropped_cells, negcon_X)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def split_cells(
    metadata: pd.DataFrame,
    *,
    method: str = "cell",
    test_size: float = 0.15,
    random_state: int = 1,
) -> np.ndarray:
    """Assign each cell to ``"train"`` or ``"test"`` (an array aligned with ``metadata``'s rows).

    ``method="cell"``: the study's split, ``train_test_split(stratify=phenotype,
    test_size=0.15, random_state=1)`` at cell level (test cells share images with training
    cells). ``method="image"``: whole images go to one side (``StratifiedGroupKFold`` grouped by
    ``Metadata_ImageID``, ``round(1 / test_size)`` folds, the first fold is the test set).
    """
    labels = metadata[PHENOTYPE].to_numpy(dtype=object)
    counts = pd.Series(labels).value_counts()
    if (counts < 2).any():
        raise MorphotypeInputError(
            f"a stratified split needs >= 2 cells per phenotype; too few: {counts[counts < 2].to_dict()}")
    split = np.full(len(metadata), "train", dtype=object)
    n_test = int(np.ceil(test_size * len(labels)))
    if method == "cell" and (n_test < len(counts) or len(labels) - n_test < len(counts)):
        raise MorphotypeInputError(
            f"a stratified {test_size:.0%} test split of {len(labels)} cells cannot hold each of the "
            f"{len(counts)} phenotypes on both sides; label more cells (counts: {counts.to_dict()})")
    if method == "cell":
        _, test = train_test_split(np.arange(len(metadata)), test_size=test_size, stratify=labels,
                                   random_state=random_state)
    elif method == "image":
        n_splits = max(2, int(round(1.0 / test_size)))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
        _, test = next(splitter.split(np.zeros(len(labels)), labels, metadata[IMAGE_ID].to_numpy()))
    else:
        raise MorphotypeInputError(f"split method must be 'cell' or 'image', got {method!r}")
    split[test] = "test"
    return split


# --------------------------------------------------------------------------------------------
# Solver: exact scikit-learn objective, solved to a KKT tolerance
# --------------------------------------------------------------------------------------------

@dataclass
class SolverResult:
    """A converged (or reported not converged) fit. ``coef`` is (K, p), or (1, p) for binary."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    converged: bool
    kkt: float
    objective: float  # scikit-learn's scale: C * sum w * loss + penalty


def balanced_sample_weight(y: np.ndarray) -> np.ndarray:
    """scikit-learn's ``class_weight="balanced"`` as sample weights: n / (n_classes * n_class)."""
    _, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    return (len(y) / (len(counts) * counts))[codes]


class _Problem:
    """Weight-normalised smooth part of the objective: sum s_i logloss_i + lam2/2 ||W||^2, sum s = 1.

    W is (classes, features), as scikit-learn's ``coef_``. Multiclass: logits W X^T + b for every
    class. Binary: class 0's logit is pinned to 0 and one row is free (scikit-learn's binary
    parametrisation). Logits are held class-major, (classes, cells): with 15 classes and
    thousands of cells the products and the softmax reductions run ~1.5x faster that way.
    """

    def __init__(self, X: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: np.ndarray, binary: bool):
        self.X = np.ascontiguousarray(X, dtype=np.float64)
        self.XT = np.ascontiguousarray(self.X.T)
        self.y = y
        self.n, self.p = self.X.shape
        self.K = n_classes
        self.binary = binary
        self.k_free = 1 if binary else n_classes
        self.weight_sum = float(sample_weight.sum())
        self.s = sample_weight / self.weight_sum
        self.rows = np.arange(self.n)
        self.onehot_s = np.zeros((self.K, self.n))
        self.onehot_s[y, self.rows] = self.s

    def _logits(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Logits of every class (K, n), shifted so each cell's largest is 0 (stable softmax)."""
        Z = W @ self.XT
        Z += b[:, None]
        if self.binary:
            Z = np.concatenate([np.zeros((1, self.n)), Z], axis=0)
        Z -= Z.max(axis=0)
        return Z

    def smooth(self, W: np.ndarray, b: np.ndarray, lam2: float) -> tuple[float, np.ndarray, np.ndarray]:
        Z = self._logits(W, b)
        E = np.exp(Z)
        total = E.sum(axis=0)
        loss = float(self.s @ (np.log(total) - Z[self.y, self.rows]))
        E *= self.s / total
        E -= self.onehot_s  # residual s_i * (P - Y)
        if self.binary:
            E = E[1:]
        grad_W = E @ self.X
        grad_W += lam2 * W
        return loss + 0.5 * lam2 * float(np.sum(W * W)), grad_W, E.sum(axis=1)

    def free_probabilities(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Probabilities (k_free, n) of the classes with free logits (binary: the positive class)."""
        E = np.exp(self._logits(W, b))
        E /= E.sum(axis=0)
        return E[1:] if self.binary else E

    def kfac_inverse(self, W: np.ndarray, b: np.ndarray, lam2: float):
        """Inverse of a Kronecker-factored model of the Hessian at (W, b): ``A (x) B + lam2 I``.

        The loss Hessian is ``sum_i s_i (diag p_i - p_i p_i^T) (x) x_i x_i^T`` over the free classes
        and the features with a constant 1 for the intercept. K-FAC (Martens & Grosse 2015) keeps
        ``A = sum_i s_i (diag p_i - p_i p_i^T)`` and ``B = sum_i c_i x_i x_i^T`` with ``c_i`` each
        cell's share of the curvature, so cells the model is sure of weigh little, as in the
        Hessian. Applied through the eigenvectors of A (k x k) and B (p+1 x p+1): cheap per step.
        Returns a function mapping a (k_free, p + 1) gradient (W's, then b's column) to the step.
        """
        P = self.free_probabilities(W, b)
        sP = P * self.s
        A = -(sP @ P.T)
        A[np.diag_indices_from(A)] += sP.sum(axis=1)
        curvature = (sP * (1.0 - P)).sum(axis=0)
        c = curvature / max(float(curvature.sum()), np.finfo(float).tiny)
        cX = self.X * c[:, None]
        B = np.empty((self.p + 1, self.p + 1))
        B[:-1, :-1] = self.X.T @ cX
        B[:-1, -1] = B[-1, :-1] = cX.sum(axis=0)
        B[-1, -1] = c.sum()
        a_values, U = np.linalg.eigh(A)
        b_values, V = np.linalg.eigh(B)
        # lam2 damps every direction (it is the L2 term's own curvature); the floor keeps the
        # softmax's shift-invariant direction (A's null vector) finite when lam2 is tiny.
        scale = np.maximum(a_values, 0.0)[:, None] * np.maximum(b_values, 0.0)[None, :] + lam2 + 1e-10

        return lambda G: U @ ((U.T @ G @ V) / scale) @ V.T

    def hessian_product(self, P: np.ndarray, V: np.ndarray, v_b: np.ndarray, lam2: float
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Exact Hessian of the smooth objective times a direction (V for W, v_b for b).

        P holds every class's probabilities (K, n) at the point: the loss Hessian of cell i is
        ``s_i (diag p_i - p_i p_i^T)`` on its logits, mapped through the features.
        """
        dZ = V @ self.XT
        dZ += v_b[:, None]
        if self.binary:
            dZ = np.concatenate([np.zeros((1, self.n)), dZ], axis=0)
        R = P * dZ
        R -= P * R.sum(axis=0)
        R *= self.s
        if self.binary:
            R = R[1:]
        return R @ self.X + lam2 * V, R.sum(axis=1)

    def all_probabilities(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        E = np.exp(self._logits(W, b))
        return E / E.sum(axis=0)

    def kkt(self, W: np.ndarray, b: np.ndarray, lam1: float, lam2: float) -> float:
        """Largest violation of the optimality conditions (0 at the optimum)."""
        _, g, gb = self.smooth(W, b, lam2)
        # Proximal-gradient (natural) residual W - prox(W - g): |g + lam1 sign(w)| for clearly
        # non-zero w, max(|g| - lam1, 0) at w = 0; the projected gradient L-BFGS-B stops on.
        step = W - g
        residual = W - np.sign(step) * np.maximum(np.abs(step) - lam1, 0.0)
        return float(max(np.abs(residual).max(initial=0.0), np.abs(gb).max(initial=0.0)))


# Iterations between fresh K-FAC models in the smooth solver: the curvature drifts as the fit
# saturates (C = 1e3 from zero, tol 1e-6: 740 iterations against 2,200 without refreshing).
_KFAC_REFRESH = 200


def _preconditioned_lbfgs(problem: _Problem, W: np.ndarray, b: np.ndarray, lam2: float, tol: float,
                          max_iter: int, memory: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise the smooth objective (``l1_ratio = 0``) by L-BFGS whose initial Hessian is K-FAC.

    Plain L-BFGS starts each direction from a multiple of the identity and needs ~250 iterations
    at C = 1 on the MitoCheck CP features (correlated features, cells of very unequal
    curvature); starting it from :meth:`_Problem.kfac_inverse` needs ~80. Armijo backtracking
    from the unit step, which the preconditioned direction nearly always takes. Stops when the
    KKT residual (here the gradient) is <= tol, at ``max_iter``, or when no step decreases the
    objective (rounding); the caller checks convergence and finishes with L-BFGS-B if needed.
    """
    def evaluate(theta: np.ndarray) -> tuple[float, np.ndarray]:  # theta = [W | b], (k_free, p + 1)
        value, gW, gb = problem.smooth(theta[:, :-1], theta[:, -1], lam2)
        return value, np.concatenate([gW, gb[:, None]], axis=1)

    theta = np.concatenate([W, b[:, None]], axis=1)
    value, grad = evaluate(theta)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / s.y), oldest first
    n_iter = 0
    while np.abs(grad).max() > tol and n_iter < max_iter:
        if n_iter % _KFAC_REFRESH == 0:  # a fresh model of the curvature, and memory to match
            precondition = problem.kfac_inverse(theta[:, :-1], theta[:, -1], lam2)
            pairs.clear()
        # Two-loop recursion with K-FAC as the initial inverse Hessian.
        direction = grad.copy()
        alphas = []
        for s, y, rho in reversed(pairs):
            alphas.append(rho * np.sum(s * direction))
            direction -= alphas[-1] * y
        direction = precondition(direction)
        if pairs:  # Oren-Luenberger: rescale K-FAC by the latest pair, as L-BFGS rescales I
            s, y, rho = pairs[-1]
            direction *= (1.0 / rho) / np.sum(y * precondition(y))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            direction += (alpha - rho * np.sum(y * direction)) * s
        direction = -direction
        slope = float(np.sum(grad * direction))
        if slope >= 0:  # the memory went stale: restart from the preconditioned gradient
            pairs.clear()
            direction = -precondition(grad)
            slope = float(np.sum(grad * direction))
        step = 1.0
        while True:
            trial = theta + step * direction
            trial_value, trial_grad = evaluate(trial)
            if trial_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-10:  # no decrease left to find in double precision
                return theta[:, :-1].copy(), theta[:, -1].copy(), n_iter
        if trial_value >= value:  # rounding accepted a step that gained nothing: stalled
            break
        s, y = trial - theta, trial_grad - grad
        curvature = float(np.sum(s * y))
        if curvature > 1e-16:
            pairs.append((s, y, 1.0 / curvature))
            if len(pairs) > memory:
                pairs.pop(0)
        theta, value, grad = trial, trial_value, trial_grad
        n_iter += 1
    return theta[:, :-1].copy(), theta[:, -1].copy(), n_iter


def _penalties(C: float, l1_ratio: float, weight_sum: float) -> tuple[float, float]:
    # Dividing sklearn's objective by C * sum(w) gives the weight-normalised one.
    return l1_ratio / (C * weight_sum), (1.0 - l1_ratio) / (C * weight_sum)


def _newton_polish(problem: _Problem, W: np.ndarray, b: np.ndarray, lam1: float, lam2: float,
                   tol: float, max_steps: int = 20) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Finish a fit that stalled just above ``tol`` by Newton steps on its active set.

    L-BFGS-B and the smooth solver's line search compare objective values; near the optimum a
    step's decrease (~ KKT^2) falls below double-precision rounding of the objective, so they can
    stop at a KKT of ~1e-9 whatever ``tol`` asks. Newton's method needs no objective values: with
    the signs of the non-zero weights fixed the objective is smooth there, and conjugate gradients
    on exact Hessian products give a step that converges quadratically. A step is kept only if it
    lowers the KKT residual; weights that would cross zero are set to zero (the orthant
    projection of OWL-QN), and zero weights that violate ``|g| <= lam1`` join the active set.
    """
    from scipy.sparse.linalg import LinearOperator, cg

    kkt = problem.kkt(W, b, lam1, lam2)
    k, p = W.shape
    steps = 0
    for steps in range(1, max_steps + 1):
        _, g, gb = problem.smooth(W, b, lam2)
        sign = np.sign(W)
        entering = (W == 0) & (np.abs(g) > lam1)
        sign[entering] = -np.sign(g[entering])
        free = sign != 0
        # Softmax ignores a common shift of every class's intercept (and, without an L2 term,
        # of a feature's weights in every class): the Hessian is singular there, and rounding
        # makes the system inconsistent along it. Solve in the complement of those directions.
        shift_free = not problem.binary
        shifted_columns = free.all(axis=0) if (shift_free and lam2 == 0) else np.zeros(p, bool)

        def project(v: np.ndarray) -> np.ndarray:
            V, v_b = v[:k * p].reshape(k, p).copy(), v[k * p:].copy()
            V[:, shifted_columns] -= V[:, shifted_columns].mean(axis=0)
            if shift_free:
                v_b -= v_b.mean()
            return np.concatenate([np.where(free, V, 0.0).ravel(), v_b])

        rhs = project(np.concatenate([(g + lam1 * sign).ravel(), gb]))
        P = problem.all_probabilities(W, b)

        def product(v: np.ndarray, P=P, project=project) -> np.ndarray:
            v = project(v)
            hW, hb = problem.hessian_product(P, v[:k * p].reshape(k, p), v[k * p:], lam2)
            return project(np.concatenate([hW.ravel(), hb]))

        operator = LinearOperator((k * p + k, k * p + k), matvec=product, dtype=np.float64)
        direction, _ = cg(operator, -rhs, rtol=1e-12, atol=0.0, maxiter=10 * (k * p + k))
        dW, db = direction[:k * p].reshape(k, p), direction[k * p:]
        for t in (1.0, 0.5, 0.25, 0.125):
            W_new = W + t * dW
            W_new[~free | (np.sign(W_new) != sign)] = 0.0  # stay in the orthant of the signs
            b_new = b + t * db
            kkt_new = problem.kkt(W_new, b_new, lam1, lam2)
            if kkt_new < kkt:
                break
        else:
            break  # no step lowers the residual: at the limit of double precision
        W, b, kkt = W_new, b_new, kkt_new
        if kkt <= tol:
            break
    return W, b, kkt, steps


def fit_logistic(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    C: float,
    l1_ratio: float,
    sample_weight: np.ndarray | None = None,
    binary: bool = False,
    tol: float = DEFAULT_TOL,
    max_iter: int = 20_000,
    coef_init: np.ndarray | None = None,
    intercept_init: np.ndarray | None = None,
) -> SolverResult:
    """Fit scikit-learn's elastic-net logistic regression to a KKT tolerance.

    Parameters
    ----------
    X, y
        Features (n, p) and integer class codes 0..n_classes-1.
    C, l1_ratio
        As in ``sklearn.linear_model.LogisticRegression``.
    sample_weight
        Per-cell weights (e.g. :func:`balanced_sample_weight`); None means 1.
    binary
        scikit-learn's binary model (n_classes must be 2; ``coef`` is (1, p)).
    tol
        Converged when the largest entry of the KKT residual (the proximal-gradient residual
        ``W - prox(W - grad)``, and the intercept gradient) of the objective divided by
        ``C * sum(w)`` is <= tol: the scale scikit-learn's lbfgs uses for its ``tol``. As there,
        when C is so large that the penalty's gradient is below ``tol`` the fit is converged
        in the loss but hardly shaped by the penalty.
    coef_init, intercept_init
        Warm start (same shapes as the result).

    Multiclass fits with classes absent from ``y`` give those classes zero coefficients and an
    intercept of -inf (probability 0), as a model that never saw them.
    """
    from scipy.optimize import minimize

    if not 0.0 <= l1_ratio <= 1.0 or C <= 0:
        raise ValueError(f"need C > 0 and 0 <= l1_ratio <= 1, got C={C}, l1_ratio={l1_ratio}")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    n, p = X.shape
    sample_weight = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if binary:
        if n_classes != 2:
            raise ValueError("binary=True needs n_classes=2")
        present = np.arange(2)
        if len(np.unique(y)) < 2:
            raise MorphotypeInputError("a binary model needs cells of both classes")
    else:
        present = np.unique(y)
    codes = np.searchsorted(present, y)
    problem = _Problem(X, codes, len(present), sample_weight, binary)
    k = problem.k_free
    lam1, lam2 = _penalties(C, l1_ratio, problem.weight_sum)

    W = np.zeros((k, p))
    b = np.zeros(k)
    if coef_init is not None:
        W = np.array(coef_init, dtype=np.float64)[present if not binary else slice(None)].copy()
        b = np.array(intercept_init, dtype=np.float64)[present if not binary else slice(None)].copy()
        b[~np.isfinite(b)] = 0.0
        b -= b.mean() if not binary else 0.0

    size = p * k
    if l1_ratio > 0:
        # Split form: W = W+ - W-, both >= 0, so the L1 term is linear and L-BFGS-B applies.
        def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
            Wp = theta[:size].reshape(k, p)
            Wm = theta[size:2 * size].reshape(k, p)
            value, gW, gb = problem.smooth(Wp - Wm, theta[2 * size:], lam2)
            value += lam1 * (theta[:2 * size].sum())
            return value, np.concatenate([(gW + lam1).ravel(), (lam1 - gW).ravel(), gb])

        def pack(W, b):
            return np.concatenate([np.maximum(W, 0).ravel(), np.maximum(-W, 0).ravel(), b])

        def unpack(theta):
            return theta[:size].reshape(k, p) - theta[size:2 * size].reshape(k, p), theta[2 * size:].copy()

        bounds = [(0.0, None)] * (2 * size) + [(None, None)] * k
    else:
        def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
            value, gW, gb = problem.smooth(theta[:size].reshape(k, p), theta[size:], lam2)
            return value, np.concatenate([gW.ravel(), gb])

        def pack(W, b):
            return np.concatenate([W.ravel(), b])

        def unpack(theta):
            return theta[:size].reshape(k, p).copy(), theta[size:].copy()

        bounds = None

    n_iter = 0
    if l1_ratio == 0 and max_iter > 0:
        W, b, n_iter = _preconditioned_lbfgs(problem, W, b, lam2, tol, max_iter)
    kkt = problem.kkt(W, b, lam1, lam2)
    # L-BFGS-B may stop on a line-search failure before the KKT tolerance: restart it with
    # fresh curvature memory from where it stopped, a few times.
    for _ in range(5):
        if kkt <= tol or n_iter >= max_iter:
            break
        result = minimize(fun, pack(W, b), jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": max_iter - n_iter, "maxfun": 2 * max_iter,
                                   "gtol": tol, "ftol": 0.0, "maxcor": 20})
        n_iter += int(result.nit)
        W_new, b_new = unpack(result.x)
        kkt_new = problem.kkt(W_new, b_new, lam1, lam2)
        progressed = kkt_new < kkt
        W, b, kkt = W_new, b_new, kkt_new
        if not progressed and result.nit <= 1:
            break
    if kkt > tol and n_iter < max_iter:
        W, b, kkt, polish_iter = _newton_polish(problem, W, b, lam1, lam2, tol)
        n_iter += polish_iter
    converged = kkt <= tol
    if not converged:
        log.warning("fit C=%g l1_ratio=%g did not converge: KKT %.2e > tol %.1e after %d iterations",
                    C, l1_ratio, kkt, tol, n_iter)
    value, _, _ = problem.smooth(W, b, 0.0)
    objective = C * problem.weight_sum * value + 0.5 * (1 - l1_ratio) * float(np.sum(W * W)) + \
        l1_ratio * float(np.abs(W).sum())
    if binary:
        coef, intercept = W.copy(), b.copy()
    else:
        coef = np.zeros((n_classes, p))
        intercept = np.full(n_classes, -np.inf)
        coef[present] = W
        intercept[present] = b - b.mean()  # softmax is invariant to a common shift
    return SolverResult(coef, intercept, n_iter, bool(converged), float(kkt), float(objective))


def sklearn_objective(coef: np.ndarray, intercept: np.ndarray, X: np.ndarray, y: np.ndarray, *,
                      C: float, l1_ratio: float, sample_weight: np.ndarray | None = None) -> float:
    """scikit-learn's LogisticRegression objective of a multinomial (K, p) or binary (1, p) model."""
    sample_weight = np.ones(len(y)) if sample_weight is None else sample_weight
    logits = X @ coef.T + intercept
    if coef.shape[0] == 1:
        logits = np.concatenate([np.zeros((len(y), 1)), logits], axis=1)
    loss = -log_softmax(logits, axis=1)[np.arange(len(y)), y]
    return float(C * np.sum(sample_weight * loss) + 0.5 * (1 - l1_ratio) * np.sum(coef ** 2)
                 + l1_ratio * np.abs(coef).sum())


def predict_logits(coef: np.ndarray, intercept: np.ndarray, X: np.ndarray) -> np.ndarray:
    logits = X @ coef.T + intercept
    if coef.shape[0] == 1:  # binary: [negative, positive]
        logits = np.concatenate([np.zeros((len(X), 1)), logits], axis=1)
    return logits


def softmax_probabilities(logits: np.ndarray) -> np.ndarray:
    return softmax(logits, axis=1)


# --------------------------------------------------------------------------------------------
# Grid search
# --------------------------------------------------------------------------------------------

@dataclass
class GridSearchResult:
    """Cross-validated weighted F1 of every (C, l1_ratio) and the selected point."""

    table: pd.DataFrame  # C, l1_ratio, mean_f1, std_f1, fold_<i>, mean_n_iter, max_n_iter, all_converged
    C: float
    l1_ratio: float
    score: float


def class_weights(y: np.ndarray, class_weight: str | None) -> np.ndarray:
    """Sample weights of ``class_weight`` ("balanced" or None: all 1) for the labels ``y``."""
    if class_weight == "balanced":
        return balanced_sample_weight(y)
    if class_weight is None:
        return np.ones(len(y))
    raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")


def _fold_path(X, y, train, validate, n_classes, Cs, l1_ratios, class_weight, binary, tol, max_iter):
    """Every grid point on one fold, each fit warm-started from its nearest solved neighbour.

    C ascends in the outer loop and l1_ratio in the inner one: a fit starts from the same C with
    the previous l1_ratio, the first l1_ratio from the previous C (3x fewer iterations than C
    paths alone). Each fit is converged, so the start changes the cost, not the result.
    """
    Xt, yt = X[train], y[train]
    weights = class_weights(yt, class_weight)
    rows = []
    previous_C_start = None
    for C in sorted(Cs):
        start = previous_C_start
        for i, l1_ratio in enumerate(sorted(l1_ratios)):
            fit = fit_logistic(Xt, yt, n_classes=n_classes, C=C, l1_ratio=l1_ratio, sample_weight=weights,
                               binary=binary, tol=tol, max_iter=max_iter,
                               coef_init=None if start is None else start.coef,
                               intercept_init=None if start is None else start.intercept)
            start = fit
            if i == 0:
                previous_C_start = fit
            predicted = predict_logits(fit.coef, fit.intercept, X[validate]).argmax(axis=1)
            rows.append({"C": C, "l1_ratio": l1_ratio,
                         "f1": f1_score(y[validate], predicted, average="weighted", zero_division=0),
                         "n_iter": fit.n_iter, "converged": fit.converged})
    return rows


def parallel(n_jobs: int) -> Parallel:
    """joblib's ``Parallel`` over ``n_jobs`` processes (sequential for 1), yielding results in order."""
    return Parallel(n_jobs=n_jobs, backend="loky" if n_jobs != 1 else "sequential", return_as="generator")


def grid_search(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    grid: Mapping[str, Sequence[float]] | None = None,
    cv_folds: int = 10,
    class_weight: str | None = "balanced",
    binary: bool = False,
    random_state: int = 0,
    n_jobs: int = 2,
    tol: float = DEFAULT_CV_TOL,
    max_iter: int = 20_000,
    progress: bool = True,
    description: str = "grid search",
) -> GridSearchResult:
    """Stratified k-fold grid search on weighted F1 (the study's ``GridSearchCV``).

    Folds: ``StratifiedKFold(cv_folds, shuffle=True, random_state)``; balanced class weights are
    recomputed in each fold's training part, as scikit-learn does. Selection: highest mean
    weighted F1; ties (equal to 1e-12) go to the smaller C, then to the larger l1_ratio (the
    more regularised, sparser model).
    """
    grid = dict(DEFAULT_GRID if grid is None else grid)
    Cs = [float(c) for c in grid["C"]]
    l1_ratios = [float(a) for a in grid["l1_ratio"]]
    folds = list(StratifiedKFold(cv_folds, shuffle=True, random_state=random_state).split(X, y))
    jobs = (delayed(_fold_path)(X, y, train, validate, n_classes, Cs, l1_ratios, class_weight, binary, tol,
                                max_iter) for train, validate in folds)
    results = []
    for rows in tqdm(parallel(n_jobs)(jobs), total=len(folds), desc=description, disable=not progress,
                     leave=False):
        results.append(rows)
    long = pd.DataFrame([dict(row, fold=i) for i, rows in enumerate(results) for row in rows])
    table = long.pivot_table(index=["C", "l1_ratio"], columns="fold", values="f1").add_prefix("fold_")
    summary = long.groupby(["C", "l1_ratio"]).agg(mean_f1=("f1", "mean"), std_f1=("f1", "std"),
                                                  mean_n_iter=("n_iter", "mean"), max_n_iter=("n_iter", "max"),
                                                  all_converged=("converged", "all"))
    table = summary.join(table).reset_index()
    ranked = table.assign(_score=table["mean_f1"].round(12)).sort_values(
        ["_score", "C", "l1_ratio"], ascending=[False, True, False], kind="mergesort")
    best = ranked.iloc[0]
    table["rank"] = table.index.map(dict(zip(ranked.index, range(1, len(ranked) + 1))))
    if not table["all_converged"].all():
        log.warning("%s: %d grid point(s) had a fold that did not converge", description,
                    int((~table["all_converged"]).sum()))
    return GridSearchResult(table, float(best["C"]), float(best["l1_ratio"]), float(best["mean_f1"]))


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

@dataclass
class PhenotypeModel:
    """A trained phenotype model with everything needed to apply it and to describe it."""

    model_id: str
    feature_space: str
    features: list[str]
    classes: list[str]
    coef: np.ndarray  # (K, p), or (1, p) for a binary model (positive = classes[1])
    intercept: np.ndarray
    scaler: ZScore
    C: float
    l1_ratio: float
    class_weight: str | None
    shuffled: bool
    model_type: str = "multiclass"  # or "binary"
    positive_class: str | None = None
    cv: dict[str, Any] = field(default_factory=dict)  # score, folds, grid table (records)
    training: dict[str, Any] = field(default_factory=dict)  # n_cells, per-class counts, fit report
    dropped_features: dict[str, str] = field(default_factory=dict)
    random_state: int = 0
    # raw-unit quantiles of the training cells (morphotype.domain); empty in models saved before
    training_distribution: dict[str, Any] = field(default_factory=dict)
    # pixel size (µm) and segmentation/measurement settings of the training images, when known
    acquisition: dict[str, Any] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.class_weight == "balanced"

    def probabilities(self, X_raw: np.ndarray) -> np.ndarray:
        """Class probabilities (n, K) from unscaled features in ``self.features`` order."""
        return softmax_probabilities(predict_logits(self.coef, self.intercept, self.scaler.transform(X_raw)))


def model_id_for(feature_space: str, *, class_weight: str | None, shuffled: bool,
                 positive_class: str | None = None) -> str:
    """``CP__balanced__final``; binary: ``binary_Apoptosis__CP__balanced__final``."""
    base = f"{feature_space}__{'balanced' if class_weight == 'balanced' else 'unbalanced'}__" \
           f"{'shuffled' if shuffled else 'final'}"
    return f"binary_{positive_class}__{base}" if positive_class else base


def keyed_rng(random_state: int, *keys: str) -> np.random.Generator:
    """A generator keyed by names, so adding a model never changes another model's draws."""
    key = zlib.crc32("/".join(keys).encode())
    return np.random.default_rng([int(random_state), key])


def shuffle_columns(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute every column independently (the study's shuffled baseline)."""
    out = np.empty_like(X)
    for j in range(X.shape[1]):
        out[:, j] = X[rng.permutation(len(X)), j]
    return out


def downsample_negatives(labels: np.ndarray, positive: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of all positives plus as many randomly drawn negatives (1:1), sorted."""
    positives = np.flatnonzero(labels == positive)
    negatives = np.flatnonzero(labels != positive)
    chosen = rng.choice(negatives, size=min(len(positives), len(negatives)), replace=False)
    return np.sort(np.concatenate([positives, chosen]))


def train_model(
    data: LabelledData,
    train_mask: np.ndarray,
    *,
    class_weight: str | None = "balanced",
    shuffled: bool = False,
    positive_class: str | None = None,
    grid: Mapping[str, Sequence[float]] | None = None,
    hyperparameters: tuple[float, float] | None = None,
    cv_folds: int = 10,
    random_state: int = 0,
    n_jobs: int = 2,
    tol: float = DEFAULT_TOL,
    cv_tol: float = DEFAULT_CV_TOL,
    progress: bool = True,
) -> PhenotypeModel:
    """Fit one model on the cells where ``train_mask`` is true.

    Scales against the negative controls when the table has any (else against the training
    cells), optionally shuffles every training column (seeded), grid-searches C and l1_ratio
    (unless ``hyperparameters=(C, l1_ratio)`` is given; fits to ``cv_tol``) and refits on all
    training cells (to ``tol``).
    ``positive_class`` makes a one-vs-rest binary model trained on all positives and as many
    randomly drawn negatives.
    """
    model_id = model_id_for(data.feature_space, class_weight=class_weight, shuffled=shuffled,
                            positive_class=positive_class)
    train_mask = np.asarray(train_mask, dtype=bool)
    X_train = data.X[train_mask]
    labels = data.labels[train_mask]
    if data.negcon_X is not None:
        scaler = fit_zscore(data.negcon_X, "negative_controls")
    else:
        scaler = fit_zscore(X_train, "training_set")
    features = list(data.features)
    dropped = dict(data.dropped_features)
    constant = scaler.constant
    if constant.any():
        for name in np.array(features)[constant]:
            dropped[name] = f"constant over the scaler's reference cells ({scaler.reference})"
        log.warning("%s: dropped %d feature(s) constant in the scaler reference: %s", model_id,
                    int(constant.sum()), list(np.array(features)[constant]))
        keep = ~constant
        features = [f for f, k in zip(features, keep) if k]
        scaler = ZScore(scaler.mean[keep], scaler.scale[keep], scaler.reference, scaler.n_reference,
                        scaler.constant[keep])
        X_train = X_train[:, keep]
    Xs = scaler.transform(X_train)
    if shuffled:
        Xs = shuffle_columns(Xs, keyed_rng(random_state, model_id, "shuffle"))
    if positive_class is not None:
        chosen = downsample_negatives(labels, positive_class, keyed_rng(random_state, model_id, "negatives"))
        Xs = Xs[chosen]
        labels = np.where(labels[chosen] == positive_class, positive_class, BINARY_NEGATIVE)
        classes = [BINARY_NEGATIVE, positive_class]
        binary = True
    else:
        classes = sorted(pd.unique(labels).tolist())
        binary = False
    codes = np.array([classes.index(c) for c in labels]) if binary else np.searchsorted(classes, labels)
    cv: dict[str, Any] = {}
    if hyperparameters is None:
        search = grid_search(Xs, codes, n_classes=len(classes), grid=grid, cv_folds=cv_folds,
                             class_weight=class_weight, binary=binary, random_state=random_state,
                             n_jobs=n_jobs, tol=cv_tol, progress=progress, description=model_id)
        C, l1_ratio = search.C, search.l1_ratio
        cv = {"score": search.score, "scoring": "f1_weighted", "folds": cv_folds, "tol": cv_tol,
              "fold_method": "StratifiedKFold(shuffle=True)",
              "grid": {"C": sorted({float(c) for c in search.table["C"]}),
                       "l1_ratio": sorted({float(a) for a in search.table["l1_ratio"]})},
              "results": _records(search.table)}
        log.info("%s: selected C=%g l1_ratio=%g (CV weighted F1 %.3f)", model_id, C, l1_ratio, search.score)
    else:
        C, l1_ratio = (float(v) for v in hyperparameters)
    fit = fit_logistic(Xs, codes, n_classes=len(classes), C=C, l1_ratio=l1_ratio,
                       sample_weight=class_weights(codes, class_weight), binary=binary, tol=tol)
    distribution = training_distribution(X_train, features)  # raw units, before any shuffling
    counts = pd.Series(labels).value_counts().sort_index()
    training = {"n_cells": int(len(labels)), "class_counts": {str(k): int(v) for k, v in counts.items()},
                "n_iter": fit.n_iter, "converged": fit.converged, "kkt": fit.kkt, "tol": tol,
                "objective": fit.objective, "solver": "L-BFGS-B on the split elastic-net form (scipy)"}
    return PhenotypeModel(model_id, data.feature_space, features, classes, fit.coef, fit.intercept, scaler,
                          float(C), float(l1_ratio), class_weight, shuffled,
                          "binary" if binary else "multiclass", positive_class, cv, training, dropped,
                          int(random_state), distribution)


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records", double_precision=15))


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------

def probability_column(phenotype: str) -> str:
    return f"probability_{phenotype}"


def predict_table(model: PhenotypeModel, table: pd.DataFrame) -> pd.DataFrame:
    """Predict every cell of ``table``: its ``Metadata_*`` columns, ``predicted_phenotype`` and
    one ``probability_<Class>`` column per class, row for row.

    Missing features are an error listing all of them. Cells with a non-finite feature get no
    prediction (NA and NaN probabilities) and are counted in the log.
    """
    if CELL_ID not in table.columns:
        raise MorphotypeInputError(f"the table has no {CELL_ID} column: predictions could not be joined back to cells")
    ids = table[CELL_ID]
    if ids.isna().any() or ids.duplicated().any():
        bad = ids[ids.isna() | ids.duplicated()].iloc[0]
        raise MorphotypeInputError(f"the table's {CELL_ID} must be present and unique per cell; e.g. {bad!r}"
                                   f" (row {int(np.flatnonzero((ids.isna() | ids.duplicated()).to_numpy())[0]) + 1})")
    missing = [f for f in model.features if f not in table.columns]
    if missing:
        raise MorphotypeInputError(
            f"model {model.model_id}: the table lacks {len(missing)} of its {len(model.features)} "
            f"features: {missing}")
    X = table[model.features].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(X).all(axis=1)
    probabilities = np.full((len(X), len(model.classes)), np.nan)
    if finite.any():
        probabilities[finite] = model.probabilities(X[finite])
    if (~finite).any():
        log.warning("model %s: %d cell(s) with non-finite features were not predicted", model.model_id,
                    int((~finite).sum()))
    out = table[[c for c in table.columns if c.startswith(METADATA_PREFIX)]].copy()
    predicted = pd.Series(pd.NA, index=out.index, dtype="string")
    predicted[finite] = np.asarray(model.classes, dtype=object)[probabilities[finite].argmax(axis=1)]
    out["predicted_phenotype"] = predicted
    for k, name in enumerate(model.classes):
        out[probability_column(name)] = probabilities[:, k]
    return out


# --------------------------------------------------------------------------------------------
# Artefacts
# --------------------------------------------------------------------------------------------

def model_card(model: PhenotypeModel) -> dict[str, Any]:
    """The JSON-able description written as ``model_card.json`` (deterministic: no timestamps)."""
    return {
        "model_id": model.model_id,
        "model_type": model.model_type,
        "positive_class": model.positive_class,
        "feature_space": model.feature_space,
        "features": list(model.features),
        "classes": list(model.classes),
        "hyperparameters": {"C": model.C, "l1_ratio": model.l1_ratio, "class_weight": model.class_weight,
                            "penalty": "elastic net (scikit-learn LogisticRegression objective)"},
        "shuffled": model.shuffled,
        "scaler": {"reference": model.scaler.reference, "n_reference_cells": model.scaler.n_reference,
                   "mean_of_means": float(np.mean(model.scaler.mean)),
                   "mean_of_scales": float(np.mean(model.scaler.scale)),
                   "stored_in": "coefficients.npz (scaler_mean, scaler_scale)"},
        "cross_validation": model.cv,
        "training": model.training,
        "dropped_features": model.dropped_features,
        "n_nonzero_coefficients": int(np.count_nonzero(model.coef)),
        "random_state": model.random_state,
        "training_distribution": model.training_distribution,
        "acquisition": model.acquisition,
        "versions": software_versions(MODEL_PACKAGES),
        "fingerprint": model_fingerprint(model.coef, model.intercept, model.scaler.mean, model.scaler.scale,
                                         model.features, model.classes),
    }


def model_fingerprint(coef: np.ndarray, intercept: np.ndarray, scaler_mean: np.ndarray,
                      scaler_scale: np.ndarray, features: Sequence[str], classes: Sequence[str]) -> str:
    """SHA-256 of the arrays together with the feature and class order they were trained with.

    Stored in the card and checked on load: a truncated or edited ``coefficients.npz``, or a card
    whose classes (or features) were reordered, would otherwise predict confidently wrong labels.
    """
    import hashlib

    digest = hashlib.sha256()
    for array in (coef, intercept, scaler_mean, scaler_scale):
        array = np.ascontiguousarray(array, dtype=np.float64)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    digest.update(json.dumps([list(features), list(classes)]).encode())
    return "sha256:" + digest.hexdigest()


def save_model(model: PhenotypeModel, directory: str | os.PathLike) -> Path:
    """Write ``coefficients.npz`` (coef, intercept, scaler) and ``model_card.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "coefficients.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, coef=model.coef, intercept=model.intercept, scaler_mean=model.scaler.mean,
                     scaler_scale=model.scaler.scale)
    with atomic_path(directory / "model_card.json") as tmp:
        tmp.write_text(json.dumps(model_card(model), indent=2, allow_nan=True) + "\n")
    return directory


def load_model(directory: str | os.PathLike) -> PhenotypeModel:
    """Read a model written by :func:`save_model`; predictions are identical to the saved model's."""
    directory = Path(directory)
    card_path, arrays_path = directory / "model_card.json", directory / "coefficients.npz"
    if card_path.exists() and not arrays_path.exists():
        raise MorphotypeInputError(f"{directory}: a model of another family than the study's logistic model; "
                                   "load it with morphotype.estimators.load_any_model")
    for path in (card_path, arrays_path):
        if not path.exists():
            raise MorphotypeInputError(f"{path}: missing; not a saved morphotype model directory")
    try:
        card = json.loads(card_path.read_text())
        with np.load(arrays_path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        coef, intercept = arrays["coef"], arrays["intercept"]
        scaler = ZScore(arrays["scaler_mean"], arrays["scaler_scale"], card["scaler"]["reference"],
                        int(card["scaler"]["n_reference_cells"]))
        hyper = card["hyperparameters"]
        model = PhenotypeModel(
            card["model_id"], card["feature_space"], list(card["features"]), list(card["classes"]), coef,
            intercept, scaler, float(hyper["C"]), float(hyper["l1_ratio"]), hyper["class_weight"],
            bool(card["shuffled"]), card["model_type"], card["positive_class"], card["cross_validation"],
            card["training"], card["dropped_features"], int(card["random_state"]),
            card.get("training_distribution") or {}, card.get("acquisition") or {})
    except (KeyError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise MorphotypeInputError(f"{directory}: malformed or truncated model files ({error!r})") from error
    if coef.shape[1] != len(model.features) or len(scaler.mean) != len(model.features):
        raise MorphotypeInputError(f"{directory}: coefficients do not match the card's {len(model.features)} features")
    expected = card.get("fingerprint")
    if expected is None:
        log.warning("%s: model card has no fingerprint (written before fingerprints); not verified", directory)
    elif expected != model_fingerprint(coef, intercept, scaler.mean, scaler.scale, model.features, model.classes):
        raise MorphotypeInputError(
            f"{card_path}: fingerprint does not match coefficients.npz with the card's feature and class "
            "order: the model was edited or corrupted after training; retrain or restore it")
    return model


# --------------------------------------------------------------------------------------------
# Results of a training run (trained by morphotype.training)
# --------------------------------------------------------------------------------------------

SPLIT_COLUMNS = ["feature_space", CELL_ID, IMAGE_ID, PHENOTYPE, "split"]


@dataclass
class TrainingResults:
    """Trained models, the per-cell split, and (after evaluation) the evaluation tables.

    :func:`morphotype.training.write_results` writes it all; :func:`write_models` /
    :func:`load_models` the models part.
    """

    models: dict[str, PhenotypeModel]
    splits: pd.DataFrame  # feature_space, Metadata_CellID, Metadata_ImageID, Metadata_Phenotype, split
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # evaluation tables by file stem
    skipped_feature_spaces: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def concat_tables(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """The non-empty frames one after another (an empty frame when there are none)."""
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_models(results: TrainingResults, models_dir: str | os.PathLike, *, results_id: str | None = None) -> Path:
    """Save every model as ``models_dir/<model_id>/`` plus ``models_dir/cell_splits.csv``
    (the train/test side of every cell, per feature space) and ``training.json`` (settings,
    skipped feature spaces)."""
    models_dir = Path(models_dir)
    for model_id, model in results.models.items():
        save_model(model, models_dir / model_id)
    splits = results.splits if len(results.splits.columns) else pd.DataFrame(columns=SPLIT_COLUMNS)
    write_table(splits, models_dir / "cell_splits.csv")
    with atomic_path(models_dir / "training.json") as tmp:
        tmp.write_text(json.dumps({"settings": results.settings, "models": list(results.models),
                                   "skipped_feature_spaces": results.skipped_feature_spaces,
                                   **({"results_id": results_id} if results_id else {})}, indent=2) + "\n")
    return models_dir


def load_models(models_dir: str | os.PathLike) -> TrainingResults:
    """Read what :func:`write_models` wrote (models and splits; no evaluation tables)."""
    models_dir = Path(models_dir)
    index_path = models_dir / "training.json"
    if not index_path.exists():
        raise MorphotypeInputError(f"{index_path}: missing; not a morphotype models directory")
    index = json.loads(index_path.read_text())
    loaded = {model_id: load_model(models_dir / model_id) for model_id in index["models"]}
    splits = read_table(models_dir / "cell_splits.csv")
    splits[CELL_ID] = splits[CELL_ID].astype(str)
    return TrainingResults(loaded, splits, {}, index.get("skipped_feature_spaces", {}), index.get("settings", {}))


def combine_results(parts: Sequence[TrainingResults]) -> TrainingResults:
    """One :class:`TrainingResults` from several trained with the same settings on different
    feature spaces (the per-space tasks of the Nextflow fan-out), in the given order."""
    if not parts:
        raise MorphotypeInputError("no models folders to combine")
    models: dict[str, PhenotypeModel] = {}
    skipped: dict[str, str] = {}
    spaces: list[str] = []
    reference = {k: v for k, v in parts[0].settings.items() if k != "feature_spaces"}
    for part in parts:
        other = {k: v for k, v in part.settings.items() if k != "feature_spaces"}
        if other != reference:
            changed = sorted(k for k in set(other) | set(reference) if other.get(k) != reference.get(k))
            raise MorphotypeInputError(f"models folders were trained with different settings: {changed}")
        duplicated = sorted(set(models) & set(part.models))
        if duplicated:
            raise MorphotypeInputError(f"model(s) {duplicated} appear in more than one models folder")
        models.update(part.models)
        skipped.update(part.skipped_feature_spaces)
        spaces += [s for s in part.settings.get("feature_spaces", []) if s not in spaces]
    splits = concat_tables(part.splits for part in parts)
    return TrainingResults(models, splits, {}, skipped, {**parts[0].settings, "feature_spaces": spaces})
