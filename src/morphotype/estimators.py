"""One model interface for every model family: scikit-learn estimators, a saved model folder with
its JSON card, and loading of any family (the study's logistic model folders included).

Families (each a scikit-learn classifier on z-scored features, so scikit-learn's CV tools drive
them and JUMP can feed it features z-scored against a plate's own negative controls):

- ``logistic``: :class:`ElasticNetLogistic`, the study's elastic-net objective solved by
  :func:`morphotype.models.fit_logistic` (the same solver, wrapped; no second implementation).
- ``hgb``: scikit-learn's ``HistGradientBoostingClassifier``. Chosen over LightGBM, which
  implements the same histogram algorithm, because scikit-learn is already a dependency, its
  estimator is deterministic given ``random_state`` and is saved with the rest of the model,
  and LightGBM is not installed here (one more compiled wheel for the same trees).
- ``ensemble``: :class:`AveragedProbabilities`, the mean of its members' calibrated probabilities.

A :class:`FamilyModel` holds the estimator with what the study's :class:`~morphotype.models.PhenotypeModel`
holds (features in order, classes in order, the z-score), plus a temperature fitted on
out-of-fold predictions of the training split (:mod:`morphotype.calibration`). It is saved as
``estimator.joblib`` (the fitted estimator, scikit-learn's documented persistence: joblib
pickles, so load only model folders you trust), ``scaler.npz`` and ``model_card.json`` whose
``family`` field says how to load it. :func:`load_any_model` loads any model folder; one with
no ``family`` in its card is the study's logistic model (:func:`morphotype.models.load_model`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from morphotype.calibration import apply_temperature
from morphotype.io import MorphotypeInputError, atomic_path
from morphotype.models import (
    DEFAULT_TOL,
    MODEL_PACKAGES,
    class_weights,
    fit_logistic,
    load_model,
    predict_logits,
    softmax_probabilities,
)
from morphotype.normalize import ZScore
from morphotype.versions import software_versions

FAMILIES = ("logistic", "hgb", "ensemble")
CARD = "model_card.json"


class ElasticNetLogistic(ClassifierMixin, BaseEstimator):
    """The study's multinomial elastic-net logistic regression as a scikit-learn classifier.

    Same objective as ``LogisticRegression(C=C, l1_ratio=l1_ratio, class_weight=class_weight)``,
    solved to the KKT tolerance ``tol`` by :func:`morphotype.models.fit_logistic`.
    """

    _parameter_constraints: dict = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "l1_ratio": [Interval(Real, 0, 1, closed="both")],
        "class_weight": [StrOptions({"balanced"}), None],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, C: float = 1.0, l1_ratio: float = 0.0, class_weight: str | None = "balanced",
                 tol: float = DEFAULT_TOL, max_iter: int = 20_000):
        self.C = C
        self.l1_ratio = l1_ratio
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, X, y):
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("ElasticNetLogistic needs at least two classes")
        fit = fit_logistic(X, codes, n_classes=len(self.classes_), C=self.C, l1_ratio=self.l1_ratio,
                           sample_weight=class_weights(codes, self.class_weight), tol=self.tol,
                           max_iter=self.max_iter)
        self.coef_, self.intercept_, self.n_iter_, self.converged_ = fit.coef, fit.intercept, fit.n_iter, fit.converged
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return predict_logits(self.coef_, self.intercept_, X)

    def predict_proba(self, X):
        return softmax_probabilities(self.decision_function(X))

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class AveragedProbabilities(ClassifierMixin, BaseEstimator):
    """Ensemble: the mean of fitted members' temperature-scaled probabilities.

    ``members`` are fitted classifiers sharing ``classes_``; ``temperatures`` their calibration
    (1.0: none). Not refitted by :meth:`fit` (its members are tuned and calibrated one by one).
    """

    _parameter_constraints: dict = {"members": [list], "temperatures": [list, None]}

    def __init__(self, members: list | None = None, temperatures: list | None = None):
        self.members = members
        self.temperatures = temperatures

    def fit(self, X, y):
        self._validate_params()
        classes = [np.asarray(m.classes_) for m in self.members]
        if any(not np.array_equal(classes[0], c) for c in classes[1:]):
            raise ValueError("ensemble members must share their classes")
        self.classes_ = classes[0]
        self.n_features_in_ = self.members[0].n_features_in_
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        temperatures = self.temperatures or [1.0] * len(self.members)
        return np.mean([apply_temperature(m.predict_proba(X), t) for m, t in zip(self.members, temperatures)], axis=0)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def make_estimator(family: str, params: dict[str, Any] | None = None, *, random_state: int = 0):
    """An unfitted estimator of ``family`` with ``params`` (class-balanced, as the study's model)."""
    params = dict(params or {})
    if family == "logistic":
        return ElasticNetLogistic(**params)
    if family == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        # No early stopping: it would hold out a cell-level (image-mixing) validation set. 32 bins:
        # with ~2,300 cells, split finding over 255 bins dominated; 32 bins fit 5x faster.
        defaults = {"learning_rate": 0.2, "max_iter": 50, "max_leaf_nodes": 15, "l2_regularization": 1.0,
                    "max_bins": 32, "class_weight": "balanced", "early_stopping": False,
                    "random_state": random_state}
        return HistGradientBoostingClassifier(**{**defaults, **params})
    raise MorphotypeInputError(f"unknown model family {family!r}; expected one of {FAMILIES}")


@dataclass
class FamilyModel:
    """A fitted model of any family, with the interface of :class:`morphotype.models.PhenotypeModel`
    that prediction, evaluation and JUMP use (``features``, ``classes``, ``probabilities``)."""

    model_id: str
    family: str
    feature_space: str
    features: list[str]
    classes: list[str]
    scaler: ZScore
    estimator: Any
    temperature: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    shuffled: bool = False
    class_weight: str | None = "balanced"
    cv: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    random_state: int = 0
    model_type: str = "multiclass"
    positive_class: str | None = None

    @property
    def balanced(self) -> bool:
        return self.class_weight == "balanced"

    def probabilities_scaled(self, Z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (n, K) in ``classes`` order from already z-scored features."""
        raw = self.estimator.predict_proba(Z)
        order = [list(self.estimator.classes_).index(c) for c in self.classes]
        return apply_temperature(raw[:, order], self.temperature)

    def probabilities(self, X_raw: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (n, K) from unscaled features in ``features`` order."""
        return self.probabilities_scaled(self.scaler.transform(X_raw))

    def predict_proba(self, X_raw: np.ndarray) -> np.ndarray:
        return self.probabilities(X_raw)


def family_card(model: FamilyModel) -> dict[str, Any]:
    """The JSON-able card of a family model (deterministic: no timestamps)."""
    return {
        "model_id": model.model_id, "family": model.family, "model_type": model.model_type,
        "positive_class": model.positive_class, "feature_space": model.feature_space,
        "features": list(model.features), "classes": list(model.classes),
        "hyperparameters": {**model.params, "class_weight": model.class_weight},
        "calibration": {"method": "temperature scaling", "temperature": float(model.temperature),
                        "fitted_on": "out-of-fold predictions of the training split (image-grouped CV)"},
        "shuffled": model.shuffled,
        "scaler": {"reference": model.scaler.reference, "n_reference_cells": model.scaler.n_reference,
                   "stored_in": "scaler.npz (mean, scale)"},
        "estimator": {"class": type(model.estimator).__name__, "stored_in": "estimator.joblib"},
        "cross_validation": model.cv, "training": model.training, "random_state": model.random_state,
        "versions": software_versions(MODEL_PACKAGES),
    }


def save_family_model(model: FamilyModel, directory: str | os.PathLike) -> Path:
    """Write ``estimator.joblib``, ``scaler.npz`` and ``model_card.json`` into ``directory``."""
    import joblib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "estimator.joblib") as tmp:
        joblib.dump(model.estimator, tmp)
    with atomic_path(directory / "scaler.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, mean=model.scaler.mean, scale=model.scaler.scale)
    with atomic_path(directory / CARD) as tmp:
        tmp.write_text(json.dumps(family_card(model), indent=2, allow_nan=True) + "\n")
    return directory


def load_family_model(directory: str | os.PathLike) -> FamilyModel:
    """Read a model written by :func:`save_family_model`; predictions equal the saved model's."""
    import joblib

    directory = Path(directory)
    for name in (CARD, "estimator.joblib", "scaler.npz"):
        if not (directory / name).exists():
            raise MorphotypeInputError(f"{directory / name}: missing; not a saved morphotype model directory")
    try:
        card = json.loads((directory / CARD).read_text())
        arrays = np.load(directory / "scaler.npz")
        scaler = ZScore(arrays["mean"], arrays["scale"], card["scaler"]["reference"],
                        int(card["scaler"]["n_reference_cells"]))
        hyper = dict(card["hyperparameters"])
        class_weight = hyper.pop("class_weight", "balanced")
        model = FamilyModel(
            model_id=card["model_id"], family=card["family"], feature_space=card["feature_space"],
            features=list(card["features"]), classes=list(card["classes"]), scaler=scaler,
            estimator=joblib.load(directory / "estimator.joblib"),
            temperature=float(card["calibration"]["temperature"]), params=hyper, shuffled=bool(card["shuffled"]),
            class_weight=class_weight, cv=card.get("cross_validation", {}), training=card.get("training", {}),
            random_state=int(card["random_state"]), model_type=card.get("model_type", "multiclass"),
            positive_class=card.get("positive_class"))
    except (KeyError, ValueError, TypeError) as error:
        raise MorphotypeInputError(f"{directory}: malformed model files ({error!r})") from error
    if len(scaler.mean) != len(model.features) or getattr(model.estimator, "n_features_in_", len(model.features)) \
            != len(model.features):
        raise MorphotypeInputError(f"{directory}: estimator does not match the card's {len(model.features)} features")
    return model


def recommended_model_dir(directory: str | os.PathLike, *, shuffled: bool = False) -> Path:
    """``directory`` itself when it is a model folder; for a models folder with ``recommended.json``,
    the recommended model's folder (``shuffled``: its shuffled baseline's)."""
    directory = Path(directory)
    recommended = directory / "recommended.json"
    if (directory / CARD).exists() or not recommended.exists():
        return directory
    key = "shuffled_model_id" if shuffled else "model_id"
    try:
        chosen = json.loads(recommended.read_text())[key]
    except (KeyError, ValueError) as error:
        raise MorphotypeInputError(f"{recommended}: no {key} ({error!r})") from error
    return directory / chosen


def load_any_model(directory: str | os.PathLike):
    """Load a model folder of any family; a models folder (with ``recommended.json``) gives its
    recommended model. Old folders without a ``family`` field are the study's logistic model."""
    directory = recommended_model_dir(directory)
    card_path = directory / CARD
    if not card_path.exists():
        raise MorphotypeInputError(f"{card_path}: missing; not a saved morphotype model directory "
                                   "(nor a models folder with recommended.json)")
    try:
        family = json.loads(card_path.read_text()).get("family")
    except ValueError as error:
        raise MorphotypeInputError(f"{card_path}: malformed JSON ({error})") from error
    return load_model(directory) if family is None else load_family_model(directory)
