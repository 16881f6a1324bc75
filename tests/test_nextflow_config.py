"""Resources that fit: every executor profile caps what a task may ask; the launch needs Nextflow 25.04+."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = re.compile(r"resourceLimits\s*=\s*\[cpus:\s*(\d+),\s*memory:\s*(\d+)\.GB,\s*time:\s*(\d+)\.h\]")


def _profile(name: str) -> str:
    text = (REPO / "nextflow.config").read_text()
    start = re.search(rf"^    {name} \{{$", text, re.M)
    assert start, f"profile {name} missing"
    end = text.index("\n    }", start.end())
    return text[start.end():end]


def test_every_executor_has_resource_limits_that_its_labels_respect():
    laptop = LIMIT.search((REPO / "conf" / "base.config").read_text())
    assert laptop and (int(laptop.group(1)), int(laptop.group(2))) == (4, 16)  # the README's laptop
    for profile, (cpus, memory) in {"slurm": (32, 256), "aws": (16, 64)}.items():
        limits = LIMIT.search(_profile(profile))
        assert limits and (int(limits.group(1)), int(limits.group(2))) == (cpus, memory), profile
    test = LIMIT.search((REPO / "conf" / "test.config").read_text())
    assert test and int(test.group(1)) <= 2 and int(test.group(2)) <= 6
    # first attempts of every label fit the laptop (retries are capped by the limits)
    base = (REPO / "conf" / "base.config").read_text()
    for label in ("process_single", "process_low", "process_medium", "process_high"):
        block = base[base.index(f"withLabel: {label}"):]
        block = block[:block.index("\n    }")]
        cpus = int(re.search(r"cpus\s*=\s*\{?\s*(\d+)", block).group(1))
        memory = int(re.search(r"memory\s*=\s*\{\s*(\d+)\.GB", block).group(1))
        assert cpus <= 8 and memory <= 16, label


def test_nextflow_version_is_enforced_and_traces_do_not_overwrite_each_other():
    text = (REPO / "nextflow.config").read_text()
    assert "nextflowVersion = '!>=25.04.0'" in text
    for kind in ("execution_trace", "execution_report", "execution_timeline", "pipeline_dag"):
        assert f"{kind}_${{new java.util.Date().format(" in text, kind
