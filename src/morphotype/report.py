"""The study report: every figure of a run in one self-contained HTML page.

:func:`write_report` reads a run's output folder (as written by ``morphotype run``:
``features/``, ``models/<model_id>/``, ``evaluation/``, ``pipeline_info/`` and, when the JUMP
arm ran, ``jump/summary/``) and writes ``report/index.html`` with every figure embedded as a
base64 PNG (no scripts, no external resources), plus ``report/figures/<name>.{png,svg,csv}``:
each figure as PNG and SVG and the table behind it as CSV. Anything absent (no LOIO, no JUMP,
no UMAP) is stated in its section rather than failing. The page is rendered from the Jinja2
templates in ``morphotype/templates/report/`` (autoescaped); the figures are drawn by
:mod:`morphotype.report_figures`.

Section ids are stable: ``run``, ``data``, ``models``, ``model-<model_id>``,
``feature-space-<space>``, ``silhouette``, ``loio``, ``jump``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from morphotype import report_figures as draw
from morphotype.io import atomic_path, remove_stale_temporaries
from morphotype.report_figures import FigureWriter, SavedFigure
from morphotype.report_inputs import PHENOTYPE, RunOutputs, read_run_outputs

log = logging.getLogger(__name__)

IMAGE_ID = "Metadata_ImageID"
LOIO_PASS_RANK = 2  # the study's criterion: mean rank of the true class < 2
TOP_COEFFICIENTS = 20  # features shown per coefficient heatmap
JUMP_TOP_TREATMENTS = 40  # treatments (columns) shown per KS D heatmap
TABLE_ROWS = 50  # rows shown per HTML table (the full table is in the CSV)
SPLIT_SHOWN = "test"  # the held-out split is the one the figures show


# --------------------------------------------------------------------------------------------
# Page parts: what each section shows, for the templates in morphotype/templates/report/
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HtmlTable:
    """The first rows of a table as HTML (pandas formats and escapes the cells) and its length."""

    html: str  # the template marks it safe: pandas escaped every cell
    shown: int
    total: int


def _html_table(table: pd.DataFrame, *, rows: int = TABLE_ROWS) -> HtmlTable | None:
    if table is None or not len(table):
        return None
    html = table.head(rows).to_html(
        index=False,
        escape=True,
        float_format=lambda v: f"{v:.4g}",
        na_rep="",
        border=0,
        classes="table",
    )
    return HtmlTable(html, min(rows, len(table)), len(table))


def _rows(table: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    if not len(table):
        return table
    mask = np.ones(len(table), dtype=bool)
    for column, value in equal.items():
        if column not in table.columns:
            return table.iloc[0:0]
        mask &= (table[column] == value).to_numpy()
    return table[mask]


def _counterpart(model_id: str) -> str | None:
    """The shuffled baseline of a final model and vice versa (ids end in __final / __shuffled)."""
    if model_id.endswith("__final"):
        return model_id[: -len("final")] + "shuffled"
    if model_id.endswith("__shuffled"):
        return model_id[: -len("shuffled")] + "final"
    return None


def _pass_fraction(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per ``by`` value: LOIO groups, groups whose true class has mean rank < LOIO_PASS_RANK."""
    passed = table.groupby(by, sort=True)["mean_rank"].agg(
        groups="size", passed=lambda r: int((r < LOIO_PASS_RANK).sum())
    )
    passed = passed.reset_index()
    passed["pass_fraction"] = passed["passed"] / passed["groups"]
    return passed


def _run_part(run: RunOutputs) -> dict:
    summary = run.evaluation_summary or {}
    return {
        "outdir": run.outdir,
        "params": run.params,
        "versions": run.versions,
        "settings": summary.get("settings"),
        "skipped": summary.get("skipped_feature_spaces"),
    }


