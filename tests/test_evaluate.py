"""Evaluation: F1, PR curves, confusion, coefficients, silhouette, UMAP and LOIO (cell-id alignment)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from morphotype import evaluate, models
from morphotype.normalize import fit_zscore
from morphotype.io import MorphotypeInputError

PHENOTYPES = ["Anaphase", "Apoptosis", "Interphase", "Polylobed"]
FEATURES = ["Nuclei_AreaShape_Area", "Nuclei_AreaShape_Eccentricity", "Nuclei_Intensity_MeanIntensity_DNA",
            "Nuclei_Texture_Contrast_DNA_3_00_256", "Nuclei_Granularity_1_DNA"]


def make_table(n_per_class=24, separation=3.0, seed=0, n_images=12, weights=(1, 1, 1, 1)) -> pd.DataFrame:
    """Four phenotypes, each high on its own feature; images hold cells of several phenotypes."""
    rng = np.random.default_rng(seed)
    labels = [p for p, w in zip(PHENOTYPES, weights) for _ in range(n_per_class * w)] + ["Folded"] * 4
    rows = []
    for i, phenotype in enumerate(labels):
        x = rng.normal(size=len(FEATURES))
        if phenotype in PHENOTYPES:
            x[PHENOTYPES.index(phenotype)] += separation
        image = f"img{int(rng.integers(n_images))}" if phenotype != "Folded" else "img_folded_only"
        rows.append({"Metadata_CellID": f"{image}_{i}", "Metadata_ImageID": image,
                     "Metadata_Phenotype": phenotype, **dict(zip(FEATURES, 5 * x + 20))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data():
    return models.prepare_data(make_table(weights=(1, 1, 2, 3)), "CP")


@pytest.fixture(scope="module")
def split(data):
    return models.split_cells(data.metadata)


@pytest.fixture(scope="module")
def model(data, split):
    return models.train_model(data, split == "train", hyperparameters=(1.0, 0.5), n_jobs=1, progress=False)


@pytest.fixture(scope="module")
def loio(model, data):
    return evaluate.leave_one_image_out(model, data, n_jobs=2, tol=1e-8, progress=False)


def test_f1_table_long_format_matches_sklearn(model, data, split):
    from sklearn.metrics import f1_score

    table = evaluate.f1_table(model, data, split)
    assert {"model_id", "feature_space", "balanced", "shuffled", "split", "phenotype", "f1"} <= set(table.columns)
    assert set(table["phenotype"]) == set(PHENOTYPES) | {"weighted"}
    test = split == "test"
    predicted = np.asarray(model.classes)[model.probabilities(data.X[test]).argmax(1)]
    expected = f1_score(data.labels[test], predicted, average="weighted")
    got = table[(table["split"] == "test") & (table["phenotype"] == "weighted")]["f1"].iloc[0]
    assert got == pytest.approx(expected)
    assert table["balanced"].all() and not table["shuffled"].any()


def test_confusion_counts_every_cell_once(model, data, split):
    table = evaluate.confusion_table(model, data, split)
    assert len(table) == 2 * len(PHENOTYPES) ** 2
    counts = table.groupby("split")["count"].sum()
    assert counts["train"] == (split == "train").sum() and counts["test"] == (split == "test").sum()
    true_counts = table[table["split"] == "test"].groupby("true_phenotype")["count"].sum()
    assert true_counts.to_dict() == pd.Series(data.labels[split == "test"]).value_counts().to_dict()


def test_pr_curves_per_class_and_split(model, data, split):
    table = evaluate.pr_curves(model, data, split)
    assert set(table["phenotype"]) == set(PHENOTYPES) and set(table["split"]) == {"train", "test"}
    for _, curve in table.groupby(["split", "phenotype"]):
        assert curve["recall"].iloc[-1] == 0 and curve["recall"].max() == 1
        assert curve["precision"].between(0, 1).all()
        assert curve["recall"].is_monotonic_decreasing


def test_coefficient_table_is_class_by_feature(model):
    table = evaluate.coefficient_table(model)
    assert len(table) == len(model.classes) * len(model.features)
    pivot = table.pivot(index="phenotype", columns="feature", values="coefficient")
    np.testing.assert_array_equal(pivot.loc[model.classes, model.features].to_numpy(), model.coef)
    # Each class is high on its own feature: that coefficient is its largest.
    for k, phenotype in enumerate(PHENOTYPES):
        assert pivot.loc[phenotype].idxmax() == FEATURES[k]


def test_silhouette_is_higher_for_separated_phenotypes(data):
    table = evaluate.silhouette_table(data)
    assert set(table["phenotype"]) == set(PHENOTYPES)
    assert table["n_components"].iloc[0] == len(data.features)  # fewer features than 50
    mixed = data.X.copy()
    rng = np.random.default_rng(0)
    mixed = rng.permutation(mixed)  # break the link between features and labels
    shuffled = models.LabelledData(data.feature_space, data.features, mixed, data.metadata, {}, [])
    assert table["silhouette"].mean() > evaluate.silhouette_table(shuffled)["silhouette"].mean() + 0.05


def test_umap_embedding_is_seeded(data):
    first = evaluate.umap_embedding(data, random_state=0)
    second = evaluate.umap_embedding(data, random_state=0)
    assert list(first.columns) == ["feature_space", "Metadata_CellID", "Metadata_ImageID", "Metadata_Phenotype",
                                   "umap_0", "umap_1"]
    assert len(first) == len(data.X)
    pd.testing.assert_frame_equal(first, second)


# -- leave one image out ---------------------------------------------------------------------

def test_loio_covers_each_cell_once_and_summarises_by_image_and_phenotype(loio, data):
    assert sorted(loio["Metadata_CellID"]) == sorted(data.cell_ids)
    assert "img_folded_only" not in set(loio["Metadata_ImageID"])
    assert loio["converged"].all() and loio["true_class_rank"].between(1, 4).all()
    summary = evaluate.loio_summary(loio)
    expected_groups = data.metadata.groupby(["Metadata_ImageID", "Metadata_Phenotype"]).ngroups
    assert len(summary) == expected_groups
    assert (summary["passed"] == (summary["mean_rank"] < 2)).all()
    fraction = evaluate.loio_pass_fraction(summary)["pass_fraction"].iloc[0]
    assert fraction > 0.8  # separated phenotypes: the true class ranks first in most groups


def _refit_without(model, data, image):
    """Independent LOIO refit of one image: same scaler rule, hyper-parameters and class weights."""
    held = data.metadata["Metadata_ImageID"].to_numpy() == image
    scaler = fit_zscore(data.X[~held], "training_set")
    codes = np.searchsorted(model.classes, data.labels)
    fit = models.fit_logistic(scaler.transform(data.X[~held]), codes[~held], n_classes=len(model.classes),
                              C=model.C, l1_ratio=model.l1_ratio,
                              sample_weight=models.balanced_sample_weight(codes[~held]), tol=1e-8)
    probabilities = models.softmax_probabilities(
        models.predict_logits(fit.coef, fit.intercept, scaler.transform(data.X[held])))
    return pd.DataFrame(probabilities, columns=[f"probability_{c}" for c in model.classes],
                        index=data.cell_ids[held])


def test_loio_probabilities_belong_to_their_cells(loio, model, data):
    """Regression test for the study's LOIO bug (rows reordered, labels not): every cell's
    LOIO probabilities must equal an independent balanced refit's prediction for that cell."""
    counts = data.metadata["Metadata_ImageID"].value_counts()
    for image in counts.index[:2]:  # the two most crowded images
        expected = _refit_without(model, data, image)
        got = loio.set_index("Metadata_CellID").loc[expected.index, expected.columns]
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-5)
        # A positional join after reordering the image's rows would put them on the wrong cells:
        reordered = expected.iloc[::-1].to_numpy()
        assert not np.allclose(got.to_numpy(), reordered, atol=1e-3)


