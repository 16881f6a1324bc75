"""Does a model fit the data it is applied to? Feature alignment and a domain-shift guard.

**Feature alignment** (:func:`check_feature_alignment`). A model's weight on feature ``j`` is
its share of the squared coefficient norm, ``||W[:, j]||² / ||W||_F²``, with ``W`` the
coefficients on z-scored features (so the weights are comparable across features and add up to
1). A missing feature can only be filled with 0 after z-scoring (the negative-control mean), so
the share of the model resting on missing features is the share of the model that is guessed.
Above ``max_missing_weight`` (default ``MAX_MISSING_WEIGHT``) scoring is refused unless
``fill_missing`` is given; the filling is recorded either way.

**Domain-shift guard** (:class:`DomainGuard`). Training stores, per feature and in raw units,
the quantiles ``TRAINING_QUANTILES`` of the training cells (the model card's
``training_distribution``). For new cells: per feature the fraction outside the training
1–99 % range (expected: 0.02 for cells like the training cells); overall the coefficient-weighted
mean of those fractions (weights as above). ``flagged`` when the overall fraction exceeds
``SHIFT_THRESHOLD`` (0.10, five times the expected 0.02). Per cell, ``Metadata_InDistribution``
is the weighted share of the model's features inside the training 1–99 % range (1 = every
feature inside). The guard only reads features; it never changes a prediction.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from morphotype.io import MorphotypeInputError, atomic_path

log = logging.getLogger(__name__)

MAX_MISSING_WEIGHT = 0.05
TRAINING_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SHIFT_THRESHOLD = 0.10
IN_DISTRIBUTION_COLUMN = "Metadata_InDistribution"
STATISTIC = ("per feature: fraction of cells outside the training 1-99 % quantile range (expected 0.02); "
             "overall: mean of those fractions weighted by the model's squared coefficient norm per feature "
             "(z-scored features); per cell: weighted share of features inside that range")


def feature_weights(model: Any) -> dict[str, float]:
    """Share of the squared coefficient norm per feature (adds up to 1); uniform for an all-zero
    model and for families without coefficients (trees, ensembles), where every feature may matter."""
    coef = getattr(model, "coef", None)
    if coef is None:
        return {f: 1.0 / len(model.features) for f in model.features}
    squared = np.square(np.asarray(coef, dtype=np.float64)).sum(axis=0)
    total = squared.sum()
    if total == 0:
        squared, total = np.ones(len(model.features)), float(len(model.features))
    return {f: float(w / total) for f, w in zip(model.features, squared)}


def check_feature_alignment(models: Mapping[str, Any], available: Iterable[str], *, source: str,
                            fill_missing: bool = False, max_missing_weight: float | None = MAX_MISSING_WEIGHT
                            ) -> dict[str, Any]:
    """Report the model features absent from the input and the share of each model resting on them.

    Raises
    ------
    MorphotypeInputError
        When a model's missing share exceeds ``max_missing_weight`` and ``fill_missing`` is false
        (``max_missing_weight=None``: never refuse, the study's JUMP behaviour).
    """
    available = set(available)
    report: dict[str, Any] = {"max_missing_weight": max_missing_weight, "fill_missing": fill_missing,
                              "weight": "share of the squared coefficient norm on z-scored features",
                              "filled_with": "0 after z-scoring (the negative-control mean)", "models": {}}
    refused = []
    for name, model in models.items():
        weights = feature_weights(model)
        missing = {f: round(w, 6) for f, w in sorted(weights.items(), key=lambda kv: -kv[1]) if f not in available}
        share = float(sum(weights[f] for f in missing))
        report["models"][name] = {"model_id": model.model_id, "n_features": len(weights),
                                  "n_missing": len(missing), "missing_weight": share, "missing": missing}
        if missing:
            log.warning("%s: model %s lacks %d of its %d features (%.1f %% of its weight)%s", source,
                        model.model_id, len(missing), len(weights), 100 * share,
                        "; filled with 0 (negcon mean)" if fill_missing or max_missing_weight is None
                        or share <= max_missing_weight else "")
        if max_missing_weight is not None and share > max_missing_weight and not fill_missing:
            refused.append((name, model, share, missing))
    if refused:
        name, model, share, missing = refused[0]
        listed = ", ".join(f"{f} ({w:.3f})" for f, w in list(missing.items())[:15])
        more = f" and {len(missing) - 15} more" if len(missing) > 15 else ""
        raise MorphotypeInputError(
            f"{source}: lacks {len(missing)} feature(s) of the {name} model {model.model_id}, carrying "
            f"{share:.1%} of its weight (more than the allowed {max_missing_weight:.1%}): {listed}{more}. "
            "Name the nuclei object / DNA stain (--nuclei-object, --dna-stain), train on the features the "
            "input has (morphotype train --features-of), or accept filling them with the negative-control "
            "mean (--fill-missing)")
    report["filled"] = bool(any(m["n_missing"] for m in report["models"].values()))
    return report


def training_distribution(X_raw: np.ndarray, features: Sequence[str]) -> dict[str, Any]:
    """Quantiles ``TRAINING_QUANTILES`` of every feature over the training cells (raw units)."""
    X_raw = np.asarray(X_raw, dtype=np.float64)
    values = np.nanquantile(X_raw, TRAINING_QUANTILES, axis=0) if len(X_raw) else np.full(
        (len(TRAINING_QUANTILES), len(features)), np.nan)
    return {"quantiles": list(TRAINING_QUANTILES), "n_cells": int(len(X_raw)), "units": "raw feature units",
            "features": {f: [float(v) for v in values[:, j]] for j, f in enumerate(features)}}


class DomainGuard:
    """Accumulates how far new cells lie from a model's training cells (see the module docstring)."""

    def __init__(self, model: Any, threshold: float = SHIFT_THRESHOLD):
        self.model_id = model.model_id
        self.threshold = threshold
        distribution = getattr(model, "training_distribution", None) or {}
        quantiles = distribution.get("quantiles", [])
        self.known = bool(distribution.get("features")) and 0.01 in quantiles and 0.99 in quantiles
        self.weights = feature_weights(model)
        self.ranges: dict[str, tuple[float, float]] = {}
        if self.known:
            low, high = quantiles.index(0.01), quantiles.index(0.99)
            self.ranges = {f: (v[low], v[high]) for f, v in distribution["features"].items() if f in self.weights}
        self.below = {f: 0 for f in self.ranges}
        self.above = {f: 0 for f in self.ranges}
        self.counted = {f: 0 for f in self.ranges}

    def update(self, X_raw: np.ndarray, columns: Sequence[str]) -> np.ndarray:
        """Count the cells of ``X_raw`` (raw units, ``columns`` order); return their in-distribution scores."""
        X_raw = np.asarray(X_raw, dtype=np.float64)
        if not self.known:
            return np.full(len(X_raw), np.nan)
        inside = np.zeros(len(X_raw))
        total = np.zeros(len(X_raw))
        for j, name in enumerate(columns):
            if name not in self.ranges:
                continue
            low, high = self.ranges[name]
            values = X_raw[:, j]
            finite = np.isfinite(values)
            below, above = finite & (values < low), finite & (values > high)
            self.below[name] += int(below.sum())
            self.above[name] += int(above.sum())
            self.counted[name] += int(finite.sum())
            weight = self.weights[name]
            inside += weight * (finite & ~below & ~above)
            total += weight * finite
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)

    def report(self) -> dict[str, Any]:
        """The ``domain_shift.json`` content; ``flagged`` is None ("unknown") without a stored distribution."""
        if not self.known:
            return {"status": "unknown", "flagged": None, "model_id": self.model_id,
                    "reason": "the model card has no training_distribution (a model saved before it was recorded)"}
        per_feature, weighted, weight_sum = {}, 0.0, 0.0
        for name in self.ranges:
            n = self.counted[name]
            if n == 0:
                continue
            outside = (self.below[name] + self.above[name]) / n
            per_feature[name] = {"fraction_outside": outside, "fraction_below": self.below[name] / n,
                                 "fraction_above": self.above[name] / n, "n_cells": n,
                                 "weight": self.weights[name], "training_range_1_99": list(self.ranges[name])}
            weighted += self.weights[name] * outside
            weight_sum += self.weights[name]
        overall = weighted / weight_sum if weight_sum else float("nan")
        flagged = bool(weight_sum and overall > self.threshold)
        top = sorted(per_feature, key=lambda f: -per_feature[f]["weight"] * per_feature[f]["fraction_outside"])[:10]
        return {"status": "flagged" if flagged else "ok", "flagged": flagged, "model_id": self.model_id,
                "overall_fraction_outside": overall, "expected_if_like_training": 0.02,
                "threshold": self.threshold, "statistic": STATISTIC,
                "n_features_compared": len(per_feature), "most_shifted": top, "features": per_feature}


