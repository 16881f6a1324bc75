"""Apply the phenotype models to the JUMP Cell Painting pilot (CPJUMP1, ``cpg0000-jump-pilot``).

Per plate (:func:`score_plate`): read the nuclei of one CellProfiler SQLite plate in chunks,
z-score the model's features against the plate's negative-control cells, predict phenotype
probabilities with the final and the shuffled-baseline model, test every treated well against
the negative controls with two-sample KS tests (one per phenotype) and write the per-well
profiles (median probability per phenotype). Across plates (:func:`summarise`): Benjamini-Hochberg
q-values and per-treatment aggregation of replicate wells, top treatments per phenotype.

Method (Tomkinson, Kern, Mattson & Way 2024; ``notes/paper_methods.md``), with the reference
code's pitfalls fixed: metadata restricted to batch ``2020_11_04_CPJUMP1`` and every join checked
one-to-one (the experiment table lists 16 barcodes under several batches, which duplicated
cells); predictions keyed by cell (never joined by position); replicate p-values combined with
a merging rule valid under dependence instead of a plain mean, and q-values added.

The plate metadata shipped in ``assets/jump/`` (``plates.csv``, ``wells.csv``) is derived from
the original CPJUMP1 tables by :func:`build_metadata`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, ks_2samp
from tqdm import tqdm

from morphotype.cellprofiler import open_cellprofiler
from morphotype.columns import CELL_ID, IMAGE_ID, OBJECT_NUMBER, PHENOTYPE
from morphotype.domain import check_feature_alignment
from morphotype.download import FetchOptions, SourceError, download, s3_https_url
from morphotype.estimators import FamilyModel, load_any_model, recommended_model_dir
from morphotype.io import MorphotypeInputError, asset_path, atomic_path, read_table, write_table
from morphotype.models import PhenotypeModel, predict_logits, softmax_probabilities
from morphotype.normalize import fit_zscore

log = logging.getLogger(__name__)

BATCH = "2020_11_04_CPJUMP1"
MIN_CELLS = 50  # a well is analysed only with MORE than this many cells (paper, both arms)
DEFAULT_CHUNK_SIZE = 100_000
MODEL_NAMES = ("final", "shuffled")  # Metadata_Model values
PLATE_COLUMNS = [
    "Metadata_Plate", "Metadata_PlateMap", "Metadata_Batch", "Metadata_Perturbation",
    "Metadata_CellType", "Metadata_Time", "Metadata_CellLine", "Metadata_Density",
    "Metadata_Antibiotics", "Metadata_Anomaly", "Metadata_TimeDelay", "Metadata_TimesImaged",
    "Metadata_NumberOfImages", "Metadata_SQLite",
]
WELL_COLUMNS = [
    "Metadata_PlateMap", "Metadata_Well", "Metadata_broad_sample", "Metadata_Treatment",
    "Metadata_pert_type", "Metadata_control_type", "Metadata_negcon_control_type",
    "Metadata_Target", "Metadata_moa",
]
# metadata carried from the plate and well tables into every output row
CONDITION_COLUMNS = ["Metadata_Plate", "Metadata_PlateMap", "Metadata_Perturbation",
                     "Metadata_CellType", "Metadata_Time"]
TREATMENT_COLUMNS = ["Metadata_Well", "Metadata_broad_sample", "Metadata_Treatment",
                     "Metadata_pert_type", "Metadata_control_type"]
# How replicate wells' KS p-values are merged into one p per treatment. Replicate wells of a
# plate share its control cells, so the tests are dependent: twice the arithmetic mean is a valid
# p-value under arbitrary dependence (Vovk & Wang 2020, Biometrika 107:791), unlike Fisher or
# Stouffer (which assume independence) or the reference code's plain mean (anti-conservative).
P_COMBINATION = "min(1, 2 * mean(p)) over replicate wells (Vovk & Wang 2020); p itself for one well"


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

def _merge_checked(left: pd.DataFrame, right: pd.DataFrame, on: str | list[str], validate: str,
                   what: str, how: str = "left") -> pd.DataFrame:
    """``pandas.merge`` that refuses joins which would duplicate rows (the CPJUMP1 batch trap)."""
    keys = [on] if isinstance(on, str) else list(on)
    try:
        merged = left.merge(right, on=keys, how=how, validate=validate)
    except pd.errors.MergeError as error:
        side = right if validate.endswith("one") else left
        counts = side.groupby(keys, dropna=False).size()
        repeated = counts[counts > 1]
        example = ", ".join(f"{key} ×{n}" for key, n in repeated.head(5).items())
        raise MorphotypeInputError(
            f"{what}: joining on {keys} would duplicate rows; {len(repeated)} key(s) appear "
            f"several times ({example}). Restrict the table (e.g. to batch {BATCH!r}) first."
        ) from error
    if how == "left" and len(merged) != len(left):  # validate= covers this; kept as a guard
        raise MorphotypeInputError(f"{what}: join changed the row count {len(left)} -> {len(merged)}")
    return merged


def build_metadata(source_dir: str | os.PathLike, batch: str | None = BATCH
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Derive the plate and well tables from the original CPJUMP1 metadata files.

    Parameters
    ----------
    source_dir
        Folder with ``barcode_platemap.csv``, ``experiment-metadata.tsv``,
        ``jump_dataset_location_manifest.csv``, the three ``JUMP-Target-1_*_platemap.txt`` and
        their perturbation metadata (``*_metadata*.tsv``, ``JUMP-Target-1_compoundg_moa_metadata.tsv``).
    batch
        Keep only this batch of ``experiment-metadata.tsv``. ``None`` keeps every batch, which
        duplicates barcodes and therefore raises (kept to demonstrate the trap).

    Returns
    -------
    plates, wells
        ``plates``: one row per plate (barcode, platemap, perturbation, cell type, time in hours,
        SQLite URL, ...). ``wells``: one row per platemap and well with the treatment
        (``Metadata_broad_sample``, name, ``Metadata_pert_type`` trt/control/empty,
        ``Metadata_control_type`` negcon/poscon_*). Negative controls are the wells with
        ``Metadata_control_type == "negcon"``: DMSO (64 wells) on compound plates, the
        non-targeting/intergenic guides (60) on CRISPR plates, the 15 designated ORFs (60) on ORF
        plates.

    Raises
    ------
    MorphotypeInputError
        When a join would duplicate rows, or a plate lacks experiment metadata or a SQLite location.
    """
    source = Path(source_dir)

    def read(name: str, sep: str = "\t") -> pd.DataFrame:
        path = source / name
        if not path.exists():
            raise MorphotypeInputError(f"{path}: CPJUMP1 metadata file not found")
        return pd.read_csv(path, sep=sep)

    barcodes = read("barcode_platemap.csv", sep=",")
    experiment = read("experiment-metadata.tsv")
    if batch is not None:
        experiment = experiment[experiment["Batch"] == batch]
    manifest = read("jump_dataset_location_manifest.csv", sep=",").rename(
        columns={"plate": "Assay_Plate_Barcode", "sqlite_file": "Metadata_SQLite"})
    plates = _merge_checked(barcodes, experiment.drop(columns="Plate_Map_Name"), "Assay_Plate_Barcode",
                            "one_to_one", f"{source}/barcode_platemap.csv + experiment-metadata.tsv")
    plates = _merge_checked(plates, manifest, "Assay_Plate_Barcode", "one_to_one",
                            f"{source}/jump_dataset_location_manifest.csv")
    missing = plates[plates["Batch"].isna() | plates["Metadata_SQLite"].isna()]
    if len(missing):
        raise MorphotypeInputError(
            f"{source}: plate(s) {missing['Assay_Plate_Barcode'].tolist()} lack experiment metadata "
            f"(batch {batch!r}) or a SQLite location")
    plates = plates.rename(columns={
        "Assay_Plate_Barcode": "Metadata_Plate", "Plate_Map_Name": "Metadata_PlateMap",
        "Batch": "Metadata_Batch", "Perturbation": "Metadata_Perturbation",
        "Cell_type": "Metadata_CellType", "Time": "Metadata_Time", "Cell_line": "Metadata_CellLine",
        "Density": "Metadata_Density", "Antibiotics": "Metadata_Antibiotics",
        "Anomaly": "Metadata_Anomaly", "Time_delay": "Metadata_TimeDelay",
        "Times_imaged": "Metadata_TimesImaged", "Number_of_images": "Metadata_NumberOfImages",
    })[PLATE_COLUMNS]
    plates["Metadata_Time"] = plates["Metadata_Time"].astype(int)

    moa = read("JUMP-Target-1_compoundg_moa_metadata.tsv").rename(
        columns={"Metadata_pert_iname": "pert_iname", "Metadata_moa": "moa"})[["pert_iname", "moa"]]
    sources = {
        "compound": ("JUMP-Target-1_compound_metadata_targets.tsv", "pert_iname", "target"),
        "crispr": ("JUMP-Target-1_crispr_metadata.tsv", "gene", "gene"),
        "orf": ("JUMP-Target-1_orf_metadata.tsv", "gene", "gene"),
    }
    tables = []
    for kind, (metadata_file, name_column, target_column) in sources.items():
        platemap_name = f"JUMP-Target-1_{kind}_platemap"
        platemap = read(f"{platemap_name}.txt")
        perturbations = read(metadata_file).dropna(subset=["broad_sample", "pert_type"], how="all")
        if kind == "compound":
            # DMSO has no broad_sample in either file; name it so the join is explicit
            perturbations.loc[perturbations["pert_iname"] == "DMSO", "broad_sample"] = "DMSO"
            platemap["broad_sample"] = platemap["broad_sample"].fillna("DMSO")
            perturbations = _merge_checked(perturbations, moa, "pert_iname", "many_to_one",
                                           f"{source}/{metadata_file} + compound MOA metadata")
        else:
            perturbations["moa"] = np.nan
        if "negcon_control_type" not in perturbations:
            perturbations["negcon_control_type"] = np.nan
        perturbations = perturbations.dropna(subset=["broad_sample"])
        wells = _merge_checked(platemap[["well_position", "broad_sample"]], perturbations,
                               "broad_sample", "many_to_one", f"{source}/{platemap_name}.txt + {metadata_file}")
        unknown = wells[wells["broad_sample"].notna() & wells["pert_type"].isna()]
        if len(unknown):
            raise MorphotypeInputError(
                f"{source}/{platemap_name}.txt: broad_sample(s) {unknown['broad_sample'].tolist()[:5]} "
                f"not in {metadata_file}")
        empty = wells["broad_sample"].isna()  # CRISPR/ORF plates have 4 untreated wells
        wells.loc[empty, ["pert_type", "control_type"]] = "empty"
        tables.append(pd.DataFrame({
            "Metadata_PlateMap": platemap_name,
            "Metadata_Well": wells["well_position"],
            "Metadata_broad_sample": wells["broad_sample"],
            "Metadata_Treatment": wells[name_column],
            "Metadata_pert_type": wells["pert_type"],
            "Metadata_control_type": wells["control_type"],
            "Metadata_negcon_control_type": wells["negcon_control_type"],
            "Metadata_Target": wells[target_column],
            "Metadata_moa": wells["moa"],
        }))
    wells = pd.concat(tables, ignore_index=True)
    check_metadata(plates, wells, source=str(source))
    return plates, wells


