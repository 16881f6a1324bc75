"""The Nextflow checker (tests/nextflow/nflint.py) catches real mistakes and describes clean code.

nflint runs in its own venv (the language-server jar + JPype; `make nflint-venv`), so these tests
call it as a subprocess on small pipelines written into tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NFLINT = REPO / "tests" / "nextflow" / "nflint.py"


def nflint_python() -> Path:
    """The nflint venv's interpreter; a missing venv is a failure, never a skip."""
    python = Path(os.environ.get("MORPHOTYPE_NFLINT_PYTHON", REPO / ".venv-nflint" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"nflint interpreter {python} not found: run `make nflint-venv` "
                    "(or set MORPHOTYPE_NFLINT_PYTHON)", pytrace=False)
    return python


def run_nflint(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(nflint_python()), str(NFLINT), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


# A small pipeline in modern strict syntax, laid out and written the nf-core way.
CLEAN = {
    "main.nf": """
        #!/usr/bin/env nextflow
        include { MORPHOTYPE         } from './workflows/morphotype'
        include { validateParameters } from 'plugin/nf-schema'

        params.input = null

        workflow {
            main:
            validateParameters()
            ch_images = channel.fromPath(params.input)
                .map { image -> tuple([id: image.baseName], image) }
            MORPHOTYPE(ch_images, params.model)

            publish:
            features = MORPHOTYPE.out.features
        }

        output {
            features {
                path 'features'
            }
        }
        """,
    "workflows/morphotype.nf": """
        include { SEGMENT } from '../modules/local/segment'
        include { MEASURE } from '../modules/local/measure/main'

        workflow MORPHOTYPE {
            take:
            ch_images // channel: [ val(meta), path(image) ]
            model     // value: cellpose model name

            main:
            SEGMENT(ch_images, model)
            MEASURE(SEGMENT.out.masks.join(ch_images))

            emit:
            features = MEASURE.out.features
            masks    = SEGMENT.out.masks
        }
        """,
    "modules/local/segment/main.nf": """
        process SEGMENT {
            tag "${meta.id}"
            label 'process_medium'
            label 'process_gpu'

            conda "${moduleDir}/environment.yml"
            container "${ workflow.containerEngine in ['singularity', 'apptainer'] && !task.ext.singularity_pull_docker_container
                ? 'oras://community.wave.seqera.io/library/cellpose:3.1.1.3'
                : 'community.wave.seqera.io/library/cellpose:3.1.1.3' }"

            input:
            tuple val(meta), path(image)
            val model

            output:
            tuple val(meta), path("${prefix}_masks.tif"), emit: masks
            tuple val("${task.process}"), val('cellpose'), eval('cellpose --version | tail -n 1'), topic: versions, emit: versions_cellpose

            script:
            def args = task.ext.args ?: ''
            prefix = task.ext.prefix ?: "${meta.id}"
            \"\"\"
            export HOME=\\$PWD
            morphotype segment --image ${image} --model ${model} --output ${prefix}_masks.tif ${args}
            \"\"\"

            stub:
            prefix = task.ext.prefix ?: "${meta.id}"
            \"\"\"
            touch ${prefix}_masks.tif
            \"\"\"
        }
        """,
    "modules/local/measure/main.nf": """
        process MEASURE {
            tag "${meta.id}"
            label 'process_low'

            conda "${moduleDir}/environment.yml"
            container 'community.wave.seqera.io/library/cp-measure:0.3.0'

            input:
            tuple val(meta), path(masks), path(image)

            output:
            tuple val(meta), path("${prefix}.parquet"), emit: features
            tuple val("${task.process}"), val('morphotype'), eval('morphotype --version'), topic: versions

            script:
            def args = task.ext.args ?: ''
            prefix = task.ext.prefix ?: "${meta.id}"
            \"\"\"
            morphotype measure --masks ${masks} --image ${image} --output ${prefix}.parquet ${args}
            \"\"\"

            stub:
            prefix = task.ext.prefix ?: "${meta.id}"
            \"\"\"
            touch ${prefix}.parquet
            \"\"\"
        }
        """,
    "modules/local/segment/tests/main.nf.test": """
        nextflow_process {
            name "Test Process SEGMENT"
            script "../main.nf"
            process "SEGMENT"

            test("segment - stub") {
                options "-stub"
                when {
                    process {
                        \"\"\"
                        input[0] = [ [ id:'test' ], file(params.test_image, checkIfExists: true) ]
                        input[1] = 'nuclei'
                        \"\"\"
                    }
                }
                then {
                    assertAll(
                        { assert process.success },
                        { assert snapshot(process.out).match() }
                    )
                }
            }
        }
        """,
    "nextflow.config": """
        params {
            input  = null
            model  = 'nuclei'
            outdir = 'results'
        }

        plugins {
            id 'nf-schema@2.4.2'
        }

        validation {
            help.enabled = true
        }

        includeConfig 'conf/base.config'

        profiles {
            docker {
                docker.enabled = true
            }
            test {
                params.input = "${projectDir}/tests/data/*.tif"
                process.resourceLimits = [cpus: 2, memory: 6.GB, time: 1.h]
            }
        }

        outputDir = params.outdir
        manifest {
            name = 'morphotype'
            mainScript = 'main.nf'
        }
        """,
    "conf/base.config": """
        process {
            cpus   = { 1 * task.attempt }
            memory = { 6.GB * task.attempt }
            errorStrategy = { task.exitStatus in ((130..145) + 104) ? 'retry' : 'finish' }
            maxRetries = 1
            withLabel: process_low {
                cpus   = { 2 * task.attempt }
                memory = { 12.GB * task.attempt }
            }
            withLabel: process_gpu {
                accelerator = 1
            }
        }
        """,
}

# One defect per file; (file, line, message fragment) of the error each must raise.
BROKEN = {
    "syntax.nf": """
        workflow SYNTAX {
            main:
            ch = channel.of(1
            other = 2
        }
        """,
    "undefined.nf": """
        workflow UNDEFINED {
            main:
            NOT_A_PROCESS(channel.of(1))
            println(not_a_variable)
        }
        """,
    "bad_include.nf": """
        include { GONE } from './modules/local/gone'

        workflow BAD_INCLUDE {
            main:
            GONE(channel.of(1))
        }
        """,
    "modules/local/typo/main.nf": """
        process TYPO {
            label 'process_low'
            cpu 2

            input:
            val x

            output:
            val x, emit: x

            script:
            \"\"\"
            echo ${x}
            \"\"\"
        }
        """,
    "nextflow.config": """
        docker.enable = true
        process {
            cpus = 2
        }
        """,
    "tests/broken.nf.test": """
        nextflow_process {
            name "broken"
            script "../modules/local/typo/main.nf"
            process "TYPO"
            test("x") {
                then {
                    assert process.success )
                }
            }
        }
        """,
    "tests/wrong_target.nf.test": """
        nextflow_process {
            name "wrong target"
            script "../modules/local/typo/main.nf"
            process "NOT_THERE"
        }
        """,
}
EXPECTED_ERRORS = [
    ("syntax.nf", 4, "Unexpected input"),
    ("undefined.nf", 3, "`NOT_A_PROCESS` is not defined"),
    ("undefined.nf", 4, "`not_a_variable` is not defined"),
    ("bad_include.nf", 1, "Invalid include source"),
    ("bad_include.nf", 5, "`GONE` is not defined"),  # what a failed include leaves behind
    ("modules/local/typo/main.nf", 3, "Unrecognized process directive `cpu`"),
    ("nextflow.config", 1, "Unrecognized config option 'docker.enable'"),
    ("tests/broken.nf.test", 7, "Unexpected input"),
    ("tests/wrong_target.nf.test", 4, "nf-test process 'NOT_THERE' is not defined"),
]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    root = write_tree(tmp_path_factory.mktemp("clean"), CLEAN)
    result = run_nflint("lint", root, "--strict", "--json", root / "description.json", cwd=root)
    return result, json.loads((root / "description.json").read_text())


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> subprocess.CompletedProcess:
    root = write_tree(tmp_path_factory.mktemp("broken"), BROKEN)
    return run_nflint("lint", root, cwd=root)


def test_missing_venv_fails_and_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setenv("MORPHOTYPE_NFLINT_PYTHON", str(tmp_path / "no" / "python"))
    with pytest.raises(pytest.fail.Exception, match="make nflint-venv"):
        nflint_python()


def test_clean_strict_pipeline_passes_even_in_strict_mode(clean):
    result, description = clean
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r": (error|warning): ", result.stdout), result.stdout
    # Only the offline plugin-registry findings remain, each with its reason.
    leftovers = description["diagnostics"]
    assert leftovers and all(d["allowed"] for d in leftovers), leftovers
    assert {d["message"] for d in leftovers} == {"Unrecognized config option 'validation.help.enabled'"}


@pytest.mark.parametrize("file,line,fragment", EXPECTED_ERRORS)
def test_each_defect_is_reported_at_its_line(broken, file, line, fragment):
    pattern = rf"^{re.escape(file)}:{line}:\d+: error: .*{re.escape(fragment)}"
    assert re.search(pattern, broken.stdout, re.M), broken.stdout + broken.stderr


def test_broken_pipeline_fails_and_reports_nothing_unexpected(broken):
    assert broken.returncode == 1
    errors = re.findall(r"^(\S+):(\d+):\d+: error: ", broken.stdout, re.M)
    assert {(f, int(n)) for f, n in errors} == {(f, n) for f, n, _ in EXPECTED_ERRORS}, broken.stdout


def test_warnings_only_fail_in_strict_mode(tmp_path):
    write_tree(tmp_path, {"main.nf": """
        workflow {
            Channel.of(1, 2).map { it * 2 }.view()
        }
        """})
    relaxed = run_nflint("lint", ".", cwd=tmp_path)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert re.search(r"^main\.nf:2:5: warning: The use of `Channel` .* deprecated", relaxed.stdout, re.M)
    assert re.search(r"^main\.nf:2:\d+: warning: Implicit closure parameter is deprecated", relaxed.stdout, re.M)
    assert run_nflint("lint", ".", "--strict", cwd=tmp_path).returncode == 1


def test_describe_gives_processes_with_directives_emits_and_script(clean):
    _, description = clean
    (segment,) = description["files"]["modules/local/segment/main.nf"]["processes"]
    assert segment["name"] == "SEGMENT"
    assert segment["labels"] == ["process_medium", "process_gpu"]
    assert segment["directives"]["tag"] == '"${meta.id}"'
    assert segment["directives"]["conda"] == '"${moduleDir}/environment.yml"'
    assert "community.wave.seqera.io/library/cellpose:3.1.1.3" in segment["directives"]["container"]
    assert segment["inputs"] == ["tuple val(meta), path(image)", "val model"]
    emits = {o["emit"]: o for o in segment["outputs"]}
    assert set(emits) == {"masks", "versions_cellpose"}
    assert emits["versions_cellpose"]["topic"] == "versions" and emits["masks"]["topic"] is None
    assert "eval('cellpose --version | tail -n 1')" in emits["versions_cellpose"]["text"]
    assert segment["script"].splitlines()[0] == "def args = task.ext.args ?: ''"
    assert "morphotype segment --image ${image}" in segment["script"]
    assert "touch ${prefix}_masks.tif" in segment["stub"] and "morphotype" not in segment["stub"]
    assert segment["when"] is None
    (measure,) = description["files"]["modules/local/measure/main.nf"]["processes"]
    assert [(o["emit"], o["topic"]) for o in measure["outputs"]] == [("features", None), (None, "versions")]


def test_describe_gives_workflows_calls_includes_and_params(clean):
    _, description = clean
    files = description["files"]
    (sub,) = files["workflows/morphotype.nf"]["workflows"]
    assert sub["name"] == "MORPHOTYPE" and not sub["entry"]
    assert sub["takes"] == ["ch_images", "model"]
    assert [(e["name"], e["text"]) for e in sub["emits"]] == [
        ("features", "MEASURE.out.features"), ("masks", "SEGMENT.out.masks")]
    assert [(c["name"], c["kind"]) for c in sub["calls"]] == [("SEGMENT", "process"), ("MEASURE", "process")]
    assert sub["main"].splitlines() == ["SEGMENT(ch_images, model)", "MEASURE(SEGMENT.out.masks.join(ch_images))"]
    includes = {i["source"]: i for i in files["workflows/morphotype.nf"]["includes"]}
    assert includes["../modules/local/segment"]["resolved"] == "modules/local/segment/main.nf"
    assert includes["../modules/local/measure/main"]["exists"]

    (entry,) = files["main.nf"]["workflows"]
    assert entry["entry"] and entry["name"] is None
    assert entry["calls"] == [{"name": "MORPHOTYPE", "kind": "workflow", "target": "MORPHOTYPE", "line": 12}]
    assert entry["publish"] == "features = MORPHOTYPE.out.features"
    plugin = next(i for i in files["main.nf"]["includes"] if i["plugin"])
    assert plugin["source"] == "plugin/nf-schema" and plugin["names"][0]["name"] == "validateParameters"
    assert files["main.nf"]["params"] == [{"name": "input", "value": "null", "line": 5}]

    config = files["nextflow.config"]
    assert [(p["name"], p["value"], p["profile"]) for p in config["params"]] == [
        ("input", "null", None), ("model", "'nuclei'", None), ("outdir", "'results'", None),
        ("input", '"${projectDir}/tests/data/*.tif"', "test")]
    assert config["plugins"] == ["nf-schema@2.4.2"]
    assert config["includes"] == [{"source": "conf/base.config", "line": 15, "exists": True}]


def test_groovy_command_flags_a_broken_nf_test_file(tmp_path):
    good = write_tree(tmp_path, {"good.nf.test": CLEAN["modules/local/segment/tests/main.nf.test"]})
    (tmp_path / "bad.nf.test").write_text("nextflow_process {\n    test('x') {\n        then { assert x == }\n    }\n}\n")
    result = run_nflint("groovy", "good.nf.test", "bad.nf.test", cwd=good)
    assert result.returncode == 1
    assert re.fullmatch(r"bad\.nf\.test:3:\d+: error: .+\n", result.stdout), result.stdout
