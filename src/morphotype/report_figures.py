"""The figures of the study report: matplotlib drawings and the writer that saves them.

:mod:`morphotype.report` chooses the rows each figure shows and its caption; this module draws
them (matplotlib ``Figure`` objects, no pyplot state) and :class:`FigureWriter` saves each one as
PNG + SVG with the table behind it as CSV.
"""

from __future__ import annotations

import base64
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphotype.io import atomic_path
from morphotype.report_inputs import PHENOTYPE


def confusion_counts(confusion: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Cells per (true, predicted) phenotype, both in ``order``, from a long confusion table."""
    return (
        confusion.pivot_table(
            index="true_phenotype", columns="predicted_phenotype", values="count", aggfunc="sum"
        )
        .reindex(index=order, columns=order)
        .fillna(0)
    )


def safe_name(text: str) -> str:
    """``text`` reduced to the characters a file name and an HTML id can hold."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


@dataclass(frozen=True)
class SavedFigure:
    """A figure as the report page shows it: file stem, caption and the PNG as base64."""

    name: str
    caption: str
    png_base64: str


class FigureWriter:
    """Saves each figure as PNG + SVG with its table as CSV; returns it for the page to embed."""

    def __init__(self, figures_dir: Path):
        self.figures_dir = figures_dir
        self.names: list[str] = []
        self.seconds: dict[str, float] = {}  # render time per figure, for the log and benchmarks
        figures_dir.mkdir(parents=True, exist_ok=True)

    def save(self, fig, name: str, table: pd.DataFrame, caption: str) -> SavedFigure:
        """Write ``figures/<name>.{png,svg,csv}``; ``name`` must be new to this report."""
        started = time.perf_counter()
        name = safe_name(name)
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
            svg_metadata = {"Date": None, "Creator": None}
            fig.savefig(tmp, format="svg", bbox_inches=bbox, metadata=svg_metadata)
        with atomic_path(self.figures_dir / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False)
        self.seconds[name] = time.perf_counter() - started
        return SavedFigure(name, caption, base64.b64encode(png).decode("ascii"))


# --------------------------------------------------------------------------------------------
# General drawings
# --------------------------------------------------------------------------------------------


def new_figure(width: float, height: float):
    """An empty matplotlib ``Figure`` (not pyplot: no global state, no GUI backend)."""
    from matplotlib.figure import Figure

    # no layout engine: the tight box on save fits the labels; constrained layout doubled the cost
    return Figure(figsize=(width, height))


def colours(names: list[str]) -> dict[str, Any]:
    """One tab20 colour per name, in order."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {name: cmap(i % 20) for i, name in enumerate(names)}


def bar_chart(
    table: pd.DataFrame,
    category: str,
    series: str,
    value: str,
    *,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
):
    """Grouped bars: one group per ``category``, one bar per ``series`` value."""
    pivot = table.pivot_table(
        index=category, columns=series, values=value, aggfunc="first", sort=True
    )
    fig = new_figure(max(6.0, 0.45 * len(pivot) + 2), 3.8)
    ax = fig.add_subplot()
    x = np.arange(len(pivot))
    width = 0.8 / max(1, pivot.shape[1])
    for j, column in enumerate(pivot.columns):
        offset = (j - (pivot.shape[1] - 1) / 2) * width
        ax.bar(x + offset, pivot[column].to_numpy(dtype=float), width, label=str(column))
    ax.set_xticks(x, [str(i) for i in pivot.index], rotation=60, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    if pivot.shape[1] > 1:
        ax.legend(fontsize=8)
    return fig


def heatmap(
    matrix: pd.DataFrame,
    *,
    title: str,
    cbar: str,
    cmap: str = "viridis",
    center: bool = False,
    annotate: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
):
    """``matrix`` as an image with its labels; ``center`` makes the colour scale symmetric."""
    values = matrix.to_numpy(dtype=float)
    fig = new_figure(max(5.0, 0.32 * matrix.shape[1] + 3), max(2.5, 0.3 * matrix.shape[0] + 1.8))
    ax = fig.add_subplot()
    if center:
        bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        vmin, vmax = -(bound or 1.0), bound or 1.0
    image = ax.imshow(
        values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    columns = [str(c) for c in matrix.columns]
    ax.set_xticks(range(matrix.shape[1]), columns, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index], fontsize=7)
    if annotate and matrix.size <= 400:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, format(v, annotate), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(image, ax=ax, label=cbar)
    ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# The study's drawings
# --------------------------------------------------------------------------------------------


def confusion_pair(counts: pd.DataFrame, normalised: pd.DataFrame, order: list[str]):
    """Confusion matrix as counts (left) and normalised by true class (right)."""
    fig = new_figure(max(9.0, 0.6 * len(order) + 5), max(4.0, 0.3 * len(order) + 2))
    fig.subplots_adjust(wspace=0.45)
    panels = [(counts, "cells", ".0f"), (normalised, "fraction of true class", ".2f")]
    for k, (matrix, label, fmt) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        values = matrix.to_numpy(dtype=float)
        vmax = None if k == 0 else 1
        image = ax.imshow(values, cmap="Blues", interpolation="nearest", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(order)), order, rotation=70, ha="right", fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("counts" if k == 0 else "row-normalised", fontsize=9)
        if len(order) <= 4:  # annotating 15 x 15 cells dominated the render time; values in the CSV
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v) and v > 0:
                    text = format(v, fmt).lstrip("0") if k else format(v, fmt)
                    ax.text(j, i, text, ha="center", va="center", fontsize=5)
        fig.colorbar(image, ax=ax, label=label, shrink=0.8)
    return fig


def pr_curves(pr: pd.DataFrame, title: str):
    """One precision-recall curve per phenotype, with its average precision in the legend."""
    fig = new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    palette = colours(sorted(pr["phenotype"].unique()))
    for phenotype, curve in pr.groupby("phenotype", sort=True):
        label = f"{phenotype} (AP {curve['average_precision'].iloc[0]:.2f})"
        ax.plot(curve["recall"], curve["precision"], lw=1, color=palette[phenotype], label=label,
                drawstyle="steps-post")  # fmt: skip
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def loio_ranks(loio: pd.DataFrame, pass_fraction: pd.Series, pass_rank: float, title: str):
    """Mean rank of the true class per phenotype (box + points) over the pass fraction (bars)."""
    order = sorted(loio[PHENOTYPE].unique())
    fig = new_figure(max(7.0, 0.45 * len(order) + 2), 5.5)
    ax, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    data = [loio.loc[loio[PHENOTYPE] == p, "mean_rank"].to_numpy(dtype=float) for p in order]
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)  # jitter only: fixed so the figure is reproducible
    for i, values in enumerate(data):
        ax.scatter(i + 1 + rng.uniform(-0.2, 0.2, len(values)), values, s=6, alpha=0.6, color="k")
    ax.axhline(pass_rank, color="r", lw=0.8, ls="--")
    ax.set_xticks(range(1, len(order) + 1), [""] * len(order))
    ax.set_ylabel("mean rank of true class\n(per image × phenotype)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax2.bar(range(1, len(order) + 1), pass_fraction)
    ax2.set_xticks(range(1, len(order) + 1), order, rotation=60, ha="right", fontsize=7)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("fraction passed", fontsize=8)
    return fig


def _f1_panel(ax, f1: pd.DataFrame, pair: list[str | None]) -> pd.DataFrame | None:
    frame = None
    if len(f1):
        f1 = f1[f1["model_id"].isin(pair)].sort_values(["shuffled", "phenotype"])
        shuffled = f1["shuffled"].astype(bool)
        labels = [
            f"{'shuffled' if s else 'final'}\n{p}"
            for s, p in zip(shuffled, f1["phenotype"], strict=True)
        ]
        ax.bar(range(len(f1)), f1["f1"], color=["tab:grey" if s else "tab:blue" for s in shuffled])
        ax.set_xticks(range(len(f1)), labels, fontsize=6)
        frame = f1[["model_id", "split", "phenotype", "f1", "n_cells"]].assign(panel="f1")
    ax.set_ylim(0, 1)
    ax.set_title("test F1 (final vs shuffled)", fontsize=8)
    return frame


def _confusion_panel(ax, confusion: pd.DataFrame, order: list[str]) -> pd.DataFrame | None:
    frame = None
    if len(confusion):
        counts = confusion_counts(confusion, order)
        fraction = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0)
        ax.imshow(fraction.to_numpy(dtype=float), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(counts.to_numpy()):
            text = f"{int(v)}\n{fraction.iloc[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(2), order, fontsize=7)
        ax.set_yticks(range(2), order, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        columns = ["split", "true_phenotype", "predicted_phenotype", "count"]
        frame = confusion[columns].assign(panel="confusion")
    ax.set_title("test confusion (count, row fraction)", fontsize=8)
    return frame


def _pr_panel(ax, pr: pd.DataFrame, positive: str) -> pd.DataFrame | None:
    frame = None
    if len(pr):
        ax.plot(pr["recall"], pr["precision"], drawstyle="steps-post")
        ax.set_title(f"PR {positive} (AP {pr['average_precision'].iloc[0]:.2f})", fontsize=8)
        columns = ["split", "phenotype", "precision", "recall", "threshold", "average_precision"]
        frame = pr[columns].assign(panel="pr")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall", fontsize=7)
    return frame


def _coefficients_panel(ax, coefficients: pd.DataFrame) -> pd.DataFrame | None:
    frame = None
    if len(coefficients):
        magnitude = coefficients["coefficient"].abs().sort_values(ascending=False, kind="stable")
        top = coefficients.reindex(magnitude.index).head(10).iloc[::-1]
        bar_colours = np.where(top["coefficient"] > 0, "tab:red", "tab:blue")
        ax.barh(range(len(top)), top["coefficient"], color=bar_colours)
        names = [f.replace("Nuclei_", "") for f in top["feature"]]
        ax.set_yticks(range(len(top)), names, fontsize=6)
        columns = ["phenotype", "feature", "coefficient"]
        frame = top[columns].iloc[::-1].assign(panel="coefficients")
    ax.set_title("top 10 coefficients", fontsize=8)
    return frame


def binary_panels(
    f1: pd.DataFrame,
    pair: list[str | None],
    confusion: pd.DataFrame,
    pr: pd.DataFrame,
    coefficients: pd.DataFrame,
    order: list[str],
    positive: str,
):
    """The four panels of a one-vs-rest model: test-set F1 of the models in ``pair`` (the model
    and its counterpart), row-normalised confusion, precision-recall and the top 10 coefficients.

    Returns
    -------
    tuple
        The figure and the table behind it (a ``panel`` column names the panel), or
        ``(figure, None)`` when every input is empty.
    """
    fig = new_figure(14.0, 3.4)
    fig.subplots_adjust(wspace=0.9)
    frames = [
        _f1_panel(fig.add_subplot(1, 4, 1), f1, pair),
        _confusion_panel(fig.add_subplot(1, 4, 2), confusion, order),
        _pr_panel(fig.add_subplot(1, 4, 3), pr, positive),
        _coefficients_panel(fig.add_subplot(1, 4, 4), coefficients),
    ]
    frames = [frame for frame in frames if frame is not None]
    return fig, (pd.concat(frames, ignore_index=True) if frames else None)


def umap_scatter(embedding: pd.DataFrame, space: str):
    """The UMAP embedding of one feature space, coloured by phenotype."""
    fig = new_figure(8.0, 6.0)
    ax = fig.add_subplot()
    order = sorted(embedding[PHENOTYPE].astype(str).unique())
    palette = colours(order)
    for phenotype in order:
        cells = embedding[embedding[PHENOTYPE].astype(str) == phenotype]
        ax.scatter(cells["umap_0"], cells["umap_1"], s=4, color=palette[phenotype], label=phenotype,
                   rasterized=True, linewidths=0)  # fmt: skip
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(f"UMAP of {space} features ({len(embedding)} labelled cells)", fontsize=9)
    ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def ks_histograms(enrichment: pd.DataFrame):
    """Per-treatment median KS D of each JUMP model (final, shuffled) as overlaid histograms."""
    fig = new_figure(7.0, 4.0)
    ax = fig.add_subplot()
    for model in sorted(enrichment["Metadata_Model"].astype(str).unique()):
        rows = enrichment["Metadata_Model"] == model
        values = enrichment.loc[rows, "median_ks_d"].dropna().to_numpy(dtype=float)
        ax.hist(values, bins=40, range=(0, 1), alpha=0.6, label=f"{model} (n={len(values)})")
    ax.set_xlabel("median KS D over replicate wells (per treatment × phenotype)")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    title = "Final vs shuffled-baseline model: KS D of treatments against negative controls"
    ax.set_title(title, fontsize=9)
    return fig
