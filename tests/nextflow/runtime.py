"""The real Nextflow runtime for the tests: a copy of the pipeline run by tests/nextflow/nextflow.sh.

The runtime is io.nextflow:nextflow from Maven Central (tests/nextflow/runtime/pom.xml, built by
`make nextflow-runtime`). Plugins come only from GitHub releases, out of reach here, so the copy
the tests run is the pipeline without nf-schema: the `plugins {}` block of nextflow.config and
the three nf-schema lines of main.nf (include, validateParameters, paramsSummaryLog) are removed,
and nothing else. `pipeline_copy` refuses to run if those lines change, so this stays true.
Users keep nf-schema: validation is tested against nextflow_schema.json in tests/test_nextflow.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "tests" / "nextflow" / "nextflow.sh"
RUNTIME_LIB = REPO / "tests" / "nextflow" / "runtime" / "lib"
PIPELINE = ("main.nf", "nextflow.config", "nextflow_schema.json", "workflows", "subworkflows", "modules", "conf",
            "assets", "bin")
# The only lines that need the nf-schema plugin (main.nf), and the config block that loads it.
PLUGIN_LINES = ("include { validateParameters; paramsSummaryLog } from 'plugin/nf-schema'",
                "validateParameters()", "log.info(paramsSummaryLog(workflow))")
PLUGINS_BLOCK = re.compile(r"^plugins \{\n(?:    id '[^']+'\n)+\}\n", re.MULTILINE)


def available() -> bool:
    """Whether `make nextflow-runtime` has assembled the runtime."""
    return (RUNTIME_LIB / ".complete").exists()


def without_plugins(main_nf: str, config: str) -> tuple[str, str]:
    """main.nf and nextflow.config without nf-schema; raises if the lines to remove are not there."""
    lines = main_nf.splitlines(keepends=True)
    kept = [line for line in lines if line.strip() not in PLUGIN_LINES]
    if len(lines) - len(kept) != len(PLUGIN_LINES) or "nf-schema" in "".join(kept):
        raise AssertionError(f"main.nf should hold exactly these nf-schema lines: {PLUGIN_LINES}")
    config, count = PLUGINS_BLOCK.subn("", config)
    if count != 1:
        raise AssertionError("nextflow.config should hold one `plugins { id '...' }` block")
    return "".join(kept), config


def pipeline_copy(dest: Path, edits: dict[str, tuple[str, str]] | None = None) -> Path:
    """The pipeline's files under `dest`, without nf-schema; `edits` maps a file to (old, new) text,
    each `old` found exactly once (the wiring mutations)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, symlinks=True)
        elif source.exists():
            shutil.copy2(source, dest / name)
    if (REPO / "src").exists():
        (dest / "src").symlink_to(REPO / "src")  # bin/ runs the package from ${projectDir}/src
    main_nf, config = without_plugins((dest / "main.nf").read_text(), (dest / "nextflow.config").read_text())
    (dest / "main.nf").write_text(main_nf)
    (dest / "nextflow.config").write_text(config)
    for name, (old, new) in (edits or {}).items():
        text = (dest / name).read_text()
        if text.count(old) != 1:
            raise AssertionError(f"{name}: {old!r} found {text.count(old)} times")
        (dest / name).write_text(text.replace(old, new))
    return dest


def environment(home: Path) -> dict[str, str]:
    """The tasks' environment: `morphotype` from this venv first on PATH, no network for Nextflow."""
    env = dict(os.environ)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", NXF_HOME=str(home),
               NXF_OFFLINE="true", NXF_ANSI_LOG="false", NXF_DISABLE_CHECK_LATEST="true")
    env.setdefault("NUMBA_CACHE_DIR", str(home / "numba"))
    env.setdefault("MPLCONFIGDIR", str(home / "matplotlib"))
    return env


def command(pipeline: Path, launch: Path, params: dict, *options: str) -> list[str]:
    """`nextflow run` of the pipeline copy from `launch` (its .nextflow/ cache and work/)."""
    args = [str(LAUNCHER), "run", str(pipeline / "main.nf"), "-w", str(launch / "work"), *options]
    for name, value in params.items():
        value = str(value).lower() if isinstance(value, bool) else value
        args += [f"--{name}", str(value)]
    return args


def run(pipeline: Path, launch: Path, params: dict, *options: str, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run the pipeline to its end; with `check`, a failure raises with the log's tail."""
    launch.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command(pipeline, launch, params, *options), cwd=launch, capture_output=True,
                            text=True, timeout=timeout, env=environment(launch / ".nxf"), check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"nextflow exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}")
    return result


def run_until(pipeline: Path, launch: Path, params: dict, line: str, *options: str, timeout: float = 300) -> str:
    """Start the pipeline and kill it (SIGTERM, as Ctrl-C or a scheduler does) once its log
    shows `line`; returns the log."""
    launch.mkdir(parents=True, exist_ok=True)
    log = launch / "killed.log"
    with log.open("w") as out:
        process = subprocess.Popen(command(pipeline, launch, params, *options), cwd=launch, stdout=out,
                                   stderr=subprocess.STDOUT, env=environment(launch / ".nxf"),
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while line not in log.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the run ended or timed out before {line!r}:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    return log.read_text()


def trace(outdir: Path) -> pd.DataFrame:
    """The newest execution trace of a run's outdir (pipeline_info/execution_trace*.txt)."""
    traces = sorted((outdir / "pipeline_info").glob("execution_trace*.txt"), key=lambda path: path.stat().st_mtime)
    return pd.read_csv(traces[-1], sep="\t")


def tasks(outdir: Path) -> list[tuple[str, str]]:
    """(process, tag) of each task that ran or was cached, sorted: 'MORPHOTYPE:TRAIN:MORPHOTYPE_LOIO (CP.loio_0)'."""
    table = trace(outdir)
    done = table[table["status"].isin(["COMPLETED", "CACHED"])]
    return sorted(tuple(name.rstrip(")").split(" (", 1)) if " (" in name else (name, "") for name in done["name"])


def published(outdir: Path) -> list[str]:
    """Published files and folders, relative to outdir, two levels deep (pipeline_info left out)."""
    return sorted(str(path.relative_to(outdir)) for path in list(outdir.glob("*")) + list(outdir.glob("*/*"))
                  if path.relative_to(outdir).parts[0] != "pipeline_info")