def check_metadata(plates: pd.DataFrame, wells: pd.DataFrame, source: str = "metadata") -> None:
    """Raise unless there is one row per plate, one per platemap well, and negative controls."""
    for table, columns, key, what in ((plates, PLATE_COLUMNS, ["Metadata_Plate"], "plates"),
                                      (wells, WELL_COLUMNS, ["Metadata_PlateMap", "Metadata_Well"], "wells")):
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise MorphotypeInputError(f"{source} ({what}): missing column(s) {absent}")
        repeated = table[table.duplicated(key, keep=False)]
        if len(repeated):
            raise MorphotypeInputError(
                f"{source} ({what}): {key} must be unique; repeated: "
                f"{repeated[key].drop_duplicates().head(5).to_dict('records')}")
    unknown = sorted(set(plates["Metadata_PlateMap"]) - set(wells["Metadata_PlateMap"]))
    if unknown:
        raise MorphotypeInputError(f"{source}: platemap(s) {unknown} of the plate table have no wells")
    negcon = wells[wells["Metadata_control_type"] == "negcon"].groupby("Metadata_PlateMap").size()
    lacking = sorted(set(wells["Metadata_PlateMap"]) - set(negcon.index))
    if lacking:
        raise MorphotypeInputError(f"{source}: platemap(s) {lacking} have no negative-control wells")


