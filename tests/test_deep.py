"""Deep nucleus features: boxes, DeepProfiler's resampling (against values recorded from
TensorFlow), EfficientNet-B0 (both Keras weight layouts, recipes), in-domain SSL encoder."""

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from morphotype import deep
from morphotype import deepprofiler_input as dpi
from morphotype.io import MorphotypeInputError

# Recorded by tests/deepprofiler_reference.py (tensorflow-cpu 2.15.1) in the opt-in parity run
RECORDED = Path(__file__).parent / "data" / "deepprofiler_resampling.npz"

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ boxes

def test_boxes_at_image_border_are_padded():
    image = np.arange(1, 101, dtype=np.uint16).reshape(10, 10)
    boxes = deep.extract_boxes(image, [[0.2, 0.0], [5, 5]], box_size=4)
    assert boxes.shape == (2, 4, 4) and boxes.dtype == np.uint16
    # centre (0, 0): box spans rows/cols -2..1, the first two rows and columns are outside
    assert (boxes[0, :2] == 0).all() and (boxes[0, :, :2] == 0).all()
    np.testing.assert_array_equal(boxes[0, 2:, 2:], image[:2, :2])
    np.testing.assert_array_equal(boxes[1], image[3:7, 3:7])
    edge = deep.extract_boxes(image, [[0, 0]], box_size=4, pad_mode="edge")[0]
    assert (edge[:2, 2] == image[0, 0]).all() and (edge[2, :2] == image[0, 0]).all()
    with pytest.raises(MorphotypeInputError):
        deep.extract_boxes(image, [[0, 0]], box_size=4, pad_mode="wrap-around")


def test_boxes_masked_to_their_object():
    image = np.full((8, 8), 7, dtype=np.uint8)
    labels = np.zeros((8, 8), dtype=int)
    labels[2:4, 2:4], labels[4:6, 4:6] = 1, 2
    box = deep.extract_boxes(image, [[3, 3]], box_size=6, mask=(labels, [1]))[0]
    assert box.sum() == 4 * 7  # only object 1's four pixels survive; object 2 is blanked


