"""Parity of ``deep_features(recipe="deepprofiler")`` with DeepProfiler's own profiling code.

Opt-in: runs only where the DeepProfiler venv exists (``make deepprofiler-venv``: tensorflow-cpu
2.15.1, qubvel's efficientnet 1.1.1 and a checkout of cytomining/DeepProfiler at the study's commit
2fb3ed3); it is never installed into the main venv. A deterministic random EfficientNet-B0 saved
by Keras in DeepProfiler's layout, and a mosaic of 12 shared MitoCheck crops with fractional
nucleus centres (most 128-pixel boxes cross the image edge, two centres sit on it) go through
DeepProfiler's ``profile`` command and through morphotype (~1 min).
"""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-deepprofiler"
PYTHON, SOURCE = VENV / "bin" / "python", VENV / "DeepProfiler"
HELPER = REPO / "tests" / "deepprofiler_reference.py"

if not (PYTHON.exists() and (SOURCE / "deepprofiler").is_dir()):
    pytest.skip(f"optional DeepProfiler venv missing ({VENV}); build it with `make deepprofiler-venv`",
                allow_module_level=True)

from morphotype import deep

pytestmark = [pytest.mark.deepprofiler, pytest.mark.slow]

GRID, SPACING, CROP = (3, 4), 96, 64
EDGE_CENTRES = [(1.3, 140.6), (382.8, 286.9)]  # (x, y) on the left and bottom-right edges