def write_metadata(plates: pd.DataFrame, wells: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``plates.csv`` and ``wells.csv`` (the ``assets/jump/`` layout) atomically."""
    out = Path(out_dir)
    return [write_table(plates, out / "plates.csv"), write_table(wells, out / "wells.csv")]


def load_metadata(plates: str | os.PathLike | pd.DataFrame | None = None,
                  wells: str | os.PathLike | pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and check the plate and well tables (default: the ones shipped in ``assets/jump/``)."""
    def read(table, name):
        if isinstance(table, pd.DataFrame):
            return table.copy(), "given table"
        path = Path(table) if table is not None else asset_path(f"jump/{name}")
        frame = pd.read_csv(path, dtype={"Metadata_Plate": str, "Metadata_Well": str}) \
            if path.suffix == ".csv" else read_table(path)
        return frame, str(path)

    plate_table, plate_source = read(plates, "plates.csv")
    well_table, well_source = read(wells, "wells.csv")
    check_metadata(plate_table, well_table, source=f"{plate_source} / {well_source}")
    return plate_table, well_table


# --------------------------------------------------------------------------------------------
# Models (the only code that knows the model interface of morphotype.models)
# --------------------------------------------------------------------------------------------

def _load_model(model: Any, role: str) -> Any:
    """Load a :class:`morphotype.models.PhenotypeModel` (or take a loaded one) and check its role.

    ``role`` is ``"final"`` or ``"shuffled"``; a shuffled baseline passed as the final model (or
    the reverse) is refused.
    """
    source = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "model_id", repr(model))
    if isinstance(model, (str, os.PathLike)):
        # a models folder: its recommended model (and the recommended model's shuffled baseline)
        model = load_any_model(recommended_model_dir(model, shuffled=role == "shuffled"))
    if not isinstance(model, (PhenotypeModel, FamilyModel)):
        raise TypeError(f"expected a model directory or a morphotype model, got {type(model)}")
    if model.shuffled != (role == "shuffled"):
        raise MorphotypeInputError(
            f"{source}: model {model.model_id!r} is {'a shuffled baseline' if model.shuffled else 'not shuffled'}"
            f" but was given as the {role} model")
    return model


def _predict(model: Any, z: np.ndarray) -> np.ndarray:
    """Probabilities from features already z-scored against the plate's negative controls.

    The model's own scaler (fitted on the training screen's controls) is deliberately not applied:
    as in the study, each JUMP plate is standardised against its own negative-control cells.
    """
    if hasattr(model, "probabilities_scaled"):  # any other family (morphotype.estimators)
        return model.probabilities_scaled(z)
    return softmax_probabilities(predict_logits(model.coef, model.intercept, z))


# --------------------------------------------------------------------------------------------
# Reading plates
# --------------------------------------------------------------------------------------------

def _remote_url(source: str) -> str | None:
    """HTTP(S) URL of a remote plate, or None for a local path.

    ``s3://bucket/key`` becomes the anonymous public URL ``https://bucket.s3.amazonaws.com/key``,
    or ``$AWS_ENDPOINT_URL/bucket/key`` (path style) when that variable names another endpoint
    (:func:`morphotype.download.s3_https_url`).
    """
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return source
    if parsed.scheme == "s3":
        return s3_https_url(source)
    return None