def write_report(report: dict[str, Any], path: str | os.PathLike, source: str = "") -> Path:
    """Write ``domain_shift.json`` and warn loudly when the data are flagged as unlike the training data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    if report.get("flagged"):
        log.warning("!" * 78)
        log.warning("DOMAIN SHIFT: %s is unlike the training data of %s: %.0f %% of (weighted) feature values lie "
                    "outside the training 1-99 %% range (threshold %.0f %%); most shifted: %s. "
                    "Predictions may be wrong; see %s", source or "the input", report["model_id"],
                    100 * report["overall_fraction_outside"], 100 * report["threshold"],
                    ", ".join(report["most_shifted"][:5]), path)
        log.warning("!" * 78)
    elif report.get("status") == "unknown":
        log.warning("domain shift unknown: model %s records no training distribution", report["model_id"])
    return path


# MitoCheck (idr0013-screenA): 10x objective on an Olympus ScanR with a Hamamatsu Orca-ER camera
# (6.45 µm pixels, 1344x1024 frames), i.e. 0.645 µm per image pixel (Neumann et al. 2010, Nature
# 464:721, methods). Not in the IDR's own screen table; the value follows from those two numbers.
MITOCHECK_PIXEL_SIZE_UM = 0.645


def pixel_size_of(table) -> float | None:
    """MitoCheck's pixel size when every cell comes from a MitoCheck plate (LT0001_01, ...), else None."""
    plates = table["Metadata_Plate"].astype(str) if "Metadata_Plate" in table else None
    return MITOCHECK_PIXEL_SIZE_UM if plates is not None and len(plates) and plates.str.startswith("LT0").all() \
        else None


def record_acquisition(models: Iterable[Any], *, pixel_size_um: float | None,
                       segmentation: Mapping[str, Any] | None = None,
                       measurement: Mapping[str, Any] | None = None) -> None:
    """Store the training images' pixel size and segmentation/measurement settings on each model card."""
    for model in models:
        model.acquisition = {"pixel_size_um": pixel_size_um,
                             "segmentation": dict(segmentation) if segmentation is not None else None,
                             "measurement": dict(measurement) if measurement is not None else None}
