"""The study report: every figure of a run in one self-contained HTML page.

:func:`write_report` reads a run's output folder (as written by ``morphotype run``:
``features/``, ``models/<model_id>/``, ``evaluation/``, ``pipeline_info/`` and, when the JUMP
arm ran, ``jump/summary/``) and writes ``report/index.html`` with every figure embedded as a
base64 PNG (no scripts, no external resources), plus ``report/figures/<name>.{png,svg,csv}``:
each figure as PNG and SVG and the table behind it as CSV. Anything absent (no LOIO, no JUMP,
no UMAP) is stated in its section rather than failing.

Section ids are stable: ``run``, ``data``, ``models``, ``model-<model_id>``,
``feature-space-<space>``, ``silhouette``, ``loio``, ``jump``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphotype.io import MorphotypeInputError, atomic_path, read_table, remove_stale_temporaries
from morphotype.training import check_results_consistent

log = logging.getLogger(__name__)

PHENOTYPE = "Metadata_Phenotype"
IMAGE_ID = "Metadata_ImageID"
LOIO_PASS_RANK = 2  # the study's criterion: mean rank of the true class < 2
TOP_COEFFICIENTS = 20  # features shown per coefficient heatmap
JUMP_TOP_TREATMENTS = 40  # treatments (columns) shown per KS D heatmap
TABLE_ROWS = 50  # rows shown per HTML table (the full table is in the CSV)
SPLIT_SHOWN = "test"  # the held-out split is the one the figures show


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _read_optional(path: Path) -> pd.DataFrame:
    """A table, or an empty frame when the file is absent or was written empty."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return read_table(path)


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MorphotypeInputError(f"{path}: not valid JSON ({error})") from error


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MorphotypeInputError(f"{path}: not valid YAML ({error})") from error


@dataclass
class RunOutputs:
    """Everything the report draws from, read once from the run's output folder."""

    outdir: Path
    cards: dict[str, dict]
    tables: dict[str, pd.DataFrame]
    phenotypes: pd.Series | None
    features_path: Path | None
    params: Any
    versions: Any
    evaluation_summary: Any
    jump: dict[str, pd.DataFrame] = field(default_factory=dict)
    jump_summary: Any = None


EVALUATION_TABLES = ("models.csv", "f1_scores.csv", "loio_summary.csv", "pr_curves.csv", "confusion_matrices.csv",
                     "silhouette.csv", "umap.parquet", "coefficients.csv", "cell_splits.csv")
JUMP_TABLES = ("enrichment.parquet", "enrichment_top.csv", "ks_wells.parquet", "profiles.parquet")


