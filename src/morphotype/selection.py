"""Model families beside the study's model: image-grouped tuning, calibration, leave-images-out
evaluation and the run's recommended model.

Everything is chosen on the training split only:

- **Tuning** (each family's hyper-parameters): out-of-fold (OOF) weighted F1 over folds that keep
  each image whole (``StratifiedGroupKFold`` grouped by ``Metadata_ImageID``), so a model cannot
  score by recognising cells of an image it was trained on. The study's cell-level CV
  (``StratifiedKFold``) of the chosen point is reported beside it.
- **Calibration**: a temperature fitted on the chosen point's grouped OOF probabilities
  (:mod:`morphotype.calibration`), stored in the model and applied by its ``probabilities``.
- **Recommended model**: the highest grouped-CV weighted F1 among the families (ties go to the
  earlier family in :data:`morphotype.estimators.FAMILIES`, the simpler one). The test split is
  only evaluated, never consulted.

Leave-images-out (LIO): the study's LOIO refits once per image (229 refits on the demo), which
a tree ensemble cannot afford; here every labelled cell (train and test split) is predicted by a
model fitted on ``loio_folds`` image-grouped folds that never saw its image. Each model is fitted
on fewer images than in LOIO, so LIO is the harder test; its per image x phenotype pass fraction
(mean rank of the true class < 2) is the study's LOIO statistic.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from morphotype.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from morphotype.columns import IMAGE_ID
from morphotype.estimators import (
    AveragedProbabilities,
    FamilyModel,
    make_estimator,
    save_family_model,
)
from morphotype.evaluate import _features_of, data_as_trained, split_for, true_class_rank
from morphotype.io import MorphotypeInputError, atomic_path, write_table
from morphotype.models import DEFAULT_CV_TOL, LabelledData, keyed_rng, shuffle_columns
from morphotype.normalize import ZScore, fit_zscore

log = logging.getLogger(__name__)

# Small grids: each point costs ``cv_folds`` fits. The logistic grid brackets the study's usual
# choice (C = 0.1, l1_ratio = 0) at CV tolerance; the tree grid is boosting rounds, one fit per fold
# for all of them (staged predictions).
FAMILY_GRIDS: dict[str, list[dict[str, Any]]] = {
    "logistic": [{"C": c, "l1_ratio": 0.0, "tol": DEFAULT_CV_TOL} for c in (0.01, 0.1, 1.0)],
    "hgb": [{"max_leaf_nodes": 15, "learning_rate": 0.2, "max_iter": n} for n in (25, 50, 75)],
}
RECOMMENDED = "recommended.json"


def grouped_folds(labels: np.ndarray, images: np.ndarray, n_splits: int, random_state: int):
    """Stratified folds that keep every image whole (each image in exactly one validation fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = min(n_splits, len(pd.unique(images)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(len(labels)), labels, images))


def cell_folds(labels: np.ndarray, n_splits: int, random_state: int):
    """The study's cell-level stratified folds (cells of one image on both sides)."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits, shuffle=True, random_state=random_state).split(np.zeros(len(labels)), labels))


def _aligned(estimator, Z: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Probabilities in ``classes`` order; classes the estimator never saw get 0."""
    raw = estimator.predict_proba(Z)
    out = np.zeros((len(Z), len(classes)))
    index = {c: k for k, c in enumerate(classes)}
    for j, c in enumerate(estimator.classes_):
        out[:, index[c]] = raw[:, j]
    return out


def _fit_fold(family, params, Z, labels, train, validate, classes, random_state):
    estimator = make_estimator(family, params, random_state=random_state).fit(Z[train], labels[train])
    return validate, _aligned(estimator, Z[validate], classes)


def out_of_fold(family: str, params: dict, Z: np.ndarray, labels: np.ndarray, folds, classes: Sequence[str], *,
                random_state: int = 0, n_jobs: int = 2) -> np.ndarray:
    """OOF probabilities (n, K): each cell predicted by the fold model that did not train on it."""
    from joblib import Parallel, delayed

    # Trees use OpenMP threads themselves; the logistic solver is single-threaded per fit.
    workers = n_jobs if family == "logistic" else 1
    jobs = (delayed(_fit_fold)(family, params, Z, labels, tr, va, classes, random_state) for tr, va in folds)
    probabilities = np.zeros((len(Z), len(classes)))
    for validate, block in Parallel(n_jobs=workers, backend="loky" if workers > 1 else "sequential")(jobs):
        probabilities[validate] = block
    return probabilities


def weighted_f1(labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> float:
    from sklearn.metrics import f1_score

    predicted = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    return float(f1_score(labels, predicted, average="weighted", zero_division=0))


def fit_scaler_for(data: LabelledData, rows: np.ndarray) -> ZScore:
    """The study's z-score: against negative controls when the table has them, else ``rows``;
    features constant in the reference are centred only."""
    return fit_zscore(data.negcon_X, "negative_controls") if data.negcon_X is not None else \
        fit_zscore(data.X[rows], "training_set")


@dataclass
class Candidate:
    """One tuned, calibrated family: its fitted model and every score the comparison reports."""

    model: FamilyModel
    grid: pd.DataFrame
    oof: np.ndarray  # calibrated grouped-CV OOF probabilities of the training cells
    scores: dict[str, Any] = field(default_factory=dict)
    loio: np.ndarray | None = None  # calibrated leave-images-out probabilities of all cells


def _model_id(space: str, family: str, shuffled: bool = False) -> str:
    return f"{space}__balanced__{family}__{'shuffled' if shuffled else 'final'}"


def _staged_out_of_fold(params: dict, rounds: Sequence[int], Z, labels, folds, classes, random_state):
    """OOF probabilities of boosted trees after each of ``rounds`` boosting iterations, from one
    fit per fold (``staged_predict_proba``): points of a grid that differ only in ``max_iter``
    cost one fit."""
    wanted = sorted(set(int(r) for r in rounds))
    out = {r: np.zeros((len(Z), len(classes))) for r in wanted}
    for train, validate in folds:
        estimator = make_estimator("hgb", {**params, "max_iter": wanted[-1]}, random_state=random_state)
        estimator.fit(Z[train], labels[train])
        columns = [list(classes).index(c) for c in estimator.classes_]  # classes absent from a fold get 0
        for stage, probabilities in enumerate(estimator.staged_predict_proba(Z[validate]), start=1):
            if stage in out:
                out[stage][np.ix_(validate, columns)] = probabilities
    return out


def _grid_oof(family, grid, Z, labels, folds, classes, random_state, n_jobs):
    """OOF probabilities of every grid point (boosted trees share fits across ``max_iter``)."""
    results: dict[int, np.ndarray] = {}
    if family == "hgb":
        shared: dict[str, list[int]] = {}
        for i, params in enumerate(grid):
            key = json.dumps({k: v for k, v in params.items() if k != "max_iter"}, sort_keys=True)
            shared.setdefault(key, []).append(i)
        for key, points in shared.items():
            staged = _staged_out_of_fold(json.loads(key), [grid[i].get("max_iter", 60) for i in points], Z,
                                         labels, folds, classes, random_state)
            results.update({i: staged[int(grid[i].get("max_iter", 60))] for i in points})
        return [results[i] for i in range(len(grid))]
    return [out_of_fold(family, params, Z, labels, folds, classes, random_state=random_state, n_jobs=n_jobs)
            for params in grid]


def _tune(family: str, grid: Sequence[dict], Z, labels, folds, classes, random_state, n_jobs):
    rows, best = [], None
    for i, (params, oof) in enumerate(zip(grid, _grid_oof(family, grid, Z, labels, folds, classes, random_state,
                                                          n_jobs))):
        score = weighted_f1(labels, oof, classes)
        rows.append({"point": i, **params, "grouped_cv_f1": score})
        if best is None or score > best[0] + 1e-12:
            best = (score, params, oof)
    return pd.DataFrame(rows), best


def _leave_images_out(model: FamilyModel, data: LabelledData, folds, random_state: int) -> np.ndarray:
    """Calibrated probabilities of every labelled cell from a fold model that never saw its image."""
    labels = data.labels
    probabilities = np.zeros((len(labels), len(model.classes)))
    for train, validate in folds:
        scaler = fit_scaler_for(data, train)
        Z = scaler.transform(data.X)
        estimator = make_estimator(model.family, model.params, random_state=random_state).fit(Z[train], labels[train])
        probabilities[validate] = apply_temperature(_aligned(estimator, Z[validate], model.classes),
                                                    model.temperature)
    return probabilities


def _truth_index(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    return np.searchsorted(np.asarray(classes, dtype=object), labels)


def train_families(
    data: LabelledData,
    split: np.ndarray,
    *,
    families: Sequence[str] = ("logistic", "hgb"),
    ensemble: bool = True,
    grids: dict[str, list[dict[str, Any]]] | None = None,
    cv_folds: int = 5,
    loio_folds: int = 5,
    shuffled_baseline: bool = True,
    random_state: int = 0,
    n_jobs: int = 2,
) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """Tune, calibrate and fit every family on the training split of ``data``; evaluate on the
    test split and leave-images-out. Returns the candidates by model id and ``recommended.json``."""
    grids = {**FAMILY_GRIDS, **(grids or {})}
    train = np.asarray(split) == "train"
    labels, images = data.labels, data.metadata[IMAGE_ID].to_numpy(dtype=object)
    classes = sorted(pd.unique(labels[train]).tolist())
    unseen = sorted(set(labels) - set(classes))
    if unseen:
        raise MorphotypeInputError(f"phenotype(s) {unseen} have no training cells; cannot train the model families")
    scaler = fit_scaler_for(data, np.flatnonzero(train))
    Z = scaler.transform(data.X)
    Z_train, y_train = Z[train], labels[train]
    folds = grouped_folds(y_train, images[train], cv_folds, random_state)
    study_folds = cell_folds(y_train, cv_folds, random_state)
    lio_folds = grouped_folds(labels, images, loio_folds, random_state)
    truth_train = _truth_index(y_train, classes)
    candidates: dict[str, Candidate] = {}
    for family in families:
        started = time.perf_counter()
        grid_table, (score, params, oof) = _tune(family, grids[family], Z_train, y_train, folds, classes,
                                                 random_state, n_jobs)
        temperature = fit_temperature(oof, truth_train)
        cell_oof = out_of_fold(family, params, Z_train, y_train, study_folds, classes, random_state=random_state,
                               n_jobs=n_jobs)
        fit_started = time.perf_counter()
        estimator = make_estimator(family, params, random_state=random_state).fit(Z_train, y_train)
        fit_seconds = time.perf_counter() - fit_started
        model = FamilyModel(_model_id(data.feature_space, family), family, data.feature_space, list(data.features),
                            classes, scaler, estimator, temperature, dict(params), random_state=random_state)
        calibrated = apply_temperature(oof, temperature)
        model.cv = {"grouped_cv_f1": score, "cell_cv_f1": weighted_f1(y_train, cell_oof, classes),
                    "folds": len(folds), "fold_method": "StratifiedGroupKFold(shuffle=True) by " + IMAGE_ID,
                    "cell_fold_method": "StratifiedKFold(shuffle=True)", "scoring": "f1_weighted (pooled OOF)",
                    "grid": json.loads(grid_table.to_json(orient="records"))}
        model.training = {"n_cells": int(train.sum()), "fit_seconds": fit_seconds,
                          "tuning_seconds": time.perf_counter() - started,
                          "oof_ece_uncalibrated": expected_calibration_error(oof, truth_train),
                          "oof_ece_calibrated": expected_calibration_error(calibrated, truth_train)}
        candidates[model.model_id] = Candidate(model, grid_table, calibrated)
        log.info("%s: %s grouped-CV F1 %.3f (cell-level CV %.3f), T = %.2f, fit %.1f s", model.model_id, params,
                 score, model.cv["cell_cv_f1"], temperature, fit_seconds)
    for candidate in candidates.values():
        _evaluate(candidate, data, Z, train, lio_folds, random_state)
    if ensemble and len(candidates) >= 2:
        ranked = sorted(candidates.values(), key=lambda c: -c.model.cv["grouped_cv_f1"])[:2]
        combined = _ensemble(ranked, data, scaler, classes, y_train, truth_train, random_state)
        # Leave-images-out of the average: the members' own fold predictions, averaged (same folds).
        combined.loio = apply_temperature(np.mean([m.loio for m in ranked], axis=0), combined.model.temperature)
        _evaluate(combined, data, Z, train, None, random_state)
        candidates[combined.model.model_id] = combined
    order = {family: i for i, family in enumerate(("logistic", "hgb", "ensemble"))}
    best = sorted(candidates.values(), key=lambda c: (-round(c.model.cv["grouped_cv_f1"], 12),
                                                      order.get(c.model.family, 99)))[0].model
    recommended = {
        "model_id": best.model_id, "family": best.family, "feature_space": best.feature_space,
        "chosen_by": f"highest weighted F1 of out-of-fold predictions in {len(folds)}-fold image-grouped CV "
                     f"(StratifiedGroupKFold by {IMAGE_ID}) on the training split; the test split was not used",
        "grouped_cv_f1": {mid: c.model.cv["grouped_cv_f1"] for mid, c in candidates.items()},
        "reference_model": f"{data.feature_space}__balanced__final (the study's model; default for the paper)",
    }
    if shuffled_baseline:
        shuffled = _shuffled_baseline(best, Z_train, y_train, data, random_state)
        candidates[shuffled.model.model_id] = shuffled
        _evaluate(shuffled, data, Z, train, None, random_state)
        recommended["shuffled_model_id"] = shuffled.model.model_id
    return candidates, recommended


def _ensemble(members: Sequence[Candidate], data, scaler, classes, y_train, truth_train, random_state) -> Candidate:
    """Average the members' calibrated probabilities; the average gets its own temperature."""
    oof = np.mean([m.oof for m in members], axis=0)
    temperature = fit_temperature(oof, truth_train)
    estimator = AveragedProbabilities([m.model.estimator for m in members],
                                      [m.model.temperature for m in members]).fit(None, None)
    params = {"members": [{"family": m.model.family, "params": m.model.params} for m in members]}
    model = FamilyModel(_model_id(data.feature_space, "ensemble"), "ensemble", data.feature_space,
                        list(data.features), classes, scaler, estimator, temperature, params,
                        random_state=random_state)
    calibrated = apply_temperature(oof, temperature)
    model.cv = {"grouped_cv_f1": weighted_f1(y_train, oof, classes),
                "cell_cv_f1": float(np.nan), "members": [m.model.model_id for m in members],
                "fold_method": members[0].model.cv["fold_method"], "scoring": "f1_weighted (pooled OOF)"}
    model.training = {"n_cells": int(len(y_train)),
                      "fit_seconds": float(sum(m.model.training["fit_seconds"] for m in members)),
                      "oof_ece_uncalibrated": expected_calibration_error(oof, truth_train),
                      "oof_ece_calibrated": expected_calibration_error(calibrated, truth_train)}
    return Candidate(model, pd.DataFrame(), calibrated)


def _shuffled_baseline(best: FamilyModel, Z_train, y_train, data, random_state) -> Candidate:
    """The recommended family refitted on independently permuted columns (chance by construction;
    the JUMP baseline of the recommended model). Same hyper-parameters, no tuning, T = 1."""

    model_id = _model_id(data.feature_space, best.family, shuffled=True)
    Z_shuffled = shuffle_columns(Z_train, keyed_rng(random_state, model_id, "shuffle"))
    if isinstance(best.estimator, AveragedProbabilities):
        members = [make_estimator(m["family"], m["params"], random_state=random_state).fit(Z_shuffled, y_train)
                   for m in best.params["members"]]
        estimator = AveragedProbabilities(members, [1.0] * len(members)).fit(None, None)
    else:
        estimator = make_estimator(best.family, best.params, random_state=random_state).fit(Z_shuffled, y_train)
    model = FamilyModel(model_id, best.family, best.feature_space, list(best.features), list(best.classes),
                        best.scaler, estimator, 1.0, dict(best.params), shuffled=True, random_state=random_state)
    model.cv = {"grouped_cv_f1": float(np.nan), "cell_cv_f1": float(np.nan)}
    model.training = {"n_cells": int(len(y_train)), "fit_seconds": float(np.nan)}
    return Candidate(model, pd.DataFrame(), np.empty((0, len(best.classes))))


def _evaluate(candidate: Candidate, data: LabelledData, Z: np.ndarray, train: np.ndarray, lio_folds,
              random_state: int) -> None:
    model = candidate.model
    labels = data.labels
    test = ~train
    probabilities = model.probabilities_scaled(Z[test])
    truth = _truth_index(labels[test], model.classes)
    candidate.scores.update({"test_f1": weighted_f1(labels[test], probabilities, model.classes),
                             "test_ece": expected_calibration_error(probabilities, truth),
                             "test_reliability": reliability_curve(probabilities, truth)})
    if lio_folds is not None:
        candidate.loio = _leave_images_out(model, data, lio_folds, random_state)
    if candidate.loio is not None:
        truth_all = _truth_index(labels, model.classes)
        candidate.scores.update({"lio_f1": weighted_f1(labels, candidate.loio, model.classes),
                                 "lio_ece": expected_calibration_error(candidate.loio, truth_all),
                                 "lio_pass_fraction": pass_fraction(candidate.loio, labels, data, model.classes)})


def pass_fraction(probabilities: np.ndarray, labels: np.ndarray, data: LabelledData, classes: Sequence[str]) -> float:
    """The study's LOIO statistic: fraction of image x phenotype groups whose cells' mean rank of
    the true class is < 2."""

    ranks = true_class_rank(probabilities, classes, list(labels))
    groups = pd.DataFrame({"image": data.metadata[IMAGE_ID].to_numpy(), "phenotype": labels, "rank": ranks})
    return float((groups.groupby(["image", "phenotype"])["rank"].mean() < 2).mean())


# --------------------------------------------------------------------------------------------
# Comparison table and figure
# --------------------------------------------------------------------------------------------

def study_model_scores(model, data: LabelledData, split: np.ndarray, loio_summary: pd.DataFrame | None) -> dict:
    """The study's model scored as the candidates are (test F1 and ECE; its exact LOIO)."""
    test = np.asarray(split) == "test"

    probabilities = model.probabilities(_features_of(model, data)[test])
    truth = _truth_index(data.labels[test], model.classes)
    row = {"model_id": model.model_id, "family": "logistic (study)", "shuffled": model.shuffled,
           "grouped_cv_f1": np.nan, "cell_cv_f1": model.cv.get("score", np.nan),
           "test_f1": weighted_f1(data.labels[test], probabilities, model.classes),
           "test_ece": expected_calibration_error(probabilities, truth),
           "test_reliability": reliability_curve(probabilities, truth),
           "fit_seconds": np.nan, "temperature": 1.0}
    if loio_summary is not None and len(loio_summary):
        rows = loio_summary[loio_summary["model_id"] == model.model_id]
        row["loio_pass_fraction"] = float(rows["passed"].mean()) if len(rows) else np.nan
    return row


def comparison_table(candidates: dict[str, Candidate], recommended: dict, study_rows: Sequence[dict] = ()
                     ) -> pd.DataFrame:
    """One row per model: grouped and cell-level CV F1 (training split), test weighted F1 and ECE,
    leave-images-out F1, pass fraction and ECE, fit time, temperature, recommended."""
    rows = [{k: v for k, v in row.items() if k != "test_reliability"} for row in study_rows]
    for model_id, candidate in candidates.items():
        model = candidate.model
        rows.append({"model_id": model_id, "family": model.family, "shuffled": model.shuffled,
                     "grouped_cv_f1": model.cv.get("grouped_cv_f1"), "cell_cv_f1": model.cv.get("cell_cv_f1"),
                     **{k: v for k, v in candidate.scores.items() if k != "test_reliability"},
                     "fit_seconds": model.training.get("fit_seconds"), "temperature": model.temperature})
    table = pd.DataFrame(rows)
    table["recommended"] = table["model_id"] == recommended["model_id"]
    return table


def comparison_figure(table: pd.DataFrame, reliability: dict[str, pd.DataFrame], path: str | os.PathLike) -> Path:
    """PNG: test weighted F1, LOIO / leave-images-out pass fraction and ECE per model (left);
    reliability curves on the test split (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table[~table["shuffled"].astype(bool)].reset_index(drop=True)
    metrics = [m for m in ("test_f1", "loio_pass_fraction", "lio_pass_fraction", "test_ece") if m in shown]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(shown), 1)
    for i, row in shown.iterrows():
        values = [float(row.get(m, np.nan)) for m in metrics]
        bars.bar(np.arange(len(metrics)) + i * width, np.nan_to_num(values), width,
                 label=row["model_id"] + (" (recommended)" if row["recommended"] else ""))
    bars.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics, rotation=15)
    bars.set_ylim(0, 1)
    bars.legend(fontsize=7, loc="upper right")
    bars.set_title("Model families (test split, LOIO / leave-images-out)")
    curves.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for model_id, curve in reliability.items():
        filled = curve[curve["n_cells"] > 0]
        curves.plot(filled["confidence"], filled["accuracy"], marker="o", ms=3, label=model_id)
    curves.set_xlabel("top-label confidence (15 bins)")
    curves.set_ylabel("accuracy")
    curves.set_title("Reliability on the test split")
    curves.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def write_families(candidates: dict[str, Candidate], recommended: dict, models_dir: str | os.PathLike,
                   evaluation_dir: str | os.PathLike, study_rows: Sequence[dict] = ()) -> dict[str, Path]:
    """Save every candidate under ``models_dir/<model_id>/``, ``models_dir/recommended.json``, and
    ``evaluation_dir/model_families.csv``, ``model_families_reliability.csv``, ``model_families.png``."""
    models_dir, evaluation_dir = Path(models_dir), Path(evaluation_dir)
    for model_id, candidate in candidates.items():
        save_family_model(candidate.model, models_dir / model_id)
    with atomic_path(models_dir / RECOMMENDED) as tmp:
        tmp.write_text(json.dumps(recommended, indent=2) + "\n")
    table = comparison_table(candidates, recommended, study_rows)
    reliability = {row["model_id"]: row["test_reliability"] for row in study_rows}
    reliability.update({mid: c.scores["test_reliability"] for mid, c in candidates.items() if not c.model.shuffled})
    curves = pd.concat([curve.assign(model_id=mid, split="test") for mid, curve in reliability.items()],
                       ignore_index=True)
    return {"recommended": models_dir / RECOMMENDED,
            "table": write_table(table, evaluation_dir / "model_families.csv"),
            "reliability": write_table(curves, evaluation_dir / "model_families_reliability.csv"),
            "figure": comparison_figure(table, reliability, evaluation_dir / "model_families.png")}


def train_families_for_run(table: pd.DataFrame, results, outdir: str | os.PathLike, *, n_jobs: int = 2,
                           families: Sequence[str] = ("logistic", "hgb"), loio_folds: int = 5) -> dict[str, Path]:
    """The run's ``model_families`` stage: the families on the study model's feature space (CP when
    trained, else the first multiclass space), the same split and CV fold count as the study's
    models; writes the models, ``recommended.json`` and the comparison into ``outdir``."""

    references = [m for m in results.models.values()
                  if m.model_type == "multiclass" and not m.shuffled and m.balanced]
    if not references:
        log.warning("model families: no balanced multiclass study model to compare with; skipped")
        return {}
    reference = next((m for m in references if m.feature_space == "CP"), references[0])
    data = data_as_trained(table, reference)
    split = split_for(data, results.splits)
    settings = results.settings
    candidates, recommended = train_families(
        data, split, families=families, cv_folds=int(settings.get("cv_folds", 5)), loio_folds=loio_folds,
        random_state=int(settings.get("random_state", 0)), n_jobs=n_jobs)
    recommended["reference_model"] = reference.model_id
    study_rows = [study_model_scores(model, data, split, results.tables.get("loio_summary"))
                  for model in results.models.values()
                  if model.model_type == "multiclass" and model.feature_space == reference.feature_space
                  and model.balanced]
    written = write_families(candidates, recommended, Path(outdir) / "models", Path(outdir) / "evaluation",
                             study_rows)
    table_out = pd.read_csv(written["table"])
    for _, row in table_out.iterrows():
        log.info("%-34s test F1 %.3f  LOIO %s  leave-images-out %s  test ECE %.3f%s", row["model_id"],
                 row["test_f1"], _fmt(row.get("loio_pass_fraction")), _fmt(row.get("lio_pass_fraction")),
                 row["test_ece"], "  (recommended)" if row["recommended"] else "")
    return {"recommended_model": written["recommended"], "model_families": written["table"]}


def _fmt(value: Any) -> str:
    return "  -  " if value is None or pd.isna(value) else f"{float(value):.3f}"
