"""Pipeline parameters: their defaults, loading a params file, and turning each into settings.

One place owns every parameter of ``morphotype run`` and ``nextflow run main.nf`` (the same
names, the same params file): :data:`PARAM_DEFAULTS` holds the defaults that the command-line
options, :func:`load_params` and the training defaults all take; :func:`coerce` turns a
command-line string into the default's type; :func:`check_params` is the one check of a loaded
set of params (checks against ``nextflow_schema.json`` belong there); :func:`training_settings`
turns params into the keyword arguments of :func:`morphotype.training.train_all`.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import yaml
from jsonschema import Draft202012Validator

from morphotype.io import ASSETS_DIR, MorphotypeInputError

# Every pipeline parameter with its default; nextflow.config and nextflow_schema.json hold the
# same names and defaults (a test keeps them in step).
PARAM_DEFAULTS: dict[str, object] = {
    "input": None,  # samplesheet CSV (assets/schema_input.json)
    "mitocheck_crops": None,  # or: a folder of MitoCheck crops (class folders + manifest.csv)
    "idr_plates": None,  # or: comma-separated idr0013-screenA plates streamed from the IDR ("all": every labelled plate)
    "outdir": "results",
    # IDR streaming
    "idr_labelled": True,  # the frames with MitoCheck annotations
    "idr_controls": "negative",  # comma-separated control kinds: one drawn frame per control well
    "idr_base_url": None,  # IDR file server (HTTP(S) or FTP mirror); None: the IDR's own
    "idr_cache": None,  # frame cache; None: <outdir>/idr/frames
    "illumination_correction": True,  # BaSiC on neighbouring frames (ic); false: raw frames (no_ic)
    "idr_movies_per_batch": 4,  # whole movies held in scratch at a time
    "idr_seed": 0,  # draw of the control frames
    "segmentation_backend": "threshold",  # threshold | cellpose
    "cellpose_model": "cyto",  # model name in Cellpose's cache, or a path to weights
    "cellpose_diameter": 0.0,  # 0: estimated by Cellpose's size model
    "cellpose_flow_threshold": 0.8,
    "cellpose_cellprob_threshold": 0.0,
    "use_gpu": False,
    "min_nucleus_size": 15,
    "remove_edge_objects": True,
    "split_touching_nuclei": True,  # threshold backend: watershed-split touching nuclei
    "image_channel": None,  # multi-channel (RGB) images: 0-based channel holding the nuclei
    "annotation_tolerance": 5.0,  # pixels from an annotated centre to the nearest mask
    "batch_size": 500,  # images per Nextflow task
    # deep features (off unless given)
    "deep_weights": None,  # EfficientNet-B0 weights (.h5 / torch) -> DP__ features
    "deep_box_size": 128,
    "ssl_encoder": None,  # encoder folder, or "train": learn one on this run's training split -> SSL__ features
    "encoder_epochs": 30,
    # models (comma-separated lists are strings: Nextflow params are scalars)
    "train_models": True,
    "feature_spaces": "CP,DP,CP_and_DP,CP_areashape,CP_zernike",  # absent spaces are skipped
    "class_balance": "both",  # balanced | unbalanced | both
    "shuffled_baselines": True,
    "binary_models": True,
    "cv_folds": 10,
    "grid_c": "0.001,0.01,0.1,1,10,100,1000",
    "grid_l1_ratio": "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
    "split": "cell",  # cell: the study's 85/15 split; image: whole images held out
    "exclude_phenotypes": "Folded",
    "loio": True,
    "loio_feature_spaces": "",  # comma-separated; empty: every feature space
    "umap": True,
    "model_families": False,  # morphotype run: tree and ensemble families, models/recommended.json (not in Nextflow yet)
    "random_state": 0,
    # JUMP Cell Painting pilot (off unless given)
    "jump_plates": None,  # text file: one plate SQLite path or URL per line
    "jump_model": "CP_areashape__balanced",  # <model>__final and <model>__shuffled from <outdir>/models
    "jump_min_cells": 50,
    "jump_top_n": 10,
    "report": True,  # <outdir>/report/index.html
}

# Parameters for Nextflow's infrastructure only (executors, staging); morphotype run accepts
# and ignores them so that one params file serves both.
INFRASTRUCTURE_PARAMS: dict[str, object] = {
    "cellpose_models_dir": None,
    "publish_dir_mode": "copy",
    "slurm_queue": None,
    "slurm_cluster_options": None,
    "aws_queue": None,
    "aws_region": "eu-west-1",
    "aws_workdir": None,
    "loio_chunks": 8,  # LOIO tasks per feature space
}


# Allowed values of the params that take one of a few words (the CLI's choices too).
CLASS_BALANCES: dict[str, tuple[bool, ...]] = {"both": (True, False), "balanced": (True,), "unbalanced": (False,)}
SPLIT_METHODS = ("cell", "image")
SEGMENTATION_BACKENDS = ("threshold", "cellpose")

# Exactly one of these names the images of a run.
IMAGE_SOURCES = ("input", "mitocheck_crops", "idr_plates")


def default_workers() -> int:
    """Processes (or joblib workers) when ``--workers`` is not given: every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_params(params_file: str | Path | None, overrides: dict[str, object] | None = None) -> dict:
    """Defaults, then the params file (YAML or JSON), then command-line overrides; checked.

    Unknown names are an error; Nextflow's infrastructure params (:data:`INFRASTRUCTURE_PARAMS`)
    are accepted and dropped. Override values given as strings are coerced to the default's type.
    """
    params = dict(PARAM_DEFAULTS)
    source = "command line"
    if params_file is not None:
        path = Path(params_file)
        source = str(path)
        params.update(read_params_file(path))
    for name, value in (overrides or {}).items():
        if name in INFRASTRUCTURE_PARAMS:
            continue
        if name not in PARAM_DEFAULTS:
            raise MorphotypeInputError(f"unknown parameter --{name}; known: {sorted(PARAM_DEFAULTS)}")
        default = PARAM_DEFAULTS[name]
        if default is None:  # no default to take the type from: the schema's type
            kind = pipeline_schema()["properties"].get(name, {}).get("type")
            default = {"integer": 0, "number": 0.0, "boolean": False}.get(kind)
        try:
            params[name] = coerce(value, default)
        except MorphotypeInputError as error:
            raise MorphotypeInputError(f"--{name}: {error}") from None
    check_params(params, source=source)
    return params