def _data_part(run: RunOutputs, figures: FigureWriter) -> dict | None:
    if run.phenotypes is None:
        return None
    params = run.params if isinstance(run.params, dict) else {}
    source = params.get("mitocheck_crops") or params.get("input")
    if not source and params.get("idr_plates"):
        source = f"IDR plates {params['idr_plates']}"
    labelled = run.phenotypes.dropna()
    part = {
        "features_path": run.features_path,
        "n_cells": len(run.phenotypes),
        "source": source,
        "n_labelled": len(labelled),
        "n_unlabelled": run.phenotypes.isna().sum(),
        "class_counts": None,
    }
    if len(labelled):
        counts = labelled.value_counts().rename_axis("phenotype").reset_index(name="n_cells")
        counts = counts.sort_values("phenotype")
        title = "Labelled cells per phenotype (single-cell table)"
        counts_by = counts.assign(series="cells")
        fig = draw.bar_chart(
            counts_by, "phenotype", "series", "n_cells", title=title, ylabel="cells"
        )
        caption = "Labelled cells per phenotype in the single-cell table."
        part["class_counts"] = figures.save(fig, "data_class_counts", counts, caption)
    return part


def _loio_part(run: RunOutputs, figures: FigureWriter) -> SavedFigure | None:
    summary = run.tables["loio_summary"]
    if not len(summary):
        return None
    fractions = _pass_fraction(summary, "model_id")
    title = f"LOIO: fraction of image × phenotype groups with mean rank < {LOIO_PASS_RANK}"
    by_model = fractions.assign(series="pass fraction")
    fig = draw.bar_chart(
        by_model,
        "model_id",
        "series",
        "pass_fraction",
        title=title,
        ylabel="fraction passed",
        ylim=(0, 1),
    )
    caption = (
        "The study's LOIO metric per model: fraction of image × phenotype groups whose "
        f"true class has mean rank < {LOIO_PASS_RANK}."
    )
    return figures.save(fig, "loio_pass_fraction", fractions, caption)


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def _class_counts_figure(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter):
    # training cells from the card, per split from the F1 table
    f1 = _rows(run.tables["f1_scores"], model_id=model_id)
    counts = pd.DataFrame()
    if len(f1):
        counts = f1[f1["phenotype"] != "weighted"][["split", "phenotype", "n_cells"]]
    elif (card.get("training") or {}).get("class_counts"):
        training = card["training"]["class_counts"]
        counts = pd.DataFrame(
            {"split": "train", "phenotype": list(training), "n_cells": list(training.values())}
        )
    if not len(counts):
        return None
    title = f"{model_id}: cells per class"
    fig = draw.bar_chart(counts, "phenotype", "split", "n_cells", title=title, ylabel="cells")
    caption = "Cells per class in each split."
    return figures.save(fig, f"model_{model_id}_class_counts", counts, caption)


def _f1_figure(model_id: str, run: RunOutputs, figures: FigureWriter):
    """F1 per class against the shuffled baseline (or the final model, for a baseline)."""
    other = _counterpart(model_id)
    f1 = _rows(run.tables["f1_scores"], split=SPLIT_SHOWN)
    if not len(f1):
        return None
    f1 = f1[f1["model_id"].isin([model_id, other])]
    shuffled = f1["shuffled"].astype(bool)
    this = np.where(shuffled, "this model (shuffled)", "this model (final)")
    that = np.where(shuffled, "shuffled baseline", "final model")
    f1 = f1.assign(model=np.where(f1["model_id"] == model_id, this, that))
    title = f"{model_id}: test-set F1 per class"
    fig = draw.bar_chart(f1, "phenotype", "model", "f1", title=title, ylabel="F1", ylim=(0, 1))
    note = "" if other in set(f1["model_id"]) else " (no counterpart model was trained)"
    table = f1[["model_id", "shuffled", "split", "phenotype", "f1", "n_cells"]]
    caption = f"Test-set F1 per class and weighted, with the counterpart {other}{note}."
    return figures.save(fig, f"model_{model_id}_f1", table, caption)


def _confusion_figure(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter):
    confusion = _rows(run.tables["confusion_matrices"], model_id=model_id, split=SPLIT_SHOWN)
    if not len(confusion):
        return None
    order = list(card["classes"])
    counts = draw.confusion_counts(confusion, order)
    normalised = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)
    fig = draw.confusion_pair(counts, normalised, order)
    table = confusion[["split", "true_phenotype", "predicted_phenotype", "count"]].copy()
    row_total = table.groupby("true_phenotype")["count"].transform("sum").replace(0, np.nan)
    table["row_fraction"] = table["count"] / row_total
    caption = "Test-set confusion matrix: counts and normalised by true class."
    return figures.save(fig, f"model_{model_id}_confusion", table, caption)


