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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from jsonschema import Draft202012Validator

from morphotype import __version__
from morphotype.cli import build_parser
from morphotype.run import PARAM_DEFAULTS, STAGES

REPO = Path(__file__).resolve().parents[1]
NFLINT = REPO / "tests" / "nextflow" / "nflint.py"
MODULES = REPO / "modules" / "local"
SKIP_DIRS = {"work", "results", "node_modules", "__pycache__", "null"}  # as nflint, plus hidden dirs
# Allow-listed nflint findings may only be these (the offline plugin registry).
OFFLINE_ONLY = (r"^Plugin 'nf-schema' does not exist", r"^Unrecognized config option 'validation\.")
# Params the entry workflow handles itself rather than passing to a command as an option.
WORKFLOW_PARAMS = {"input", "mitocheck_crops", "outdir", "batch_size"}
# Each science param, by the call whose command line carries it: (call, argparse dest, to_option).
PARAM_OPTIONS = {
    "segmentation_backend": ("MORPHOTYPE_SEGMENT", "backend", lambda v: v),
    "cellpose_model": ("MORPHOTYPE_SEGMENT", "cellpose_model", lambda v: v),
    "cellpose_diameter": ("MORPHOTYPE_SEGMENT", "diameter", float),
    "cellpose_flow_threshold": ("MORPHOTYPE_SEGMENT", "flow_threshold", float),
    "cellpose_cellprob_threshold": ("MORPHOTYPE_SEGMENT", "cellprob_threshold", float),
    "use_gpu": ("MORPHOTYPE_SEGMENT", "gpu", bool),
    "min_nucleus_size": ("MORPHOTYPE_SEGMENT", "min_size", int),
    "remove_edge_objects": ("MORPHOTYPE_SEGMENT", "keep_edge_objects", lambda v: not v),
    "annotation_tolerance": ("MORPHOTYPE_FEATURES", "tolerance", float),
}
# Values unlike every default, to see each param reach its option.
FLIPPED = {"segmentation_backend": "cellpose", "cellpose_model": "nuclei", "cellpose_diameter": 17.5,
           "cellpose_flow_threshold": 0.4, "cellpose_cellprob_threshold": -1.5, "use_gpu": True,
           "min_nucleus_size": 40, "remove_edge_objects": False, "annotation_tolerance": 9.0}
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
        assert (REPO / "containers" / match.group(1) / "Dockerfile").is_file(), f"{name}: no containers/{match.group(1)}"
        assert match.group(2) == version, f"{name}: image tag {match.group(2)} != package version {version}"


def test_dockerfiles_install_pinned_torch_then_the_lock_file_without_entrypoint():
    dockerfiles = sorted((REPO / "containers").glob("*/Dockerfile"))
    assert dockerfiles
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
        assert value != PARAM_DEFAULTS[name] and type(value) is type(PARAM_DEFAULTS[name]), name


def example_params(path: Path) -> dict:
    return {**PARAM_DEFAULTS, **yaml.safe_load(path.read_text())}


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
        body = text[selector.end():_closing_brace(text, selector.end() - 1)]
        for ext in re.finditer(r"^\s*ext\.(\w+)\s*=\s*", body, re.M):
            start = ext.end()
            end = _closing_brace(body, start) + 1 if body[start] == "{" else body.index("\n", start)
            settings[ext.group(1)] = body[start:end].strip()
    return settings


def _closing_brace(text: str, opening: int) -> int:
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError("unbalanced braces")


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


