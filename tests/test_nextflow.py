"""The Nextflow layer: strict, lint-clean nf-core layout, in step with the Python core.

Without a Nextflow runtime, three things stand in for one:
- nflint (tests/nextflow/nflint.py, the official Nextflow parser in its own venv, `make nflint-venv`)
  parses every ``*.nf``, ``*.config`` and ``*.nf.test`` file once per session and describes them;
- a Groovy evaluator (the same jar) renders each process's ``script:`` and ``stub:`` blocks, the
  ``ext.*`` settings of conf/modules.config and the batching function exactly as Nextflow would;
- the rendered commands run in task folders staged the way Nextflow stages them, with the real
  ``morphotype`` command, chained as workflows/morphotype.nf chains them, on a few shared crops;
  the result must equal ``morphotype run`` on the same crops.

A new module: add ``modules/local/<step>/`` (main.nf, meta.yml, environment.yml,
tests/main.nf.test), call it from its stage's subworkflow, and add its call to ``simulate``.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from jsonschema import Draft202012Validator

from morphotype import __version__
from morphotype.cli import build_parser
from morphotype.params import INFRASTRUCTURE_PARAMS, PARAM_DEFAULTS
from morphotype.run import STAGES

REPO = Path(__file__).resolve().parents[1]
NFLINT = REPO / "tests" / "nextflow" / "nflint.py"
MODULES = REPO / "modules" / "local"
SKIP_DIRS = {"work", "results", "node_modules", "__pycache__", "null"}  # as nflint, plus hidden dirs
# Allow-listed nflint findings may only be these (the offline plugin registry).
OFFLINE_ONLY = (r"^Plugin 'nf-schema' does not exist", r"^Unrecognized config option 'validation\.")
# Params the entry workflow handles itself rather than passing to a command as an option: the
# sources, the fan-outs and switches (which calls run), and files staged into tasks.
WORKFLOW_PARAMS = {"input", "mitocheck_crops", "idr_plates", "outdir", "batch_size", "idr_cache", "deep_weights",
                   "ssl_encoder", "train_models", "feature_spaces", "jump_plates", "report", "model_families"}


def _names(value) -> list[str]:
    return [name for name in str(value or "").split(",") if name]


# Each science param, by the call whose command line carries it: (call, argparse dest, to_option).
PARAM_OPTIONS = {
    "idr_labelled": ("MORPHOTYPE_SAMPLESHEET_IDR", "labelled", bool),
    "idr_controls": ("MORPHOTYPE_SAMPLESHEET_IDR", "controls", _names),
    "idr_base_url": ("MORPHOTYPE_SAMPLESHEET_IDR", "base_url", lambda v: v),
    "idr_seed": ("MORPHOTYPE_SAMPLESHEET_IDR", "seed", int),
    "illumination_correction": ("MORPHOTYPE_STREAM", "variant", lambda v: "ic" if v else "no_ic"),
    "idr_movies_per_batch": ("MORPHOTYPE_STREAM", "batch_size", int),
    "segmentation_backend": ("MORPHOTYPE_SEGMENT", "backend", lambda v: v),
    "cellpose_model": ("MORPHOTYPE_SEGMENT", "cellpose_model", lambda v: v),
    "cellpose_diameter": ("MORPHOTYPE_SEGMENT", "diameter", float),
    "cellpose_flow_threshold": ("MORPHOTYPE_SEGMENT", "flow_threshold", float),
    "cellpose_cellprob_threshold": ("MORPHOTYPE_SEGMENT", "cellprob_threshold", float),
    "use_gpu": ("MORPHOTYPE_SEGMENT", "gpu", bool),
    "min_nucleus_size": ("MORPHOTYPE_SEGMENT", "min_size", int),
    "remove_edge_objects": ("MORPHOTYPE_SEGMENT", "keep_edge_objects", lambda v: not v),
    "split_touching_nuclei": ("MORPHOTYPE_SEGMENT", "split_touching", bool),
    "image_channel": ("MORPHOTYPE_SEGMENT", "channel", lambda value: None if value is None else int(value)),
    "annotation_tolerance": ("MORPHOTYPE_FEATURES", "tolerance", float),
    "deep_box_size": ("DEEP_FEATURES_DP", "box_size", int),
    "encoder_epochs": ("MORPHOTYPE_ENCODER_TRAIN", "epochs", int),
    "class_balance": ("MORPHOTYPE_TRAIN", "class_balance", lambda v: v),
    "shuffled_baselines": ("MORPHOTYPE_TRAIN", "shuffled", bool),
    "binary_models": ("MORPHOTYPE_TRAIN", "binary", bool),
    "cv_folds": ("MORPHOTYPE_TRAIN", "cv_folds", int),
    "grid_c": ("MORPHOTYPE_TRAIN", "grid_c", lambda v: v),
    "grid_l1_ratio": ("MORPHOTYPE_TRAIN", "grid_l1_ratio", lambda v: v),
    "split": ("MORPHOTYPE_TRAIN", "split", lambda v: v),
    "exclude_phenotypes": ("MORPHOTYPE_TRAIN", "exclude_phenotypes", lambda v: v),
    "random_state": ("MORPHOTYPE_TRAIN", "seed", int),
    "loio": ("MORPHOTYPE_EVALUATE", "run_loio", bool),
    "loio_feature_spaces": ("MORPHOTYPE_EVALUATE", "loio_feature_spaces", lambda v: v),
    "umap": ("MORPHOTYPE_EVALUATE", "umap", bool),
    "jump_model": ("MORPHOTYPE_JUMP_SCORE", "model", lambda v: Path(f"models/{v}__final")),
    "jump_min_cells": ("MORPHOTYPE_JUMP_SCORE", "min_cells", int),
    "jump_top_n": ("MORPHOTYPE_JUMP_SUMMARISE", "top_n", int),
}
# Values unlike every default, to see each param reach its option.
FLIPPED = {"segmentation_backend": "cellpose", "cellpose_model": "nuclei", "cellpose_diameter": 17.5,
           "cellpose_flow_threshold": 0.4, "cellpose_cellprob_threshold": -1.5, "use_gpu": True,
           "min_nucleus_size": 40, "remove_edge_objects": False, "split_touching_nuclei": False, "image_channel": 1,
           "annotation_tolerance": 9.0,
           "idr_labelled": False, "idr_controls": "negative,positive", "idr_base_url": "ftp://mirror.example/idr",
           "idr_seed": 7, "illumination_correction": False, "idr_movies_per_batch": 2, "deep_box_size": 96,
           "encoder_epochs": 2, "class_balance": "balanced", "shuffled_baselines": False, "binary_models": False,
           "cv_folds": 3, "grid_c": "0.1,1", "grid_l1_ratio": "0.5", "split": "image",
           "exclude_phenotypes": "Folded,OutOfFocus", "random_state": 11, "loio": False,
           "loio_feature_spaces": "CP,DP", "umap": False, "jump_model": "CP__unbalanced", "jump_min_cells": 10,
           "jump_top_n": 3}
# Values of a call's val inputs (other than meta) when its command is rendered on its own.
VAL_INPUTS = {"plates": ["LT0003_40", "LT0004_06"], "model_kind": "weights"}
ANY_META = {"id": "batch_00000", "batch": 0, "space": "CP", "index": 0, "chunk": 1, "chunks": 4}
MANIFEST_STEP = 400  # every 400th crop of the shared manifest: 7 crops, 6 classes, 7 plates
BATCH_SIZE = 4  # 7 crops -> batches of 4 and 3 images


def nflint_python() -> Path:
    """The nflint venv's interpreter; a missing venv is a failure, never a skip."""
    python = Path(os.environ.get("MORPHOTYPE_NFLINT_PYTHON", REPO / ".venv-nflint" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"nflint interpreter {python} not found: run `make nflint-venv` "
                    "(or set MORPHOTYPE_NFLINT_PYTHON)", pytrace=False)
    return python


# ------------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Lint:
    returncode: int
    output: str
    description: dict


@pytest.fixture(scope="session")
def lint(tmp_path_factory) -> Lint:
    """One strict nflint run over the repository, with its description JSON."""
    out = tmp_path_factory.mktemp("nflint") / "description.json"
    result = subprocess.run([str(nflint_python()), str(NFLINT), "lint", ".", "--strict", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"nflint wrote no description:\n{result.stdout}\n{result.stderr}", pytrace=False)
    return Lint(result.returncode, result.stdout + result.stderr, json.loads(out.read_text()))


# Runs in the nflint venv: evaluates Groovy snippets sent as JSON lines, answers JSON lines.
GROOVY_SERVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jpype, nflint
    nflint.start_jvm()
    shell = jpype.JClass("groovy.lang.GroovyShell")()
    to_json = jpype.JClass("groovy.json.JsonOutput").toJson
    for line in sys.stdin:
        request = json.loads(line)
        try:
            script = shell.parse(request["code"])
            binding = jpype.JClass("groovy.lang.Binding")()
            binding.setVariable("__json", request["variables"])
            script.setBinding(binding)
            reply = {"value": json.loads(str(to_json(script.run())))}
        except Exception as error:  # a Groovy failure is an answer for the test, not a crash
            reply = {"error": str(error)}
        print(json.dumps(reply), flush=True)
""")


class Groovy:
    """Evaluate Groovy code with JSON-able variables; the last expression's value comes back."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([str(nflint_python()), "-c", GROOVY_SERVER, str(NFLINT.parent)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, code: str, **variables) -> object:
        prelude = "binding.variables.putAll(new groovy.json.JsonSlurper().parseText(__json))\n"
        request = {"code": prelude + code, "variables": json.dumps(variables)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline() or '{"error": "Groovy evaluator died"}')
        if "error" in reply:
            raise AssertionError(f"Groovy failed: {reply['error']}\n--- code ---\n{code}")
        return reply["value"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def groovy() -> Groovy:
    evaluator = Groovy()
    yield evaluator
    evaluator.close()


# ------------------------------------------------------------------------- description helpers


def nextflow_files() -> set[str]:
    found = set()
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        for name in files:
            if name.endswith((".nf", ".config", ".nf.test")):
                found.add(Path(folder, name).relative_to(REPO).as_posix())
    return found


def all_processes(description: dict) -> dict[str, tuple[str, dict]]:
    """Process name -> (file, nflint description)."""
    return {process["name"]: (file, process) for file, info in description["files"].items()
            for process in info.get("processes", [])}


def calls_by_name(description: dict) -> dict[str, str]:
    """Every name a workflow file calls a local module's process by (alias or name) -> process name."""
    calls = {}
    for info in description["files"].values():
        for include in info.get("includes", []):
            for name in include.get("names", []):  # config includes have none
                if name["kind"] == "process":
                    calls[name["alias"] or name["name"]] = name["name"]
    return calls


def module_dir(file: str) -> Path:
    return (REPO / file).parent


def command_lines(script: str) -> list[str]:
    """Lines of a (rendered or raw) script that run morphotype."""
    return [line.strip() for line in script.splitlines() if re.match(r"\s*morphotype\s", line)]


def config_value(text: str) -> object:
    """A config literal (null, true, 'text', 1.5) as Python."""
    return ast.literal_eval({"null": "None", "true": "True", "false": "False"}.get(text, text))


def config_params(description: dict, file: str = "nextflow.config") -> dict[str, str]:
    return {p["name"]: p["value"] for p in description["files"][file]["params"] if p["profile"] is None}


def schema_properties(schema: dict) -> dict[str, dict]:
    """Every param of nextflow_schema.json, assembled from its $defs groups."""
    properties = {}
    for group in schema["$defs"].values():
        for name, spec in group["properties"].items():
            assert name not in properties, f"{name} is in two $defs groups"
            properties[name] = spec
    return properties


def nextflow_schema() -> dict:
    return json.loads((REPO / "nextflow_schema.json").read_text())


# ------------------------------------------------------------------------------- lint


def test_lint_is_clean_in_strict_mode(lint):
    assert lint.returncode == 0, lint.output
    unexpected = [d for d in lint.description["diagnostics"] if not d["allowed"]]
    assert not unexpected, lint.output
    for diagnostic in lint.description["diagnostics"]:  # allow-listed: only the offline registry
        assert any(re.search(p, diagnostic["message"]) for p in OFFLINE_ONLY), diagnostic


def test_lint_covers_every_script_config_and_nf_test(lint):
    described = set(lint.description["files"])
    assert described == nextflow_files()
    assert {"main.nf", "nextflow.config", "tests/main.nf.test"} <= described
    assert all(lint.description["files"][f].get("parsed", True) for f in described)
    for module in MODULES.iterdir():  # each module's nf-test spec is parsed as Groovy
        assert f"modules/local/{module.name}/tests/main.nf.test" in described


def test_every_include_resolves_and_plugins_stay_in_main_nf(lint):
    for file, info in lint.description["files"].items():
        for include in info.get("includes", []):
            if info["kind"] == "config":
                assert include["exists"], (file, include)
                continue
            if include["plugin"]:
                assert file == "main.nf", f"{file}: plugin include {include['source']} outside main.nf"
                continue
            assert include["exists"], (file, include)
            assert all(name["kind"] in ("process", "workflow", "function") for name in include["names"]), include


def test_params_are_read_only_in_main_nf_and_configs(lint):
    for file in lint.description["files"]:
        if file.endswith(".nf") and file != "main.nf":
            code = "\n".join(line.split("//")[0] for line in (REPO / file).read_text().splitlines())
            assert "params." not in code, f"{file} reads params: pass them through take: instead"


def test_workflow_stages_follow_run_stages(lint):
    (workflow,) = lint.description["files"]["workflows/morphotype.nf"]["workflows"]
    assert workflow["name"] == "MORPHOTYPE"
    sources = {name["name"]: include["resolved"]
               for include in lint.description["files"]["workflows/morphotype.nf"]["includes"]
               for name in include["names"]}
    stages = [Path(sources[call["name"]]).parent.name for call in workflow["calls"]]
    assert stages == STAGES
    assert all(sources[call["name"]].startswith("subworkflows/local/") for call in workflow["calls"])
    (entry,) = lint.description["files"]["main.nf"]["workflows"]
    assert entry["entry"] and [call["name"] for call in entry["calls"]] == ["MORPHOTYPE"]


# ---------------------------------------------------------------------------- processes


def test_every_module_folder_holds_one_process_named_after_it(lint):
    processes = all_processes(lint.description)
    modules = sorted(m.name for m in MODULES.iterdir() if m.is_dir())
    assert modules
    for name, (file, _) in processes.items():
        assert file.startswith("modules/local/") and file.endswith("/main.nf"), f"{name} defined in {file}"
        assert name == "MORPHOTYPE_" + module_dir(file).name.upper()
    assert sorted(module_dir(file).name for file, _ in processes.values()) == modules
    for module in modules:
        for part in ("main.nf", "meta.yml", "environment.yml", "tests/main.nf.test"):
            assert (MODULES / module / part).is_file(), f"modules/local/{module}/{part} is missing"


def test_every_process_is_written_the_nf_core_way(lint):
    for name, (file, process) in all_processes(lint.description).items():
        where = f"{name} ({file})"
        directives = process["directives"]
        assert directives.get("tag") == '"${meta.id}"', where
        assert any(label.startswith("process_") and label != "process_gpu" for label in process["labels"]), where
        assert directives.get("conda") == '"${moduleDir}/environment.yml"', where
        assert "container" in directives, where
        assert process["when"] is None, f"{where}: no when: (ext.when), calls decide"
        assert process["stub"] and "morphotype" not in process["stub"], f"{where}: a stub creates the outputs"
        assert process["inputs"][0].startswith("tuple val(meta), "), where
        commands = command_lines(process["script"])
        assert len(commands) == 1, f"{where}: one morphotype command per process, got {commands}"
        assert "${args}" in commands[0] and "def args = task.ext.args ?: ''" in process["script"], where
        assert all(output["emit"] for output in process["outputs"]), f"{where}: every output is named"
        (versions,) = [o for o in process["outputs"] if o["topic"] == "versions"]
        assert versions["text"].startswith('tuple val("${task.process}"), val(\'morphotype\'), '
                                           "eval('morphotype --version | sed \"s/morphotype //\"')"), where


def test_every_process_uses_a_container_built_here_at_the_package_version(lint):
    version = tomllib_version()
    for name, (_, process) in all_processes(lint.description).items():
        image = process["directives"]["container"].strip("'\"")
        match = re.fullmatch(r"ghcr\.io/morphotype/morphotype-([a-z0-9-]+):(\S+)", image)
        assert match, f"{name}: container {image} is not a morphotype image"
        assert f"morphotype-{match.group(1)}:" in (REPO / "containers" / "Dockerfile").read_text(), f"{name}: {image} not built"
        assert match.group(2) == version, f"{name}: image tag {match.group(2)} != package version {version}"


def test_dockerfiles_install_pinned_torch_then_the_lock_file_without_entrypoint():
    dockerfiles = sorted((REPO / "containers").rglob("Dockerfile"))
    assert dockerfiles == [REPO / "containers" / "Dockerfile"]  # one recipe for every image
    for dockerfile in dockerfiles:
        text = dockerfile.read_text()
        assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text, dockerfile
        assert not re.search(r"^\s*(ENTRYPOINT|CMD)\b", text, re.M), dockerfile
        torch = text.index("torch==2.13.0")
        assert "download.pytorch.org/whl/cpu" in text and torch < text.index("-r /tmp/morphotype/requirements/lock.txt")
        assert "COPY requirements/lock.txt" in text and "HOME=" in text, dockerfile


def test_environment_files_pin_python_and_install_the_lock_file():
    for environment in sorted(MODULES.glob("*/environment.yml")):
        spec = yaml.safe_load(environment.read_text())
        assert "conda-forge::python=3.11" in spec["dependencies"], environment
        (pip,) = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict)]
        assert "torch==2.13.0" in pip and "../../.." in pip, environment
        lock = next(line.split(None, 1)[1] for line in pip if line.startswith("-r "))
        assert (environment.parent / lock).resolve() == REPO / "requirements" / "lock.txt", environment


def test_meta_yml_matches_the_process_inputs_and_emits(lint):
    for name, (file, process) in all_processes(lint.description).items():
        meta = yaml.safe_load((module_dir(file) / "meta.yml").read_text())
        assert meta["name"] == name.lower()
        assert len(meta["input"]) == len(process["inputs"]), f"{name}: meta.yml input channels"
        for declared, described in zip(process["inputs"], meta["input"]):
            names = [n for _, n, _ in input_items(declared)]
            documented = [next(iter(item)) for item in (described if isinstance(described, list) else [described])]
            assert names == documented, f"{name}: {declared!r} vs meta.yml {documented}"
        assert set(meta["output"]) == {o["emit"] for o in process["outputs"]}, name
        assert list(meta["topics"]) == ["versions"], name


def tomllib_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# ------------------------------------------------------------------------ params and schema


def test_schemas_are_valid_json_schema():
    schemas = [REPO / "nextflow_schema.json", *sorted((REPO / "assets").glob("*.json"))]
    assert len(schemas) >= 2
    for path in schemas:
        schema = json.loads(path.read_text())
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", path
        Draft202012Validator.check_schema(schema)
    schema = nextflow_schema()
    assert [ref["$ref"] for ref in schema["allOf"]] == [f"#/$defs/{group}" for group in schema["$defs"]]
    assert schema_properties(schema)["input"]["schema"] == "assets/schema_input.json"


def test_config_params_equal_schema_params_and_run_defaults(lint):
    config = config_params(lint.description)
    properties = schema_properties(nextflow_schema())
    assert set(config) == set(properties)
    assert set(PARAM_DEFAULTS) <= set(config), "every morphotype run param is a pipeline param"
    for name, default in PARAM_DEFAULTS.items():
        value = config_value(config[name])
        assert value == default and type(value) is type(default), f"{name}: config {value!r} != run {default!r}"
    for name, text in config.items():
        value = config_value(text)
        if value is None:
            assert "default" not in properties[name], name
        else:
            assert properties[name]["default"] == value, f"{name}: schema default != config {value!r}"
    for profile_param in (p for p in lint.description["files"]["nextflow.config"]["params"] if p["profile"]):
        assert profile_param["name"] in properties, profile_param


def test_every_science_param_reaches_its_command_option():
    assert set(PARAM_OPTIONS) == set(PARAM_DEFAULTS) - WORKFLOW_PARAMS, "map each new param to its option"
    assert set(FLIPPED) == set(PARAM_OPTIONS)
    for name, value in FLIPPED.items():
        default = PARAM_DEFAULTS[name]
        assert value != default and (default is None or type(value) is type(default)), name


def example_params(path: Path) -> dict:
    return {**PARAM_DEFAULTS, **INFRASTRUCTURE_PARAMS, **yaml.safe_load(path.read_text())}


def test_examples_and_test_profile_are_valid_params(lint):
    schema = nextflow_schema()
    validator = Draft202012Validator(schema)
    properties = schema_properties(schema)
    examples = sorted((REPO / "examples").glob("*.yaml"))
    assert examples
    for example in examples:
        given = yaml.safe_load(example.read_text())
        assert set(given) <= set(properties), f"{example}: unknown params {set(given) - set(properties)}"
        params = {k: v for k, v in example_params(example).items() if v is not None}
        errors = [e.message for e in validator.iter_errors(params)]
        assert not errors, f"{example}: {errors}"
    test_profile = config_params(lint.description, "conf/test.config")
    assert set(test_profile) <= set(properties)
    literal = {k: config_value(v) for k, v in test_profile.items() if not v.startswith('"')}
    params = {k: v for k, v in {**PARAM_DEFAULTS, **literal}.items() if v is not None}
    assert not [e.message for e in validator.iter_errors(params)]


def test_manifest_version_is_the_package_version():
    text = (REPO / "nextflow.config").read_text()
    assert re.search(r"^\s*version\s*=\s*'([^']+)'", text, re.M).group(1) == tomllib_version()


# ---------------------------------------------------------------------- rendering and staging


INPUT_ITEM = re.compile(r"(val|path)\(\s*(\w+)\s*(?:,\s*stageAs:\s*'([^']*)')?\s*\)")


def input_items(declaration: str) -> list[tuple[str, str, str | None]]:
    """(kind, name, stageAs) of each element of one input declaration."""
    bare = re.fullmatch(r"(val|path)\s+(\w+)", declaration)
    if bare:
        items = [(bare.group(1), bare.group(2), "")]
    elif declaration.startswith("tuple "):
        items = INPUT_ITEM.findall(declaration)
    else:
        items = INPUT_ITEM.findall(declaration) if INPUT_ITEM.fullmatch(declaration) else []
    assert items, f"cannot read input declaration {declaration!r}"
    return [(kind, name, stage or None) for kind, name, stage in items]


def process_config(call: str) -> dict[str, str]:
    """ext.* expressions (Groovy source) that conf/modules.config gives to ``call``."""
    text = (REPO / "conf" / "modules.config").read_text()
    settings = {}
    for selector in re.finditer(r"withName:\s*'([^']+)'\s*\{", text):
        if not re.fullmatch(selector.group(1), call):
            continue
        body = text[selector.end():_closing(text, selector.end() - 1)]
        for ext in re.finditer(r"^\s*ext\.(\w+)\s*=\s*", body, re.M):
            start = ext.end()
            end = _closing(body, start) + 1 if body[start] == "{" else body.index("\n", start)
            settings[ext.group(1)] = body[start:end].strip()
    return settings


def _closing(text: str, opening: int) -> int:
    """Index of the brace or bracket that closes the one at ``opening``."""
    close = {"{": "}", "[": "]"}[text[opening]]
    depth = 0
    for index in range(opening, len(text)):
        depth += {text[opening]: 1, close: -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced {text[opening]}{close}")


def render_ext(groovy: Groovy, call: str, params: dict) -> dict[str, str]:
    """task.ext of a call, evaluated with these params as Nextflow evaluates conf/modules.config."""
    return {key: groovy(f"def value = {expression}\nvalue instanceof Closure ? value.call() : value", params=params)
            for key, expression in process_config(call).items()}


def render(groovy: Groovy, process: dict, block: str, variables: dict) -> tuple[str, list[tuple[str, list[str]]]]:
    """A process's script or stub block rendered, and (emit, [output file patterns]) after it."""
    patterns = []
    for output in process["outputs"]:
        if output["topic"] is None:
            sources = re.findall(r"""path\(\s*("(?:[^"\\]|\\.)*"|'[^']*')""", output["text"])
            assert sources, output
            patterns.append((output["emit"], sources))
    globs = ", ".join("[" + ", ".join(sources) + "].collect { p -> p.toString() }" for _, sources in patterns)
    code = f"def command = {{ ->\n{process[block]}\n}}.call()\n[command.toString(), [{globs}]]"
    command, rendered = groovy(code, **variables)
    return command, [(emit, found) for (emit, _), found in zip(patterns, rendered)]


@dataclass
class Task:
    call: str
    workdir: Path
    command: str
    outputs: dict[str, list[Path]]  # emit -> files
    seconds: float = 0.0  # the command's wall time


def stage(workdir: Path, value: object, stage_as: str | None) -> object:
    """Link input files into the task folder as Nextflow does; the value as a script sees it.

    stageAs 'dir/*' puts each file into dir/; a run of '?' in dir is the file's 1-based index,
    zero-padded to the run's length ('space??/*': space01/<name>, space02/<name>, ...)."""
    files = [value] if isinstance(value, Path) else list(value)
    names = []
    for index, source in enumerate(files, start=1):
        if stage_as in (None, "*"):
            name = source.name
        else:
            assert stage_as.endswith("/*") and "*" not in stage_as[:-2], f"unsupported stageAs {stage_as}"
            folder = re.sub(r"\?+", lambda run: str(index).zfill(len(run.group())), stage_as[:-2])
            name = f"{folder}/{source.name}"
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        assert not (workdir / name).exists(), f"input file name collision: {name}"
        (workdir / name).symlink_to(source.resolve())
        names.append(name)
    if isinstance(value, Path):
        return names[0]
    return " ".join(names) if names else []


class Runner:
    """Runs process calls in task folders with the real morphotype command."""

    def __init__(self, root: Path, lint: Lint, groovy: Groovy, params: dict, *, stub: bool = False) -> None:
        self.root, self.groovy, self.params, self.stub = root, groovy, params, stub
        self.processes = all_processes(lint.description)
        self.calls = calls_by_name(lint.description)
        self.bin = root / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        shim = self.bin / "morphotype"  # what the containers and conda environments put on PATH
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m morphotype \"$@\"\n")
        shim.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        self.tasks: list[Task] = []

    def __call__(self, call: str, *inputs: object) -> Task:
        process = self.processes[self.calls[call]][1]
        meta = inputs[0][0]
        workdir = self.root / f"{call}.{meta['id']}"
        workdir.mkdir()
        variables = {"task": {"ext": render_ext(self.groovy, call, self.params), "cpus": 1,
                              "process": f"MORPHOTYPE:{call}"}}
        assert len(inputs) == len(process["inputs"]), f"{call}: {len(inputs)} inputs for {process['inputs']}"
        for declaration, value in zip(process["inputs"], inputs):
            items = input_items(declaration)
            values = value if declaration.startswith("tuple ") else [value]
            assert len(values) == len(items), f"{call}: {declaration} given {value}"
            for (kind, name, stage_as), item in zip(items, values):
                variables[name] = item if kind == "val" else stage(workdir, item, stage_as)
        command, patterns = render(self.groovy, process, "stub" if self.stub else "script", variables)
        (workdir / ".command.sh").write_text(command)
        started = time.perf_counter()
        result = subprocess.run(["bash", "-euo", "pipefail", ".command.sh"], cwd=workdir, env=self.env,
                                capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
        assert result.returncode == 0, f"{call} failed:\n{command}\n{result.stdout}\n{result.stderr}"
        outputs = {}
        for emit, globs in patterns:
            # Nextflow's '**' crosses folders; staged inputs (links) never count as outputs
            found = sorted({Path(p) for g in globs for p in glob.glob(str(workdir / g.replace("**.", "**/*.")),
                                                                       recursive=True)
                            if not Path(p).is_symlink()})
            assert found, f"{call}: output {emit} ({globs}) matched nothing in {sorted(os.listdir(workdir))}"
            outputs[emit] = found
        (versions,) = [o for o in process["outputs"] if o["topic"] == "versions"]
        probe = re.search(r"eval\('(.*)'\)", versions["text"]).group(1)
        version = subprocess.run(["bash", "-c", probe], cwd=workdir, env=self.env, capture_output=True, text=True)
        assert version.stdout.strip() == __version__, (call, version.stdout, version.stderr)
        task = Task(call, workdir, command, outputs, seconds)
        self.tasks.append(task)
        return task


STREAM_FUNCTIONS = REPO / "subworkflows" / "local" / "stream" / "main.nf"


def stream_groovy(groovy: Groovy, expression: str, **variables) -> object:
    """Evaluate ``expression`` after the functions of subworkflows/local/stream/main.nf."""
    source = STREAM_FUNCTIONS.read_text()
    functions = source[source.index("def movieBatches("):]
    code = (f"def file(path) {{ new File(path.toString()) }}\n"
            f"def error(String message) {{ throw new IllegalArgumentException(message) }}\n{functions}\n{expression}")
    return groovy(code, **variables)


def read_rows(samplesheet: Path) -> list[dict]:
    with samplesheet.open(newline="") as handle:
        return list(csv.DictReader(handle))  # splitCsv(header: true, quote: '"'): strings, '' when empty


def batches_from(groovy: Groovy, samplesheet: Path, size: int, folder: Path,
                 rows: list[dict] | None = None) -> list[tuple[dict, Path, list[Path]]]:
    """What STREAM does once the rows are known: batch, collectFile. ``rows`` whose image is a
    file (a frame from MORPHOTYPE_STREAM) are given as {"image": {"file": path}, ...}."""
    rows = read_rows(samplesheet) if rows is None else rows
    expression = ("def asImage = { image -> image instanceof Map ? new File(image.file) : image }\n"
                  "rows = rows.collect { row -> row + [image: asImage(row.image)] }\n"
                  "samplesheetBatches(rows, size).collect { batch -> [batch[0], batch[1], batch[2]*.path] }")
    batches = []
    folder.mkdir(parents=True, exist_ok=True)
    for meta, text, images in stream_groovy(groovy, expression, rows=rows, size=size):
        sheet = folder / f"{meta['id']}.csv"
        sheet.write_text(text)
        batches.append((meta, sheet, [Path(image) for image in images]))
    return batches


def movie_batches_from(groovy: Groovy, samplesheet: Path, size: int, folder: Path) -> list[tuple[dict, Path]]:
    """STREAM's cut of a samplesheet of remote movie frames into batches of whole movies."""
    batches = []
    folder.mkdir(parents=True, exist_ok=True)
    for meta, text in stream_groovy(groovy, "movieBatches(rows, size)", rows=read_rows(samplesheet), size=size):
        sheet = folder / f"{meta['id']}.csv"
        sheet.write_text(text)
        batches.append((meta, sheet))
    return batches


def frame_rows(groovy: Groovy, streamed: list["Task"]) -> list[dict]:
    """STREAM's rows after MORPHOTYPE_STREAM: splitCsv of each task's sheet, `image` = its frame file."""
    rows = []
    for task in streamed:  # tasks in batch order
        (sheet,) = [p for p in task.outputs["frames"] if p.suffix == ".csv"]
        frames = [str(p) for p in task.outputs["frames"] if p.suffix != ".csv"]
        expression = ("rows.collect { row -> localFrame(row, frames.collect { f -> new File(f) }) }"
                      ".collect { row -> row + [image: [file: row.image.path]] }")
        rows += stream_groovy(groovy, expression, rows=read_rows(sheet), frames=frames)
    return rows


def in_batch_order(tasks: list[Task], emit: str, id: str) -> list:
    return [{"id": id}, [file for task in tasks for file in task.outputs[emit]]]


def simulate(root: Path, lint: Lint, groovy: Groovy, params: dict, *, stub: bool = False,
             batch_size: int = BATCH_SIZE, idr_samplesheet: Path | None = None) -> dict[str, object]:
    """workflows/morphotype.nf, call by call, for the crops (--mitocheck_crops), a samplesheet
    (--input) or IDR plates (--idr_plates; ``idr_samplesheet`` stands in for the IDR's own
    samplesheet, whose movies are on the internet)."""
    run = Runner(root, lint, groovy, params, stub=stub)
    result: dict[str, object] = {"tasks": run.tasks}
    # samplesheet
    if params["input"]:
        samplesheet = Path(params["input"])
    elif params["mitocheck_crops"]:
        crops = run("MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS", [{"id": "samplesheet"}, Path(params["mitocheck_crops"])])
        (samplesheet,) = crops.outputs["samplesheet"]
    else:
        plates = [] if params["idr_plates"] == "all" else _names(params["idr_plates"])
        idr = run("MORPHOTYPE_SAMPLESHEET_IDR", [{"id": "samplesheet"}, plates])
        (samplesheet,) = idr.outputs["samplesheet"]
        samplesheet = idr_samplesheet or samplesheet
    result["samplesheet"] = samplesheet
    # stream
    if params["idr_plates"]:
        movie_batches = movie_batches_from(groovy, samplesheet, int(params["idr_movies_per_batch"]),
                                           root / "collect-file-movies")
        streamed = [run("MORPHOTYPE_STREAM", [meta, sheet]) for meta, sheet in movie_batches]
        frames = run("MERGE_FRAMES", [{"id": "frames"}, [p for task in streamed for p in task.outputs["frames"]
                                                         if p.suffix == ".csv"]])
        result.update(movie_batches=movie_batches, frames=frames.outputs["table"][0])
        batches = batches_from(groovy, samplesheet, batch_size, root / "collect-file", frame_rows(groovy, streamed))
    else:
        batches = batches_from(groovy, samplesheet, batch_size, root / "collect-file")
    result["batches"] = batches
    # segment
    segmented = [run("MORPHOTYPE_SEGMENT", [meta, sheet, images], []) for meta, sheet, images in batches]
    summary = run("MERGE_SEGMENTATION_SUMMARY", in_batch_order(segmented, "summary", "segmentation_summary"))
    # features
    measured = [run("MORPHOTYPE_FEATURES", [meta, sheet, images, task.outputs["masks"]])
                for (meta, sheet, images), task in zip(batches, segmented)]
    features = run("MERGE_FEATURES", in_batch_order(measured, "features", "single_cells"))
    unmatched = run("MERGE_UNMATCHED", in_batch_order(measured, "unmatched", "unmatched"))
    result.update(masks=[m for task in segmented for m in task.outputs["masks"]],
                  segmentation_summary=summary.outputs["table"][0], features=features.outputs["table"][0],
                  unmatched=unmatched.outputs["table"][0])
    # deep_features
    tables = [(meta, task.outputs["features"][0]) for (meta, _, _), task in zip(batches, measured)]
    images = {meta["id"]: batch_images for meta, _, batch_images in batches}
    if params["deep_weights"]:
        weights = Path(params["deep_weights"])
        tables = [(meta, run("DEEP_FEATURES_DP", [meta, table, images[meta["id"]]], ["weights", weights])
                   .outputs["features"][0]) for meta, table in tables]
    if params["ssl_encoder"]:
        encoder = Path(str(params["ssl_encoder"]))
        if params["ssl_encoder"] == "train":
            trained = run("MORPHOTYPE_ENCODER_TRAIN", [{"id": "encoder"}, result["features"],
                                                       [i for _, _, batch_images in batches for i in batch_images]])
            (encoder,) = trained.outputs["encoder"]
            result["encoder"] = encoder
        tables = [(meta, run("DEEP_FEATURES_SSL", [meta, table, images[meta["id"]]], ["encoder", encoder])
                   .outputs["features"][0]) for meta, table in tables]
    if params["deep_weights"] or params["ssl_encoder"]:
        deep = run("MERGE_DEEP_FEATURES", [{"id": "single_cells"}, [table for _, table in tables]])
        result["features"] = deep.outputs["table"][0]
    cells = result["features"]
    # train
    if params["train_models"]:
        spaces = [{"id": space, "space": space, "index": index}
                  for index, space in enumerate(_names(params["feature_spaces"]))]
        trained = [run("MORPHOTYPE_TRAIN", [meta, cells]) for meta in spaces]
        loio_spaces = _names(params["loio_feature_spaces"])
        chunks = int(params["loio_chunks"])
        loio = [run("MORPHOTYPE_LOIO", [{**meta, "id": f"{meta['space']}.loio_{chunk}", "chunk": chunk,
                                         "chunks": chunks}, cells, task.outputs["models"][0]])
                for meta, task in zip(spaces, trained) if params["loio"] and (not loio_spaces or meta["space"] in loio_spaces)
                for chunk in range(chunks)]
        evaluated = run("MORPHOTYPE_EVALUATE", [{"id": "evaluation"}, cells,
                                                [task.outputs["models"][0] for task in trained],
                                                [task.outputs["predictions"][0] for task in loio]])
        result.update(space_models=[task.outputs["models"][0] for task in trained],
                      loio=[task.outputs["predictions"][0] for task in loio],
                      models=evaluated.outputs["models"][0], evaluation=evaluated.outputs["evaluation"][0])
    # jump
    if params["jump_plates"]:
        from morphotype.run import jump_plate_list

        plates = sorted(Path(plate) for plate in jump_plate_list(params["jump_plates"]))
        scored = [run("MORPHOTYPE_JUMP_SCORE", [{"id": plate.stem}, plate], result["models"]) for plate in plates]
        summary = run("MORPHOTYPE_JUMP_SUMMARISE", [
            {"id": "summary"}, [p for task in scored for p in task.outputs["plate"] if p.suffix == ".json"],
            [p for task in scored for p in task.outputs["plate"] if p.suffix == ".parquet"]])
        result.update(jump_plates=[p for task in scored for p in task.outputs["plate"]],
                      jump_summary=summary.outputs["summary"][0])
    # report: pipeline_info/params.yaml and versions.json as main.nf's runInfo() writes them
    if params["report"]:
        info = root / "pipeline_info"
        info.mkdir()
        science = {name: params[name] for name in PARAM_DEFAULTS}
        (info / "params.yaml").write_text(yaml.safe_dump(science, sort_keys=True))
        (info / "versions.json").write_text(json.dumps({"morphotype": __version__}))
        report = run("MORPHOTYPE_REPORT", [{"id": "report"}, [info / "params.yaml", info / "versions.json"], [cells],
                                           result.get("models", []), result.get("evaluation", []),
                                           result.get("jump_summary", [])])
        result["report"] = report.outputs["report"][0]
    return result


def linked_crops(folder: Path, manifest: pd.DataFrame, crops_dir: Path) -> Path:
    """A crops folder laid out like the shared one, linking the manifest's crops."""
    for phenotype, name in zip(manifest["phenotype"], manifest["file"]):
        (folder / phenotype).mkdir(parents=True, exist_ok=True)
        (folder / phenotype / name).symlink_to(crops_dir / phenotype / name)
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def small_crops(tmp_path_factory, crops_dir) -> Path:
    """A crops folder (links) holding every MANIFEST_STEP-th crop of the shared set."""
    folder = tmp_path_factory.mktemp("crops") / "mitocheck_crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv", dtype=str).iloc[::MANIFEST_STEP]
    return linked_crops(folder, manifest, crops_dir)


@pytest.fixture(scope="session")
def demo_params(small_crops) -> dict:
    """The demo's params on 7 crops: too few cells to train on (models need >= 2 cells per class
    on both sides of the split), so this run stops after the features."""
    return {**example_params(REPO / "examples" / "mitocheck_crops.yaml"), "mitocheck_crops": str(small_crops),
            "train_models": False, "report": False}


@pytest.fixture(scope="session")
def simulated(tmp_path_factory, lint, groovy, demo_params) -> dict:
    return simulate(tmp_path_factory.mktemp("nextflow-run"), lint, groovy, demo_params)


@pytest.fixture(scope="session")
def morphotype_run(tmp_path_factory, demo_params) -> Path:
    from morphotype.run import run

    outdir = tmp_path_factory.mktemp("morphotype-run") / "results"
    run({**demo_params, "outdir": str(outdir)}, workers=1)
    return outdir


# --------------------------------------------------------------------------------- contract


CROPS_CALLS = {"MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS", "MORPHOTYPE_SEGMENT", "MERGE_SEGMENTATION_SUMMARY",
               "MORPHOTYPE_FEATURES", "MERGE_FEATURES", "MERGE_UNMATCHED"}
MODEL_CALLS = {"DEEP_FEATURES_DP", "MERGE_DEEP_FEATURES", "MORPHOTYPE_TRAIN", "MORPHOTYPE_LOIO",
               "MORPHOTYPE_EVALUATE", "MORPHOTYPE_JUMP_SCORE", "MORPHOTYPE_JUMP_SUMMARISE", "MORPHOTYPE_REPORT"}
IDR_CALLS = {"MORPHOTYPE_SAMPLESHEET_IDR", "MORPHOTYPE_STREAM", "MERGE_FRAMES"}
ENCODER_CALLS = {"MORPHOTYPE_ENCODER_TRAIN", "DEEP_FEATURES_SSL"}


def test_the_contract_runs_every_call_of_the_workflow_for_real(lint):
    """The real simulations below together run every call; the encoder's only in stub mode and
    in tests/test_deep.py (its training takes minutes)."""
    assert CROPS_CALLS | MODEL_CALLS | IDR_CALLS | ENCODER_CALLS == set(calls_by_name(lint.description))


@pytest.mark.slow  # the simulated run: ~25 s of morphotype commands
def test_every_call_of_the_workflow_runs_in_the_contract(lint, simulated):
    assert {task.call for task in simulated["tasks"]} == CROPS_CALLS
    assert len([t for t in simulated["tasks"] if t.call == "MORPHOTYPE_SEGMENT"]) == 2  # 7 crops, batches of 4


@pytest.mark.slow  # the simulated run: ~25 s of morphotype commands
def test_rendered_commands_pass_the_real_argument_parser(simulated):
    parser = build_parser()
    for task in simulated["tasks"]:
        (line,) = command_lines(task.command)
        assert "${" not in line and "$(" not in line, line
        parser.parse_args(shlex.split(line)[1:])  # exits (SystemExit) on an unknown or missing option


@pytest.mark.parametrize("flipped", sorted(FLIPPED))
def test_each_param_sets_its_option(lint, groovy, demo_params, flipped):
    params = {**demo_params, flipped: FLIPPED[flipped]}
    call, dest, to_option = PARAM_OPTIONS[flipped]
    process = all_processes(lint.description)[calls_by_name(lint.description)[call]][1]
    variables = {"task": {"ext": render_ext(groovy, call, params), "cpus": 3, "process": call}, "meta": ANY_META}
    for declaration in process["inputs"]:
        for kind, name, _ in input_items(declaration):
            if name not in variables:
                variables[name] = "input_file" if kind == "path" else VAL_INPUTS[name]
    command, _ = render(groovy, process, "script", variables)
    (line,) = command_lines(command)
    parsed = build_parser().parse_args(shlex.split(line)[1:])
    for name, (other_call, other_dest, other_to_option) in PARAM_OPTIONS.items():
        if other_call == call:
            assert getattr(parsed, other_dest) == other_to_option(params[name]), (name, line)
    assert getattr(parsed, dest) == to_option(FLIPPED[flipped])
    if hasattr(parsed, "workers"):
        assert parsed.workers == 3, line


def test_idr_plates_reach_the_samplesheet_command(lint, groovy, demo_params):
    """main.nf hands the plates as a list ([] for 'all'); the command names them, or none."""
    process = all_processes(lint.description)["MORPHOTYPE_SAMPLESHEET_IDR"][1]
    ext = render_ext(groovy, "MORPHOTYPE_SAMPLESHEET_IDR", demo_params)
    for plates, expected in ((["LT0003_40", "LT0004_06"], ["LT0003_40", "LT0004_06"]), ([], None)):
        variables = {"task": {"ext": ext, "cpus": 1, "process": "x"}, "meta": {"id": "samplesheet"}, "plates": plates}
        (line,) = command_lines(render(groovy, process, "script", variables)[0])
        parsed = build_parser().parse_args(shlex.split(line)[1:])
        assert parsed.plates == expected and parsed.controls == ["negative"] and parsed.labelled, line
    main = (REPO / "main.nf").read_text()
    assert "params.idr_plates == 'all' ? [] : names(params.idr_plates)" in main


def test_train_options_are_those_of_morphotype_run(groovy, demo_params):
    """MORPHOTYPE_TRAIN + MORPHOTYPE_EVALUATE carry every option of params.training_options(params)."""
    from morphotype.params import training_options

    params = {**demo_params, **{k: FLIPPED[k] for k in ("class_balance", "shuffled_baselines", "binary_models",
                                                         "loio", "umap", "loio_feature_spaces", "split")}}
    nextflow = shlex.split(render_ext(groovy, "MORPHOTYPE_TRAIN", params)["args"])
    nextflow += shlex.split(render_ext(groovy, "MORPHOTYPE_EVALUATE", params)["args"])
    run_options = training_options(params)
    spaces = run_options.index("--feature-spaces")
    run_options = run_options[:spaces] + run_options[spaces + 1 + len(_names(params["feature_spaces"])):]
    as_pairs = lambda options: set(" ".join(options).replace(" --", "\n--").splitlines())  # noqa: E731
    assert as_pairs(nextflow) == as_pairs(run_options)


@pytest.mark.slow  # the simulated run: ~25 s of morphotype commands
def test_batches_cut_the_samplesheet_into_whole_images_in_order(simulated):
    sheet = pd.read_csv(simulated["samplesheet"], dtype=str, keep_default_na=False)
    batches = simulated["batches"]
    assert [meta["batch"] for meta, _, _ in batches] == [0, 1]
    assert [meta["id"] for meta, _, _ in batches] == ["batch_00000", "batch_00001"]
    parts = [pd.read_csv(path, dtype=str, keep_default_na=False) for _, path, _ in batches]
    assert [len(images) for _, _, images in batches] == [4, 3]
    joined = pd.concat(parts, ignore_index=True)
    assert list(joined.columns) == list(sheet.columns)
    assert list(joined["image"]) == [f"images/{Path(image).name}" for image in sheet["image"]]
    assert joined.drop(columns="image").equals(sheet.drop(columns="image"))
    assert [str(i) for _, _, images in batches for i in images] == list(sheet["image"])


def test_batch_samplesheets_quote_fields_and_keep_rows_of_one_image_together(groovy, tmp_path, crops_dir):
    images = sorted((crops_dir / "Anaphase").glob("*.png"))[:3]
    rows = [  # two annotations of the first image; awkward text in an extra column
        {"image": str(images[0]), "plate": "P1", "well": "A01", "site": "1", "frame": "0", "x": "10", "y": "12",
         "note": 'comma, and "quotes"'},
        {"image": str(images[1]), "plate": "P1", "well": "A01", "site": "1", "frame": "1", "x": "", "y": "",
         "note": "line\nbreak"},
        {"image": str(images[0]), "plate": "P1", "well": "A01", "site": "1", "frame": "0", "x": "30", "y": "31",
         "note": ""},
        {"image": str(images[2]), "plate": "P2", "well": "B02", "site": "2", "frame": "0", "x": "", "y": "",
         "note": "plain"},
    ]
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame(rows).to_csv(sheet, index=False)
    batches = batches_from(groovy, sheet, 2, tmp_path / "batches")
    assert [meta for meta, _, _ in batches] == [{"id": "batch_00000", "batch": 0, "images": 2},
                                                     {"id": "batch_00001", "batch": 1, "images": 1}]
    first = pd.read_csv(batches[0][1], dtype=str, keep_default_na=False)
    assert list(first["note"]) == ['comma, and "quotes"', "", "line\nbreak"]  # image 0's rows together
    assert list(first["x"]) == ["10", "30", ""]
    assert [p.name for p in batches[0][2]] == [images[0].name, images[1].name]

    from morphotype.samplesheet import read_samplesheet

    task = tmp_path / "task"
    task.mkdir()
    for image in batches[0][2]:
        stage(task, image, "images/*")
    cwd = os.getcwd()
    try:  # relative image paths resolve in the task folder, through the links to the originals
        os.chdir(task)
        read = read_samplesheet(batches[0][1])
    finally:
        os.chdir(cwd)
    originals = [str(image.resolve()) for image in images]  # the shared folder may be a link
    assert list(read["image"]) == [originals[0], originals[0], originals[1]]


def test_batching_refuses_two_images_with_the_same_file_name(groovy, tmp_path, crops_dir):
    image = next((crops_dir / "Anaphase").glob("*.png"))
    twin = tmp_path / "elsewhere" / image.name
    twin.parent.mkdir()
    shutil.copy(image, twin)
    sheet = tmp_path / "sheet.csv"
    pd.DataFrame({"image": [str(image), str(twin)], "plate": "P", "well": "1", "site": "1", "frame": "0"}).to_csv(
        sheet, index=False)
    with pytest.raises(AssertionError, match="Image file names must be unique.*" + re.escape(image.name)):
        batches_from(groovy, sheet, 10, tmp_path / "batches")


@pytest.mark.slow
def test_nextflow_layout_and_results_equal_morphotype_run(simulated, morphotype_run):
    masks = sorted(p.name for p in simulated["masks"])
    assert masks == sorted(p.name for p in (morphotype_run / "segmentation").glob("*.mask.tiff"))
    assert simulated["segmentation_summary"].name == "segmentation_summary.csv"
    assert simulated["features"].name == "single_cells.parquet"
    assert simulated["unmatched"].name == "single_cells.unmatched.csv"
    pd.testing.assert_frame_equal(pd.read_csv(simulated["segmentation_summary"]),
                                  pd.read_csv(morphotype_run / "segmentation" / "segmentation_summary.csv"))
    nextflow_cells = pd.read_parquet(simulated["features"])
    run_cells = pd.read_parquet(morphotype_run / "features" / "single_cells.parquet")
    assert len(run_cells) == 7
    pd.testing.assert_frame_equal(nextflow_cells, run_cells)
    pd.testing.assert_frame_equal(pd.read_csv(simulated["unmatched"]),
                                  pd.read_csv(morphotype_run / "features" / "single_cells.unmatched.csv"))
    sheet = pd.read_csv(simulated["samplesheet"])
    pd.testing.assert_frame_equal(sheet, pd.read_csv(morphotype_run / "samplesheet" / "samplesheet.csv"))


def test_published_layout_is_the_run_layout(groovy):
    """conf/modules.config publishes each output where `morphotype run` writes it."""
    text = (REPO / "conf" / "modules.config").read_text()
    published = {}
    params = {"outdir": "OUT", "idr_cache": None, "publish_dir_mode": "copy", "deep_weights": None, "ssl_encoder": None}
    for selector in re.finditer(r"withName:\s*'([^']+)'\s*\{", text):
        body = text[selector.end():_closing(text, selector.end() - 1)]
        if "publishDir" not in body:
            continue
        start = body.index("publishDir")
        publish_dir = body[body.index("[", start):_closing(body, body.index("[", start)) + 1]
        rendered = groovy(f"def value = {publish_dir}\n"
                          "value.collectEntries { k, v -> [k, v instanceof Closure ? v.call().toString() : v] }",
                          params=params)
        assert rendered["path"] == "OUT" or rendered["path"].startswith("OUT/"), rendered
        settings = process_config(selector.group(1))
        name = None
        if "prefix" in settings:
            name = settings["prefix"].strip("'") + "." + settings["suffix"].strip("'")
        published[selector.group(1)] = (rendered["path"][4:], name, rendered.get("pattern"), rendered.get("enabled", True))
    assert published == {
        "MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS": ("samplesheet", None, None, True),  # meta.id 'samplesheet'
        "MORPHOTYPE_SAMPLESHEET_IDR": ("samplesheet", None, None, True),
        "MORPHOTYPE_STREAM": ("idr/frames", None, "frames/**", True),  # idr/frames/frames/<variant>/<plate>/
        "MERGE_FRAMES": ("idr", "frames.csv", None, True),
        "MORPHOTYPE_SEGMENT": ("segmentation", None, "*.mask.tiff", True),  # <file_id>.mask.tiff only
        "MERGE_SEGMENTATION_SUMMARY": ("segmentation", "segmentation_summary.csv", None, True),
        "MERGE_FEATURES": ("features", "single_cells.parquet", None, True),  # off with deep features
        "MERGE_UNMATCHED": ("features", "single_cells.unmatched.csv", None, True),
        "MORPHOTYPE_ENCODER_TRAIN": ("", None, None, True),  # meta.id 'encoder' -> encoder/
        "MERGE_DEEP_FEATURES": ("features", "single_cells.parquet", None, True),
        "MORPHOTYPE_EVALUATE": ("", None, None, True),  # models/ and evaluation/
        "MORPHOTYPE_JUMP_SCORE": ("jump/plates", None, None, True),
        "MORPHOTYPE_JUMP_SUMMARISE": ("jump", None, None, True),  # meta.id 'summary' -> jump/summary/
        "MORPHOTYPE_REPORT": ("", None, None, True),  # meta.id 'report' -> report/
    }
    deep = groovy("def value = " + text[text.index("enabled:") + 8:].split("\n")[0].rstrip(",") + "\nvalue",
                  params={**params, "deep_weights": "w.h5"})
    assert deep is False  # MERGE_FEATURES does not publish when MERGE_DEEP_FEATURES does


@pytest.mark.slow
def test_unmatched_annotations_in_a_later_batch_are_merged(tmp_path, lint, groovy, demo_params, simulated):
    """Batch 0 has no unmatched annotation, batch 1 has one: the merged report keeps it."""
    sheet = pd.read_csv(simulated["samplesheet"])
    far = sheet.iloc[[4]].assign(x=1.0, y=62.0)  # a corner of a crop of batch 1: no nucleus there
    input_sheet = tmp_path / "samplesheet.csv"
    pd.concat([sheet, far], ignore_index=True).to_csv(input_sheet, index=False)
    result = simulate(tmp_path / "run", lint, groovy, {**demo_params, "input": str(input_sheet)})
    unmatched = pd.read_csv(result["unmatched"])
    assert len(unmatched) == 1 and unmatched["Metadata_AnnotatedX"].tolist() == [1.0]


def test_stub_blocks_create_every_declared_output(tmp_path, lint, groovy, demo_params):
    weights = tmp_path / "efficientnetb0_notop.h5"
    weights.touch()
    plates = tmp_path / "plates.txt"
    (tmp_path / "BR00116991.sqlite").touch()
    plates.write_text(f"{tmp_path / 'BR00116991.sqlite'}\n")
    everything = {**demo_params, "deep_weights": str(weights), "ssl_encoder": "train", "train_models": True,
                  "jump_plates": str(plates), "report": True, "loio_chunks": 2, "loio_feature_spaces": "",
                  "feature_spaces": "CP,DP,CP_areashape"}
    crops = simulate(tmp_path / "crops", lint, groovy, everything, stub=True)
    idr = simulate(tmp_path / "idr", lint, groovy, {**demo_params, "mitocheck_crops": None, "idr_plates": "all"},
                   stub=True)
    calls = {task.call for task in crops["tasks"] + idr["tasks"]}
    assert calls == set(calls_by_name(lint.description))
    assert len([t for t in crops["tasks"] if t.call == "MORPHOTYPE_LOIO"]) == 2 * 3  # 3 feature spaces, 2 chunks


# ------------------------------------------------------- models, JUMP and report, for real

TRAIN_CROPS_PER_CLASS = 16  # 16 classes (Folded excluded from training): enough cells for a 15% split
TRAIN_PARAMS = {"feature_spaces": "CP_zernike,SSL,CP_areashape",  # SSL: absent from the table, skipped
                "grid_c": "0.1,1", "grid_l1_ratio": "0.5", "cv_folds": 3, "class_balance": "balanced",
                "binary_models": False, "umap": False, "loio": True, "loio_feature_spaces": "CP_zernike,SSL", "loio_chunks": 2,
                "train_models": True, "report": True, "deep_box_size": 32}


@pytest.fixture(scope="session")
def training_crops(tmp_path_factory, crops_dir) -> Path:
    """A crops folder (links) with the first TRAIN_CROPS_PER_CLASS crops of every phenotype."""
    folder = tmp_path_factory.mktemp("training-crops") / "mitocheck_crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv", dtype=str)
    manifest = manifest.groupby("phenotype", sort=False).head(TRAIN_CROPS_PER_CLASS)
    return linked_crops(folder, manifest, crops_dir)


