import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder ($MORPHOTYPE_SHARED, default ../shared beside the repo)."""
    path = Path(os.environ.get("MORPHOTYPE_SHARED", REPO.parent / "shared"))
    if not (path / "data" / "mitocheck_crops" / "manifest.csv").exists():
        raise RuntimeError(f"shared data not found at {path}; set MORPHOTYPE_SHARED")
    return path


@pytest.fixture(scope="session")
def crops_dir(shared_dir) -> Path:
    return shared_dir / "data" / "mitocheck_crops"