def read_run_outputs(outdir: str | os.PathLike) -> RunOutputs:
    """Read the parts of a run's output folder the report uses (absent parts stay empty)."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise MorphotypeInputError(f"{outdir}: not a folder; expected a morphotype run's output folder")
    check_results_consistent(outdir)
    cards = {}
    for card_path in sorted((outdir / "models").glob("*/model_card.json")):
        card = _read_json(card_path)
        if not isinstance(card, dict) or "model_id" not in card or "classes" not in card:
            raise MorphotypeInputError(f"{card_path}: not a morphotype model card (no model_id/classes)")
        cards[card["model_id"]] = card
    evaluation = outdir / "evaluation"
    tables = {name.split(".")[0]: _read_optional(evaluation / name) for name in EVALUATION_TABLES}
    features_path = outdir / "features" / "single_cells.parquet"
    phenotypes = None
    if features_path.exists():
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(features_path)
            if PHENOTYPE in schema.schema_arrow.names:
                phenotypes = pd.read_parquet(features_path, columns=[PHENOTYPE])[PHENOTYPE]
            else:  # a table of unlabelled cells (controls, another screen)
                phenotypes = pd.Series([None] * schema.metadata.num_rows, name=PHENOTYPE, dtype=object)
        except Exception as error:  # pyarrow raises several types for a bad file
            raise MorphotypeInputError(f"{features_path}: cannot read column {PHENOTYPE} ({error})") from error
    else:
        features_path = None
    jump_dir = outdir / "jump" / "summary"
    jump = {name.split(".")[0]: _read_optional(jump_dir / name) for name in JUMP_TABLES} if jump_dir.is_dir() else {}
    return RunOutputs(outdir, cards, tables, phenotypes, features_path,
                      _read_yaml(outdir / "pipeline_info" / "params.yaml"),
                      _read_json(outdir / "pipeline_info" / "versions.json"),
                      _read_json(evaluation / "summary.json"), jump, _read_json(jump_dir / "summary.json"))


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


class FigureWriter:
    """Saves each figure as PNG + SVG with its table as CSV, and returns HTML embedding the PNG."""

    def __init__(self, figures_dir: Path):
        self.figures_dir = figures_dir
        self.names: list[str] = []
        self.seconds: dict[str, float] = {}  # render time per figure, for the log and benchmarks
        figures_dir.mkdir(parents=True, exist_ok=True)

    def save(self, fig, name: str, table: pd.DataFrame, caption: str) -> str:
        started = time.perf_counter()
        name = _safe_name(name)
        if name in self.names:
            raise ValueError(f"figure name {name!r} used twice in the report")
        self.names.append(name)
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        # the tight box is measured once and reused for PNG and SVG (it costs a full draw each time)
        bbox = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer()).padded(0.1)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches=bbox, metadata={"Software": None})
        png = buffer.getvalue()
        with atomic_path(self.figures_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
        with atomic_path(self.figures_dir / f"{name}.svg") as tmp:
            fig.savefig(tmp, format="svg", bbox_inches=bbox, metadata={"Date": None, "Creator": None})
        with atomic_path(self.figures_dir / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        self.seconds[name] = time.perf_counter() - started
        encoded = base64.b64encode(png).decode("ascii")
        return (f'<figure id="fig-{name}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
                f'<figcaption>{html.escape(caption)} <span class="files">figures/{name}.png · .svg · '
                f'data: figures/{name}.csv</span></figcaption></figure>\n')


def _figure(width: float, height: float):
    # Figure objects (not pyplot): no global state, no GUI backend, rendered by Agg on save
    from matplotlib.figure import Figure

    # no layout engine: savefig(bbox_inches="tight") fits the labels; constrained layout doubled the cost
    return Figure(figsize=(width, height))


def _bar_chart(table: pd.DataFrame, category: str, series: str, value: str, *, title: str, ylabel: str,
               ylim: tuple[float, float] | None = None):
    pivot = table.pivot_table(index=category, columns=series, values=value, aggfunc="first", sort=True)
    fig = _figure(max(6.0, 0.45 * len(pivot) + 2), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(pivot))
    width = 0.8 / max(1, pivot.shape[1])
    for j, column in enumerate(pivot.columns):
        ax.bar(x + (j - (pivot.shape[1] - 1) / 2) * width, pivot[column].to_numpy(dtype=float), width,
               label=str(column))
    ax.set_xticks(x, [str(i) for i in pivot.index], rotation=60, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    if pivot.shape[1] > 1:
        ax.legend(fontsize=8)
    return fig


def _heatmap(matrix: pd.DataFrame, *, title: str, cbar: str, cmap: str = "viridis", center: bool = False,
             annotate: str | None = None, vmin: float | None = None, vmax: float | None = None):
    values = matrix.to_numpy(dtype=float)
    fig = _figure(max(5.0, 0.32 * matrix.shape[1] + 3), max(2.5, 0.3 * matrix.shape[0] + 1.8))
    ax = fig.add_subplot()
    if center:
        bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        vmin, vmax = -(bound or 1.0), bound or 1.0
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7)
    if annotate and matrix.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, format(v, annotate), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(image, ax=ax, label=cbar)
    ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# HTML helpers
# --------------------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value))


def _note(text: str) -> str:
    return f'<p class="missing">{_esc(text)}</p>\n'


def _html_table(table: pd.DataFrame, *, rows: int = TABLE_ROWS) -> str:
    if table is None or not len(table):
        return _note("(empty table)")
    shown = table.head(rows)
    more = f"<p>Showing {rows} of {len(table)} rows.</p>" if len(table) > rows else ""
    return ('<div class="scroll">' + shown.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}",
                                                  na_rep="", border=0, classes="table") + "</div>" + more + "\n")


def _key_values(mapping: Any) -> str:
    if not mapping:
        return _note("not recorded")
    if not isinstance(mapping, dict):
        return f"<pre>{_esc(mapping)}</pre>\n"
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v) if isinstance(v, (dict, list)) else v)}</td></tr>"
                   for k, v in mapping.items())
    return f'<table class="table kv">{rows}</table>\n'


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


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def _run_section(run: RunOutputs) -> str:
    parts = ['<section id="run"><h2>Run parameters and software</h2>\n', f"<p>Output folder: <code>{_esc(run.outdir)}</code></p>"]
    parts.append("<h3>Parameters (pipeline_info/params.yaml)</h3>" + _key_values(run.params))
    parts.append("<h3>Software versions (pipeline_info/versions.json)</h3>" + _key_values(run.versions))
    settings = (run.evaluation_summary or {}).get("settings")
    parts.append("<h3>Training settings (evaluation/summary.json)</h3>" + _key_values(settings))
    skipped = (run.evaluation_summary or {}).get("skipped_feature_spaces")
    if skipped:
        parts.append("<h3>Skipped feature spaces</h3>" + _key_values(skipped))
    return "".join(parts) + "</section>\n"


def _data_section(run: RunOutputs, figures: FigureWriter) -> str:
    parts = ['<section id="data"><h2>Data provenance</h2>\n']
    if run.phenotypes is None:
        parts.append(_note("No features/single_cells.parquet in this output folder: data provenance unknown."))
        return "".join(parts) + "</section>\n"
    params = run.params if isinstance(run.params, dict) else {}
    source = params.get("mitocheck_crops") or params.get("input") or (
        f"IDR plates {params['idr_plates']}" if params.get("idr_plates") else None)
    labelled = run.phenotypes.dropna()
    parts.append(f"<p>Single-cell table: <code>{_esc(run.features_path)}</code>; {len(run.phenotypes)} cells, "
                 f"{len(labelled)} labelled, {run.phenotypes.isna().sum()} unlabelled. "
                 f"Input: <code>{_esc(source)}</code>.</p>\n")
    if len(labelled):
        counts = labelled.value_counts().rename_axis("phenotype").reset_index(name="n_cells").sort_values("phenotype")
        fig = _bar_chart(counts.assign(series="cells"), "phenotype", "series", "n_cells",
                         title="Labelled cells per phenotype (single-cell table)", ylabel="cells")
        parts.append(figures.save(fig, "data_class_counts", counts, "Labelled cells per phenotype in the single-cell table."))
    return "".join(parts) + "</section>\n"


def _models_overview(run: RunOutputs, figures: FigureWriter) -> str:
    parts = ['<section id="models"><h2>Models</h2>\n']
    if not run.cards:
        parts.append(_note("No trained models (models/<model_id>/model_card.json) in this output folder."))
        return "".join(parts) + "</section>\n"
    links = " · ".join(f'<a href="#model-{_esc(m)}">{_esc(m)}</a>' for m in run.cards)
    parts.append(f"<p>{len(run.cards)} models: {links}</p>\n")
    parts.append(_html_table(run.tables["models"], rows=500))
    return "".join(parts) + "</section>\n"


def _loio_overview(run: RunOutputs, figures: FigureWriter) -> str:
    parts = ['<section id="loio"><h2>Leave-one-image-out (LOIO)</h2>\n']
    summary = run.tables["loio_summary"]
    if not len(summary):
        parts.append(_note("LOIO was not run (evaluation/loio_summary.csv is absent or empty)."))
        return "".join(parts) + "</section>\n"
    fractions = (summary.groupby("model_id", sort=True)["mean_rank"]
                 .agg(groups="size", passed=lambda r: int((r < LOIO_PASS_RANK).sum())).reset_index())
    fractions["pass_fraction"] = fractions["passed"] / fractions["groups"]
    fig = _bar_chart(fractions.assign(series="pass fraction"), "model_id", "series", "pass_fraction",
                     title=f"LOIO: fraction of image × phenotype groups with mean rank < {LOIO_PASS_RANK}",
                     ylabel="fraction passed", ylim=(0, 1))
    parts.append(figures.save(fig, "loio_pass_fraction", fractions,
                              "The study's LOIO metric per model: fraction of image × phenotype groups whose "
                              f"true class has mean rank < {LOIO_PASS_RANK}."))
    return "".join(parts) + "</section>\n"


def _model_section(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter) -> str:
    t = run.tables
    classes = [card["positive_class"]] if card.get("model_type") == "binary" else list(card["classes"])
    hyper = card.get("hyperparameters", {})
    cv = card.get("cross_validation") or {}
    score = cv.get("score")
    score = f"{score:.4f}" if isinstance(score, (int, float)) else score
    parts = [f'<section id="model-{_esc(model_id)}" class="model"><h2>Model {_esc(model_id)}</h2>\n',
             f"<p>Type: {_esc(card.get('model_type'))}; feature space "
             f'<a href="#feature-space-{_esc(card.get("feature_space"))}">{_esc(card.get("feature_space"))}</a> '
             f"({len(card.get('features', []))} features, {card.get('n_nonzero_coefficients')} non-zero coefficients); "
             f"C = {_esc(hyper.get('C'))}, l1_ratio = {_esc(hyper.get('l1_ratio'))}, class weight = "
             f"{_esc(hyper.get('class_weight'))}; shuffled baseline: {_esc(card.get('shuffled'))}; "
             f"CV weighted F1 = {_esc(score)}; converged: {_esc((card.get('training') or {}).get('converged'))}.</p>\n"]
    prefix = f"model_{model_id}"
    if card.get("model_type") == "binary":
        return "".join(parts) + _binary_figure(model_id, card, run, figures) + "</section>\n"

    # class counts: training cells from the card, per split from the F1 table
    f1 = _rows(t["f1_scores"], model_id=model_id)
    counts = pd.DataFrame()
    if len(f1):
        counts = f1[f1["phenotype"] != "weighted"][["split", "phenotype", "n_cells"]]
    elif (card.get("training") or {}).get("class_counts"):
        counts = pd.DataFrame([{"split": "train", "phenotype": k, "n_cells": v}
                               for k, v in card["training"]["class_counts"].items()])
    if len(counts):
        fig = _bar_chart(counts, "phenotype", "split", "n_cells", title=f"{model_id}: cells per class", ylabel="cells")
        parts.append(figures.save(fig, f"{prefix}_class_counts", counts, "Cells per class in each split."))
    else:
        parts.append(_note("No class counts recorded for this model."))

    # F1 per class against the shuffled baseline (or the final model, for a baseline)
    other = _counterpart(model_id)
    f1_both = _rows(t["f1_scores"], split=SPLIT_SHOWN)
    if len(f1_both):
        f1_both = f1_both[f1_both["model_id"].isin([model_id, other])]
        f1_both = f1_both.assign(model=np.where(f1_both["model_id"] == model_id,
                                                np.where(f1_both["shuffled"].astype(bool), "this model (shuffled)",
                                                         "this model (final)"),
                                                np.where(f1_both["shuffled"].astype(bool), "shuffled baseline",
                                                         "final model")))
        fig = _bar_chart(f1_both, "phenotype", "model", "f1", title=f"{model_id}: test-set F1 per class",
                         ylabel="F1", ylim=(0, 1))
        note = "" if other in set(f1_both["model_id"]) else " (no counterpart model was trained)"
        parts.append(figures.save(fig, f"{prefix}_f1", f1_both[["model_id", "shuffled", "split", "phenotype", "f1", "n_cells"]],
                                  f"Test-set F1 per class and weighted, with the counterpart {other}{note}."))
    else:
        parts.append(_note("No F1 scores (evaluation/f1_scores.csv) for this model."))

    # confusion matrices
    confusion = _rows(t["confusion_matrices"], model_id=model_id, split=SPLIT_SHOWN)
    if len(confusion):
        order = list(card["classes"])
        counts_m = confusion.pivot_table(index="true_phenotype", columns="predicted_phenotype", values="count",
                                         aggfunc="sum").reindex(index=order, columns=order).fillna(0)
        normalised = counts_m.div(counts_m.sum(axis=1).replace(0, np.nan), axis=0)
        fig = _figure(max(9.0, 0.6 * len(order) + 5), max(4.0, 0.3 * len(order) + 2))
        fig.subplots_adjust(wspace=0.45)
        for k, (matrix, label, fmt) in enumerate([(counts_m, "cells", ".0f"), (normalised, "fraction of true class", ".2f")]):
            ax = fig.add_subplot(1, 2, k + 1)
            image = ax.imshow(matrix.to_numpy(dtype=float), cmap="Blues", interpolation="nearest",
                              vmin=0, vmax=None if k == 0 else 1)
            ax.set_xticks(range(len(order)), order, rotation=70, ha="right", fontsize=7)
            ax.set_yticks(range(len(order)), order, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title("counts" if k == 0 else "row-normalised", fontsize=9)
            if len(order) <= 4:  # annotating 15 x 15 cells dominated the render time; values are in the CSV
                for (i, j), v in np.ndenumerate(matrix.to_numpy(dtype=float)):
                    if np.isfinite(v) and v > 0:
                        ax.text(j, i, format(v, fmt).lstrip("0") if k else format(v, fmt), ha="center",
                                va="center", fontsize=5)
            fig.colorbar(image, ax=ax, label=label, shrink=0.8)
        table = confusion[["split", "true_phenotype", "predicted_phenotype", "count"]].copy()
        table["row_fraction"] = table["count"] / table.groupby("true_phenotype")["count"].transform("sum").replace(0, np.nan)
        parts.append(figures.save(fig, f"{prefix}_confusion", table,
                                  "Test-set confusion matrix: counts and normalised by true class."))
    else:
        parts.append(_note("No confusion matrix (evaluation/confusion_matrices.csv) for this model."))

    # precision-recall curves
    pr = _rows(t["pr_curves"], model_id=model_id, split=SPLIT_SHOWN)
    if len(pr):
        fig = _figure(7.5, 5.0)
        ax = fig.add_subplot()
        colours = _colours(sorted(pr["phenotype"].unique()))
        for phenotype, curve in pr.groupby("phenotype", sort=True):
            ax.plot(curve["recall"], curve["precision"], lw=1, color=colours[phenotype],
                    label=f"{phenotype} (AP {curve['average_precision'].iloc[0]:.2f})", drawstyle="steps-post")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model_id}: test-set precision-recall (one vs rest)", fontsize=9)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        parts.append(figures.save(fig, f"{prefix}_pr", pr[["split", "phenotype", "precision", "recall", "threshold",
                                                           "average_precision"]],
                                  "Test-set precision-recall curve per class with average precision (AP)."))
    else:
        parts.append(_note("No precision-recall curves (evaluation/pr_curves.csv) for this model."))

    # LOIO
    loio = _rows(t["loio_summary"], model_id=model_id)
    if len(loio):
        order = sorted(loio[PHENOTYPE].unique())
        per_class = (loio.groupby(PHENOTYPE, sort=True)["mean_rank"]
                     .agg(groups="size", passed=lambda r: int((r < LOIO_PASS_RANK).sum())).reset_index())
        per_class["pass_fraction"] = per_class["passed"] / per_class["groups"]
        total = float((loio["mean_rank"] < LOIO_PASS_RANK).mean())
        fig = _figure(max(7.0, 0.45 * len(order) + 2), 5.5)
        ax, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
        data = [loio.loc[loio[PHENOTYPE] == p, "mean_rank"].to_numpy(dtype=float) for p in order]
        ax.boxplot(data, showfliers=False)
        rng = np.random.default_rng(0)  # jitter only: fixed so the figure is reproducible
        for i, values in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.2, 0.2, len(values)), values, s=6, alpha=0.6, color="k")
        ax.axhline(LOIO_PASS_RANK, color="r", lw=0.8, ls="--")
        ax.set_xticks(range(1, len(order) + 1), [""] * len(order))
        ax.set_ylabel("mean rank of true class\n(per image × phenotype)", fontsize=8)
        ax.set_title(f"{model_id}: LOIO — {total:.1%} of {len(loio)} image × phenotype groups "
                     f"have mean rank < {LOIO_PASS_RANK}", fontsize=9)
        ax2.bar(range(1, len(order) + 1), per_class["pass_fraction"])
        ax2.set_xticks(range(1, len(order) + 1), order, rotation=60, ha="right", fontsize=7)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("fraction passed", fontsize=8)
        parts.append(figures.save(fig, f"{prefix}_loio", loio,
                                  f"LOIO: distribution of the true class's mean rank per image × phenotype group "
                                  f"(top) and the fraction of groups with mean rank < {LOIO_PASS_RANK} (bottom); "
                                  f"overall {total:.3f}."))
        parts.append(_html_table(per_class))
    else:
        parts.append(_note("LOIO was not run for this model."))

    # top coefficients
    coefficients = _rows(t["coefficients"], model_id=model_id)
    if len(coefficients):
        matrix = coefficients.pivot_table(index="phenotype", columns="feature", values="coefficient", aggfunc="first")
        matrix = matrix.reindex(index=[c for c in classes if c in matrix.index])
        top = matrix.abs().max(axis=0).sort_values(ascending=False, kind="stable").head(TOP_COEFFICIENTS).index
        shown = matrix[top]
        shown.columns = [c.replace("Nuclei_", "") for c in shown.columns]
        fig = _heatmap(shown, title=f"{model_id}: top {len(top)} coefficients (largest |coefficient| over classes)",
                       cbar="coefficient (z-scored features)", cmap="RdBu_r", center=True)
        parts.append(figures.save(fig, f"{prefix}_coefficients", matrix[top].reset_index().melt(
            id_vars="phenotype", var_name="feature", value_name="coefficient"),
            f"Top {len(top)} coefficients per class (features ranked by their largest absolute coefficient)."))
    else:
        parts.append(_note("No coefficients (evaluation/coefficients.csv) for this model."))
    return "".join(parts) + "</section>\n"


def _binary_figure(model_id: str, card: dict, run: RunOutputs, figures: FigureWriter) -> str:
    """One four-panel figure per one-vs-rest model (the study trains dozens of them): F1 against
    the counterpart, row-normalised confusion, precision-recall and the top coefficients."""
    t = run.tables
    other = _counterpart(model_id)
    positive = card["positive_class"]
    frames = []
    fig = _figure(14.0, 3.4)
    fig.subplots_adjust(wspace=0.9)
    ax = fig.add_subplot(1, 4, 1)
    f1 = _rows(t["f1_scores"], split=SPLIT_SHOWN)
    if len(f1):
        f1 = f1[f1["model_id"].isin([model_id, other])].sort_values(["shuffled", "phenotype"])
        labels = [f"{'shuffled' if s else 'final'}\n{p}" for s, p in zip(f1["shuffled"].astype(bool), f1["phenotype"])]
        ax.bar(range(len(f1)), f1["f1"], color=["tab:grey" if s else "tab:blue" for s in f1["shuffled"].astype(bool)])
        ax.set_xticks(range(len(f1)), labels, fontsize=6)
        frames.append(f1[["model_id", "split", "phenotype", "f1", "n_cells"]].assign(panel="f1"))
    ax.set_ylim(0, 1)
    ax.set_title("test F1 (final vs shuffled)", fontsize=8)
    ax = fig.add_subplot(1, 4, 2)
    confusion = _rows(t["confusion_matrices"], model_id=model_id, split=SPLIT_SHOWN)
    if len(confusion):
        order = list(card["classes"])
        counts = confusion.pivot_table(index="true_phenotype", columns="predicted_phenotype", values="count",
                                       aggfunc="sum").reindex(index=order, columns=order).fillna(0)
        fraction = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)
        ax.imshow(fraction.to_numpy(dtype=float), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(counts.to_numpy()):
            ax.text(j, i, f"{int(v)}\n{fraction.iloc[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(2), order, fontsize=7)
        ax.set_yticks(range(2), order, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        frames.append(confusion[["split", "true_phenotype", "predicted_phenotype", "count"]].assign(panel="confusion"))
    ax.set_title("test confusion (count, row fraction)", fontsize=8)
    ax = fig.add_subplot(1, 4, 3)
    pr = _rows(t["pr_curves"], model_id=model_id, split=SPLIT_SHOWN)
    if len(pr):
        ax.plot(pr["recall"], pr["precision"], drawstyle="steps-post")
        ax.set_title(f"PR {positive} (AP {pr['average_precision'].iloc[0]:.2f})", fontsize=8)
        frames.append(pr[["split", "phenotype", "precision", "recall", "threshold", "average_precision"]].assign(panel="pr"))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall", fontsize=7)
    ax = fig.add_subplot(1, 4, 4)
    coefficients = _rows(t["coefficients"], model_id=model_id)
    if len(coefficients):
        top = coefficients.reindex(coefficients["coefficient"].abs().sort_values(ascending=False, kind="stable").index)
        top = top.head(10).iloc[::-1]
        ax.barh(range(len(top)), top["coefficient"], color=np.where(top["coefficient"] > 0, "tab:red", "tab:blue"))
        ax.set_yticks(range(len(top)), [f.replace("Nuclei_", "") for f in top["feature"]], fontsize=6)
        frames.append(top[["phenotype", "feature", "coefficient"]].iloc[::-1].assign(panel="coefficients"))
    ax.set_title("top 10 coefficients", fontsize=8)
    if not frames:
        return _note("No evaluation tables for this model.")
    table = pd.concat(frames, ignore_index=True)
    return figures.save(fig, f"model_{model_id}", table,
                        f"One-vs-rest model for {positive}: test-set F1 against the counterpart {other}, "
                        "confusion matrix, precision-recall curve and the 10 largest coefficients "
                        "(the CSV's 'panel' column names the panel).")


def _colours(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {name: cmap(i % 20) for i, name in enumerate(names)}


def _feature_space_sections(run: RunOutputs, figures: FigureWriter) -> str:
    t = run.tables
    parts = ['<section id="silhouette"><h2>Silhouette per phenotype and feature space</h2>\n']
    silhouette = t["silhouette"]
    if len(silhouette):
        matrix = silhouette.pivot_table(index="phenotype", columns="feature_space", values="silhouette", aggfunc="first")
        fig = _heatmap(matrix, title="Silhouette of {phenotype, other} on principal components", cbar="silhouette",
                       cmap="RdBu_r", center=True, annotate=".2f")
        parts.append(figures.save(fig, "silhouette", silhouette,
                                  "Silhouette score of each phenotype against all other cells, per feature space."))
    else:
        parts.append(_note("Silhouette scores were not computed (evaluation/silhouette.csv is absent or empty)."))
    parts.append("</section>\n")

    umap = t["umap"]
    spaces = sorted({c.get("feature_space") for c in run.cards.values()} |
                    (set(umap["feature_space"]) if len(umap) else set()) |
                    (set(silhouette["feature_space"]) if len(silhouette) else set()))
    for space in spaces:
        parts.append(f'<section id="feature-space-{_esc(space)}"><h2>Feature space {_esc(space)}</h2>\n')
        models = [m for m, c in run.cards.items() if c.get("feature_space") == space]
        parts.append("<p>Models: " + (" · ".join(f'<a href="#model-{_esc(m)}">{_esc(m)}</a>' for m in models) or "none")
                     + "</p>\n")
        embedding = _rows(umap, feature_space=space)
        if len(embedding):
            fig = _figure(8.0, 6.0)
            ax = fig.add_subplot()
            order = sorted(embedding[PHENOTYPE].astype(str).unique())
            colours = _colours(order)
            for phenotype in order:
                cells = embedding[embedding[PHENOTYPE].astype(str) == phenotype]
                ax.scatter(cells["umap_0"], cells["umap_1"], s=4, color=colours[phenotype], label=phenotype,
                           rasterized=True, linewidths=0)
            ax.set_xlabel("UMAP 1")
            ax.set_ylabel("UMAP 2")
            ax.set_title(f"UMAP of {space} features ({len(embedding)} labelled cells)", fontsize=9)
            ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.01, 0.5))
            parts.append(figures.save(fig, f"umap_{space}", embedding, f"UMAP of the {space} features, coloured by phenotype."))
        else:
            parts.append(_note(f"No UMAP embedding for {space} (evaluation/umap.parquet has none)."))
        rows = _rows(silhouette, feature_space=space)
        if len(rows):
            fig = _bar_chart(rows.assign(series=space), "phenotype", "series", "silhouette",
                             title=f"Silhouette per phenotype ({space})", ylabel="silhouette")
            parts.append(figures.save(fig, f"silhouette_{space}", rows, f"Silhouette per phenotype for {space}."))
        parts.append("</section>\n")
    return "".join(parts)


def _jump_section(run: RunOutputs, figures: FigureWriter) -> str:
    parts = ['<section id="jump"><h2>JUMP Cell Painting pilot</h2>\n']
    enrichment = run.jump.get("enrichment", pd.DataFrame())
    if not run.jump:
        parts.append(_note("The JUMP arm was not run (no jump/summary/ in this output folder)."))
        return "".join(parts) + "</section>\n"
    if not len(enrichment):
        parts.append(_note("jump/summary/enrichment.parquet is absent or empty: no JUMP figures."))
        return "".join(parts) + "</section>\n"
    summary = run.jump_summary or {}
    parts.append(f"<p>Plates: {_esc(summary.get('n_plates', '?'))}; cells scored: {_esc(summary.get('n_cells_scored', '?'))}; "
                 f"wells tested: {_esc(summary.get('n_wells_tested', '?'))}; enriched = q &lt; {_esc(summary.get('alpha', '?'))} "
                 f"and median shift ≥ {_esc(summary.get('min_shift', '?'))}; p combination: "
                 f"{_esc(summary.get('p_combination', '?'))}.</p>\n")
    treatment_key = summary.get("treatment_key", "Metadata_broad_sample")
    if treatment_key not in enrichment.columns:
        treatment_key = "Metadata_broad_sample" if "Metadata_broad_sample" in enrichment.columns else "Metadata_Treatment"
    label = "Metadata_Treatment" if "Metadata_Treatment" in enrichment.columns else treatment_key
    conditions = [c for c in ["Metadata_Perturbation", "Metadata_CellType", "Metadata_Time"] if c in enrichment.columns]

    # final vs shuffled: distribution of per-treatment median KS D
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    models = sorted(enrichment["Metadata_Model"].astype(str).unique())
    for model in models:
        values = enrichment.loc[enrichment["Metadata_Model"] == model, "median_ks_d"].dropna().to_numpy(dtype=float)
        ax.hist(values, bins=40, range=(0, 1), alpha=0.6, label=f"{model} (n={len(values)})")
    ax.set_xlabel("median KS D over replicate wells (per treatment × phenotype)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title("Final vs shuffled-baseline model: KS D of treatments against negative controls", fontsize=9)
    compare = (enrichment.groupby(["Metadata_Model", "Metadata_Phenotype"], sort=True)
               .agg(n=("median_ks_d", "size"), median_ks_d=("median_ks_d", "median"),
                    n_enriched=("enriched", "sum")).reset_index())
    parts.append(figures.save(fig, "jump_final_vs_shuffled", compare,
                              "Per-treatment median KS D for the final and the shuffled-baseline model "
                              "(table: per model and phenotype, median and number enriched)."))
    parts.append(_html_table(compare, rows=200))

    # KS D heatmaps per phenotype × treatment
    groups = enrichment.groupby(["Metadata_Model", *conditions], sort=True, dropna=False)
    for key, rows in groups:
        key = key if isinstance(key, tuple) else (key,)
        name = "_".join(str(k) for k in key)
        matrix = rows.pivot_table(index="Metadata_Phenotype", columns=rows[label].astype(str), values="median_ks_d",
                                  aggfunc="max")
        top = matrix.max(axis=0).sort_values(ascending=False, kind="stable").head(JUMP_TOP_TREATMENTS).index
        matrix = matrix[top]
        fig = _heatmap(matrix, title=f"KS D per phenotype × treatment — {' / '.join(map(str, key))} "
                                     f"(top {len(top)} of {rows[label].nunique()} treatments)",
                       cbar="median KS D", cmap="magma", vmin=0, vmax=1)
        parts.append(figures.save(fig, f"jump_ks_{name}", rows[rows[label].astype(str).isin(top)],
                                  f"Median KS D over replicate wells per phenotype and treatment ({', '.join(map(str, key))}); "
                                  f"the {len(top)} treatments with the largest D."))

    # top hits
    top_hits = run.jump.get("enrichment_top", pd.DataFrame())
    parts.append("<h3>Top enriched treatments (jump/summary/enrichment_top.csv)</h3>\n")
    if len(top_hits):
        columns = [c for c in ["Metadata_Model", *conditions, "Metadata_Phenotype", "rank", label, treatment_key,
                               "n_wells", "median_ks_d", "median_shift", "combined_p", "q"] if c in top_hits.columns]
        parts.append(_html_table(top_hits[list(dict.fromkeys(columns))], rows=200))
    else:
        parts.append(_note("No treatment passed the enrichment criteria."))
    return "".join(parts) + "</section>\n"


STYLE = """
body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}
h2{border-bottom:1px solid #ccc;padding-top:.5em}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#444}
.files{color:#888;font-family:monospace}
.missing{color:#a40;font-style:italic}
table.table{border-collapse:collapse;font-size:.75em;margin:.5em 0}
table.table td,table.table th{border:1px solid #ddd;padding:2px 5px;text-align:left}
nav a{margin-right:.8em}
.scroll{overflow-x:auto;max-width:100%}
p{overflow-wrap:anywhere}
"""


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
    body = [_run_section(run), _data_section(run, figures), _models_overview(run, figures),
            _loio_overview(run, figures)]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = lambda x, **_: x  # noqa: E731
    for model_id, card in tqdm(run.cards.items(), desc="report: models", unit="model", disable=None):
        body.append(_model_section(model_id, card, run, figures))
    body.append(_feature_space_sections(run, figures))
    body.append(_jump_section(run, figures))
    nav = " ".join(f'<a href="#{s}">{s}</a>' for s in ("run", "data", "models", "loio", "silhouette", "jump"))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>morphotype report</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>morphotype report</h1>\n<nav>{nav}</nav>\n"
            + "".join(body) + "</body></html>\n")
    path = report_dir / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("report: %s (%d figures, %.1f s)", path, len(figures.names), time.perf_counter() - started)
    return path
