"""Evaluation of phenotype models: F1, precision-recall, confusion, coefficients, silhouette,
UMAP and leave-one-image-out (LOIO).

Every table is long (one value per row) and carries ``model_id``, ``feature_space``,
``balanced`` and ``shuffled`` so tables of several models concatenate. Predictions are keyed by
``Metadata_CellID`` end to end: the study's LOIO joined row-shuffled probabilities to unshuffled
cell metadata; :func:`attach_labels` joins by cell id and refuses anything but a one-to-one match.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from joblib import delayed
from sklearn.decomposition import PCA
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    silhouette_score,
)
from tqdm.auto import tqdm

from morphotype.columns import CELL_ID, IMAGE_ID, PHENOTYPE
from morphotype.io import MorphotypeInputError, atomic_path, write_table
from morphotype.models import (
    BINARY_NEGATIVE,
    DEFAULT_TOL,
    LabelledData,
    PhenotypeModel,
    TrainingResults,
    class_weights,
    fit_logistic,
    keyed_rng,
    parallel,
    predict_logits,
    prepare_data,
    probability_column,
    shuffle_columns,
    softmax_probabilities,
)
from morphotype.normalize import fit_zscore

log = logging.getLogger(__name__)
# umap is imported where it is used: it loads numba and compiles, seconds that other steps need not pay.

SPLITS = ("train", "test")
# LOIO refits of a shuffled baseline: its features are permuted independently, so its predictions
# are chance by construction and solving each of its ~230 refits to 1e-6 bought nothing but time
# (5 of the demo's 5.5 LOIO minutes at C = 10, l1_ratio = 1). Its refits stop at this KKT
# tolerance or iteration cap instead; the final models' refits keep ``tol``. Recorded per row
# (``solver_tol``, ``solver_max_iter``) in loio_predictions.
SHUFFLED_LOIO_TOL = 1e-3
SHUFFLED_LOIO_MAX_ITER = 150


def _model_columns(model: PhenotypeModel) -> dict[str, Any]:
    return {"model_id": model.model_id, "model_type": model.model_type, "positive_class": model.positive_class,
            "feature_space": model.feature_space, "balanced": model.balanced, "shuffled": model.shuffled}


def _features_of(model: PhenotypeModel, data: LabelledData) -> np.ndarray:
    """The model's features (by name) out of the prepared data."""
    index = {name: j for j, name in enumerate(data.features)}
    missing = [f for f in model.features if f not in index]
    if missing:
        raise MorphotypeInputError(f"model {model.model_id}: features missing from the data: {missing}")
    return data.X[:, [index[f] for f in model.features]]


def _true_labels(model: PhenotypeModel, labels: np.ndarray) -> np.ndarray:
    if model.model_type == "binary":
        return np.where(labels == model.positive_class, model.positive_class, BINARY_NEGATIVE).astype(object)
    return labels


def predictions_by_split(model: PhenotypeModel, data: LabelledData, split: np.ndarray):
    """Yield (split name, true labels, predicted labels, probabilities) for train and test."""
    probabilities = model.probabilities(_features_of(model, data))
    predicted = np.asarray(model.classes, dtype=object)[probabilities.argmax(axis=1)]
    truth = _true_labels(model, data.labels)
    for name in SPLITS:
        rows = split == name
        yield name, truth[rows], predicted[rows], probabilities[rows]


