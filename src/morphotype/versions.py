"""Software versions recorded with every artefact (run info, model cards, encoder cards)."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from morphotype import __version__
from morphotype.io import atomic_path

# What a whole run records (pipeline_info/versions.json); artefacts name the packages they depend on.
RUN_PACKAGES = ("numpy", "scipy", "pandas", "scikit-image", "scikit-learn", "cp-measure", "cellpose", "basicpy",
                "pycytominer", "pyarrow", "torch")


def software_versions(packages: Sequence[str] = RUN_PACKAGES) -> dict[str, str]:
    """``morphotype`` and Python versions, then each installed package of ``packages`` by its
    distribution name (as ``pip`` reports it); packages that are not installed are left out."""
    versions = {"morphotype": __version__, "python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def write_versions(path: str | Path, packages: Sequence[str] = RUN_PACKAGES) -> Path:
    """Write :func:`software_versions` as JSON (sorted keys), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(software_versions(packages), indent=2, sort_keys=True))
    return path
