"""Normalisation: z-score every feature against negative-control nuclei.

:func:`fit_zscore` is the package's one z-score: the models' scalers, the evaluation's
embeddings, LOIO refits, JUMP plates and the tables here all use it. It computes what
pycytominer's ``standardize`` (scikit-learn's ``StandardScaler``) computes: population standard
deviation, NaN ignored, a feature that is constant (up to rounding) keeps scale 1, so it is
centred only. It is written with numpy (``nanmean``, ``nanstd``) because those are bit-for-bit
the ``mean``/``std`` the models were always scaled with, which ``StandardScaler`` is not.

The study fits one scaler (mean, standard deviation) on the negative-control nuclei of the whole
screen and applies it to every cell; JUMP-style screens fit one per plate (``group_by``). The
fitted scaler is a small table (one row per group and feature: ``mean``, ``scale``, ``n``) written as Parquet, CSV or JSON,
so it can be applied later to cells measured elsewhere (e.g. the labelled MitoCheck cells).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from morphotype.io import MorphotypeInputError, atomic_path

log = logging.getLogger(__name__)
# pycytominer is imported where it is used: it pulls in much of the scientific stack at start-up.

NEGATIVE_CONTROLS = "Metadata_Control == 'negative'"
SCALER_COLUMNS = ["feature", "mean", "scale", "n"]


@dataclass
class ZScore:
    """Per-feature z-score: ``(x - mean) / scale``, fitted by :func:`fit_zscore`.

    ``reference`` says which cells it was fitted on (e.g. ``"negative_controls"``,
    ``"training_set"``), ``n_reference`` how many; ``constant`` marks the features that were
    constant there (their scale is 1: centred only).
    """

    mean: np.ndarray
    scale: np.ndarray
    reference: str = "cells"
    n_reference: int = 0
    constant: np.ndarray | None = field(default=None, repr=False)

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.scale


def fit_zscore(values: np.ndarray, reference: str = "cells") -> ZScore:
    """Fit the z-score on the reference cells (rows of ``values``, features in columns).

    Mean and population standard deviation per feature, NaN ignored. A feature whose variance
    is within rounding error of 0 (scikit-learn's test in ``StandardScaler``) gets scale 1.
    """
    values = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features: NaN mean and scale
        mean = np.nanmean(values, axis=0)
        scale = np.nanstd(values, axis=0)
    counts = np.sum(~np.isnan(values), axis=0)
    eps = np.finfo(np.float64).eps
    variance = scale**2
    constant = variance <= counts * eps * variance + (counts * mean * eps) ** 2
    scale = np.where(constant, 1.0, scale)
    return ZScore(mean, scale, reference, int(len(values)), constant)


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    """Model features: ``Nuclei_`` / ``Cells_`` / ``Cytoplasm_`` columns, without object locations."""
    from pycytominer.cyto_utils.features import infer_cp_features

    features = infer_cp_features(profiles)
    return [f for f in features if "_Location_" not in f]


def fit_scaler(
    profiles: pd.DataFrame,
    *,
    samples: str = NEGATIVE_CONTROLS,
    features: Sequence[str] | None = None,
    group_by: Sequence[str] = (),
) -> pd.DataFrame:
    """Fit the z-score scaler on the rows of ``profiles`` selected by ``samples`` (a pandas query).

    Returns the scaler table: ``group_by`` columns, then ``feature``, ``mean``, ``scale`` (the
    divisor) and ``n`` (control cells with a value).
    """
    features = list(features) if features is not None else feature_columns(profiles)
    _check_columns(profiles, [*features, *group_by], "profiles")
    try:
        controls = profiles.query(samples)
    except Exception as error:  # pandas raises several types for a bad expression
        raise MorphotypeInputError(f"samples query {samples!r} failed on the profiles: {error}") from error
    tables = []
    groups = controls.groupby(list(group_by), sort=True) if group_by else [((), controls)]
    for key, rows in groups:
        if len(rows) < 2:
            raise MorphotypeInputError(
                f"{len(rows)} control cell(s) match {samples!r}"
                + (f" in group {dict(zip(group_by, _tuple(key)))}" if group_by else "")
                + "; need at least 2 to estimate a standard deviation"
            )
        values = rows[features].to_numpy(dtype=np.float64)
        zscore = fit_zscore(values, samples)
        table = pd.DataFrame(
            {"feature": features, "mean": zscore.mean, "scale": zscore.scale, "n": np.sum(~np.isnan(values), axis=0)}
        )
        for column, value in zip(group_by, _tuple(key)):
            table.insert(list(group_by).index(column), column, value)
        tables.append(table)
    if not tables:
        raise MorphotypeInputError(f"no control cells match {samples!r}")
    scaler_table = pd.concat(tables, ignore_index=True)
    log.info("fitted z-score scaler on %d control cells (%d features, %d group(s))",
             len(controls), len(features), len(tables))
    return scaler_table


def apply_scaler(profiles: pd.DataFrame, scaler: pd.DataFrame) -> pd.DataFrame:
    """Z-score the scaler's features in ``profiles``: ``(x - mean) / scale``; other columns kept.

    With group columns in the scaler, each row uses its group's scaler; a row whose group has no
    scaler, or a feature missing from ``profiles``, is an error.
    """
    group_by = [c for c in scaler.columns if c not in SCALER_COLUMNS]
    features = list(dict.fromkeys(scaler["feature"]))
    _check_columns(profiles, [*features, *group_by], "profiles")
    out = profiles.copy()
    values = profiles[features].to_numpy(dtype=np.float64)
    if not group_by:
        table = scaler.set_index("feature").loc[features]
        out[features] = (values - table["mean"].to_numpy()) / table["scale"].to_numpy()
        return out
    means = scaler.pivot_table(index=group_by, columns="feature", values="mean")[features]
    scales = scaler.pivot_table(index=group_by, columns="feature", values="scale")[features]
    keys = pd.MultiIndex.from_frame(profiles[group_by]) if len(group_by) > 1 else pd.Index(profiles[group_by[0]])
    missing = sorted(set(keys) - set(means.index), key=str)
    if missing:
        raise MorphotypeInputError(f"no scaler fitted for group(s) {missing[:5]} of {group_by}")
    out[features] = (values - means.loc[keys].to_numpy()) / scales.loc[keys].to_numpy()
    return out


def normalize_to_controls(
    profiles: pd.DataFrame,
    *,
    samples: str = NEGATIVE_CONTROLS,
    features: Sequence[str] | None = None,
    group_by: Sequence[str] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Z-score ``profiles`` against their own control rows with ``pycytominer.normalize``.

    For a screen whose single-cell table holds its negative-control cells (marked so that the
    ``samples`` query selects them). Returns the normalised table (same rows, same column order)
    and the scaler table (see :func:`fit_scaler`), which reproduces the normalisation.
    """
    from pycytominer import normalize

    features = list(features) if features is not None else feature_columns(profiles)
    meta = [c for c in profiles.columns if c not in features]
    _check_columns(profiles, [*features, *group_by], "profiles")
    scaler = fit_scaler(profiles, samples=samples, features=features, group_by=group_by)
    original_index = profiles.index
    profiles = profiles.reset_index(drop=True)  # pycytominer joins on the index: make it unique
    parts = []
    groups = profiles.groupby(list(group_by), sort=False) if group_by else [((), profiles)]
    for _, rows in groups:
        normalised = normalize(
            profiles=rows, features=features, meta_features=meta, samples=samples, method="standardize"
        )
        parts.append(normalised)
    normalised = pd.concat(parts).loc[profiles.index, list(profiles.columns)]
    normalised.index = original_index
    return normalised, scaler


def write_scaler(scaler: pd.DataFrame, path: str | Path) -> Path:
    """Write a scaler table atomically: ``.parquet``, ``.csv`` or ``.json`` (records)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".json":
            tmp.write_text(json.dumps({"scaler": scaler.to_dict(orient="records")}, indent=1))
        elif path.suffix == ".csv":
            scaler.to_csv(tmp, index=False)
        else:
            scaler.to_parquet(tmp, index=False)
    return path


def read_scaler(path: str | Path) -> pd.DataFrame:
    """Read a scaler written by :func:`write_scaler`, checking its columns."""
    path = Path(path)
    if not path.exists():
        raise MorphotypeInputError(f"{path}: scaler file does not exist")
    try:
        if path.suffix == ".json":
            scaler = pd.DataFrame.from_records(json.loads(path.read_text())["scaler"])
        elif path.suffix == ".csv":
            scaler = pd.read_csv(path)
        else:
            scaler = pd.read_parquet(path)
    except Exception as error:  # JSON, CSV and Parquet readers raise different types
        raise MorphotypeInputError(f"{path}: cannot be read as a scaler table ({error})") from error
    _check_columns(scaler, SCALER_COLUMNS, str(path))
    if scaler.duplicated([c for c in scaler.columns if c not in ("mean", "scale", "n")]).any():
        raise MorphotypeInputError(f"{path}: a feature appears twice in the same group")
    return scaler


def _check_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MorphotypeInputError(f"{name}: missing column(s) {missing[:10]} ({len(missing)} in all)")


def _tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)