def _helper(*args: str) -> None:
    env = dict(os.environ, DEEPPROFILER_SRC=str(SOURCE), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([str(PYTHON), str(HELPER), *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def mosaic(crops_dir: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """12 shared crops (first of each phenotype folder) on a 288 x 384 canvas and their (x, y)
    centres, shifted by a fraction of a pixel; then two centres on the image edge."""
    rng = np.random.default_rng(seed)
    files = [min(folder.glob("*.png")) for folder in sorted(p for p in crops_dir.iterdir() if p.is_dir())]
    from skimage.io import imread

    canvas = np.zeros((GRID[0] * SPACING, GRID[1] * SPACING), np.uint8)
    centres = []
    for k, path in enumerate(files[: GRID[0] * GRID[1]]):
        row, col = divmod(k, GRID[1])
        top, left = row * SPACING + (SPACING - CROP) // 2, col * SPACING + (SPACING - CROP) // 2
        canvas[top:top + CROP, left:left + CROP] = imread(path)
        centres.append((left + CROP / 2 + rng.uniform(-0.5, 0.5), top + CROP / 2 + rng.uniform(-0.5, 0.5)))
    return canvas, np.array(centres + EDGE_CENTRES)


def deepprofiler_project(root: Path, image: np.ndarray, centres: np.ndarray) -> Path:
    """DeepProfiler's folder layout and the study's profiling settings; returns the checkpoint path."""
    from skimage.io import imsave

    (root / "inputs" / "images" / "plate1").mkdir(parents=True)
    imsave(root / "inputs" / "images" / "plate1" / "mosaic.png", image, check_contrast=False)
    (root / "inputs" / "metadata").mkdir(parents=True)
    pd.DataFrame({"Metadata_Plate": ["plate1"], "Metadata_Well": ["A01"], "Metadata_Site": ["1"],
                  "DNA": ["plate1/mosaic.png"], "Class": ["Interphase"]}).to_csv(
        root / "inputs" / "metadata" / "index.csv", index=False)
    (root / "inputs" / "locations" / "plate1").mkdir(parents=True)
    pd.DataFrame({"Nuclei_Location_Center_X": centres[:, 0], "Nuclei_Location_Center_Y": centres[:, 1]}).to_csv(
        root / "inputs" / "locations" / "plate1" / "A01-1-Nuclei.csv", index=False)
    config = {
        "dataset": {"metadata": {"label_field": "Class", "control_value": "Interphase"},
                    "images": {"channels": ["DNA"], "file_format": "png", "width": image.shape[1],
                               "height": image.shape[0], "bits": 8},
                    "locations": {"mode": "single_cells", "box_size": 128, "view_size": 128,
                                  "mask_objects": False}},
        "prepare": {"compression": {"implement": False, "scaling_factor": 1.0}},
        "train": {"partition": {"targets": ["Class"], "split_field": "Split", "training": [0], "validation": [1]},
                  "model": {"name": "efficientnet", "crop_generator": "repeat_channel_crop_generator",
                            "augmentations": False, "metrics": ["accuracy"], "epochs": 1,
                            "initialization": "ImageNet",
                            "params": {"learning_rate": 0.005, "batch_size": 32, "conv_blocks": 0,
                                       "label_smoothing": 0.0}},
                  "sampling": {"factor": 1.0, "workers": 1, "cache_size": 64},
                  "validation": {"top_k": 1, "batch_size": 32, "frame": "val", "sample_first_crops": False}},
        "profile": {"feature_layer": "avg_pool", "checkpoint": "efficientnet-b0_random.h5", "batch_size": 32,
                    "use_pretrained_input_size": 224},
    }
    (root / "inputs" / "config").mkdir(parents=True)
    (root / "inputs" / "config" / "config.json").write_text(json.dumps(config, indent=2))
    checkpoint = root / "outputs" / "results" / "checkpoint" / "efficientnet-b0_random.h5"
    checkpoint.parent.mkdir(parents=True)
    return checkpoint


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, crops_dir):
    root = tmp_path_factory.mktemp("deepprofiler")
    image, centres = mosaic(crops_dir)
    checkpoint = deepprofiler_project(root, image, centres)
    _helper("checkpoint", str(checkpoint), "--seed", "3")
    _helper("profile", str(root))
    theirs = np.load(root / "outputs" / "results" / "features" / "plate1" / "A01" / "1.npz", allow_pickle=True)
    table = pd.DataFrame({deep.CELL_ID: [f"cell{i}" for i in range(len(centres))],
                          deep.IMAGE_PATH: str(root / "inputs" / "images" / "plate1" / "mosaic.png"),
                          deep.CENTRE_X: centres[:, 0], deep.CENTRE_Y: centres[:, 1]})
    return table, checkpoint, theirs


def test_features_match_deepprofiler(profiled):
    table, checkpoint, theirs = profiled
    locations = pd.DataFrame(theirs["locations"], columns=["x", "y"]) if theirs["locations"].ndim == 2 else None
    if locations is not None:  # DeepProfiler keeps the centres it read: same cells, same order
        np.testing.assert_allclose(locations.to_numpy(dtype=float), table[[deep.CENTRE_X, deep.CENTRE_Y]])
    ours = deep.deep_features(table, weights=checkpoint, progress=False)
    assert ours.attrs["card"]["recipe"] == "deepprofiler"
    ours = ours.drop(columns=deep.CELL_ID).to_numpy(dtype=np.float64)
    reference = np.asarray(theirs["features"], dtype=np.float64)
    assert reference.shape == ours.shape == (14, deep.EFFICIENTNET_FEATURES)
    scale = np.abs(reference).max()
    relative = np.abs(ours - reference).max() / scale
    per_cell = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours, reference)]
    print(f"DeepProfiler parity: max |diff| / max |feature| = {relative:.2e}, "
          f"per-cell 1 - correlation max {1 - min(per_cell):.1e}, feature scale {scale:.3g}")
    assert relative < 1e-4
    assert min(per_cell) > 0.99999
    # the Keras-applications recipe needs ImageNet constants that this checkpoint does not hold
    with pytest.raises(deep.MorphotypeInputError, match="normalisation"):
        deep.deep_features(table, weights=checkpoint, recipe="keras-applications", progress=False)


def test_recorded_resampling_fixture_is_tensorflows(tmp_path):
    _helper("resampling", str(tmp_path / "resampling.npz"))
    fresh, committed = np.load(tmp_path / "resampling.npz"), np.load(REPO / "tests" / "data" / "deepprofiler_resampling.npz")
    assert sorted(fresh.files) == sorted(committed.files)
    for name in fresh.files:
        np.testing.assert_array_equal(fresh[name], committed[name], err_msg=name)