@pytest.fixture(scope="session")
def jump_plates_file(tmp_path_factory) -> Path:
    """One synthetic CPJUMP1 plate (tests/test_jump.py's builder) listed in a --jump_plates file."""
    import numpy as np

    from morphotype import jump
    from test_jump import PLATES, plate_layout, write_plate

    folder = tmp_path_factory.mktemp("jump-plates")
    _, wells = jump.load_metadata()
    plate = write_plate(folder / f"{PLATES[0]}.sqlite", PLATES[0], plate_layout(wells, np.random.default_rng(0)),
                        seed=10)
    listing = folder / "plates.txt"
    listing.write_text(f"# one synthetic plate\n{plate}\n")
    return listing


@pytest.mark.slow  # ~2 x 256 crops through every stage, models included: ~2.5 min
def test_models_jump_and_report_fan_out_equals_morphotype_run(tmp_path, lint, groovy, demo_params, training_crops,
                                                              jump_plates_file):
    """train per feature space -> LOIO per chunk -> evaluate, DP features per batch, JUMP per plate
    and the report give the same tables, models and report figures as `morphotype run`."""
    import filecmp

    from morphotype.run import run

    (tmp_path / "random").write_text("")  # staged as `random`: deep-features' test-only random weights
    params = {**demo_params, **TRAIN_PARAMS, "mitocheck_crops": str(training_crops),
              "jump_plates": str(jump_plates_file)}
    result = simulate(tmp_path / "nextflow", lint, groovy, {**params, "deep_weights": str(tmp_path / "random")},
                      batch_size=128)
    outdir = tmp_path / "run" / "results"
    started = time.perf_counter()
    run({**params, "deep_weights": "random", "outdir": str(outdir)}, workers=1)
    print(f"morphotype run: {time.perf_counter() - started:.1f} s; Nextflow calls:",
          ", ".join(f"{task.call} {task.seconds:.1f} s" for task in result["tasks"]))

    calls = [task.call for task in result["tasks"]]
    assert set(calls) == CROPS_CALLS | MODEL_CALLS
    assert calls.count("MORPHOTYPE_FEATURES") == calls.count("DEEP_FEATURES_DP") == 2  # 256 crops, batches of 128
    assert calls.count("MORPHOTYPE_TRAIN") == 3 and calls.count("MORPHOTYPE_LOIO") == 2 * 2  # LOIO: 2 spaces, 2 chunks
    parser = build_parser()
    for task in result["tasks"]:
        (line,) = command_lines(task.command)
        parser.parse_args(shlex.split(line)[1:])

    # features: CP + DP__ columns, merged in batch order
    cells = pd.read_parquet(result["features"])
    assert any(column.startswith("DP__") for column in cells.columns)
    pd.testing.assert_frame_equal(cells, pd.read_parquet(outdir / "features" / "single_cells.parquet"))

    # a feature space absent from the table: no model, an empty cell_splits.csv, named as skipped
    skipped = result["space_models"][1]
    assert not [p for p in skipped.iterdir() if p.is_dir()]
    assert pd.read_csv(skipped / "cell_splits.csv").empty
    assert list(json.loads((skipped / "training.json").read_text())["skipped_feature_spaces"]) == ["SSL"]

    # models and evaluation: the same files as `morphotype run` (one train over every space)
    models, evaluation = result["models"], result["evaluation"]
    assert sorted(p.name for p in models.iterdir()) == sorted(p.name for p in (outdir / "models").iterdir())
    for folder, reference in ((models, outdir / "models"), (evaluation, outdir / "evaluation")):
        for path in sorted(reference.rglob("*")):
            ours = folder / path.relative_to(reference)
            assert ours.exists(), ours
            if path.is_dir():
                continue
            if path.suffix == ".parquet":
                pd.testing.assert_frame_equal(pd.read_parquet(ours), pd.read_parquet(path))
            elif path.suffix == ".csv":
                pd.testing.assert_frame_equal(pd.read_csv(ours), pd.read_csv(path))
            elif path.suffix == ".json":
                assert json.loads(ours.read_text()) == json.loads(path.read_text()), path
            else:
                assert filecmp.cmp(ours, path, shallow=False), path
    loio = pd.read_csv(evaluation / "loio_summary.csv")
    assert not loio.empty and set(loio["model_id"].str.split("__").str[0]) == {"CP_zernike"}

    # JUMP: the plate's tables and the summary
    plate_files = {p.name: p for p in result["jump_plates"]}
    assert set(plate_files) == {p.name for p in (outdir / "jump" / "plates").iterdir()}
    for name, path in plate_files.items():
        if path.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(outdir / "jump" / "plates" / name))
    summary = result["jump_summary"]
    assert summary.name == "summary"
    for path in sorted((outdir / "jump" / "summary").glob("*.*[!n]")):  # tables (not summary.json)
        read = pd.read_csv if path.suffix == ".csv" else pd.read_parquet
        pd.testing.assert_frame_equal(read(summary / path.name), read(path))

    # report: the same figures from the staged run layout
    report = result["report"]
    assert report.name == "report" and (report / "index.html").stat().st_size > 0
    assert sorted(p.name for p in (report / "figures").iterdir()) == \
        sorted(p.name for p in (outdir / "report" / "figures").iterdir())


