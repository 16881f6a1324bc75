"""Domain-shift guard, feature alignment and ``train --features-of``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from morphotype import domain, models
from morphotype.io import MorphotypeInputError, read_table

from test_jump import SHAPES, nucleus_features
from test_score import SHAPE_FEATURES, sqlite_dir


def labelled_cells(seed: int, pixel_scale: float = 1.0, n: int = 150) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.concat([nucleus_features(rng, n, shape, pixel_scale)[SHAPE_FEATURES].assign(Metadata_Phenotype=shape)
                       for shape in SHAPES], ignore_index=True)
    table["Metadata_CellID"] = [f"c{i}" for i in range(len(table))]
    table["Metadata_ImageID"] = [f"i{i // 20}" for i in range(len(table))]
    return table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    data = models.prepare_data(labelled_cells(0), "CP")
    model = models.train_model(data, np.ones(len(data.X), bool), hyperparameters=(0.1, 0.0), n_jobs=1, progress=False)
    return models.save_model(model, tmp_path_factory.mktemp("domain") / model.model_id)


def predict_cli(model_dir, features, out):
    return subprocess.run([sys.executable, "-m", "morphotype", "predict", "--model", str(model_dir),
                           "--features", str(features), "--out", str(out)], capture_output=True, text=True,
                          timeout=300)


def test_card_stores_training_quantiles_in_raw_units(model_dir):
    card = json.loads((model_dir / "model_card.json").read_text())
    distribution = card["training_distribution"]
    assert distribution["quantiles"] == list(domain.TRAINING_QUANTILES)
    area = np.asarray(distribution["features"]["Nuclei_AreaShape_Area"])
    assert np.all(np.diff(area) >= 0) and area[3] > 50  # raw pixels, not z-scores


def test_guard_flags_upscaled_cells_but_not_new_cells_like_the_training_cells(model_dir, tmp_path):
    same = labelled_cells(1)
    upscaled = labelled_cells(1, pixel_scale=2.0)  # as images upscaled 2x: nuclei 4x larger in area
    reports = {}
    for name, table in (("same", same), ("upscaled", upscaled)):
        table.to_parquet(tmp_path / f"{name}.parquet")
        result = predict_cli(model_dir, tmp_path / f"{name}.parquet", tmp_path / f"{name}.pred.parquet")
        assert result.returncode == 0, result.stderr
        reports[name] = json.loads((tmp_path / f"{name}.domain_shift.json").read_text())
        print(name, "overall fraction outside", reports[name]["overall_fraction_outside"])
    assert reports["same"]["flagged"] is False and reports["same"]["overall_fraction_outside"] < 0.06
    assert reports["upscaled"]["flagged"] is True
    assert "DOMAIN SHIFT" in result.stderr
    scores = read_table(tmp_path / "upscaled.pred.parquet")["Metadata_InDistribution"]
    assert scores.median() < read_table(tmp_path / "same.pred.parquet")["Metadata_InDistribution"].median()


def test_guard_never_changes_predictions(model_dir, tmp_path):
    table = labelled_cells(2, pixel_scale=2.0)
    table.to_parquet(tmp_path / "cells.parquet")
    assert predict_cli(model_dir, tmp_path / "cells.parquet", tmp_path / "out.parquet").returncode == 0
    guarded = read_table(tmp_path / "out.parquet")
    plain = models.predict_table(models.load_model(model_dir), table)
    columns = [c for c in plain.columns if c.startswith("probability_")]
    np.testing.assert_array_equal(guarded[columns].to_numpy(), plain[columns].to_numpy())
    assert (guarded["predicted_phenotype"] == plain["predicted_phenotype"]).all()


def test_old_model_without_distribution_loads_and_guard_says_unknown(model_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    card = json.loads((model_dir / "model_card.json").read_text())
    for key in ("training_distribution", "acquisition"):
        card.pop(key)
    (old / "model_card.json").write_text(json.dumps(card))
    (old / "coefficients.npz").write_bytes((model_dir / "coefficients.npz").read_bytes())
    report = domain.DomainGuard(models.load_model(old)).report()
    assert report["status"] == "unknown" and report["flagged"] is None


def test_alignment_weights_add_up_and_refuse_above_the_threshold(model_dir):
    model = models.load_model(model_dir)
    weights = domain.feature_weights(model)
    assert abs(sum(weights.values()) - 1) < 1e-12
    heaviest = max(weights, key=weights.get)
    available = set(model.features) - {heaviest}
    with pytest.raises(MorphotypeInputError, match=heaviest):
        domain.check_feature_alignment({"final": model}, available, source="x.sqlite: table Nuclei",
                                       max_missing_weight=weights[heaviest] / 2)
    report = domain.check_feature_alignment({"final": model}, available, source="x", fill_missing=True)
    assert report["models"]["final"]["missing_weight"] == pytest.approx(weights[heaviest], abs=1e-6)


def test_train_features_of_needs_nothing_filled(tmp_path):
    table = labelled_cells(3)
    table["Nuclei_AreaShape_ConvexArea"] = table["Nuclei_AreaShape_Area"] / table["Nuclei_AreaShape_Solidity"]
    table.to_parquet(tmp_path / "train.parquet")
    target = sqlite_dir() / "cytominer_database_data_a.sqlite"  # no ConvexArea, as in CPJUMP1
    result = subprocess.run(
        [sys.executable, "-m", "morphotype", "train", "--features", str(tmp_path / "train.parquet"),
         "--outdir", str(tmp_path / "out"), "--feature-spaces", "CP", "--class-balance", "balanced",
         "--no-shuffled", "--no-binary", "--no-evaluation", "--cv-folds", "2", "--grid-c", "0.1",
         "--grid-l1-ratio", "0", "--features-of", str(target), "--workers", "1"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    model = models.load_model(tmp_path / "out" / "models" / "CP__balanced__final")
    assert "Nuclei_AreaShape_ConvexArea" not in model.features and len(model.features) == len(SHAPE_FEATURES)
    from morphotype.cellprofiler import features_of

    report = domain.check_feature_alignment({"final": model}, features_of(target), source=str(target))
    assert report["models"]["final"]["n_missing"] == 0