def f1_table(model: PhenotypeModel, data: LabelledData, split: np.ndarray) -> pd.DataFrame:
    """Per-class and weighted F1 on the training and test cells (phenotype ``"weighted"``).

    Binary models report their positive class and the weighted F1 of the two classes, on all
    cells of each split (the training negatives were down-sampled only for fitting).
    """
    rows = []
    for name, truth, predicted, _ in predictions_by_split(model, data, split):
        if len(truth) == 0:
            continue
        classes = [model.positive_class] if model.model_type == "binary" else list(model.classes)
        per_class = f1_score(truth, predicted, labels=classes, average=None, zero_division=0)
        support = pd.Series(truth).value_counts()
        for phenotype, value in zip(classes, per_class):
            rows.append({"split": name, "phenotype": phenotype, "f1": float(value),
                         "n_cells": int(support.get(phenotype, 0))})
        weighted = f1_score(truth, predicted, average="weighted", zero_division=0)
        rows.append({"split": name, "phenotype": "weighted", "f1": float(weighted), "n_cells": int(len(truth))})
    return pd.DataFrame([{**_model_columns(model), **row} for row in rows])


def pr_curves(model: PhenotypeModel, data: LabelledData, split: np.ndarray) -> pd.DataFrame:
    """One-vs-rest precision-recall curve of every class (binary: the positive class), per split."""
    frames = []
    for name, truth, _, probabilities in predictions_by_split(model, data, split):
        classes = [model.positive_class] if model.model_type == "binary" else list(model.classes)
        for phenotype in classes:
            positives = truth == phenotype
            if not positives.any():
                continue
            score = probabilities[:, model.classes.index(phenotype)]
            precision, recall, thresholds = precision_recall_curve(positives, score, drop_intermediate=True)
            frames.append(pd.DataFrame({
                **_model_columns(model), "split": name, "phenotype": phenotype, "precision": precision,
                "recall": recall, "threshold": np.append(thresholds, np.nan),
                "average_precision": average_precision_score(positives, score)}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def confusion_table(model: PhenotypeModel, data: LabelledData, split: np.ndarray) -> pd.DataFrame:
    """Confusion matrix counts per split: every (true, predicted) pair of the model's classes."""
    rows = []
    for name, truth, predicted, _ in predictions_by_split(model, data, split):
        counts = confusion_matrix(truth, predicted, labels=model.classes)
        for i, true_class in enumerate(model.classes):
            for j, predicted_class in enumerate(model.classes):
                rows.append({**_model_columns(model), "split": name, "true_phenotype": true_class,
                             "predicted_phenotype": predicted_class, "count": int(counts[i, j])})
    return pd.DataFrame(rows)


def coefficient_table(model: PhenotypeModel) -> pd.DataFrame:
    """Coefficients (on z-scored features), one row per class x feature, with the intercept."""
    classes = [model.positive_class] if model.model_type == "binary" else list(model.classes)
    frames = []
    for k, phenotype in enumerate(classes):
        frames.append(pd.DataFrame({**_model_columns(model), "phenotype": phenotype,
                                    "feature": list(model.features), "coefficient": model.coef[k],
                                    "intercept": float(model.intercept[k])}))
    return pd.concat(frames, ignore_index=True)


def _scaled(data: LabelledData, rows: np.ndarray | None = None) -> np.ndarray:
    """Z-scored features: against the negative controls when present, else the cells themselves.

    Features constant in the reference are left out (they carry nothing to embed).
    """
    X = data.X if rows is None else data.X[rows]
    zscore = fit_zscore(data.negcon_X, "negative_controls") if data.negcon_X is not None else \
        fit_zscore(X, "cells")
    keep = ~zscore.constant
    return (X[:, keep] - zscore.mean[keep]) / zscore.scale[keep]


def silhouette_table(data: LabelledData, *, n_components: int = 50, random_state: int = 0) -> pd.DataFrame:
    """Silhouette of {phenotype, other} labels on the first principal components, per phenotype.

    As the study: z-score, PCA to ``n_components`` (fewer when there are fewer features or
    cells), then ``silhouette_score`` over all cells with the two labels.
    """
    X = _scaled(data)
    components = min(n_components, X.shape[1], X.shape[0] - 1)
    pcs = PCA(n_components=components, random_state=random_state).fit_transform(X)
    labels = data.labels
    rows = []
    for phenotype in sorted(set(labels)):
        two = np.where(labels == phenotype, phenotype, "other")
        value = silhouette_score(pcs, two) if 1 < (labels == phenotype).sum() < len(labels) else np.nan
        rows.append({"feature_space": data.feature_space, "phenotype": phenotype, "silhouette": float(value),
                     "n_cells": int((labels == phenotype).sum()), "n_components": components})
    return pd.DataFrame(rows)


def umap_embedding(data: LabelledData, *, random_state: int = 0, n_neighbors: int = 15,
                   min_dist: float = 0.1) -> pd.DataFrame:
    """2-D UMAP of the z-scored features of every labelled cell (seeded, hence single-threaded)."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(tempfile.gettempdir()) / "morphotype-numba-cache"))
    import umap

    X = _scaled(data)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(X) - 1), min_dist=min_dist,
                        random_state=random_state, n_jobs=1)
    embedding = reducer.fit_transform(X)
    out = data.metadata[[CELL_ID, IMAGE_ID, PHENOTYPE]].copy()
    out.insert(0, "feature_space", data.feature_space)
    out["umap_0"] = embedding[:, 0]
    out["umap_1"] = embedding[:, 1]
    return out


# --------------------------------------------------------------------------------------------
# Leave one image out
# --------------------------------------------------------------------------------------------

def attach_labels(predictions: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Join per-cell predictions to true phenotypes by ``Metadata_CellID`` (never by position).

    Both tables must hold the same cells, each once; anything else is an error naming the ids.
    """
    for name, frame in (("predictions", predictions), ("labels", labels)):
        if CELL_ID not in frame.columns:
            raise MorphotypeInputError(f"{name}: no {CELL_ID} column to join on")
        duplicated = frame[CELL_ID][frame[CELL_ID].duplicated()]
        if len(duplicated):
            raise MorphotypeInputError(f"{name}: duplicated {CELL_ID} {duplicated.iloc[:5].tolist()}")
    predicted_ids, label_ids = set(predictions[CELL_ID]), set(labels[CELL_ID])
    if predicted_ids != label_ids:
        raise MorphotypeInputError(
            f"predictions and labels cover different cells: {len(predicted_ids - label_ids)} predicted "
            f"without a label (e.g. {sorted(map(str, predicted_ids - label_ids))[:3]}), "
            f"{len(label_ids - predicted_ids)} labelled without a prediction "
            f"(e.g. {sorted(map(str, label_ids - predicted_ids))[:3]})")
    label_columns = [CELL_ID] + [c for c in labels.columns if c != CELL_ID and c not in predictions.columns]
    return predictions.merge(labels[label_columns], on=CELL_ID, how="inner", validate="one_to_one")


def true_class_rank(probabilities: np.ndarray, classes: Sequence[str], truth: Sequence[str]) -> np.ndarray:
    """Rank of the true class among the class probabilities (1 = highest; ties count in its favour)."""
    index = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(truth) - set(index))
    if unknown:
        raise MorphotypeInputError(f"true phenotype(s) {unknown} are not classes of the model {list(classes)}")
    true_probability = probabilities[np.arange(len(probabilities)), [index[t] for t in truth]]
    return 1 + (probabilities > true_probability[:, None]).sum(axis=1)


def rank_predictions(predictions: pd.DataFrame, labels: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Attach true labels by cell id, then the predicted class and the rank of the true class."""
    joined = attach_labels(predictions, labels)
    probabilities = joined[[probability_column(c) for c in classes]].to_numpy(dtype=np.float64)
    joined["predicted_phenotype"] = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    joined["true_class_rank"] = true_class_rank(probabilities, classes, joined[PHENOTYPE].tolist())
    return joined


def _loio_chunk(X, codes, cell_ids, images, chunk, classes, negcon_X, C, l1_ratio, class_weight, shuffled,
                seed_key, random_state, coef_init, intercept_init, tol, max_iter=20_000):
    """Refit without each image of ``chunk`` and predict its cells (keyed by cell id)."""
    frames = []
    for image in chunk:
        held = images == image
        train = ~held
        scaler = fit_zscore(negcon_X, "negative_controls") if negcon_X is not None else \
            fit_zscore(X[train], "training_set")  # constant in the reference: centred only
        X_train = scaler.transform(X[train])
        if shuffled:
            X_train = shuffle_columns(X_train, keyed_rng(random_state, seed_key, "loio", str(image)))
        fit = fit_logistic(X_train, codes[train], n_classes=len(classes), C=C, l1_ratio=l1_ratio,
                           sample_weight=class_weights(codes[train], class_weight), tol=tol, max_iter=max_iter,
                           coef_init=coef_init, intercept_init=intercept_init)
        probabilities = softmax_probabilities(predict_logits(fit.coef, fit.intercept, scaler.transform(X[held])))
        frame = pd.DataFrame(probabilities, columns=[probability_column(c) for c in classes])
        frame.insert(0, CELL_ID, cell_ids[held])  # ids travel with the very rows that were predicted
        frame["n_iter"] = fit.n_iter
        frame["converged"] = fit.converged
        frame["solver_tol"] = tol
        frame["solver_max_iter"] = max_iter
        frames.append(frame)
    return frames


def leave_one_image_out(
    model: PhenotypeModel,
    data: LabelledData,
    *,
    n_jobs: int = 2,
    tol: float = DEFAULT_TOL,
    random_state: int | None = None,
    images: Sequence[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """LOIO: for every image (or only ``images``, one chunk of a fan-out), refit ``model``'s C, l1_ratio and class weighting on all cells of
    the other images and predict the held-out image's cells.

    Uses every labelled cell of ``data`` (train and test split alike; images whose only cells are
    excluded phenotypes such as Folded are not in ``data``). Each refit re-fits the z-score on
    the other images (or uses the negative controls), re-shuffles for a shuffled model, and is
    warm-started from the all-image fit (same objective: the optimum does not depend on the
    start). Returns one row per cell keyed by ``Metadata_CellID``: true phenotype, predicted
    phenotype, rank of the true class and the class probabilities.
    """
    if model.model_type != "multiclass":
        raise MorphotypeInputError(f"LOIO is defined for multiclass models, not {model.model_id}")
    random_state = model.random_state if random_state is None else random_state
    X = _features_of(model, data)
    classes = list(model.classes)
    labels = data.labels
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise MorphotypeInputError(f"{model.model_id}: phenotypes {unknown} in the data are not model classes")
    codes = np.searchsorted(classes, labels)
    subset, images = images, data.metadata[IMAGE_ID].to_numpy(dtype=object)
    cell_ids = data.cell_ids
    # Warm start: the same model on all images.
    scaler = fit_zscore(data.negcon_X[:, [data.features.index(f) for f in model.features]], "negative_controls") \
        if data.negcon_X is not None else fit_zscore(X, "training_set")
    X_all = scaler.transform(X)
    max_iter = 20_000
    if model.shuffled:
        X_all = shuffle_columns(X_all, keyed_rng(random_state, model.model_id, "loio", "all"))
        tol, max_iter = max(tol, SHUFFLED_LOIO_TOL), SHUFFLED_LOIO_MAX_ITER
    start = fit_logistic(X_all, codes, n_classes=len(classes), C=model.C, l1_ratio=model.l1_ratio,
                         sample_weight=class_weights(codes, model.class_weight), tol=tol, max_iter=max_iter)
    negcon = None if data.negcon_X is None else data.negcon_X[:, [data.features.index(f) for f in model.features]]
    unique_images = list(pd.unique(images))
    if subset is not None:
        unknown_images = sorted(set(subset) - set(unique_images))
        if unknown_images:
            raise MorphotypeInputError(f"{model.model_id}: LOIO images not among the labelled cells: "
                                       f"{unknown_images[:3]}")
        unique_images = [image for image in unique_images if image in set(subset)]
        if not unique_images:
            return pd.DataFrame()
    n_chunks = min(len(unique_images), max(1, 4 * max(n_jobs, 1)))
    chunks = [unique_images[i::n_chunks] for i in range(n_chunks)]
    jobs = (delayed(_loio_chunk)(X, codes, cell_ids, images, chunk, classes, negcon, model.C, model.l1_ratio,
                                 model.class_weight, model.shuffled, model.model_id, random_state, start.coef,
                                 start.intercept, tol, max_iter) for chunk in chunks)
    frames = []
    for result in tqdm(parallel(n_jobs)(jobs), total=len(chunks), desc=f"LOIO {model.model_id}",
                       disable=not progress, leave=False):
        frames.extend(result)
    predictions = pd.concat(frames, ignore_index=True)
    failed = sum(not bool(frame["converged"].iloc[0]) for frame in frames)
    if failed and model.shuffled:
        log.info("LOIO %s: %d of %d refits stopped at the shuffled baseline's cap of %d iterations (tol %g)",
                 model.model_id, failed, len(frames), max_iter, tol)
    elif failed:
        log.warning("LOIO %s: %d of %d refits did not converge", model.model_id, failed, len(frames))
    held_out = np.isin(images, unique_images)  # every image, or this chunk's
    ranked = rank_predictions(predictions, data.metadata.loc[held_out, [CELL_ID, IMAGE_ID, PHENOTYPE]], classes)
    order = pd.Series(np.arange(len(cell_ids)), index=cell_ids)
    ranked = ranked.iloc[np.argsort(order[ranked[CELL_ID]].to_numpy(), kind="stable")].reset_index(drop=True)
    front = {k: v for k, v in _model_columns(model).items() if k not in ("model_type", "positive_class")}
    for position, (name, value) in enumerate(front.items()):
        ranked.insert(position, name, value)
    leading = list(front) + [CELL_ID, IMAGE_ID, PHENOTYPE, "predicted_phenotype", "true_class_rank"]
    return ranked[leading + [c for c in ranked.columns if c not in leading]]


def loio_image_chunk(data: LabelledData, chunk: int, chunks: int) -> list[str]:
    """Images of LOIO chunk ``chunk`` of ``chunks`` (every ``chunks``-th image, in table order)."""
    if not 0 <= chunk < chunks:
        raise MorphotypeInputError(f"LOIO chunk must be in 0..{chunks - 1}, got {chunk}")
    return list(pd.unique(data.metadata[IMAGE_ID].to_numpy(dtype=object)))[chunk::chunks]


def _collected_loio(predictions: pd.DataFrame, model: PhenotypeModel, data: LabelledData) -> pd.DataFrame:
    """One model's LOIO rows from chunk outputs, checked complete, in the table's cell order."""
    rows = predictions[predictions["model_id"] == model.model_id]
    ids = pd.Index(data.cell_ids.astype(str))
    found = pd.Index(rows[CELL_ID].astype(str))
    if found.duplicated().any() or len(ids.difference(found)) or len(found.difference(ids)):
        raise MorphotypeInputError(
            f"LOIO predictions for {model.model_id}: {len(ids.difference(found))} cell(s) missing, "
            f"{int(found.duplicated().sum())} duplicated, {len(found.difference(ids))} unknown; "
            "give the outputs of every chunk, computed on this table")
    order = pd.Series(np.arange(len(ids)), index=ids)
    rows = rows.iloc[np.argsort(order[found].to_numpy(), kind="stable")].reset_index(drop=True)
    return rows.dropna(axis=1, how="all")


def loio_summary(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per model x image x true phenotype: cells, mean rank of the true class, passed (< 2)."""
    keys = ["model_id", "feature_space", "balanced", "shuffled", IMAGE_ID, PHENOTYPE]
    summary = predictions.groupby(keys, sort=True).agg(n_cells=(CELL_ID, "size"),
                                                       mean_rank=("true_class_rank", "mean")).reset_index()
    summary["passed"] = summary["mean_rank"] < 2
    return summary


def loio_pass_fraction(summary: pd.DataFrame) -> pd.DataFrame:
    """The study's LOIO figure: fraction of image x phenotype groups with mean rank < 2, per model."""
    return summary.groupby(["model_id", "feature_space", "balanced", "shuffled"], sort=True).agg(
        groups=("passed", "size"), passed=("passed", "sum"), pass_fraction=("passed", "mean")).reset_index()


# --------------------------------------------------------------------------------------------
# All models of a training run
# --------------------------------------------------------------------------------------------

def split_for(data: LabelledData, splits: pd.DataFrame) -> np.ndarray:
    """The train/test side of each cell of ``data``, looked up by cell id in ``splits``."""
    rows = splits[splits["feature_space"] == data.feature_space] if "feature_space" in splits else splits
    sides = pd.Series(rows["split"].to_numpy(), index=rows[CELL_ID].astype(str).to_numpy())
    if sides.index.duplicated().any():
        raise MorphotypeInputError(f"splits: duplicated {CELL_ID} for feature space {data.feature_space}")
    ids = pd.Index(data.cell_ids.astype(str))
    missing = ids.difference(sides.index)
    extra = sides.index.difference(ids)
    if len(missing) or len(extra):
        raise MorphotypeInputError(
            f"splits do not match the table's {data.feature_space} cells: {len(missing)} cell(s) without a split "
            f"(e.g. {list(missing[:3])}), {len(extra)} split cell(s) not in the table (e.g. {list(extra[:3])}); "
            "evaluate with the table the models were trained on")
    return sides.loc[ids].to_numpy(dtype=object)


def data_as_trained(table: pd.DataFrame, model: PhenotypeModel) -> LabelledData:
    """The cells of ``table`` prepared as ``model`` was trained on (excluded phenotypes and the
    positional-feature choice are read from its card)."""
    training = model.training
    return prepare_data(table, model.feature_space, exclude_phenotypes=training.get("exclude_phenotypes", ["Folded"]),
                        drop_positional=training.get("drop_positional", False))


def evaluate_models(
    results: TrainingResults,
    table: pd.DataFrame,
    *,
    loio: bool = True,
    loio_feature_spaces: Sequence[str] | None = None,
    umap: bool = True,
    silhouette: bool = True,
    n_jobs: int = 2,
    tol: float = DEFAULT_TOL,
    random_state: int = 0,
    progress: bool = True,
    loio_predictions: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """Every evaluation table for the models of ``results`` on ``table`` (the ``evaluate`` step).

    ``loio_predictions``: LOIO rows computed elsewhere (``morphotype loio`` chunks of a
    Nextflow fan-out) used instead of refitting; they must cover every cell of each model.

    The cells are prepared as at training (the excluded phenotypes and positional-feature
    choice are read from each model's card) and split as recorded in ``results.splits``.
    LOIO runs for the multiclass models of ``loio_feature_spaces`` (None: every space).
    """
    frames: dict[str, list[pd.DataFrame]] = {stem: [] for stem in (
        "f1_scores", "pr_curves", "confusion_matrices", "coefficients", "silhouette", "umap", "loio_predictions",
        "loio_summary")}
    spaces = list(dict.fromkeys(model.feature_space for model in results.models.values()))
    for space in spaces:
        space_models = [m for m in results.models.values() if m.feature_space == space]
        data = data_as_trained(table, space_models[0])
        split = split_for(data, results.splits)
        for model in space_models:
            frames["f1_scores"].append(f1_table(model, data, split))
            frames["pr_curves"].append(pr_curves(model, data, split))
            frames["confusion_matrices"].append(confusion_table(model, data, split))
            frames["coefficients"].append(coefficient_table(model))
            if loio and model.model_type == "multiclass" and (loio_feature_spaces is None
                                                              or space in loio_feature_spaces):
                if loio_predictions is None:
                    predictions = leave_one_image_out(model, data, n_jobs=n_jobs, tol=tol, progress=progress)
                else:
                    predictions = _collected_loio(loio_predictions, model, data)
                frames["loio_predictions"].append(predictions)
                frames["loio_summary"].append(loio_summary(predictions))
        if silhouette:
            frames["silhouette"].append(silhouette_table(data, random_state=random_state))
        if umap:
            frames["umap"].append(umap_embedding(data, random_state=random_state))
    return {stem: (pd.concat([f for f in parts if len(f)], ignore_index=True) if any(len(f) for f in parts)
                   else pd.DataFrame()) for stem, parts in frames.items()}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

EVALUATION_FILES = {
    "f1_scores": "f1_scores.csv",
    "loio_summary": "loio_summary.csv",
    "loio_predictions": "loio_predictions.parquet",
    "pr_curves": "pr_curves.csv",
    "confusion_matrices": "confusion_matrices.csv",
    "silhouette": "silhouette.csv",
    "umap": "umap.parquet",
    "coefficients": "coefficients.csv",
    "cell_splits": "cell_splits.csv",
}


def headline(results: TrainingResults) -> pd.DataFrame:
    """One row per model: hyper-parameters, CV F1, train/test weighted F1, LOIO pass fraction."""
    f1 = results.tables.get("f1_scores", pd.DataFrame())
    rows = []
    for model_id, model in results.models.items():
        row = {**_model_columns(model), "C": model.C, "l1_ratio": model.l1_ratio,
               "cv_f1": model.cv.get("score"), "n_iter": model.training.get("n_iter"),
               "converged": model.training.get("converged")}
        if len(f1):
            weighted = f1[(f1["model_id"] == model_id) & (f1["phenotype"] == "weighted")]
            for split in SPLITS:
                values = weighted.loc[weighted["split"] == split, "f1"]
                row[f"{split}_f1"] = float(values.iloc[0]) if len(values) else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = results.tables.get("loio_summary", pd.DataFrame())
    if len(summary) and len(table):
        fractions = loio_pass_fraction(summary)[["model_id", "pass_fraction"]]
        table = table.merge(fractions.rename(columns={"pass_fraction": "loio_pass_fraction"}), on="model_id",
                            how="left")
    return table


def write_evaluation(results: TrainingResults, evaluation_dir: str | os.PathLike, *,
                     results_id: str | None = None) -> dict[str, Path]:
    """Write the evaluation tables into ``evaluation_dir`` (atomically, one file per table).

    Files: f1_scores.csv, loio_summary.csv, loio_predictions.parquet, pr_curves.csv,
    confusion_matrices.csv, silhouette.csv, umap.parquet, coefficients.csv, cell_splits.csv,
    models.csv (one headline row per model) and summary.json (settings, skipped feature spaces,
    LOIO pass fractions). A table that was switched off is written empty, so the set of files
    is always the same.
    """
    evaluation_dir = Path(evaluation_dir)
    evaluation_dir.mkdir(parents=True, exist_ok=True)
    tables = dict(results.tables)
    tables["cell_splits"] = results.splits
    written = {}
    for stem, filename in EVALUATION_FILES.items():
        written[stem] = write_table(tables.get(stem, pd.DataFrame()), evaluation_dir / filename)
    models = headline(results)
    written["models"] = write_table(models, evaluation_dir / "models.csv")
    summary = {"settings": results.settings, "skipped_feature_spaces": results.skipped_feature_spaces,
               "models": json.loads(models.to_json(orient="records", double_precision=15)) if len(models) else [],
               **({"results_id": results_id} if results_id else {})}
    with atomic_path(evaluation_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    written["summary"] = evaluation_dir / "summary.json"
    return written