def _pr_figure(model_id: str, run: RunOutputs, figures: FigureWriter):
    pr = _rows(run.tables["pr_curves"], model_id=model_id, split=SPLIT_SHOWN)
    if not len(pr):
        return None
    fig = draw.pr_curves(pr, f"{model_id}: test-set precision-recall (one vs rest)")
    table = pr[["split", "phenotype", "precision", "recall", "threshold", "average_precision"]]
    caption = "Test-set precision-recall curve per class with average precision (AP)."
    return figures.save(fig, f"model_{model_id}_pr", table, caption)


def _loio_figure(model_id: str, run: RunOutputs, figures: FigureWriter):
    """The model's LOIO figure and its per-class pass table, or (None, None) without LOIO."""
    loio = _rows(run.tables["loio_summary"], model_id=model_id)
    if not len(loio):
        return None, None
    per_class = _pass_fraction(loio, PHENOTYPE)
    total = float((loio["mean_rank"] < LOIO_PASS_RANK).mean())
    title = (
        f"{model_id}: LOIO — {total:.1%} of {len(loio)} image × phenotype groups "
        f"have mean rank < {LOIO_PASS_RANK}"
    )
    fig = draw.loio_ranks(loio, per_class["pass_fraction"], LOIO_PASS_RANK, title)
    caption = (
        "LOIO: distribution of the true class's mean rank per image × phenotype group "
        f"(top) and the fraction of groups with mean rank < {LOIO_PASS_RANK} (bottom); "
        f"overall {total:.3f}."
    )
    return figures.save(fig, f"model_{model_id}_loio", loio, caption), _html_table(per_class)


def _coefficients_figure(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter):
    coefficients = _rows(run.tables["coefficients"], model_id=model_id)
    if not len(coefficients):
        return None
    classes = [card["positive_class"]] if card.get("model_type") == "binary" else card["classes"]
    matrix = coefficients.pivot_table(
        index="phenotype", columns="feature", values="coefficient", aggfunc="first"
    )
    matrix = matrix.reindex(index=[c for c in classes if c in matrix.index])
    magnitude = matrix.abs().max(axis=0).sort_values(ascending=False, kind="stable")
    top = magnitude.head(TOP_COEFFICIENTS).index
    shown = matrix[top]
    shown.columns = [c.replace("Nuclei_", "") for c in shown.columns]
    title = f"{model_id}: top {len(top)} coefficients (largest |coefficient| over classes)"
    fig = draw.heatmap(
        shown, title=title, cbar="coefficient (z-scored features)", cmap="RdBu_r", center=True
    )
    table = (
        matrix[top]
        .reset_index()
        .melt(id_vars="phenotype", var_name="feature", value_name="coefficient")
    )
    caption = (
        f"Top {len(top)} coefficients per class "
        "(features ranked by their largest absolute coefficient)."
    )
    return figures.save(fig, f"model_{model_id}_coefficients", table, caption)


def _binary_figure(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter):
    """One four-panel figure per one-vs-rest model (the study trains dozens of them)."""
    t = run.tables
    other = _counterpart(model_id)
    positive = card["positive_class"]
    fig, table = draw.binary_panels(
        _rows(t["f1_scores"], split=SPLIT_SHOWN),
        [model_id, other],
        _rows(t["confusion_matrices"], model_id=model_id, split=SPLIT_SHOWN),
        _rows(t["pr_curves"], model_id=model_id, split=SPLIT_SHOWN),
        _rows(t["coefficients"], model_id=model_id),
        list(card["classes"]),
        positive,
    )
    if table is None:
        return None
    caption = (
        f"One-vs-rest model for {positive}: test-set F1 against the counterpart {other}, "
        "confusion matrix, precision-recall curve and the 10 largest coefficients "
        "(the CSV's 'panel' column names the panel)."
    )
    return figures.save(fig, f"model_{model_id}", table, caption)


