"""``morphotype score``: apply phenotype models to any CellProfiler single-cell output.

The per-plate statistics are those of :func:`morphotype.jump.score_plate` (z-scoring against the
plate's negative-control cells, per-well KS tests against them, median-probability profiles);
``jump score`` is the CPJUMP1 preset of this command (plate metadata from ``assets/jump``). Here
the wells come from a user plate map (:func:`read_platemap`) or a ``--controls`` query on the image
metadata (:func:`platemap_from_query`), the input is any layout :mod:`morphotype.cellprofiler`
reads, feature alignment is checked before scoring (:func:`morphotype.domain.check_feature_alignment`)
and ``domain_shift.json`` is written beside the outputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from morphotype import domain, jump
from morphotype.cellprofiler import MODEL_OBJECT, MODEL_STAIN, normalise_well, open_cellprofiler
from morphotype.io import MorphotypeInputError

log = logging.getLogger(__name__)

CONTROL_VALUES = {"negative": ("control", "negcon"), "positive": ("control", "poscon"),
                  "treated": ("trt", None), "empty": ("empty", "empty")}
USER_PLATEMAP = "user_platemap"


def _wells_table(wells: pd.DataFrame, platemap_name: str) -> pd.DataFrame:
    """The jump well table (``jump.WELL_COLUMNS``) from well, treatment and control kind."""
    kinds = wells["control"].map(CONTROL_VALUES)
    return pd.DataFrame({
        "Metadata_PlateMap": platemap_name, "Metadata_Well": wells["well"].to_numpy(),
        "Metadata_broad_sample": wells["treatment"].to_numpy(), "Metadata_Treatment": wells["treatment"].to_numpy(),
        "Metadata_pert_type": [k[0] for k in kinds], "Metadata_control_type": [k[1] for k in kinds],
        "Metadata_negcon_control_type": np.nan, "Metadata_Target": np.nan, "Metadata_moa": np.nan})


def read_platemap(path: str | os.PathLike, plate: str | None = None) -> pd.DataFrame:
    """A user plate map CSV: columns ``well``, ``treatment``, ``control`` (negative, positive,
    treated, empty; default treated); optional ``plate`` (rows of other plates are ignored).
    Well names are normalised (``A1`` = ``A01`` = ``a01``). Returns the jump well table."""
    path = Path(path)
    if not path.is_file():
        raise MorphotypeInputError(f"{path}: plate map not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise MorphotypeInputError(f"{path}: cannot be read as a CSV plate map ({error})") from error
    table.columns = [c.strip().lower() for c in table.columns]
    for column in ("well", "treatment"):
        if column not in table.columns:
            raise MorphotypeInputError(f"{path}: plate map has no column {column!r} (columns: {list(table.columns)}; "
                                       "expected well, treatment, control)")
    if "plate" in table.columns and plate is not None:
        table = table[table["plate"].isin(["", plate])]
    if "control" not in table.columns:
        table["control"] = "treated"
    table["control"] = table["control"].str.strip().str.lower().replace("", "treated")
    for row, (well, kind) in enumerate(zip(table["well"], table["control"]), start=2):
        if normalise_well(well) is None:
            raise MorphotypeInputError(f"{path}, row {row}, column well: {well!r} is not a well name (e.g. A01)")
        if kind not in CONTROL_VALUES:
            raise MorphotypeInputError(f"{path}, row {row}, column control: {kind!r}; expected one of "
                                       f"{sorted(CONTROL_VALUES)}")
    table["well"] = table["well"].map(normalise_well)
    repeated = table[table["well"].duplicated()]
    if len(repeated):
        raise MorphotypeInputError(f"{path}: well {repeated['well'].iloc[0]} is listed more than once")
    if not (table["control"] == "negative").any():
        raise MorphotypeInputError(f"{path}: column control marks no well as negative (needed to z-score the plate)")
    return _wells_table(table, path.stem)


def platemap_from_query(images: pd.DataFrame, query: str, source: str) -> pd.DataFrame:
    """Negative-control wells = wells whose images all match ``query`` (pandas ``DataFrame.query``
    on the image metadata); every other well is a treatment named by its well."""
    try:
        matched = images.query(query, engine="python")
    except Exception as error:  # pandas raises many kinds for a bad expression
        raise MorphotypeInputError(f"--controls {query!r}: not a valid query on the image metadata of {source} "
                                   f"({error}); columns: {sorted(images.columns)}") from error
    matched_wells = set(matched["Metadata_Well"])
    mixed = sorted(w for w in matched_wells if len(images[images["Metadata_Well"] == w]) != (matched["Metadata_Well"] == w).sum())
    if mixed:
        raise MorphotypeInputError(f"--controls {query!r}: well(s) {mixed[:5]} of {source} match only some of their images")
    if not matched_wells:
        raise MorphotypeInputError(f"--controls {query!r}: matches no image of {source}")
    wells = sorted(set(images["Metadata_Well"]))
    table = pd.DataFrame({"well": wells, "treatment": wells,
                          "control": ["negative" if w in matched_wells else "treated" for w in wells]})
    table.loc[table["control"] == "negative", "treatment"] = "negative control"
    return _wells_table(table, USER_PLATEMAP)


def score(input_path: str | os.PathLike, model_dir: Any, outdir: str | os.PathLike, *,
          shuffled_model_dir: Any = None, platemap: str | os.PathLike | None = None, controls: str | None = None,
          plate: str | None = None, nuclei_object: str = MODEL_OBJECT, dna_stain: str = MODEL_STAIN,
          fill_missing: bool = False, max_missing_weight: float = domain.MAX_MISSING_WEIGHT,
          shift_threshold: float = domain.SHIFT_THRESHOLD, chunk_size: int = jump.DEFAULT_CHUNK_SIZE,
          min_cells: int = jump.MIN_CELLS, seed: int = 0, cache_dir: str | os.PathLike | None = None,
          keep_cells: bool = False) -> dict:
    """Score one CellProfiler output (SQLite, CytoTable Parquet, ExportToSpreadsheet folder; path or URL).

    Writes ``<plate>.ks.parquet``, ``<plate>.profiles.parquet``, ``<plate>.summary.json``
    (optionally ``<plate>.cells.parquet`` with ``Metadata_InDistribution``) and
    ``<plate>.domain_shift.json`` into ``outdir``. Without ``shuffled_model_dir`` the final model is
    scored alone. Exactly one of ``platemap`` and ``controls`` names the negative controls.
    """
    if (platemap is None) == (controls is None):
        raise MorphotypeInputError("give either --platemap CSV or --controls QUERY (which wells are negative controls)")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    models = {"final": jump._load_model(model_dir, "final")}
    if shuffled_model_dir is not None:
        models["shuffled"] = jump._load_model(shuffled_model_dir, "shuffled")
    if Path(input_path).is_dir():  # ExportToSpreadsheet folder; files and URLs go through the plate fetcher
        local, downloaded = Path(input_path), False
    else:
        local, downloaded = jump.fetch_plate(input_path, cache_dir or outdir / ".cache")
    try:
        cell_table = open_cellprofiler(local, nuclei_object=nuclei_object, dna_stain=dna_stain)
        try:
            barcodes = sorted(cell_table.images["Metadata_Plate"].dropna().unique())
            if plate is None:
                if len(barcodes) > 1:
                    raise MorphotypeInputError(f"{local}: the image table names several plates {barcodes}; "
                                               "keep one plate per input")
                plate = barcodes[0] if barcodes else Path(local).name.split(".")[0]
                if not barcodes:
                    cell_table.images["Metadata_Plate"] = plate
            if platemap is not None:
                wells = read_platemap(platemap, plate)
                unknown = sorted(set(cell_table.images["Metadata_Well"]) - set(wells["Metadata_Well"]))
                if unknown:
                    raise MorphotypeInputError(
                        f"{platemap}: well(s) {unknown[:8]} of {local} (image table, column Metadata_Well) "
                        "are not in the plate map; expected a row per imaged well")
            else:
                wells = platemap_from_query(cell_table.images, controls, str(local))
        except MorphotypeInputError:
            cell_table.close()
            raise
        plates = pd.DataFrame([{c: None for c in jump.PLATE_COLUMNS} | {
            "Metadata_Plate": plate, "Metadata_PlateMap": wells["Metadata_PlateMap"].iloc[0],
            "Metadata_Batch": "user", "Metadata_Perturbation": "user", "Metadata_CellType": "unspecified",
            "Metadata_Time": "unspecified", "Metadata_SQLite": str(input_path)}])
        guard = domain.DomainGuard(models["final"], threshold=shift_threshold)
        summary = jump._score_local_plate(cell_table, str(input_path), models, plates, wells, outdir, plate,
                                          chunk_size, min_cells, seed, keep_cells, fill_missing=fill_missing,
                                          max_missing_weight=max_missing_weight, guard=guard)
    finally:
        if downloaded:
            local.unlink(missing_ok=True)
    report = guard.report()
    report["input"] = str(input_path)
    path = domain.write_report(report, outdir / f"{plate}.domain_shift.json", source=str(input_path))
    summary["domain_shift"] = {"status": report["status"], "flagged": report["flagged"], "file": path.name}
    summary["input_layout"] = cell_table.layout
    jump.write_summary(summary, outdir / f"{plate}.summary.json")
    return summary