def read_params_file(path: Path) -> dict[str, object]:
    """The pipeline params of a YAML (or JSON, a subset of YAML) params file."""
    if not path.exists():
        raise MorphotypeInputError(f"{path}: params file does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        raise MorphotypeInputError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(loaded, dict):
        raise MorphotypeInputError(f"{path}: expected a mapping of parameter names to values")
    unknown = sorted(set(loaded) - set(PARAM_DEFAULTS) - set(INFRASTRUCTURE_PARAMS))
    if unknown:
        raise MorphotypeInputError(f"{path}: unknown parameter(s) {unknown}; known: {sorted(PARAM_DEFAULTS)}")
    return {name: value for name, value in loaded.items() if name in PARAM_DEFAULTS}


@lru_cache(maxsize=1)
def pipeline_schema() -> dict:
    """The params' JSON schema: ``nextflow_schema.json``'s groups as one flat object schema.

    The same file validates ``nextflow run`` (nf-schema); in a source checkout it sits beside the
    package, in an installed package a copy ships in ``assets/``.
    """
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "nextflow_schema.json", ASSETS_DIR / "nextflow_schema.json"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"nextflow_schema.json not found in {[str(c) for c in candidates]}")
    schema = json.loads(path.read_text())
    properties: dict[str, dict] = {}
    for group in schema.get("$defs", schema.get("definitions", {})).values():
        properties.update(group.get("properties", {}))
    return {"type": "object", "properties": properties}


def _schema_errors(params: dict) -> list[str]:
    """Every param that breaks its type, range, enum or pattern in the schema (None = not given)."""
    schema = pipeline_schema()
    given = {name: value for name, value in params.items() if value is not None}
    messages = []
    for error in sorted(Draft202012Validator(schema).iter_errors(given), key=lambda e: list(e.path)):
        name = error.path[0] if error.path else "?"
        rule = schema["properties"].get(name, {})
        expected = {"type": f"a {rule.get('type')}", "enum": f"one of {rule.get('enum')}",
                    "pattern": f"text matching {rule.get('pattern')}",
                    "minimum": f"a number >= {rule.get('minimum')}",
                    "maximum": f"a number <= {rule.get('maximum')}"}.get(error.validator, error.message)
        messages.append(f"param {name!r}: {error.instance!r} is not valid; expected {expected}")
    for name, rule in schema["properties"].items():
        value = given.get(name)
        if rule.get("exists") and isinstance(value, str) and "://" not in value and not Path(value).exists():
            messages.append(f"param {name!r}: {value!r} does not exist")
    return messages