def _model_part(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter) -> dict:
    hyper = card.get("hyperparameters", {})
    score = (card.get("cross_validation") or {}).get("score")
    part = {
        "id": model_id,
        "type": card.get("model_type"),
        "feature_space": card.get("feature_space"),
        "n_features": len(card.get("features", [])),
        "n_nonzero": card.get("n_nonzero_coefficients"),
        "hyper": {key: hyper.get(key) for key in ("C", "l1_ratio", "class_weight")},
        "shuffled": card.get("shuffled"),
        "cv_score": f"{score:.4f}" if isinstance(score, (int, float)) else score,
        "converged": (card.get("training") or {}).get("converged"),
        "binary": card.get("model_type") == "binary",
    }
    if part["binary"]:
        part["panels"] = _binary_figure(model_id, card, run, figures)
        return part
    part["class_counts"] = _class_counts_figure(model_id, card, run, figures)
    part["f1"] = _f1_figure(model_id, run, figures)
    part["confusion"] = _confusion_figure(model_id, card, run, figures)
    part["pr"] = _pr_figure(model_id, run, figures)
    part["loio"], part["loio_table"] = _loio_figure(model_id, run, figures)
    part["coefficients"] = _coefficients_figure(model_id, card, run, figures)
    return part


# --------------------------------------------------------------------------------------------
# Feature spaces and JUMP
# --------------------------------------------------------------------------------------------


def _feature_space_parts(run: RunOutputs, figures: FigureWriter) -> tuple[SavedFigure | None, list]:
    """The silhouette heatmap over all spaces, and per feature space its models and figures."""
    silhouette, umap = run.tables["silhouette"], run.tables["umap"]
    overview = None
    if len(silhouette):
        matrix = silhouette.pivot_table(
            index="phenotype", columns="feature_space", values="silhouette", aggfunc="first"
        )
        title = "Silhouette of {phenotype, other} on principal components"
        fig = draw.heatmap(
            matrix, title=title, cbar="silhouette", cmap="RdBu_r", center=True, annotate=".2f"
        )
        caption = "Silhouette score of each phenotype against all other cells, per feature space."
        overview = figures.save(fig, "silhouette", silhouette, caption)
    spaces = {c.get("feature_space") for c in run.cards.values()}
    spaces |= set(umap["feature_space"]) if len(umap) else set()
    spaces |= set(silhouette["feature_space"]) if len(silhouette) else set()
    parts = []
    for space in sorted(spaces):
        models = [m for m, c in run.cards.items() if c.get("feature_space") == space]
        part = {"name": space, "models": models, "umap": None, "silhouette": None}
        embedding = _rows(umap, feature_space=space)
        if len(embedding):
            caption = f"UMAP of the {space} features, coloured by phenotype."
            fig = draw.umap_scatter(embedding, space)
            part["umap"] = figures.save(fig, f"umap_{space}", embedding, caption)
        rows = _rows(silhouette, feature_space=space)
        if len(rows):
            title = f"Silhouette per phenotype ({space})"
            by_space = rows.assign(series=space)
            fig = draw.bar_chart(
                by_space, "phenotype", "series", "silhouette", title=title, ylabel="silhouette"
            )
            caption = f"Silhouette per phenotype for {space}."
            part["silhouette"] = figures.save(fig, f"silhouette_{space}", rows, caption)
        parts.append(part)
    return overview, parts


def _jump_heatmaps(
    enrichment: pd.DataFrame, conditions: list[str], label: str, figures: FigureWriter
) -> list[SavedFigure]:
    """KS D per phenotype × treatment, one heatmap per model and condition."""
    saved = []
    groups = enrichment.groupby(["Metadata_Model", *conditions], sort=True, dropna=False)
    for key, rows in groups:
        key = key if isinstance(key, tuple) else (key,)
        treatments = rows[label].astype(str)
        matrix = rows.pivot_table(
            index="Metadata_Phenotype", columns=treatments, values="median_ks_d", aggfunc="max"
        )
        largest = matrix.max(axis=0).sort_values(ascending=False, kind="stable")
        top = largest.head(JUMP_TOP_TREATMENTS).index
        title = (
            f"KS D per phenotype × treatment — {' / '.join(map(str, key))} "
            f"(top {len(top)} of {rows[label].nunique()} treatments)"
        )
        fig = draw.heatmap(
            matrix[top], title=title, cbar="median KS D", cmap="magma", vmin=0, vmax=1
        )
        caption = (
            "Median KS D over replicate wells per phenotype and treatment "
            f"({', '.join(map(str, key))}); the {len(top)} treatments with the largest D."
        )
        name = "jump_ks_" + "_".join(str(k) for k in key)
        saved.append(figures.save(fig, name, rows[treatments.isin(top)], caption))
    return saved