def fetch_plate(source: str | os.PathLike, cache_dir: str | os.PathLike, *,
                options: FetchOptions | None = None) -> tuple[Path, bool]:
    """Local path of a plate SQLite; ``s3://`` and ``http(s)://`` sources are downloaded first.

    Returns the path and whether it was downloaded by this call. Downloads go through
    :func:`morphotype.download.download` (``options``; default: 60 s timeout, retries with
    back-off, resumed with Range) into ``cache_dir`` and appear under their final name only when
    complete; an existing complete file is reused. A plate that is missing or refused is bad
    input (:class:`~morphotype.io.MorphotypeInputError`); a network failure that outlasts the
    retries raises :class:`~morphotype.download.DownloadError`.
    """
    url = _remote_url(str(source))
    if url is None:
        path = Path(source)
        if not path.is_file():
            raise MorphotypeInputError(f"{path}: plate SQLite file does not exist")
        return path, False
    target = Path(cache_dir) / Path(urllib.parse.urlparse(url).path).name
    if target.is_file():
        log.info("reusing %s for %s", target, source)
        return target, False
    log.info("downloading %s to %s", url, target)
    try:
        download(url, target, options=options or FetchOptions(timeout=60), progress=True)
    except SourceError as error:
        raise MorphotypeInputError(f"{source}: cannot download plate ({error})") from error
    return target, True


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------

