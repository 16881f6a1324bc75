"""The inputs of the study report: the parts of a run's output folder it draws from.

:func:`read_run_outputs` reads ``features/single_cells.parquet`` (phenotype column only), the
model cards, the evaluation tables, ``pipeline_info/`` and, when the JUMP arm ran,
``jump/summary/``; absent parts stay empty so that :mod:`morphotype.report` can state them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from morphotype.io import MorphotypeInputError, read_table
from morphotype.training import check_results_consistent

PHENOTYPE = "Metadata_Phenotype"


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


EVALUATION_TABLES = (
    "models.csv",
    "f1_scores.csv",
    "loio_summary.csv",
    "pr_curves.csv",
    "confusion_matrices.csv",
    "silhouette.csv",
    "umap.parquet",
    "coefficients.csv",
    "cell_splits.csv",
)
JUMP_TABLES = ("enrichment.parquet", "enrichment_top.csv", "ks_wells.parquet", "profiles.parquet")


def read_run_outputs(outdir: str | os.PathLike) -> RunOutputs:
    """Read the parts of a run's output folder the report uses (absent parts stay empty)."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise MorphotypeInputError(
            f"{outdir}: not a folder; expected a morphotype run's output folder"
        )
    check_results_consistent(outdir)
    cards = {}
    for card_path in sorted((outdir / "models").glob("*/model_card.json")):
        card = _read_json(card_path)
        if not isinstance(card, dict) or "model_id" not in card or "classes" not in card:
            raise MorphotypeInputError(
                f"{card_path}: not a morphotype model card (no model_id/classes)"
            )
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
                phenotypes = pd.Series(
                    [None] * schema.metadata.num_rows, name=PHENOTYPE, dtype=object
                )
        except Exception as error:  # pyarrow raises several types for a bad file
            raise MorphotypeInputError(
                f"{features_path}: cannot read column {PHENOTYPE} ({error})"
            ) from error
    else:
        features_path = None
    jump_dir = outdir / "jump" / "summary"
    jump = (
        {name.split(".")[0]: _read_optional(jump_dir / name) for name in JUMP_TABLES}
        if jump_dir.is_dir()
        else {}
    )
    return RunOutputs(
        outdir,
        cards,
        tables,
        phenotypes,
        features_path,
        _read_yaml(outdir / "pipeline_info" / "params.yaml"),
        _read_json(outdir / "pipeline_info" / "versions.json"),
        _read_json(evaluation / "summary.json"),
        jump,
        _read_json(jump_dir / "summary.json"),
    )
