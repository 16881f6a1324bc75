"""Training runs: every model of a single-cell table (the ``train`` step), then its evaluation.

:func:`train_models` trains the models that the settings ask for (one split per feature space,
grid search, refit; :mod:`morphotype.models` holds the solver and the model objects),
:func:`train_all` adds every evaluation table (:mod:`morphotype.evaluate`) and
:func:`write_results` writes both. The defaults are the pipeline params' defaults
(:func:`morphotype.params.training_settings` of :data:`morphotype.params.PARAM_DEFAULTS`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from morphotype.columns import CELL_ID, IMAGE_ID, PHENOTYPE
from morphotype.evaluate import evaluate_models, write_evaluation
from morphotype.io import MorphotypeInputError
from morphotype.models import (
    DEFAULT_CV_TOL,
    DEFAULT_GRID,
    DEFAULT_TOL,
    FEATURE_SPACES,
    SPLIT_COLUMNS,
    PhenotypeModel,
    TrainingResults,
    concat_tables,
    model_fingerprint,
    prepare_data,
    split_cells,
    train_model,
    write_models,
)
from morphotype.params import PARAM_DEFAULTS, default_workers, training_settings

log = logging.getLogger(__name__)

# The keyword defaults below: the pipeline's defaults, as the params turn into settings.
DEFAULTS: dict[str, Any] = training_settings(PARAM_DEFAULTS)


def check_cv_folds(class_counts: pd.Series, cv_folds: int, *, what: str, test_size: float = 0.0) -> None:
    """Refuse ``cv_folds`` above the cells of the smallest class (stratified folds need one each).

    ``test_size`` > 0 checks counts before the split (a samplesheet's annotations): the training
    split keeps about ``1 - test_size`` of each class.
    """
    if class_counts.empty:
        return
    kept = np.floor(class_counts.astype(float) * (1.0 - test_size)).astype(int)
    smallest = kept.idxmin()
    if kept[smallest] < cv_folds:
        raise MorphotypeInputError(
            f"cv_folds {cv_folds} is more than the {int(kept[smallest])} training cells of class {smallest!r} "
            f"({what}); lower cv_folds or exclude the class (exclude_phenotypes)")


def train_models(
    table: pd.DataFrame,
    *,
    feature_spaces: Sequence[str] = tuple(DEFAULTS["feature_spaces"]),
    balanced: Sequence[bool] = DEFAULTS["balanced"],
    shuffled: Sequence[bool] = DEFAULTS["shuffled"],
    binary: bool = DEFAULTS["binary"],
    binary_feature_spaces: Sequence[str] = ("CP", "DP", "CP_and_DP"),
    grid: Mapping[str, Sequence[float]] | None = None,
    cv_folds: int = DEFAULTS["cv_folds"],
    split_method: str = DEFAULTS["split_method"],
    test_size: float = 0.15,
    split_random_state: int = 1,
    exclude_phenotypes: Sequence[str] = tuple(DEFAULTS["exclude_phenotypes"]),
    drop_positional: bool = False,
    random_state: int = DEFAULTS["random_state"],
    n_jobs: int | None = None,
    tol: float = DEFAULT_TOL,
    cv_tol: float = DEFAULT_CV_TOL,
    progress: bool = True,
) -> TrainingResults:
    """Train every requested model (the ``train`` step); no evaluation tables yet.

    For each feature space present in ``table`` (absent ones are skipped with a message in
    ``skipped_feature_spaces`` and the log): multiclass models for every ``balanced`` x
    ``shuffled`` setting and, with ``binary``, balanced one-vs-rest models per phenotype for the
    spaces in ``binary_feature_spaces`` (every ``shuffled`` setting). The split (``split_method``
    "cell", the study's, or "image") is made once per feature space with ``split_random_state``
    (the study's 1) and returned per cell in ``splits``. Defaults are the pipeline params'
    (:data:`morphotype.params.PARAM_DEFAULTS`); ``n_jobs`` None: every core.
    """
    n_jobs = n_jobs or default_workers()
    unknown = [space for space in feature_spaces if space not in FEATURE_SPACES]
    if unknown:
        raise MorphotypeInputError(f"unknown feature space(s) {unknown}; expected some of {sorted(FEATURE_SPACES)}")
    if len(table) == 0:
        raise MorphotypeInputError("the single-cell table has no rows: nothing to train on")
    models: dict[str, PhenotypeModel] = {}
    skipped: dict[str, str] = {}
    split_tables = []
    preparation = {"exclude_phenotypes": list(exclude_phenotypes), "drop_positional": drop_positional,
                   "split": {"method": split_method, "test_size": test_size, "random_state": split_random_state}}
    for space in feature_spaces:
        try:
            data = prepare_data(table, space, exclude_phenotypes=exclude_phenotypes, drop_positional=drop_positional)
        except MorphotypeInputError as error:
            skipped[space] = str(error)
            log.warning("skipping feature space %s: %s", space, error)
            continue
        split = split_cells(data.metadata, method=split_method, test_size=test_size, random_state=split_random_state)
        check_cv_folds(pd.Series(data.labels[split == "train"]).value_counts(), cv_folds,
                       what=f"feature space {space}, training split")
        split_tables.append(data.metadata[[CELL_ID, IMAGE_ID, PHENOTYPE]].assign(split=split).assign(
            feature_space=space)[SPLIT_COLUMNS])
        settings = [(w, s, None) for w in balanced for s in shuffled]
        if binary and space in binary_feature_spaces:
            settings += [(True, s, phenotype) for s in shuffled for phenotype in sorted(set(data.labels))]
        for is_balanced, is_shuffled, positive in settings:
            model = train_model(data, split == "train", class_weight="balanced" if is_balanced else None,
                                shuffled=is_shuffled, positive_class=positive, grid=grid, cv_folds=cv_folds,
                                random_state=random_state, n_jobs=n_jobs, tol=tol, cv_tol=cv_tol,
                                progress=progress)
            model.training.update(preparation)
            models[model.model_id] = model
    settings_used = {"feature_spaces": list(feature_spaces), "balanced": list(balanced), "shuffled": list(shuffled),
                     "binary": binary, "binary_feature_spaces": list(binary_feature_spaces),
                     "grid": {k: [float(x) for x in v] for k, v in dict(grid or DEFAULT_GRID).items()},
                     "cv_folds": cv_folds, **preparation, "random_state": random_state, "tol": tol,
                     "cv_tol": cv_tol}
    return TrainingResults(models, concat_tables(split_tables), {}, skipped, settings_used)


def train_all(
    table: pd.DataFrame,
    *,
    loio: bool = DEFAULTS["loio"],
    loio_feature_spaces: Sequence[str] | None = DEFAULTS["loio_feature_spaces"],
    umap: bool = DEFAULTS["umap"],
    silhouette: bool = True,
    **training: Any,
) -> TrainingResults:
    """Train (:func:`train_models`, same keyword arguments) and evaluate
    (:func:`morphotype.evaluate.evaluate_models`) in one call: the ``run`` step.

    ``loio`` (for the multiclass models of ``loio_feature_spaces``, None: all), ``umap`` and
    ``silhouette`` switch those evaluations on or off; the tables they fill are then empty.
    """
    training["n_jobs"] = training.get("n_jobs") or default_workers()
    results = train_models(table, **training)
    results.tables = evaluate_models(
        results, table, loio=loio, loio_feature_spaces=loio_feature_spaces, umap=umap, silhouette=silhouette,
        n_jobs=training["n_jobs"], tol=training.get("tol", DEFAULT_TOL),
        random_state=training.get("random_state", DEFAULTS["random_state"]), progress=training.get("progress", True))
    results.settings.update({"loio": loio, "loio_feature_spaces": loio_feature_spaces, "umap": umap,
                             "silhouette": silhouette})
    return results



RESULT_FOLDERS = ("models", "evaluation")
STAGING_PREFIX = ".results-staging-"


def results_id(results: TrainingResults) -> str:
    """A fingerprint of one set of results: its models' fingerprints and the settings.

    Stamped into ``models/training.json`` and ``evaluation/summary.json``; two folders with
    different ids come from different runs. Deterministic: the same results, the same id.
    """
    digest = hashlib.sha256(json.dumps(results.settings, sort_keys=True, default=str).encode())
    for model_id in sorted(results.models):
        model = results.models[model_id]
        digest.update(model_fingerprint(model.coef, model.intercept, model.scaler.mean, model.scaler.scale,
                                        model.features, model.classes).encode())
    return digest.hexdigest()[:16]


def write_results(results: TrainingResults, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write ``outdir/models/`` (:func:`write_models`) and ``outdir/evaluation/``
    (:func:`morphotype.evaluate.write_evaluation`) so that they can never mix two runs.

    Both are written into a staging folder first and then swapped in, each in one rename; a
    run killed before the swap leaves the previous results whole (its staging folder is removed
    by the next run), and one killed between the two renames leaves folders whose ``results_id``
    differ, which :func:`check_results_consistent` (and so the report) refuses.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for stale in outdir.glob(f"{STAGING_PREFIX}*"):  # what a killed run left
        shutil.rmtree(stale, ignore_errors=True)
    stamp = results_id(results)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=outdir))
    try:
        write_models(results, staging / "models", results_id=stamp)
        written = write_evaluation(results, staging / "evaluation", results_id=stamp)
        for name in RESULT_FOLDERS:
            final = outdir / name
            if final.exists():
                final.rename(staging / f"previous-{name}")
            (staging / name).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {key: outdir / "evaluation" / Path(path).name for key, path in written.items()}


def check_results_consistent(outdir: str | os.PathLike) -> None:
    """Refuse an output folder whose ``models/`` and ``evaluation/`` come from different runs."""
    outdir = Path(outdir)
    stamps = {}
    for name, index in (("models", "training.json"), ("evaluation", "summary.json")):
        path = outdir / name / index
        if path.is_file():
            try:
                stamps[name] = json.loads(path.read_text()).get("results_id")
            except (json.JSONDecodeError, AttributeError) as error:
                raise MorphotypeInputError(f"{path}: not valid JSON ({error})") from error
    if None not in stamps.values() and len(set(stamps.values())) > 1:
        raise MorphotypeInputError(
            f"{outdir}: models/ (results {stamps['models']}) and evaluation/ (results {stamps['evaluation']}) "
            "come from different runs (a run was killed while writing them); run the training again")
