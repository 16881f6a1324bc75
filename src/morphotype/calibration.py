"""Calibration of class probabilities: temperature scaling, expected calibration error (ECE) and
reliability curves.

ECE (Guo et al. 2017): the top-label confidence ``max_k p_k`` of each cell goes to one of 15
equal-width bins on [0, 1] (the last bin closed); ECE is the cell-weighted mean over bins of
``|accuracy - mean confidence|``. The reliability curve is the same bins' accuracy against mean
confidence. scikit-learn's ``calibration_curve`` is one-vs-rest for one class, not top-label over
classes, hence the few lines here.

Temperature scaling divides log-probabilities by one scalar T and renormalises; T is chosen to
minimise the log loss of out-of-fold predictions of the training split (never the test split).
It rescales confidence without changing any cell's predicted class (argmax is kept), so F1 is
untouched. Hand-written (a bounded 1-D minimisation) because scikit-learn's calibrators refit
the model per fold with cell-level folds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ECE_BINS = 15


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row; T = 1 returns the probabilities unchanged."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if temperature == 1.0:
        return probabilities
    with np.errstate(divide="ignore"):
        logits = np.log(probabilities) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, truth_index: np.ndarray) -> float:
    """Temperature minimising the mean log loss of ``probabilities`` (n, K) against the true class
    indices (out-of-fold predictions: calibration must not see the cells it is judged on)."""
    from scipy.optimize import minimize_scalar

    probabilities = np.asarray(probabilities, dtype=np.float64)
    rows = np.arange(len(probabilities))

    def log_loss(log_t: float) -> float:
        p = apply_temperature(probabilities, float(np.exp(log_t)))[rows, truth_index]
        return float(-np.mean(np.log(np.clip(p, 1e-12, None))))

    result = minimize_scalar(log_loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def reliability_curve(probabilities: np.ndarray, truth_index: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per confidence bin: its bounds, cells, mean top-label confidence and accuracy."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(truth_index)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = which == b
        rows.append({"bin": b, "lower": edges[b], "upper": edges[b + 1], "n_cells": int(inside.sum()),
                     "confidence": float(confidence[inside].mean()) if inside.any() else np.nan,
                     "accuracy": float(correct[inside].mean()) if inside.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(probabilities: np.ndarray, truth_index: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (see the module docstring)."""
    curve = reliability_curve(probabilities, truth_index, n_bins)
    filled = curve[curve["n_cells"] > 0]
    return float((filled["n_cells"] * (filled["accuracy"] - filled["confidence"]).abs()).sum()
                 / max(int(filled["n_cells"].sum()), 1))