def sample_for_ks(n_treated: int, control_wells: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the treated and control cells compared, as in the paper's reference code.

    If the treated well has more cells than the controls, the treated cells are sampled down to the
    control count; otherwise every control well is sampled with the fraction
    ``n_treated / n_controls`` (``round(fraction * well size)`` cells per well, as pandas'
    ``sample(frac=...)``), i.e. stratified by well.
    """
    n_controls = len(control_wells)
    if n_treated > n_controls:
        return np.sort(rng.choice(n_treated, n_controls, replace=False)), np.arange(n_controls)
    fraction = n_treated / n_controls
    starts = np.flatnonzero(np.r_[True, control_wells[1:] != control_wells[:-1]])
    stops = np.r_[starts[1:], n_controls]
    picked = [start + rng.choice(stop - start, round(fraction * (stop - start)), replace=False)
              for start, stop in zip(starts, stops)]
    return np.arange(n_treated), np.sort(np.concatenate(picked))


def combine_replicate_pvalues(pvalues: np.ndarray) -> float:
    """Merge the KS p-values of a treatment's replicate wells (see ``P_COMBINATION``)."""
    pvalues = np.asarray(pvalues, dtype=float)
    if len(pvalues) == 1:
        return float(pvalues[0])
    return float(min(1.0, 2.0 * pvalues.mean()))


# --------------------------------------------------------------------------------------------
# Per plate
# --------------------------------------------------------------------------------------------

def _plate_metadata(plate: str, plates: pd.DataFrame, wells: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    rows = plates[plates["Metadata_Plate"] == plate]
    if len(rows) != 1:
        raise MorphotypeInputError(f"plate {plate!r}: expected one row in the plate metadata, found {len(rows)}")
    plate_row = rows.iloc[0].to_dict()
    plate_wells = wells[wells["Metadata_PlateMap"] == plate_row["Metadata_PlateMap"]].set_index("Metadata_Well")
    return plate_row, plate_wells


def score_plate(
    sqlite_path: str | os.PathLike,
    model_dir: Any,
    shuffled_model_dir: Any,
    outdir: str | os.PathLike,
    *,
    plate_metadata: str | os.PathLike | pd.DataFrame | None = None,
    well_metadata: str | os.PathLike | pd.DataFrame | None = None,
    plate: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    min_cells: int = MIN_CELLS,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    keep_download: bool = False,
    keep_cells: bool = False,
) -> dict:
    """Score one CPJUMP1 plate: probabilities, per-well KS tests against negcon cells, profiles.

    Parameters
    ----------
    sqlite_path
        The plate's CellProfiler SQLite (``Image`` and ``Nuclei`` tables): a local path, an
        ``s3://`` URL (anonymous; ``$AWS_ENDPOINT_URL`` overrides the endpoint) or an HTTP(S) URL.
    model_dir, shuffled_model_dir
        The final and the shuffled-baseline model: directories written by
        :func:`morphotype.models.save_model` (or loaded ``PhenotypeModel`` objects). Their
        coefficients are applied to the plate's features z-scored against the plate's own
        negative-control cells (the models' training scalers are not used, as in the study).
    outdir
        Output folder: ``<plate>.ks.parquet``, ``<plate>.profiles.parquet``,
        ``<plate>.summary.json`` (and ``<plate>.cells.parquet`` with ``keep_cells``).
    plate_metadata, well_metadata
        Plate and well tables (paths or frames); default: ``assets/jump/plates.csv`` and ``wells.csv``.
    plate
        Barcode; default: the single ``Metadata_Plate`` of the Image table.
    chunk_size
        Nuclei rows read and scored at a time (memory ~ chunk_size × features).
    min_cells
        Wells need more than this many cells to be tested or profiled (paper: 50).
    seed
        Seed of the KS down-sampling (paper: 0), fresh for every treated well.
    cache_dir
        Where remote plates are downloaded (default ``outdir/.cache``); the download is deleted
        after scoring unless ``keep_download``.
    keep_cells
        Also write per-cell probabilities keyed by ``Metadata_CellID``.

    Returns
    -------
    dict
        The summary written to ``<plate>.summary.json``: counts, wells skipped (≤ ``min_cells``),
        features missing from the plate (set to 0 = the negcon mean) and output paths.
    """
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2, got {chunk_size}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    models = {role: _load_model(model, role) for role, model in zip(MODEL_NAMES, (model_dir, shuffled_model_dir))}
    plates, wells = load_metadata(plate_metadata, well_metadata)
    local, downloaded = fetch_plate(sqlite_path, cache_dir or outdir / ".cache")
    try:

        return _score_local_plate(open_cellprofiler(local), str(sqlite_path), models, plates, wells, outdir,
                                  plate, chunk_size, min_cells, seed, keep_cells)
    finally:
        if downloaded and not keep_download:
            local.unlink(missing_ok=True)


def _score_local_plate(cell_table, source: str, models: dict, plates: pd.DataFrame, wells: pd.DataFrame,
                       outdir: Path, plate: str | None, chunk_size: int, min_cells: int, seed: int,
                       keep_cells: bool, *, fill_missing: bool = True, max_missing_weight: float | None = None,
                       guard: Any = None) -> dict:
    """Score an open :class:`morphotype.cellprofiler.CellTable` (closed on return).

    ``fill_missing``/``max_missing_weight``: see :func:`morphotype.domain.check_feature_alignment`;
    ``guard``: a :class:`morphotype.domain.DomainGuard` fed the raw features of every cell.
    """

    path = Path(cell_table.source)
    try:
        images = cell_table.images
        barcodes = sorted(images["Metadata_Plate"].dropna().unique())
        if plate is None:
            if len(barcodes) != 1:
                raise MorphotypeInputError(f"{path}: Image table names plates {barcodes}; pass --plate")
            plate = barcodes[0]
        elif barcodes and barcodes != [plate]:
            raise MorphotypeInputError(f"{path}: Image table names plate(s) {barcodes}, expected {plate!r}")
        plate_row, plate_wells = _plate_metadata(plate, plates, wells)
        unknown = sorted(set(images["Metadata_Well"]) - set(plate_wells.index))
        if unknown:
            raise MorphotypeInputError(
                f"{path}: wells {unknown[:5]} are not in platemap {plate_row['Metadata_PlateMap']}")

        plate_columns = set(cell_table.features)
        wanted = list(dict.fromkeys(f for m in models.values() for f in m.features))
        present = [f for f in wanted if f in plate_columns]
        missing = [f for f in wanted if f not in plate_columns]
        alignment = check_feature_alignment(models, plate_columns, source=cell_table.nuclei_table,
                                            fill_missing=fill_missing, max_missing_weight=max_missing_weight)

        # Images -> row of the well table; join key = (TableNumber, ImageNumber)
        image_index = pd.MultiIndex.from_arrays([images["TableNumber"], images["ImageNumber"].astype(np.int64)])
        well_names = np.array(sorted(plate_wells.index))
        image_well = np.searchsorted(well_names, images["Metadata_Well"].to_numpy())
        image_table_code = pd.Categorical(images["TableNumber"]).codes.astype(np.int64)

        with tempfile.TemporaryDirectory(prefix=f".{plate}.", dir=outdir) as scratch:
            # one pass over the SQLite: keys in memory, features spilled to disk (bounded memory)
            keys, n_cells = [], 0
            spill = Path(scratch) / "features.f64"
            with open(spill, "wb") as handle:
                for table_number, image_number, object_number, values in tqdm(
                        cell_table.iter_nuclei(present, chunk_size),
                        desc=f"{plate} nuclei", unit="chunk", disable=None):
                    rows = image_index.get_indexer(pd.MultiIndex.from_arrays([table_number, image_number]))
                    if (rows < 0).any():
                        bad = int(np.flatnonzero(rows < 0)[0])
                        raise MorphotypeInputError(
                            f"{path}: Nuclei row with TableNumber={table_number[bad]!r}, "
                            f"ImageNumber={image_number[bad]} has no Image row")
                    keys.append(np.column_stack([image_well[rows], image_table_code[rows],
                                                 image_number, object_number, rows]))
                    values.tofile(handle)
                    n_cells += len(values)
            cell_table.close()
            if n_cells == 0:
                raise MorphotypeInputError(f"{path}: the Nuclei table is empty")
            keys = np.concatenate(keys)
            width = len(present)

            def spilled_blocks(mask: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
                # plain reads, not a memmap: mapped pages would count towards (and grow) the RSS
                with open(spill, "rb") as stored:
                    for start in range(0, n_cells, chunk_size):
                        count = min(chunk_size, n_cells - start)
                        block = np.fromfile(stored, np.float64, count * width).reshape(count, width)
                        yield start, (block if mask is None else block[mask[start:start + count]])

            # a canonical cell order makes everything below independent of read order and chunking
            order = np.lexsort((keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0]))
            if (np.diff(keys[order][:, 1:4], axis=0) == 0).all(axis=1).any():
                raise MorphotypeInputError(f"{path}: duplicated (TableNumber, ImageNumber, ObjectNumber) in Nuclei")
            is_negcon_well = (plate_wells.loc[well_names, "Metadata_control_type"] == "negcon").to_numpy()
            negcon_rows = order[is_negcon_well[keys[order, 0]]]
            if len(negcon_rows) == 0:
                raise MorphotypeInputError(f"{path}: no cells in the negative-control wells of {plate}")

            # z-score against the plate's negcon cells (as pycytominer normalize(method="standardize"))
            negcon_values = np.concatenate([b for _, b in spilled_blocks(is_negcon_well[keys[:, 0]])])
            negcon_values = negcon_values[np.argsort(np.argsort(negcon_rows))]  # read -> canonical order
            empty = [f for f, all_nan in zip(present, np.isnan(negcon_values).all(axis=0)) if all_nan]
            if empty:
                log.warning("%s: feature(s) %s have no value in negcon cells; set to 0", plate, empty)
            scaler = fit_zscore(negcon_values, "negative_controls") if width else None
            del negcon_values

            classes = {name: list(m.classes) for name, m in models.items()}
            probabilities = {name: np.empty((n_cells, len(c)), np.float32) for name, c in classes.items()}
            in_distribution = np.full(n_cells, np.nan)
            usable = np.ones(n_cells, bool)
            column_of = {f: i for i, f in enumerate(present)}
            for start, block in tqdm(spilled_blocks(), total=-(-n_cells // chunk_size), desc=f"{plate} scoring",
                                     unit="chunk", disable=None):
                if guard is not None:  # raw units, before z-scoring; never feeds the predictions
                    in_distribution[start:start + len(block)] = guard.update(block, present)
                z = scaler.transform(block) if scaler is not None else block
                for i, name in enumerate(present):
                    if name in empty:
                        z[:, i] = 0.0
                usable[start:start + len(block)] = ~np.isnan(z).any(axis=1)
                z = np.nan_to_num(z, nan=0.0)  # rows with NaN are dropped below
                for name, model in models.items():
                    design = np.zeros((len(block), len(model.features)))
                    for j, feature in enumerate(model.features):
                        if feature in column_of:
                            design[:, j] = z[:, column_of[feature]]
                    probabilities[name][start:start + len(block)] = _predict(model, design)

        order = order[usable[order]]
        n_dropped = int(n_cells - len(order))
        if n_dropped:
            log.warning("%s: %d cell(s) with missing feature values dropped", plate, n_dropped)
        well_of_cell = keys[order, 0]
        cells = {name: probabilities.pop(name)[order] for name in list(probabilities)}
        results = _analyse_wells(plate, plate_row, plate_wells, well_names, well_of_cell, cells, classes,
                                 min_cells, seed)
        outputs = _write_plate_outputs(outdir, plate, results, keep_cells, keys[order], images, well_names,
                                       plate_row, cells, classes,
                                       in_distribution[order] if guard is not None else None)
    finally:
        cell_table.close()

    summary = {
        "plate": plate, "source": source, **{k: _jsonable(v) for k, v in plate_row.items()},
        "n_cells": int(n_cells), "n_cells_scored": int(len(order)), "n_cells_dropped_missing_values": n_dropped,
        "n_negcon_cells": int(len(negcon_rows)), "n_wells_with_cells": results["n_wells"],
        "n_wells_tested": results["n_tested"], "n_wells_profiled": results["n_profiled"],
        "min_cells": min_cells, "n_wells_skipped_low_count": len(results["skipped"]),
        "wells_skipped_low_count": results["skipped"],
        "n_negcon_wells_used": results["n_negcon_wells"],
        "missing_features": missing, "features_without_negcon_values": empty,
        "feature_alignment": alignment,
        "models": {name: m.model_id for name, m in models.items()},
        "model_features": {name: list(m.features) for name, m in models.items()},
        "classes": classes, "seed": seed, "chunk_size": chunk_size, "outputs": outputs,
    }
    summary_path = write_summary(summary, outdir / f"{plate}.summary.json")
    summary["outputs"]["summary"] = summary_path.name
    log.info("%s: %d cells, %d wells tested, %d skipped (<= %d cells)", plate, len(order),
             results["n_tested"], len(results["skipped"]), min_cells)
    return summary


def write_summary(summary: dict, path: Path) -> Path:
    """Write a plate's ``<plate>.summary.json`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({k: v for k, v in summary.items()}, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _analyse_wells(plate: str, plate_row: dict, plate_wells: pd.DataFrame, well_names: np.ndarray,
                   well_of_cell: np.ndarray, cells: dict[str, np.ndarray], classes: dict[str, list[str]],
                   min_cells: int, seed: int) -> dict:
    """KS tests of treated wells vs negcon cells, and median-probability profiles, per model."""
    counts = np.bincount(well_of_cell, minlength=len(well_names))
    bounds = np.r_[0, np.cumsum(counts)]  # cells are sorted by well
    info = plate_wells.loc[well_names]
    control_type = info["Metadata_control_type"].to_numpy()
    with_cells = np.flatnonzero(counts > 0)
    kept = with_cells[counts[with_cells] > min_cells]
    skipped = [{"Metadata_Well": str(well_names[w]), "n_cells": int(counts[w]),
                "Metadata_control_type": None if pd.isna(control_type[w]) else str(control_type[w])}
               for w in with_cells if counts[w] <= min_cells]
    negcon_wells = [w for w in kept if control_type[w] == "negcon"]
    control_rows = np.concatenate([np.arange(bounds[w], bounds[w + 1]) for w in negcon_wells]) \
        if negcon_wells else np.empty(0, np.int64)
    control_well = well_of_cell[control_rows]
    condition = {c: _jsonable(plate_row[c]) for c in CONDITION_COLUMNS}

    treatment = info[TREATMENT_COLUMNS[1:]].to_dict(orient="records")
    metadata_of = {w: {**condition, "Metadata_Well": str(well_names[w]), **treatment[w]} for w in kept}

    ks_rows, profile_rows, n_tested = [], [], 0
    treated = [w for w in kept if control_type[w] not in ("negcon", "empty")]
    if not negcon_wells:
        log.warning("%s: no negative-control well has more than %d cells; no KS tests", plate, min_cells)
        treated = []
    for w in treated:
        rng = np.random.default_rng(seed)
        rows = np.arange(bounds[w], bounds[w + 1])
        pick_treated, pick_control = sample_for_ks(len(rows), control_well, rng)
        n_tested += 1
        for model, probabilities in cells.items():
            treated_p = probabilities[rows[pick_treated]].astype(np.float64)
            control_p = probabilities[control_rows[pick_control]].astype(np.float64)
            result = ks_2samp(control_p, treated_p, axis=0)
            shift = np.median(treated_p, axis=0) - np.median(control_p, axis=0)
            for k, phenotype in enumerate(classes[model]):
                ks_rows.append({**metadata_of[w], "Metadata_Model": model, PHENOTYPE: phenotype,
                                "n_treated": int(len(rows)), "n_control": int(len(control_rows)),
                                "n_treated_compared": int(len(pick_treated)),
                                "n_control_compared": int(len(pick_control)),
                                "ks_d": float(result.statistic[k]), "ks_p": float(result.pvalue[k]),
                                "median_shift": float(shift[k])})
    for w in kept:
        rows = slice(bounds[w], bounds[w + 1])
        for model, probabilities in cells.items():
            medians = np.median(probabilities[rows].astype(np.float64), axis=0)
            profile_rows.append({**metadata_of[w], "Metadata_Model": model, "Metadata_CellCount": int(counts[w]),
                                 **dict(zip(classes[model], medians.tolist()))})
    ks_columns = [*CONDITION_COLUMNS, *TREATMENT_COLUMNS, "Metadata_Model", PHENOTYPE, "n_treated",
                  "n_control", "n_treated_compared", "n_control_compared", "ks_d", "ks_p", "median_shift"]
    return {"ks": pd.DataFrame(ks_rows, columns=ks_columns), "profiles": pd.DataFrame(profile_rows),
            "skipped": skipped,
            "n_wells": int(len(with_cells)), "n_tested": n_tested, "n_profiled": int(len(kept)),
            "n_negcon_wells": len(negcon_wells)}


def _write_plate_outputs(outdir: Path, plate: str, results: dict, keep_cells: bool, keys: np.ndarray,
                         images: pd.DataFrame, well_names: np.ndarray, plate_row: dict,
                         cells: dict[str, np.ndarray], classes: dict[str, list[str]],
                         in_distribution: np.ndarray | None = None) -> dict:
    # file names only: summarise() finds them beside the summary JSON (works when staged elsewhere)
    outputs = {"ks": write_table(results["ks"], outdir / f"{plate}.ks.parquet").name,
               "profiles": write_table(results["profiles"], outdir / f"{plate}.profiles.parquet").name}
    if keep_cells:
        image_rows = keys[:, 4]
        site = images["Metadata_Site"].to_numpy()[image_rows]
        table_number = images["TableNumber"].to_numpy()[image_rows]
        well = well_names[keys[:, 0]]
        image_id = pd.Series([f"{plate}_{w}_{s}" for w, s in zip(well, site)])
        # TableNumber is part of the key: cytominer-database restarts ImageNumber per table
        cell_id = [f"{i}_{t}_{n}_{o}" for i, t, n, o in zip(image_id, table_number, keys[:, 2], keys[:, 3])]
        frames = []
        for model, probabilities in cells.items():
            frame = pd.DataFrame({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                                  "Metadata_TableNumber": table_number, "Metadata_ImageNumber": keys[:, 2],
                                  OBJECT_NUMBER: keys[:, 3], IMAGE_ID: image_id,
                                  CELL_ID: cell_id, "Metadata_Model": model})
            if in_distribution is not None:
                frame["Metadata_InDistribution"] = in_distribution
            frames.append(pd.concat([frame, pd.DataFrame(probabilities, columns=classes[model])], axis=1))
        outputs["cells"] = write_table(pd.concat(frames, ignore_index=True), outdir / f"{plate}.cells.parquet").name
    return outputs


# --------------------------------------------------------------------------------------------
# Across plates
# --------------------------------------------------------------------------------------------

def _summary_files(plate_outputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in plate_outputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.summary.json"))
            if not found:
                raise MorphotypeInputError(f"{path}: no <plate>.summary.json in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise MorphotypeInputError(f"{path}: no such plate output (folder or .summary.json)")
    return files


def summarise(plate_outputs: Sequence[str | os.PathLike], outdir: str | os.PathLike, top_n: int = 10,
              treatment_key: str = "Metadata_broad_sample", alpha: float = 0.05,
              min_shift: float = 0.1) -> dict:
    """Combine per-plate outputs: q-values, per-treatment enrichment, top treatments, profiles.

    Parameters
    ----------
    plate_outputs
        ``<plate>.summary.json`` files written by :func:`score_plate`, or folders holding them.
    outdir
        Writes ``ks_wells.parquet`` (per-well tests with BH q-values per model),
        ``enrichment.parquet`` (per treatment, condition, model and phenotype),
        ``enrichment_top.csv`` (top ``top_n`` per model, perturbation type, cell type, time and
        phenotype), ``profiles.parquet`` and ``summary.json``.
    top_n
        Treatments kept per group in ``enrichment_top.csv``.
    treatment_key
        What a treatment is: ``Metadata_broad_sample`` (the reagent: compound, guide, ORF clone)
        or ``Metadata_Treatment`` (its name: pools the CRISPR guides of a gene).
    alpha, min_shift
        A treatment is ``enriched`` for a phenotype when ``q < alpha`` and its median probability
        shift over the controls is at least ``min_shift``.

    Notes
    -----
    Per treatment: ``median_ks_d`` (median KS D over replicate wells, the paper's statistic)
    ranks the enriched treatments; ``median_shift`` is the median over wells of (median treated
    probability − median control probability). The shift is required because KS D is rank-based:
    a strong morphological change moves even a shuffled-baseline model's near-constant
    probabilities consistently, giving a large D with a negligible shift. ``combined_p`` merges
    the wells' p-values by ``P_COMBINATION``; ``q`` is Benjamini-Hochberg over all treatments,
    conditions and phenotypes of a model (and, in ``ks_wells``, over all wells and phenotypes of
    a model).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be positive, got {top_n}")
    files = _summary_files(plate_outputs)
    summaries = [json.loads(f.read_text()) for f in files]
    plates = pd.Series([s["plate"] for s in summaries])
    if plates.duplicated().any():
        raise MorphotypeInputError(f"plate(s) {sorted(set(plates[plates.duplicated()]))} given more than once "
                                   f"({[str(f) for f in files]}); each plate must be counted once")

    def table(summary: dict, kind: str, source: Path) -> pd.DataFrame:
        return read_table(source.parent / summary["outputs"][kind])  # names are relative to the JSON

    ks = pd.concat([table(s, "ks", f) for s, f in zip(summaries, files)], ignore_index=True)
    profiles = pd.concat([table(s, "profiles", f) for s, f in zip(summaries, files)], ignore_index=True)
    if ks.duplicated(["Metadata_Plate", "Metadata_Well", "Metadata_Model", PHENOTYPE]).any():
        raise MorphotypeInputError("per-well KS tables repeat a (plate, well, model, phenotype)")

    ks["q"] = np.nan
    for model, rows in ks.groupby("Metadata_Model").groups.items():
        ks.loc[rows, "q"] = false_discovery_control(ks.loc[rows, "ks_p"].to_numpy())

    group = ["Metadata_Model", "Metadata_Perturbation", "Metadata_CellType", "Metadata_Time",
             treatment_key, PHENOTYPE]
    descriptive = [c for c in ["Metadata_broad_sample", "Metadata_Treatment", "Metadata_pert_type",
                               "Metadata_control_type"] if c != treatment_key]
    enrichment = (ks.groupby(group, dropna=False, sort=True)
                  .agg(n_wells=("ks_d", "size"), n_plates=("Metadata_Plate", "nunique"),
                       median_ks_d=("ks_d", "median"), mean_ks_d=("ks_d", "mean"),
                       median_shift=("median_shift", "median"),
                       combined_p=("ks_p", combine_replicate_pvalues),
                       **{c: (c, lambda v: "|".join(sorted(set(map(str, v.dropna()))))) for c in descriptive})
                  .reset_index())
    enrichment["q"] = np.nan
    for model, rows in enrichment.groupby("Metadata_Model").groups.items():
        enrichment.loc[rows, "q"] = false_discovery_control(enrichment.loc[rows, "combined_p"].to_numpy())
    enrichment["enriched"] = (enrichment["q"] < alpha) & (enrichment["median_shift"] >= min_shift)
    ranked = enrichment[enrichment["enriched"]].sort_values(
        ["median_ks_d", "combined_p", treatment_key], ascending=[False, True, True])
    rank = ranked.groupby(group[:4] + [PHENOTYPE], dropna=False).cumcount() + 1
    enrichment["rank"] = rank.reindex(enrichment.index).astype("Int64")
    top = enrichment[enrichment["rank"] <= top_n].sort_values(group[:4] + [PHENOTYPE, "rank"])

    outdir = Path(outdir)
    outputs = {"ks_wells": str(write_table(ks, outdir / "ks_wells.parquet")),
               "enrichment": str(write_table(enrichment, outdir / "enrichment.parquet")),
               "enrichment_top": str(write_table(top, outdir / "enrichment_top.csv")),
               "profiles": str(write_table(profiles, outdir / "profiles.parquet"))}
    median_d = (ks.groupby(["Metadata_Model", "Metadata_CellType"])["ks_d"].median()
                .unstack("Metadata_CellType").to_dict(orient="index"))
    summary = {
        "plates": plates.tolist(), "n_plates": len(plates),
        "n_cells_scored": int(sum(s["n_cells_scored"] for s in summaries)),
        "n_wells_tested": int(sum(s["n_wells_tested"] for s in summaries)),
        "n_wells_skipped_low_count": int(sum(s["n_wells_skipped_low_count"] for s in summaries)),
        "missing_features": {s["plate"]: s["missing_features"] for s in summaries if s["missing_features"]},
        "median_ks_d": median_d, "treatment_key": treatment_key, "top_n": top_n,
        "alpha": alpha, "min_shift": min_shift,
        "n_enriched": {model: int(n) for model, n in enrichment.groupby("Metadata_Model")["enriched"].sum().items()},
        "p_combination": P_COMBINATION, "q_values": "Benjamini-Hochberg per model (scipy false_discovery_control)",
        "outputs": outputs,
    }
    with atomic_path(outdir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=_jsonable))
    return summary