def test_efficientnet_input_repeats_channel_and_resizes_like_tf():
    boxes = np.array([[[0, 255], [255 // 3, 255]]], dtype=np.uint8)
    x = deep.efficientnet_input(boxes, input_size=4)
    assert x.shape == (1, 3, 4, 4)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # tf.image.resize bilinear: half-pixel centres, source coordinate clamped at the borders
    src = boxes[0].astype(np.float64)
    coords = np.clip((np.arange(4) + 0.5) * 0.5 - 0.5, 0, 1)
    low, frac = np.floor(coords).astype(int), coords - np.floor(coords)
    high = np.minimum(low + 1, 1)
    rows = src[low] * (1 - frac)[:, None] + src[high] * frac[:, None]
    expected = rows[:, low] * (1 - frac)[None] + rows[:, high] * frac[None]
    np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=1e-4)


# ------------------------------------------------------------------------------ DeepProfiler's resampling

def test_deepprofiler_boxes_and_crop_and_resize_match_tensorflow():
    recorded = np.load(RECORDED)
    assert str(recorded["tensorflow"]) == "2.15.1"
    image = recorded["image"]
    boxes = dpi.deepprofiler_boxes(recorded["centres"], float(recorded["box_size"]), image.shape)
    np.testing.assert_array_equal(boxes, recorded["boxes"])  # same float32 boxes as DeepProfiler's numpy
    crops = dpi.crop_and_resize(image, boxes, int(recorded["crop_size"]))
    expected = recorded["crop_and_resize"]
    assert crops.dtype == np.float32 and crops.shape == expected.shape == (6, 9, 9)
    np.testing.assert_allclose(crops, expected, rtol=0, atol=1e-4)  # pixels up to 255: float32 rounding
    # boxes across the edges: whole rows and columns outside the image are 0, as in TensorFlow
    assert (expected[1, :4] == 0).all() and (expected[1, :, :4] == 0).all() and (crops[1, :4] == 0).all()
    # fractional geometry, not an integer cut around a rounded centre
    assert not np.isin(expected[0], image).all()


def test_legacy_resize_matches_tensorflow_without_half_pixel_centres():
    recorded = np.load(RECORDED)
    small = dpi.resize_bilinear_legacy(recorded["small"], 28)  # 16 -> 28 is 128 -> 224's ratio
    np.testing.assert_allclose(small, recorded["resize_small"], rtol=0, atol=1e-5)
    odd = dpi.resize_bilinear_legacy(recorded["odd"], (14, 12))
    np.testing.assert_allclose(odd, recorded["resize_odd"], rtol=0, atol=1e-5)
    # legacy grid: output pixel 0 is input pixel 0 (half-pixel centres would blend pixels 0 and 1)
    np.testing.assert_array_equal(small[:, 0, 0], recorded["small"][:, 0, 0])
    torch_half_pixel = torch.nn.functional.interpolate(torch.from_numpy(recorded["small"])[:, None], size=(28, 28),
                                                       mode="bilinear", align_corners=False)[:, 0].numpy()
    assert np.abs(torch_half_pixel - recorded["resize_small"]).max() > 0.1


def test_deepprofiler_network_input_scaling():
    rng = np.random.default_rng(0)
    crops = rng.uniform(0, 200, (3, 16, 16)).astype(np.float32)
    x = dpi.deepprofiler_network_input(crops, 28)
    assert x.shape == (3, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x.min(axis=(1, 2)), -1) and np.testing.assert_allclose(x.max(axis=(1, 2)), 1)
    # per-crop min-max: a crop's brightness and offset do not matter
    np.testing.assert_allclose(dpi.deepprofiler_network_input(crops * 3 + 7, 28), x, atol=1e-5)
    tensor = deep.network_input(crops, "deepprofiler", 28)
    assert tensor.shape == (3, 3, 28, 28) and torch.equal(tensor[:, 0], tensor[:, 2])
    with np.errstate(invalid="ignore"):
        assert np.isnan(dpi.deepprofiler_network_input(np.ones((1, 4, 4), np.float32), 8)).all()  # as DeepProfiler


# ------------------------------------------------------------------------------ EfficientNet

def _synthetic_keras_h5(path, seed=0, layout="keras-applications"):
    """A file with the Keras EfficientNetB0 layer names and (Keras-ordered) shapes; the
    Keras-applications layout has a ``normalization`` layer, DeepProfiler's (qubvel) has none, a
    ``probs`` head, and a graph-mode weight name (``stem_conv_1/kernel:0``)."""
    import h5py

    rng = np.random.default_rng(seed)
    model = deep.EfficientNetB0()
    state = model.state_dict()
    arrays = {}
    for torch_name, (keras_name, kind) in deep.keras_weight_map(model).items():
        shape = tuple(state[torch_name].shape)
        if kind == "conv":
            shape = (shape[2], shape[3], shape[1], shape[0])
        elif kind == "depthwise":
            shape = (shape[2], shape[3], shape[0], 1)
        value = rng.normal(0, 0.3, shape)
        if keras_name.endswith("moving_variance:0"):
            value = rng.uniform(0.5, 1.5, shape)
        arrays[keras_name] = value.astype(np.float32)
    if layout == "keras-applications":
        arrays["normalization/mean:0"] = np.array([0.4, 0.5, 0.6], np.float32)
        arrays["normalization/variance:0"] = np.array([0.2, 0.25, 0.3], np.float32)
    else:
        arrays["probs/kernel:0"] = rng.normal(0, 0.1, (1280, 4)).astype(np.float32)
    with h5py.File(path, "w") as handle:  # Keras 2 save_weights layout: layer/layer/weight:0
        layers = sorted({name.split("/")[0] for name in arrays})
        handle.attrs["layer_names"] = np.array([n.encode() for n in layers])
        for layer in layers:
            group = handle.create_group(layer)
            names = [n for n in arrays if n.startswith(layer + "/")]
            stored = [n.replace("stem_conv/", "stem_conv_1/") if layout != "keras-applications" else n for n in names]
            group.attrs["weight_names"] = np.array([n.encode() for n in stored])
            for name, as_stored in zip(names, stored):
                group.create_dataset(as_stored, data=arrays[name])
    return arrays


def _swish(x):
    return x / (1 + np.exp(-x))


def _bn(x, arrays, layer):
    g, b, m, v = (arrays[f"{layer}/{w}:0"] for w in ("gamma", "beta", "moving_mean", "moving_variance"))
    return g[:, None, None] * (x - m[:, None, None]) / np.sqrt(v[:, None, None] + 1e-3) + b[:, None, None]


def _reference_stem_block1a(image, arrays):
    """Keras stem + block1a computed straight from the .h5 tensors with numpy."""
    from numpy.lib.stride_tricks import sliding_window_view as windows

    mean, var = arrays["normalization/mean:0"], arrays["normalization/variance:0"]
    x = (image / 255.0 - mean[:, None, None]) / np.sqrt(var[:, None, None])
    x = x / np.sqrt(np.array(deep.IMAGENET_STDDEV))[:, None, None]
    x = np.pad(x, ((0, 0), (0, 1), (0, 1)))  # correct_pad for an even size and kernel 3
    patches = windows(x, (3, 3), axis=(1, 2))[:, ::2, ::2]  # (c, h, w, 3, 3)
    x = np.einsum("chwab,abco->ohw", patches, arrays["stem_conv/kernel:0"])
    x = _swish(_bn(x, arrays, "stem_bn"))
    patches = windows(np.pad(x, ((0, 0), (1, 1), (1, 1))), (3, 3), axis=(1, 2))
    x = np.einsum("chwab,abc->chw", patches, arrays["block1a_dwconv/depthwise_kernel:0"][..., 0])
    x = _swish(_bn(x, arrays, "block1a_bn"))
    se = x.mean(axis=(1, 2))
    se = _swish(se @ arrays["block1a_se_reduce/kernel:0"][0, 0] + arrays["block1a_se_reduce/bias:0"])
    se = 1 / (1 + np.exp(-(se @ arrays["block1a_se_expand/kernel:0"][0, 0] + arrays["block1a_se_expand/bias:0"])))
    x = np.einsum("chw,co->ohw", x * se[:, None, None], arrays["block1a_project_conv/kernel:0"][0, 0])
    return _bn(x, arrays, "block1a_project_bn")


def test_keras_h5_weights_reproduce_a_reference_forward_pass(tmp_path):
    arrays = _synthetic_keras_h5(tmp_path / "efficientnetb0_notop.h5")
    model = deep.load_efficientnet(tmp_path / "efficientnetb0_notop.h5")
    # every mapped tensor arrived, transposed to torch order
    np.testing.assert_array_equal(model.stem_conv.weight.detach().numpy(),
                                  arrays["stem_conv/kernel:0"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(model.blocks[15].dwconv.weight.detach().numpy(),
                                  arrays["block7a_dwconv/depthwise_kernel:0"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(model.top_bn.running_var.numpy(), arrays["top_bn/moving_variance:0"])
    image = np.random.default_rng(1).uniform(0, 255, (3, 16, 16))
    with torch.inference_mode():
        ours = model.blocks[0](model.stem(torch.tensor(image[None], dtype=torch.float32)))[0].numpy()
    np.testing.assert_allclose(ours, _reference_stem_block1a(image, arrays), rtol=1e-3, atol=1e-3)
    # Keras B0 (no top) holds 4,049,571 weights: ours plus the 7 of its Normalization layer
    state = model.state_dict()
    n = sum(v.numel() for k, v in state.items() if "num_batches" not in k and not k.startswith(("norm_", "imagenet")))
    assert n + 7 == 4_049_571


def test_keras_h5_with_missing_layers_is_refused(tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.create_dataset("dense/dense/kernel:0", data=np.zeros((2, 2)))
    with pytest.raises(MorphotypeInputError, match="not a Keras EfficientNetB0.*DeepProfiler"):
        deep.load_efficientnet(tmp_path / "other.h5")
    with h5py.File(tmp_path / "keras3.weights.h5", "w") as handle:  # Keras 3: layers/<name>/vars/0
        handle.create_dataset("layers/stem_conv/vars/0", data=np.zeros((3, 3, 3, 32)))
    with pytest.raises(MorphotypeInputError, match="not a Keras EfficientNetB0"):
        deep.load_efficientnet(tmp_path / "keras3.weights.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(MorphotypeInputError, match="text.h5"):
        deep.load_efficientnet(tmp_path / "text.h5")


def test_deepprofiler_layout_loads_and_picks_its_recipe(tmp_path):
    arrays = _synthetic_keras_h5(tmp_path / "dp.h5", layout="deepprofiler")
    model = deep.load_efficientnet(tmp_path / "dp.h5")
    assert model.layout == "deepprofiler"
    np.testing.assert_array_equal(model.stem_conv.weight.detach().numpy(),  # read despite the _1 suffix
                                  arrays["stem_conv/kernel:0"].transpose(3, 2, 0, 1))
    assert deep.resolve_recipe(None, model, "dp.h5") == "deepprofiler"
    with pytest.raises(MorphotypeInputError, match="no ImageNet normalisation"):
        deep.resolve_recipe("keras-applications", model, "dp.h5")
    with pytest.raises(MorphotypeInputError, match="recipe must be one of"):
        deep.resolve_recipe("imagenet", model, "dp.h5")
    keras = deep.load_efficientnet(_keras_file(tmp_path))
    assert keras.layout == "keras-applications" and deep.resolve_recipe(None, keras, "k.h5") == "keras-applications"
    # qubvel's network takes the [-1, 1] input as it is; Keras's applies its normalisation first
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        model.normalise = False
        stem = model.stem(x)
        model.normalise = True
        assert not torch.allclose(model.stem(x), stem)


def _keras_file(tmp_path):
    _synthetic_keras_h5(tmp_path / "keras.h5")
    return tmp_path / "keras.h5"


def test_keras_applications_file_without_normalisation_constants_is_refused(tmp_path):
    import h5py

    path = _keras_file(tmp_path)
    with h5py.File(path, "a") as handle:
        del handle["normalization"]
        handle.create_group("rescaling")  # still the Keras-applications layout, constants gone
    with pytest.raises(MorphotypeInputError, match="without the normalisation layer's mean and variance"):
        deep.load_efficientnet(path)


def test_refuses_without_weights(tmp_path):
    with pytest.raises(MorphotypeInputError, match="need EfficientNet-B0 weights"):
        deep.load_efficientnet(None)
    with pytest.raises(MorphotypeInputError, match="not found"):
        deep.load_efficientnet(tmp_path / "absent.h5")


@pytest.fixture()
def cell_table(tmp_path):
    from skimage.io import imsave

    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        image = rng.integers(0, 255, (40, 40), dtype=np.uint8)
        path = tmp_path / f"image{i}.png"
        imsave(path, image, check_contrast=False)
        for j, (x, y) in enumerate([(3.0, 4.0), (20.0, 20.0), (38.6, 39.2)]):
            rows.append({"Metadata_CellID": f"image{i}_{j + 1}", "Metadata_Image": str(path),
                         "Nuclei_Location_Center_X": x, "Nuclei_Location_Center_Y": y,
                         "Metadata_Phenotype": ["Interphase", "Large", "Apoptosis"][j]})
    return pd.DataFrame(rows)


def test_deep_features_naming_determinism_and_checkpoint(cell_table, tmp_path):
    kwargs = dict(box_size=16, input_size=32, batch_size=4, progress=False)
    first = deep.deep_features(cell_table, weights="random", random_state=3, **kwargs)
    assert list(first.columns) == ["Metadata_CellID"] + [f"DP__efficientnet_{i}" for i in range(1280)]
    assert first["Metadata_CellID"].tolist() == cell_table["Metadata_CellID"].tolist()
    assert np.isfinite(first.iloc[:, 1:].to_numpy()).all()
    again = deep.deep_features(cell_table, weights="random", random_state=3, **kwargs)
    pd.testing.assert_frame_equal(first, again)
    other_seed = deep.deep_features(cell_table, weights="random", random_state=4, **kwargs)
    assert not np.allclose(first.iloc[:, 1:], other_seed.iloc[:, 1:], rtol=1e-2, atol=0)
    # a saved torch checkpoint reproduces the features
    torch.save(deep.load_efficientnet("random", random_state=3).state_dict(), tmp_path / "b0.pt")
    loaded = deep.deep_features(cell_table, weights=tmp_path / "b0.pt", **kwargs)
    pd.testing.assert_frame_equal(first, loaded)
    assert first.attrs["card"]["recipe"] == "keras-applications" and loaded.attrs["card"]["weights_layout"] == "torch"
    assert len(loaded.attrs["card"]["weights_sha256"]) == 64


def test_deepprofiler_recipe_keeps_fractional_centres(cell_table, tmp_path):
    _synthetic_keras_h5(tmp_path / "dp.h5", layout="deepprofiler")
    kwargs = dict(weights=tmp_path / "dp.h5", box_size=16, input_size=32, batch_size=2, progress=False)
    shifted = cell_table.assign(Nuclei_Location_Center_X=cell_table["Nuclei_Location_Center_X"] + 0.3)
    first = deep.deep_features(cell_table, **kwargs)
    card = first.attrs["card"]
    assert card["recipe"] == "deepprofiler" and card["weights_layout"] == "deepprofiler"
    assert card["weights"] == str(tmp_path / "dp.h5") and card["fill"].startswith("zeros")
    values, moved = first.iloc[:, 1:].to_numpy(), deep.deep_features(shifted, **kwargs).iloc[:, 1:].to_numpy()
    assert np.isfinite(values).all() and not np.allclose(values, moved, rtol=1e-4, atol=0)
    # the Keras-applications recipe cuts integer boxes: a 0.3-pixel shift rounds away
    keras = dict(kwargs, weights="random")
    np.testing.assert_array_equal(deep.deep_features(cell_table, **keras).iloc[:, 1:],
                                  deep.deep_features(shifted, **keras).iloc[:, 1:])
    # batches spanning images give the same features as one cell at a time (to float32 kernel rounding)
    one_by_one = deep.deep_features(cell_table, **dict(kwargs, batch_size=1)).iloc[:, 1:].to_numpy()
    np.testing.assert_allclose(one_by_one, values, rtol=0, atol=1e-5 * np.abs(values).max())
    with pytest.raises(MorphotypeInputError, match="fills outside the image with zeros"):
        deep.deep_features(cell_table, pad_mode="edge", **kwargs)
    outside = cell_table.assign(Nuclei_Location_Center_Y=cell_table["Nuclei_Location_Center_Y"] + 100)
    with pytest.raises(MorphotypeInputError, match="outside the image"):
        deep.deep_features(outside, **kwargs)


def test_cli_recipe_option_and_card(cell_table, tmp_path):
    from morphotype.cli import main

    _synthetic_keras_h5(tmp_path / "dp.h5", layout="deepprofiler")
    cell_table.to_parquet(tmp_path / "cells.parquet")
    out = tmp_path / "cells.dp.parquet"
    common = ["deep-features", "--features", str(tmp_path / "cells.parquet"), "--weights", str(tmp_path / "dp.h5"),
              "--out", str(out), "--box-size", "16", "--batch-size", "4"]
    assert main(common + ["--recipe", "keras-applications"]) == 2 and not out.exists()
    assert main(common) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["recipe"] == "deepprofiler" and card["weights"] == str(tmp_path / "dp.h5")
    assert pd.read_parquet(out).filter(like="DP__efficientnet_").shape == (6, 1280)


# ------------------------------------------------------------------------------ SSL encoder

def _blobs(n=48, size=16, seed=0):
    """Bright discs or bars on a dark background, centred like nucleus crops."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    crops = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        r = rng.uniform(2, 5)
        shape = (xx ** 2 + yy ** 2 < r ** 2) if i % 2 else (np.abs(xx) < r) & (np.abs(yy) < 1.5)
        crops[i] = np.clip(shape * rng.uniform(120, 250) + rng.normal(10, 3, (size, size)), 0, 255)
    return crops


def test_encoder_training_lowers_loss_and_checkpoint_reproduces(tmp_path):
    crops = _blobs()
    encoder = deep.train_encoder(crops, epochs=20, seed=0, batch_size=16, width=8, dim=16,
                                 projection_dim=8, learning_rate=1e-2, progress=False)
    curve = encoder.card["loss_curve"]
    assert len(curve) == 20 and np.mean(curve[-5:]) < np.mean(curve[:3]) - 0.2
    assert encoder.card["training_crops"] == 48 and encoder.card["crop_size"] == 16
    features = deep.encode(encoder, crops, progress=False)
    assert features.shape == (48, 16) and np.isfinite(features).all()
    deep.save_encoder(encoder, tmp_path / "enc")
    loaded = deep.load_encoder(tmp_path / "enc")
    assert loaded.card == encoder.card
    np.testing.assert_array_equal(deep.encode(loaded, crops, progress=False), features)
    same = deep.train_encoder(crops, epochs=1, seed=0, batch_size=16, width=4, dim=16, projection_dim=8,
                              learning_rate=3e-3, progress=False)
    twin = deep.train_encoder(crops, epochs=1, seed=0, batch_size=16, width=4, dim=16, projection_dim=8,
                              learning_rate=3e-3, progress=False)
    for a, b in zip(same.model.state_dict().values(), twin.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(MorphotypeInputError):
        deep.encode(encoder, crops[:, :8, :8], progress=False)


def test_encoder_training_cannot_see_labels(cell_table):
    parameters = inspect.signature(deep.train_encoder).parameters
    assert "y" not in parameters and not any(word in name.lower() for name in parameters
                                              for word in ("label", "phenotype", "table", "metadata", "target"))
    permuted = cell_table.assign(Metadata_Phenotype=cell_table["Metadata_Phenotype"].to_numpy()[::-1])
    kwargs = dict(epochs=1, seed=0, batch_size=6, width=4, dim=8, projection_dim=4, progress=False)
    a = deep.train_encoder(deep.table_boxes(cell_table, 16, progress=False), **kwargs)
    b = deep.train_encoder(deep.table_boxes(permuted, 16, progress=False), **kwargs)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    ssl = deep.ssl_features(cell_table, a, progress=False)
    assert list(ssl.columns) == ["Metadata_CellID"] + [f"SSL__{i}" for i in range(8)]