def _grid_errors(params: dict) -> list[str]:
    messages = []
    for name, low, high, low_open in (("grid_c", 0.0, math.inf, True), ("grid_l1_ratio", 0.0, 1.0, False)):
        try:
            values = [float(item) for item in str(params[name]).split(",") if item.strip()]
        except ValueError:
            continue  # the schema's pattern names it
        bad = [v for v in values if not (math.isfinite(v) or v == high) or v > high or v < low
               or (low_open and v == low)]
        if bad or not values:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            messages.append(f"param {name!r}: {params[name]!r}: every value must lie in {interval}")
    return messages


def check_params(params: dict, *, source: str = "params") -> None:
    """The one check of a complete set of params, before any work starts.

    Types, ranges, enums and patterns come from ``nextflow_schema.json`` (what nf-schema checks
    for ``nextflow run``), strictly: ``'no'`` is no boolean, ``-1`` no C. ``source`` names where
    the params came from (the params file) in messages; every problem is listed.
    """
    problems = _schema_errors(params) + _grid_errors(params)
    if problems:
        raise MorphotypeInputError(f"{source}: " + "; ".join(problems))
    given = [name for name in IMAGE_SOURCES if params[name]]
    if len(given) != 1:
        raise MorphotypeInputError(f"{source}: give exactly one of 'input' (a samplesheet), 'mitocheck_crops' (a crops folder) "
                                   f"or 'idr_plates' (IDR plates); got {given or 'none'}")


def coerce(value: object, default: object) -> object:
    """A command-line string to the default's type, as Nextflow does for ``--param value``."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise MorphotypeInputError(f"expected true or false, got {value!r}")
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise MorphotypeInputError(f"expected {kind}, got {value!r}") from None
    return value


def names(value: object) -> list[str]:
    """A comma-separated param as a list of its non-empty, stripped items."""
    return [item.strip() for item in str(value or "").split(",") if item.strip()]


def _items(value: object) -> list[str]:
    # Training lists are split on commas only (no stripping), as the train command always did.
    return [item for item in str(value).split(",") if item]


def _numbers(name: str, value: object) -> list[float]:
    try:
        return [float(item) for item in str(value).split(",") if item.strip()]
    except ValueError as error:
        raise MorphotypeInputError(f"{name}: expected comma-separated numbers, got {value!r}") from error


def _integer(name: str, value: object) -> int:
    try:
        return int(str(value))
    except ValueError as error:
        raise MorphotypeInputError(f"{name}: expected an integer, got {value!r}") from error


def _choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise MorphotypeInputError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return str(value)


def training_settings(params: dict) -> dict[str, Any]:
    """Keyword arguments of :func:`morphotype.training.train_all` from the params (all but ``n_jobs``)."""
    return dict(
        feature_spaces=_items(params["feature_spaces"]),
        balanced=CLASS_BALANCES[_choice("class_balance", params["class_balance"], tuple(CLASS_BALANCES))],
        shuffled=(False, True) if params["shuffled_baselines"] else (False,),
        binary=bool(params["binary_models"]),
        grid={"C": _numbers("grid_c", params["grid_c"]), "l1_ratio": _numbers("grid_l1_ratio", params["grid_l1_ratio"])},
        cv_folds=_integer("cv_folds", params["cv_folds"]),
        split_method=_choice("split", params["split"], SPLIT_METHODS),
        exclude_phenotypes=_items(params["exclude_phenotypes"]),
        loio=bool(params["loio"]),
        loio_feature_spaces=_items(params["loio_feature_spaces"]) or None,
        umap=bool(params["umap"]),
        random_state=_integer("random_state", params["random_state"]),
    )


def training_options(params: dict) -> list[str]:
    """The ``morphotype train`` options that the params stand for (what Nextflow passes)."""
    options = [
        "--feature-spaces", *str(params["feature_spaces"]).split(","),
        "--class-balance", str(params["class_balance"]),
        "--cv-folds", str(params["cv_folds"]),
        "--grid-c", str(params["grid_c"]),
        "--grid-l1-ratio", str(params["grid_l1_ratio"]),
        "--split", str(params["split"]),
        "--exclude-phenotypes", str(params["exclude_phenotypes"]),
        "--seed", str(params["random_state"]),
    ]
    if params["loio_feature_spaces"]:
        options += ["--loio-feature-spaces", str(params["loio_feature_spaces"])]
    options += [] if params["shuffled_baselines"] else ["--no-shuffled"]
    options += [] if params["binary_models"] else ["--no-binary"]
    options += [] if params["loio"] else ["--no-loio"]
    options += [] if params["umap"] else ["--no-umap"]
    return options