def test_loio_is_invariant_to_row_order(loio, model, data):
    order = np.random.default_rng(1).permutation(len(data.X))
    permuted = models.LabelledData(data.feature_space, data.features, data.X[order],
                                   data.metadata.iloc[order].reset_index(drop=True), {}, [])
    again = evaluate.leave_one_image_out(model, permuted, n_jobs=1, tol=1e-8, progress=False)
    columns = ["true_class_rank"] + [f"probability_{c}" for c in model.classes]
    left = loio.set_index("Metadata_CellID")[columns].sort_index()
    right = again.set_index("Metadata_CellID")[columns].sort_index()
    np.testing.assert_allclose(left.to_numpy(dtype=float), right.to_numpy(dtype=float), atol=1e-5)


def test_attach_labels_refuses_misaligned_or_duplicated_ids():
    labels = pd.DataFrame({"Metadata_CellID": ["a", "b", "c"], "Metadata_Phenotype": ["X", "Y", "Y"]})
    predictions = pd.DataFrame({"Metadata_CellID": ["c", "a", "b"], "probability_X": [0.1, 0.9, 0.2],
                                "probability_Y": [0.9, 0.1, 0.8]})
    ranked = evaluate.rank_predictions(predictions, labels, ["X", "Y"])
    assert ranked.set_index("Metadata_CellID")["true_class_rank"].to_dict() == {"a": 1, "b": 1, "c": 1}
    # The same probabilities joined by position would rank every cell wrongly: the join is by id.
    positional = predictions.drop(columns="Metadata_CellID").assign(Metadata_CellID=labels["Metadata_CellID"])
    assert evaluate.rank_predictions(positional, labels, ["X", "Y"])["true_class_rank"].tolist() != [1, 1, 1]
    with pytest.raises(MorphotypeInputError, match="different cells"):
        evaluate.attach_labels(predictions.iloc[:2], labels)
    with pytest.raises(MorphotypeInputError, match="duplicated"):
        evaluate.attach_labels(pd.concat([predictions, predictions.iloc[:1]]), labels)


def test_loio_honours_class_weighting(data, split):
    balanced = models.train_model(data, split == "train", hyperparameters=(1.0, 0.0), n_jobs=1, progress=False)
    plain = models.train_model(data, split == "train", hyperparameters=(1.0, 0.0), class_weight=None, n_jobs=1,
                               progress=False)
    a = evaluate.leave_one_image_out(balanced, data, n_jobs=1, progress=False)
    b = evaluate.leave_one_image_out(plain, data, n_jobs=1, progress=False)
    rare = "Anaphase"  # the smallest class gets more probability when balanced
    assert a[f"probability_{rare}"].mean() > b[f"probability_{rare}"].mean()


def test_true_class_rank_ties_and_unknown_labels():
    probabilities = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    ranks = evaluate.true_class_rank(probabilities, ["A", "B", "C"], ["A", "A", "B"])
    assert ranks.tolist() == [1, 3, 1]
    with pytest.raises(MorphotypeInputError, match="not classes"):
        evaluate.true_class_rank(probabilities, ["A", "B", "C"], ["A", "Z", "B"])