def stage(workdir: Path, value: object, stage_as: str | None) -> object:
    """Link input files into the task folder as Nextflow does; the value as a script sees it."""
    files = [value] if isinstance(value, Path) else list(value)
    names = []
    for source in files:
        if stage_as in (None, "*"):
            name = source.name
        else:
            assert stage_as.endswith("/*") and "*" not in stage_as[:-2], f"unsupported stageAs {stage_as}"
            name = f"{stage_as[:-2]}/{source.name}"
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
        result = subprocess.run(["bash", "-euo", "pipefail", ".command.sh"], cwd=workdir, env=self.env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{call} failed:\n{command}\n{result.stdout}\n{result.stderr}"
        outputs = {}
        for emit, globs in patterns:
            found = sorted({Path(p) for g in globs for p in glob.glob(str(workdir / g))
                            if not Path(p).is_symlink()})  # staged inputs never count as outputs
            assert found, f"{call}: output {emit} ({globs}) matched nothing in {sorted(os.listdir(workdir))}"
            outputs[emit] = found
        (versions,) = [o for o in process["outputs"] if o["topic"] == "versions"]
        probe = re.search(r"eval\('(.*)'\)", versions["text"]).group(1)
        version = subprocess.run(["bash", "-c", probe], cwd=workdir, env=self.env, capture_output=True, text=True)
        assert version.stdout.strip() == __version__, (call, version.stdout, version.stderr)
        task = Task(call, workdir, command, outputs)
        self.tasks.append(task)
        return task


def batches_from(groovy: Groovy, samplesheet: Path, size: int, folder: Path) -> list[tuple[dict, Path, list[Path]]]:
    """What SAMPLESHEET does after the samplesheet exists: splitCsv, batch, collectFile."""
    source = (REPO / "subworkflows" / "local" / "samplesheet" / "main.nf").read_text()
    functions = source[source.index("def samplesheetBatches("):]
    with samplesheet.open(newline="") as handle:
        rows = list(csv.DictReader(handle))  # splitCsv(header: true, quote: '"'): strings, '' when empty
    code = (f"def file(path) {{ new File(path.toString()) }}\n"
            f"def error(String message) {{ throw new IllegalArgumentException(message) }}\n{functions}\n"
            "samplesheetBatches(rows, size).collect { batch -> [batch[0], batch[1], batch[2]*.path] }")
    batches = []
    folder.mkdir(parents=True, exist_ok=True)
    for meta, text, images in groovy(code, rows=rows, size=size):
        sheet = folder / f"{meta['id']}.csv"
        sheet.write_text(text)
        batches.append((meta, sheet, [Path(image) for image in images]))
    return batches


def in_batch_order(tasks: list[Task], emit: str, id: str) -> list:
    return [{"id": id}, [file for task in tasks for file in task.outputs[emit]]]


def simulate(root: Path, lint: Lint, groovy: Groovy, params: dict, *, stub: bool = False,
             batch_size: int = BATCH_SIZE) -> dict[str, object]:
    """workflows/morphotype.nf, call by call, for the crops (--mitocheck_crops) or a samplesheet (--input)."""
    run = Runner(root, lint, groovy, params, stub=stub)
    # samplesheet
    if params["input"]:
        samplesheet = Path(params["input"])
    else:
        crops = run("MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS", [{"id": "samplesheet"}, Path(params["mitocheck_crops"])])
        (samplesheet,) = crops.outputs["samplesheet"]
    batches = batches_from(groovy, samplesheet, batch_size, root / "collect-file")
    # segment
    segmented = [run("MORPHOTYPE_SEGMENT", [meta, sheet, images], []) for meta, sheet, images in batches]
    summary = run("MERGE_SEGMENTATION_SUMMARY", in_batch_order(segmented, "summary", "segmentation_summary"))
    # features
    measured = [run("MORPHOTYPE_FEATURES", [meta, sheet, images, task.outputs["masks"]])
                for (meta, sheet, images), task in zip(batches, segmented)]
    features = run("MERGE_FEATURES", in_batch_order(measured, "features", "single_cells"))
    unmatched = run("MERGE_UNMATCHED", in_batch_order(measured, "unmatched", "unmatched"))
    return {"samplesheet": samplesheet, "batches": batches, "tasks": run.tasks,
            "masks": [m for task in segmented for m in task.outputs["masks"]],
            "segmentation_summary": summary.outputs["table"][0],
            "features": features.outputs["table"][0], "unmatched": unmatched.outputs["table"][0]}


@pytest.fixture(scope="session")
def small_crops(tmp_path_factory, crops_dir) -> Path:
    """A crops folder (links) holding every MANIFEST_STEP-th crop of the shared set."""
    folder = tmp_path_factory.mktemp("crops") / "mitocheck_crops"
    manifest = pd.read_csv(crops_dir / "manifest.csv", dtype=str).iloc[::MANIFEST_STEP]
    for phenotype, name in zip(manifest["phenotype"], manifest["file"]):
        (folder / phenotype).mkdir(parents=True, exist_ok=True)
        (folder / phenotype / name).symlink_to(crops_dir / phenotype / name)
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def demo_params(small_crops) -> dict:
    return {**example_params(REPO / "examples" / "mitocheck_crops.yaml"), "mitocheck_crops": str(small_crops)}


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


@pytest.mark.slow  # the simulated run: ~25 s of morphotype commands
def test_every_call_of_the_workflow_runs_in_the_contract(lint, simulated):
    assert {task.call for task in simulated["tasks"]} == set(calls_by_name(lint.description))
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
    variables = {"task": {"ext": render_ext(groovy, call, params), "cpus": 3, "process": call},
                 "meta": {"id": "batch_00000"}}
    for declaration in process["inputs"]:
        for kind, name, _ in input_items(declaration):
            variables.setdefault(name, "input_file" if kind == "path" else {"id": "batch_00000"})
    command, _ = render(groovy, process, "script", variables)
    (line,) = command_lines(command)
    parsed = build_parser().parse_args(shlex.split(line)[1:])
    for name, (other_call, other_dest, other_to_option) in PARAM_OPTIONS.items():
        if other_call == call:
            assert getattr(parsed, other_dest) == other_to_option(params[name]), (name, line)
    assert getattr(parsed, dest) == to_option(FLIPPED[flipped])
    assert parsed.workers == 3


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
    assert list(read["image"]) == [str(images[0]), str(images[0]), str(images[1])]


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


def test_published_layout_is_the_run_layout():
    """conf/modules.config publishes each merged output where `morphotype run` writes it."""
    text = (REPO / "conf" / "modules.config").read_text()
    published = {}
    for selector in re.finditer(r"withName:\s*'([^']+)'\s*\{", text):
        body = text[selector.end():_closing_brace(text, selector.end() - 1)]
        folder = re.search(r'path:\s*\{\s*"\$\{params\.outdir\}/([^"]+)"\s*\}', body)
        if folder:
            settings = process_config(selector.group(1))
            name = None
            if "prefix" in settings:
                name = settings["prefix"].strip("'") + "." + settings["suffix"].strip("'")
            published[selector.group(1)] = (folder.group(1), name)
    assert published == {
        "MORPHOTYPE_SAMPLESHEET_MITOCHECKCROPS": ("samplesheet", None),  # meta.id 'samplesheet' -> samplesheet.csv
        "MORPHOTYPE_SEGMENT": ("segmentation", None),  # <file_id>.mask.tiff only (pattern)
        "MERGE_SEGMENTATION_SUMMARY": ("segmentation", "segmentation_summary.csv"),
        "MERGE_FEATURES": ("features", "single_cells.parquet"),
        "MERGE_UNMATCHED": ("features", "single_cells.unmatched.csv"),
    }


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
    result = simulate(tmp_path, lint, groovy, demo_params, stub=True)
    assert {task.call for task in result["tasks"]} == set(calls_by_name(lint.description))