# ------------------------------------------------------------------- IDR streaming, for real


@pytest.fixture(scope="session")
def idr_server_root(tmp_path_factory) -> Path:
    """Synthetic CellH5 movies (90 frames of 96x128) at the IDR paths of plate LT0003_40's
    labelled and negative-control movies, to serve on loopback (--idr_base_url)."""
    import numpy as np

    from morphotype import idr
    from morphotype.testing import synthetic_movie

    root = tmp_path_factory.mktemp("idr-server")
    sheet = idr.idr_samplesheet(["LT0003_40"], labelled=True, controls=["negative"], seed=0,
                                base_url="http://server")
    for index, (movie, well) in enumerate(sheet[["movie", "well"]].drop_duplicates().itertuples(index=False)):
        relative = movie.removeprefix("http://server/")
        frames = synthetic_movie(8, (96, 128), n_nuclei=8, seed=index)["movie"]
        idr.write_cellh5(root / relative, np.resize(frames, (90, *frames.shape[1:])), plate="LT0003_40",
                         well=int(well))
    return root


@pytest.mark.slow  # ~40 s: the IDR path twice (Nextflow calls and `morphotype run`)
def test_idr_plates_stream_in_movie_batches_and_equal_morphotype_run(tmp_path, lint, groovy, demo_params,
                                                                     idr_server_root):
    """samplesheet idr -> stream (one task per batch of whole movies) -> frames staged by name into
    image batches -> segment -> features, against `morphotype run` on the same loopback IDR."""
    from morphotype.run import run
    from morphotype.testing import LoopbackFileServer

    with LoopbackFileServer(idr_server_root) as server:
        # raw frames keep this test short; tests/test_idr.py checks the BaSiC (ic) correction
        outdir = tmp_path / "run" / "results"
        params = {**demo_params, "mitocheck_crops": None, "idr_plates": "LT0003_40", "idr_base_url": server.url,
                  "illumination_correction": False, "idr_movies_per_batch": 3, "outdir": str(outdir)}
        result = simulate(tmp_path / "nextflow", lint, groovy, params, batch_size=3)  # publishes nothing
        run(params, workers=1)

    calls = [task.call for task in result["tasks"]]
    assert set(calls) == IDR_CALLS | CROPS_CALLS - {"MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS"}
    assert [meta["movies"] for meta, _ in result["movie_batches"]] == [3, 3, 2]  # 8 movies, whole
    assert [meta["images"] for meta, _, _ in result["batches"]] == [3, 3, 2]  # 8 frames
    parser = build_parser()
    for task in result["tasks"]:
        (line,) = command_lines(task.command)
        parser.parse_args(shlex.split(line)[1:])
    stream_lines = [task.command for task in result["tasks"] if task.call == "MORPHOTYPE_STREAM"]
    assert all("--variant no_ic" in line and "--cache ." in line for line in stream_lines)

    pd.testing.assert_frame_equal(pd.read_csv(result["samplesheet"]), pd.read_csv(outdir / "samplesheet" / "samplesheet.csv"))
    # the frames: written by the stream tasks, staged by name into the image batches
    # the published frames.csv names the published frames (idr/frames/frames/<variant>/<plate>/), as run's
    run_frames = pd.read_csv(outdir / "idr" / "frames.csv")
    pd.testing.assert_frame_equal(pd.read_csv(result["frames"]), run_frames)
    assert all("/idr/frames/frames/no_ic/LT0003_40/" in image for image in run_frames["image"])
    staged = {}
    for meta, sheet, images in result["batches"]:
        batch = pd.read_csv(sheet)
        assert set(batch["image"]) == {f"images/{image.name}" for image in images}
        assert all(image.is_file() and "MORPHOTYPE_STREAM.movies_" in str(image) for image in images)
        staged.update({image.name: image for image in images})
    assert set(staged) == {Path(image).name for image in run_frames["image"]}
    for image in run_frames["image"]:  # the frames the stream tasks wrote are run's
        assert staged[Path(image).name].read_bytes() == Path(image).read_bytes()
    # segmentation and features as `morphotype run` (image paths name different caches)
    pd.testing.assert_frame_equal(pd.read_csv(result["segmentation_summary"]).drop(columns="image"),
                                  pd.read_csv(outdir / "segmentation" / "segmentation_summary.csv").drop(columns="image"))
    cells = pd.read_parquet(result["features"])
    assert len(cells) > 8
    pd.testing.assert_frame_equal(cells.drop(columns="Metadata_Image"),
                                  pd.read_parquet(outdir / "features" / "single_cells.parquet").drop(columns="Metadata_Image"))


def test_main_nf_writes_params_yaml_as_morphotype_run(groovy):
    """pipeline_info/params.yaml (read by the report): every science param, none of the
    infrastructure ones, values that YAML reads back as `morphotype run` wrote them."""
    source = (REPO / "main.nf").read_text()
    infrastructure = re.search(r"def infrastructure = \[([^\]]*)\]", source).group(1)
    assert {name.strip(" '") for name in infrastructure.split(",")} == set(INFRASTRUCTURE_PARAMS)
    function = source[source.index("def yamlValue("):]
    values = {**PARAM_DEFAULTS, "cellpose_model": 'a "quoted" \\ path: x', "idr_base_url": "ftp://m/idr"}
    lines = groovy(f"{function}\nvalues.keySet().toList().sort().collect {{ name -> \"${{name}}: ${{yamlValue(values[name])}}\".toString() }}",
                   values=values)
    assert yaml.safe_load("\n".join(lines)) == values