def _jump_part(run: RunOutputs, figures: FigureWriter) -> dict:
    """The JUMP section: ``state`` is "not_run", "no_enrichment" or "done"."""
    enrichment = run.jump.get("enrichment", pd.DataFrame())
    if not run.jump:
        return {"state": "not_run"}
    if not len(enrichment):
        return {"state": "no_enrichment"}
    summary = run.jump_summary or {}
    keys = ("n_plates", "n_cells_scored", "n_wells_tested", "alpha", "min_shift", "p_combination")
    treatment_key = summary.get("treatment_key", "Metadata_broad_sample")
    if treatment_key not in enrichment.columns:
        broad = "Metadata_broad_sample" in enrichment.columns
        treatment_key = "Metadata_broad_sample" if broad else "Metadata_Treatment"
    label = "Metadata_Treatment" if "Metadata_Treatment" in enrichment.columns else treatment_key
    conditions = ["Metadata_Perturbation", "Metadata_CellType", "Metadata_Time"]
    conditions = [c for c in conditions if c in enrichment.columns]

    fig = draw.ks_histograms(enrichment)
    compare = (
        enrichment.groupby(["Metadata_Model", "Metadata_Phenotype"], sort=True)
        .agg(
            n=("median_ks_d", "size"),
            median_ks_d=("median_ks_d", "median"),
            n_enriched=("enriched", "sum"),
        )
        .reset_index()
    )
    caption = (
        "Per-treatment median KS D for the final and the shuffled-baseline model "
        "(table: per model and phenotype, median and number enriched)."
    )
    histograms = figures.save(fig, "jump_final_vs_shuffled", compare, caption)
    heatmaps = _jump_heatmaps(enrichment, conditions, label, figures)

    top_hits = run.jump.get("enrichment_top", pd.DataFrame())
    columns = ["Metadata_Model", *conditions, "Metadata_Phenotype", "rank", label, treatment_key]
    columns += ["n_wells", "median_ks_d", "median_shift", "combined_p", "q"]
    columns = list(dict.fromkeys(c for c in columns if c in top_hits.columns))
    return {
        "state": "done",
        "summary": {key: summary.get(key, "?") for key in keys},
        "histograms": histograms,
        "compare": _html_table(compare, rows=200),
        "heatmaps": heatmaps,
        "top_hits": _html_table(top_hits[columns], rows=200) if len(top_hits) else None,
    }


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _nested_json(value: Any) -> Any:
    """A parameter value as the page shows it: lists and mappings as JSON."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("morphotype", "templates/report"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["nested_json"] = _nested_json
    return environment


def write_report(outdir: str | os.PathLike, *, report_dir: str | os.PathLike | None = None) -> Path:
    """Write the study report of a run: ``<report_dir>/index.html`` and ``<report_dir>/figures/``.

    Parameters
    ----------
    outdir
        The run's output folder (``features/``, ``models/``, ``evaluation/``, ``pipeline_info/``,
        optionally ``jump/summary/``).
    report_dir
        Where to write; default ``outdir/report``.

    Returns
    -------
    Path
        The written ``index.html``: self-contained (figures embedded as base64 PNG, no scripts).
        Each figure is also saved as ``figures/<name>.png`` and ``.svg`` with the table it was
        drawn from as ``figures/<name>.csv``.
    """
    started = time.perf_counter()
    run = read_run_outputs(outdir)
    report_dir = Path(report_dir) if report_dir is not None else Path(outdir) / "report"
    for folder in (report_dir, report_dir / "figures"):  # what a killed report left
        remove_stale_temporaries(folder)
    figures = FigureWriter(report_dir / "figures")
    from tqdm import tqdm

    page = {
        "nav": ("run", "data", "models", "loio", "silhouette", "jump"),
        "run": _run_part(run),
        "data": _data_part(run, figures),
        "model_ids": list(run.cards),
        "models_table": _html_table(run.tables["models"], rows=500),
        "loio": _loio_part(run, figures),
        "models": [
            _model_part(model_id, card, run, figures)
            for model_id, card in tqdm(
                run.cards.items(), desc="report: models", unit="model", disable=None
            )
        ],
    }
    page["silhouette"], page["feature_spaces"] = _feature_space_parts(run, figures)
    page["jump"] = _jump_part(run, figures)
    html = _templates().get_template("index.html.j2").render(page)
    path = report_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info(
        "report: %s (%d figures, %.1f s)", path, len(figures.names), time.perf_counter() - started
    )
    return path
