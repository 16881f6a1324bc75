"""Deep nucleus features: EfficientNet-B0 embeddings (DeepProfiler's recipe or the
Keras-applications one) and an in-domain self-supervised encoder trained offline on nucleus crops.

Two extractors, both keyed by ``Metadata_CellID``:

* :func:`deep_features` -- EfficientNet-B0 up to ``avg_pool`` -> ``DP__efficientnet_0..1279``,
  with one of two input recipes (:data:`RECIPES`):

  - ``"deepprofiler"`` reproduces DeepProfiler's profiling (cytomining/DeepProfiler at the study's
    commit 2fb3ed3, network = qubvel's ``efficientnet.tfkeras`` B0): ``tf.image.crop_and_resize``
    boxes ``[c +- box/2] / size`` around the fractional centre with zeros outside, ``(x - min) /
    max`` per crop, the legacy bilinear resize to 224 (no half-pixel centres), grey repeated to RGB,
    min-max to [-1, 1] per crop, no ImageNet normalisation (:mod:`morphotype.deepprofiler_input`).
    It is the default for checkpoints in DeepProfiler's layout and matches DeepProfiler's own code
    to ~1e-6 relative (``tests/test_deepprofiler_parity.py``).
  - ``"keras-applications"``: an integer box around the rounded centre (out-of-image pixels
    padded, ``constant`` = 0), pixels to 0-255 (integer images divided by their dtype maximum),
    bilinear resize with half-pixel centres (``tf.image.resize``), then the Keras model's own input
    layers: ``Rescaling(1/255)``, ``Normalization(mean, variance)`` and, as Keras does for ImageNet
    weights, ``Rescaling(1/sqrt(IMAGENET_STDDEV))``. The mean and variance must come from the
    file's ``normalization`` layer (or a torch state dict); nothing falls back to shipped values.

  Weights come from a file: a Keras ``.h5`` in either layout (:func:`load_keras_h5`) or a torch
  state dict; there is no download and no silent random fallback (``weights="random"`` is for
  tests only). The returned table's ``attrs["card"]`` records the recipe and the weights.
* :func:`train_encoder` / :func:`ssl_features` -- a small CNN trained with SimCLR (NT-Xent) on
  unlabelled crops with microscopy-safe augmentations -> ``SSL__0..D-1``. Training sees pixels
  only: it has no label argument.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from morphotype.columns import CELL_ID, CENTRE_X, CENTRE_Y, IMAGE, IMAGE_ID
from morphotype.deepprofiler_input import (
    crop_and_resize,
    deepprofiler_boxes,
    deepprofiler_network_input,
)
from morphotype.io import MorphotypeInputError, atomic_path, read_image
from morphotype.models import prepare_data, split_cells
from morphotype.versions import software_versions

log = logging.getLogger(__name__)

DP_PREFIX = "DP__efficientnet_"
SSL_PREFIX = "SSL__"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV = (0.229, 0.224, 0.225)
EFFICIENTNET_FEATURES = 1280
BN_EPSILON = 1e-3  # Keras BatchNormalization default, used by EfficientNet
PAD_MODES = ("constant", "edge", "reflect", "symmetric")
RECIPES = {
    "deepprofiler": "DeepProfiler 2fb3ed3 profiling: crop_and_resize [c +- box/2]/size (zeros outside), "
                    "(x - min)/max, legacy bilinear resize (no half-pixel centres), min-max to [-1, 1]",
    "keras-applications": "integer box around the rounded centre, 0-255, bilinear resize (half-pixel "
                          "centres), Keras Rescaling + ImageNet Normalization",
}
# Layers only the Keras-applications EfficientNetB0 has (qubvel's pads with 'same' and has no
# input scaling); their presence tells the two .h5 layouts apart.
KERAS_APPLICATIONS_ONLY = ("normalization", "rescaling", "stem_conv_pad")


# --------------------------------------------------------------------------------------------
# Nucleus-centred boxes
# --------------------------------------------------------------------------------------------

def extract_boxes(
    image: np.ndarray,
    centres_xy: np.ndarray,
    box_size: int = 128,
    *,
    pad_mode: str = "constant",
    mask: tuple[np.ndarray, Sequence[int]] | None = None,
) -> np.ndarray:
    """Cut a ``box_size`` x ``box_size`` box centred on each nucleus (DeepProfiler's crops).

    Parameters
    ----------
    image : (H, W) array, one grey channel.
    centres_xy : (N, 2) array of (x, y) = (column, row) centres; rounded to the nearest pixel.
    box_size : side of the box; the box spans ``[c - box_size//2, c - box_size//2 + box_size)``.
    pad_mode : how pixels outside the image are filled: ``"constant"`` (0, as DeepProfiler's
        ``crop_and_resize``), ``"edge"``, ``"reflect"`` or ``"symmetric"`` (``numpy.pad`` modes).
    mask : optional ``(labels, object_ids)``; pixels of each box whose label is not that cell's
        object id are set to 0 (DeepProfiler's object masking).

    Returns
    -------
    (N, box_size, box_size) array of ``image``'s dtype.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise MorphotypeInputError(f"extract_boxes expects a 2-D grey image, got shape {image.shape}")
    if pad_mode not in PAD_MODES:
        raise MorphotypeInputError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    centres = np.asarray(centres_xy, dtype=float).reshape(-1, 2)
    if not np.isfinite(centres).all():
        raise MorphotypeInputError("nucleus centres must be finite (x, y) values")
    half = box_size // 2
    pad = box_size  # enough for any centre inside the image
    padded = np.pad(image, pad, mode=pad_mode)
    labels = object_ids = None
    if mask is not None:
        labels, object_ids = np.asarray(mask[0]), np.asarray(mask[1])
        if labels.shape != image.shape or len(object_ids) != len(centres):
            raise MorphotypeInputError(
                f"mask labels must match the image shape {image.shape} and give one object id per "
                f"centre ({len(centres)}); got {labels.shape} and {len(object_ids)} ids")
        labels = np.pad(labels, pad, mode="constant")
    boxes = np.zeros((len(centres), box_size, box_size), dtype=image.dtype)
    for i, (x, y) in enumerate(centres):
        col, row = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if not (-half <= row < image.shape[0] + half and -half <= col < image.shape[1] + half):
            raise MorphotypeInputError(f"centre {i} ({x}, {y}) lies outside image of shape {image.shape}")
        r0, c0 = row - half + pad, col - half + pad
        box = padded[r0:r0 + box_size, c0:c0 + box_size]
        if labels is not None:
            box = np.where(labels[r0:r0 + box_size, c0:c0 + box_size] == object_ids[i], box, 0)
        boxes[i] = box
    return boxes


def to_unit_range(boxes: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1]: integer dtypes divided by their maximum, floats kept."""
    boxes = np.asarray(boxes)
    if np.issubdtype(boxes.dtype, np.integer):
        return boxes.astype(np.float32) / float(np.iinfo(boxes.dtype).max)
    return boxes.astype(np.float32)


def efficientnet_input(boxes: np.ndarray, input_size: int = 224) -> torch.Tensor:
    """Boxes (N, h, w) -> (N, 3, input_size, input_size) float tensor in 0-255.

    The grey channel is repeated to RGB and resized bilinearly with half-pixel centres and no
    antialiasing, which is what ``tf.image.resize(..., "bilinear")`` does.
    """
    x = torch.from_numpy(to_unit_range(boxes) * 255.0)[:, None]
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                          antialias=False)
    return x.repeat(1, 3, 1, 1)


# --------------------------------------------------------------------------------------------
# EfficientNet-B0, layer for layer as keras.applications.EfficientNetB0 (include_top=False)
# --------------------------------------------------------------------------------------------

# (kernel, repeats, filters_in, filters_out, expand_ratio, strides) -- Keras DEFAULT_BLOCKS_ARGS
B0_BLOCKS = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
             (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
SE_RATIO = 0.25


def _keras_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPSILON)


def _correct_pad(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Keras ``imagenet_utils.correct_pad`` + ZeroPadding2D before a stride-2 'valid' conv."""
    h, w = x.shape[-2:]
    top, left = kernel // 2 - (1 - h % 2), kernel // 2 - (1 - w % 2)
    return F.pad(x, (left, kernel // 2, top, kernel // 2))


class MBConv(nn.Module):
    """Keras EfficientNet ``block``: expand 1x1, depthwise, squeeze-excite, project 1x1."""

    def __init__(self, filters_in: int, filters_out: int, kernel: int, strides: int, expand_ratio: int):
        super().__init__()
        filters = filters_in * expand_ratio
        self.kernel, self.strides = kernel, strides
        self.expand = expand_ratio != 1
        if self.expand:
            self.expand_conv = nn.Conv2d(filters_in, filters, 1, bias=False)
            self.expand_bn = _keras_bn(filters)
        self.dwconv = nn.Conv2d(filters, filters, kernel, stride=strides, groups=filters, bias=False,
                                padding=0 if strides == 2 else kernel // 2)
        self.bn = _keras_bn(filters)
        filters_se = max(1, int(filters_in * SE_RATIO))
        self.se_reduce = nn.Conv2d(filters, filters_se, 1)
        self.se_expand = nn.Conv2d(filters_se, filters, 1)
        self.project_conv = nn.Conv2d(filters, filters_out, 1, bias=False)
        self.project_bn = _keras_bn(filters_out)
        self.residual = strides == 1 and filters_in == filters_out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.expand_bn(self.expand_conv(inputs))) if self.expand else inputs
        if self.strides == 2:
            x = _correct_pad(x, self.kernel)
        x = F.silu(self.bn(self.dwconv(x)))
        se = x.mean(dim=(2, 3), keepdim=True)
        se = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(se))))
        x = self.project_bn(self.project_conv(x * se))
        return x + inputs if self.residual else x  # dropout is identity at inference


class EfficientNetB0(nn.Module):
    """Feature extractor returning ``avg_pool`` (1,280 values): from 0-255 RGB through the Keras
    input layers when ``normalise`` (Keras applications), else straight from the given input
    (qubvel's network, as DeepProfiler feeds it). For 224-pixel input the two Keras networks pad
    their stride-2 convolutions alike (even sizes: ``correct_pad`` equals TensorFlow's 'same')."""

    def __init__(self):
        super().__init__()
        # Keras Normalization layer state and the extra ImageNet Rescaling (see module docstring)
        self.register_buffer("norm_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("norm_variance", torch.tensor(IMAGENET_STDDEV).view(1, 3, 1, 1))
        self.register_buffer("imagenet_rescale",
                             torch.tensor([1 / math.sqrt(s) for s in IMAGENET_STDDEV]).view(1, 3, 1, 1))
        self.normalise = True  # Keras-applications input layers; qubvel's network (DeepProfiler) has none
        self.layout = "random"  # where the weights came from: see load_efficientnet
        self.fused = False  # BatchNorm folded into the convolutions (inference_copy)
        self.stem_conv = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self.stem_bn = _keras_bn(32)
        self.block_names: list[str] = []
        blocks = []
        for i, (kernel, repeats, f_in, f_out, expand, strides) in enumerate(B0_BLOCKS):
            for j in range(repeats):
                blocks.append(MBConv(f_in if j == 0 else f_out, f_out, kernel, strides if j == 0 else 1, expand))
                self.block_names.append(f"block{i + 1}{chr(97 + j)}")
        self.blocks = nn.ModuleList(blocks)
        self.top_conv = nn.Conv2d(320, EFFICIENTNET_FEATURES, 1, bias=False)
        self.top_bn = _keras_bn(EFFICIENTNET_FEATURES)
        for module in self.modules():  # Keras's CONV_KERNEL_INITIALIZER (variance scaling 2, fan_out)
            if isinstance(module, nn.Conv2d):
                depthwise = module.groups > 1  # Keras's fan_out of a (k, k, C, 1) kernel is k * k
                nn.init.kaiming_normal_(module.weight, mode="fan_in" if depthwise else "fan_out",
                                        nonlinearity="relu")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255.0
        x = (x - self.norm_mean) / torch.sqrt(self.norm_variance).clamp_min(1e-7)  # as Keras Normalization
        return x * self.imagenet_rescale

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x) if self.normalise else x
        return F.silu(self.stem_bn(self.stem_conv(_correct_pad(x, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return F.silu(self.top_bn(self.top_conv(x))).mean(dim=(2, 3))


def inference_copy(model: EfficientNetB0) -> EfficientNetB0:
    """A copy for fast CPU inference: every BatchNorm folded into its convolution (torch's
    ``fuse_conv_bn_eval``; float32 rounding changes at ~1e-6 relative) and channels-last memory,
    which oneDNN's depthwise convolutions need to be quick."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    pairs = [(fused, "stem_conv", "stem_bn"), (fused, "top_conv", "top_bn")]
    for block in fused.blocks:
        pairs += [(block, "dwconv", "bn"), (block, "project_conv", "project_bn")]
        if block.expand:
            pairs.append((block, "expand_conv", "expand_bn"))
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())
    fused.fused = True
    return fused.to(memory_format=torch.channels_last)


def keras_weight_map(model: EfficientNetB0) -> dict[str, tuple[str, str]]:
    """Torch parameter/buffer name -> (Keras 'layer/weight:0' name, kind of transpose)."""
    mapping: dict[str, tuple[str, str]] = {}

    def conv(torch_name: str, keras_layer: str, bias: bool, depthwise: bool = False):
        kind = "depthwise" if depthwise else "conv"
        weight = "depthwise_kernel" if depthwise else "kernel"
        mapping[f"{torch_name}.weight"] = (f"{keras_layer}/{weight}:0", kind)
        if bias:
            mapping[f"{torch_name}.bias"] = (f"{keras_layer}/bias:0", "vector")

    def bn(torch_name: str, keras_layer: str):
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
            mapping[f"{torch_name}.{ours}"] = (f"{keras_layer}/{theirs}:0", "vector")

    conv("stem_conv", "stem_conv", False)
    bn("stem_bn", "stem_bn")
    for index, (name, block) in enumerate(zip(model.block_names, model.blocks)):
        prefix = f"blocks.{index}"
        if block.expand:
            conv(f"{prefix}.expand_conv", f"{name}_expand_conv", False)
            bn(f"{prefix}.expand_bn", f"{name}_expand_bn")
        conv(f"{prefix}.dwconv", f"{name}_dwconv", False, depthwise=True)
        bn(f"{prefix}.bn", f"{name}_bn")
        conv(f"{prefix}.se_reduce", f"{name}_se_reduce", True)
        conv(f"{prefix}.se_expand", f"{name}_se_expand", True)
        conv(f"{prefix}.project_conv", f"{name}_project_conv", False)
        bn(f"{prefix}.project_bn", f"{name}_project_bn")
    conv("top_conv", "top_conv", False)
    bn("top_bn", "top_bn")
    return mapping


def _h5_group_weights(group: Any) -> dict[str, np.ndarray]:
    import h5py

    found: dict[str, np.ndarray] = {}
    group.visititems(lambda name, item: found.__setitem__(name.split("/")[-1], np.asarray(item))
                     if isinstance(item, h5py.Dataset) else None)
    return found


def _h5_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Keras HDF5 weights as {layer: {'kernel:0': array, ...}}: one top-level group per layer
    (under ``model_weights`` in a whole-model file), each weight keyed by its last name part so
    that graph-mode suffixes (``stem_conv_1/kernel:0``) do not matter."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            root = handle.get("model_weights", handle)
            return {layer: _h5_group_weights(group) if isinstance(group, h5py.Group) else {}
                    for layer, group in root.items()}
    except OSError as error:
        raise MorphotypeInputError(f"{path}: not a readable HDF5 weights file ({error})") from error


def checkpoint_layout(layers: dict[str, dict[str, np.ndarray]]) -> str:
    """``"keras-applications"`` when the file has the Keras-applications input or padding layers,
    else ``"deepprofiler"`` (qubvel's ``efficientnet``, the network DeepProfiler builds)."""
    return "keras-applications" if any(name in layers for name in KERAS_APPLICATIONS_ONLY) else "deepprofiler"


def load_keras_h5(model: EfficientNetB0, path: str | os.PathLike) -> EfficientNetB0:
    """Fill ``model`` from a Keras EfficientNet-B0 HDF5 file (``save_weights`` or ``save``) in the
    Keras-applications layout or DeepProfiler's (qubvel ``efficientnet``: ``stem_conv/stem_conv/
    kernel:0`` ..., no input scaling layers); sets ``model.layout``. Anything else is refused, and
    a Keras-applications file without its ``normalization`` mean and variance too."""
    path = Path(path)
    layers = _h5_layers(path)
    layout = checkpoint_layout(layers)
    state = model.state_dict()
    missing = []
    for torch_name, (keras_name, kind) in keras_weight_map(model).items():
        layer, weight = keras_name.split("/")
        if weight not in layers.get(layer, {}):
            missing.append(keras_name)
            continue
        value = torch.from_numpy(np.ascontiguousarray(layers[layer][weight], dtype=np.float32))
        if kind == "conv":  # Keras (kh, kw, in, out) -> torch (out, in, kh, kw)
            value = value.permute(3, 2, 0, 1)
        elif kind == "depthwise":  # Keras (kh, kw, channels, 1) -> torch (channels, 1, kh, kw)
            value = value.permute(2, 3, 0, 1)
        if tuple(value.shape) != tuple(state[torch_name].shape):
            raise MorphotypeInputError(f"{path}: {keras_name} has shape {tuple(value.shape)} after "
                                       f"transposing, expected {tuple(state[torch_name].shape)}")
        state[torch_name] = value.contiguous()
    if missing:
        raise MorphotypeInputError(
            f"{path} is not a Keras EfficientNetB0 weights file in the Keras-applications or DeepProfiler "
            f"(qubvel efficientnet) layout: {len(missing)} weights missing, e.g. {missing[:3]}")
    if layout == "keras-applications":
        constants = layers.get("normalization", {})
        if not {"mean:0", "variance:0"} <= constants.keys():
            raise MorphotypeInputError(
                f"{path}: Keras-applications EfficientNetB0 file without the normalisation layer's mean and "
                f"variance; refusing to guess them (re-save the model with its normalization layer)")
        for ours, theirs in (("norm_mean", "mean:0"), ("norm_variance", "variance:0")):
            state[ours] = torch.from_numpy(np.asarray(constants[theirs], dtype=np.float32)).view(1, 3, 1, 1)
    model.load_state_dict(state)
    model.layout = layout
    return model


def load_efficientnet(weights: str | os.PathLike | None, *, random_state: int = 0) -> EfficientNetB0:
    """An EfficientNet-B0 in eval mode with ``weights``: a Keras ``.h5`` (either layout, see
    :func:`load_keras_h5`), a torch state dict, or ``"random"`` (tests only). ``None`` refuses:
    random features would look like real ones. ``model.layout`` says which kind was read
    (``"deepprofiler"``, ``"keras-applications"``, ``"torch"``, ``"random"``)."""
    if weights is None or str(weights) == "":
        raise MorphotypeInputError(
            "deep features need EfficientNet-B0 weights: pass a Keras .h5 (DeepProfiler's "
            "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment.h5 or Keras's efficientnetb0_notop.h5) "
            "or a torch state dict (.pt); nothing is downloaded")
    torch.manual_seed(random_state)
    model = EfficientNetB0()
    if str(weights) == "random":
        log.warning("EfficientNet-B0 with RANDOM weights (tests only): features carry no meaning")
    else:
        path = Path(weights)
        if not path.is_file():
            raise MorphotypeInputError(f"EfficientNet weights file not found: {path}")
        if path.suffix.lower() in (".h5", ".hdf5", ".keras"):
            load_keras_h5(model, path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(state)
            except Exception as error:  # noqa: BLE001 -- re-raised with the file named
                raise MorphotypeInputError(f"{path}: not a torch EfficientNetB0 state dict ({error})") from error
            model.layout = "torch"
    return model.eval()


def resolve_recipe(recipe: str | None, model: EfficientNetB0, weights: Any) -> str:
    """The input recipe for ``model``: ``recipe`` if given, else ``"deepprofiler"`` for a
    DeepProfiler-layout checkpoint and ``"keras-applications"`` otherwise. A DeepProfiler-layout
    checkpoint holds no ImageNet normalisation, so it refuses the Keras-applications recipe."""
    if recipe is not None and recipe not in RECIPES:
        raise MorphotypeInputError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    chosen = recipe or ("deepprofiler" if model.layout == "deepprofiler" else "keras-applications")
    if chosen == "keras-applications" and model.layout == "deepprofiler":
        raise MorphotypeInputError(
            f"{weights}: a DeepProfiler-layout checkpoint has no ImageNet normalisation constants, which the "
            f"keras-applications recipe needs; use recipe 'deepprofiler' (its default)")
    if chosen == "deepprofiler" and model.layout == "keras-applications":
        log.warning("%s: Keras-applications weights under the deepprofiler recipe; their input normalisation "
                    "is not applied", weights)
    return chosen


# --------------------------------------------------------------------------------------------
# Table-level extraction
# --------------------------------------------------------------------------------------------

def _check_cell_table(table: pd.DataFrame) -> None:
    missing = [c for c in (CELL_ID, IMAGE, CENTRE_X, CENTRE_Y) if c not in table.columns]
    if missing:
        raise MorphotypeInputError(f"single-cell table lacks columns {missing}")
    if table[CELL_ID].duplicated().any():
        raise MorphotypeInputError(f"{CELL_ID} is not unique, e.g. {table[CELL_ID][table[CELL_ID].duplicated()].iloc[0]}")
    bad = ~np.isfinite(table[[CENTRE_X, CENTRE_Y]].to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        raise MorphotypeInputError(f"row {int(np.flatnonzero(bad)[0])} ({table[CELL_ID].iloc[int(np.flatnonzero(bad)[0])]}) "
                                   f"has no finite nucleus centre")


def table_boxes(table: pd.DataFrame, box_size: int, *, pad_mode: str = "constant",
                progress: bool = True) -> np.ndarray:
    """Boxes for every row of the single-cell table, in row order (one image read per file)."""
    from tqdm.auto import tqdm

    _check_cell_table(table)
    boxes: np.ndarray | None = None
    positions = pd.Series(np.arange(len(table)), index=table.index)
    for path, rows in tqdm(table.groupby(IMAGE, sort=False), desc="boxes", disable=not progress):
        image = read_image(path)
        cut = extract_boxes(image, rows[[CENTRE_X, CENTRE_Y]].to_numpy(dtype=float), box_size, pad_mode=pad_mode)
        if boxes is None:
            boxes = np.zeros((len(table), box_size, box_size), dtype=image.dtype)
        boxes[positions[rows.index].to_numpy()] = cut
    return boxes if boxes is not None else np.zeros((0, box_size, box_size), dtype=np.uint8)


class _Deterministic:
    """Seed torch and force deterministic kernels for the duration of a block."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.manual_seed(self.seed)
        torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)
        return False


def network_input(boxes: np.ndarray, recipe: str, input_size: int = 224) -> torch.Tensor:
    """(N, 3, input_size, input_size) network input of grey boxes under ``recipe``: integer boxes
    of :func:`table_boxes` for ``"keras-applications"`` (0-255, see :func:`efficientnet_input`),
    float crops of :func:`~morphotype.deepprofiler_input.crop_and_resize` for ``"deepprofiler"``."""
    if recipe == "deepprofiler":
        return torch.from_numpy(deepprofiler_network_input(boxes, input_size))[:, None].repeat(1, 3, 1, 1)
    return efficientnet_input(boxes, input_size)


def efficientnet_features(model: EfficientNetB0, boxes: np.ndarray, *, input_size: int = 224,
                          batch_size: int = 32, recipe: str = "keras-applications",
                          progress: bool = True) -> np.ndarray:
    """(N, 1280) ``avg_pool`` features for grey boxes (N, h, w) under ``recipe`` (see
    :func:`network_input`); the recipe also decides whether the Keras input layers apply."""
    from tqdm.auto import tqdm

    fast = model if model.fused else inference_copy(model)
    fast.normalise = recipe == "keras-applications"
    out = np.zeros((len(boxes), EFFICIENTNET_FEATURES), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(boxes), batch_size), desc="EfficientNet-B0", disable=not progress):
            batch = network_input(boxes[start:start + batch_size], recipe, input_size)
            out[start:start + batch_size] = fast(batch.contiguous(memory_format=torch.channels_last)).numpy()
    return out


def deepprofiler_crop_batches(table: pd.DataFrame, box_size: int, batch_size: int):
    """Yield ``(row positions, crops)`` of about ``batch_size`` cells: DeepProfiler's boxes around
    the fractional centres, cut by ``crop_and_resize`` (zeros outside), one image read at a time."""
    _check_cell_table(table)
    positions = pd.Series(np.arange(len(table)), index=table.index)
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    for path, rows in table.groupby(IMAGE, sort=False):
        image = read_image(path)
        centres = rows[[CENTRE_X, CENTRE_Y]].to_numpy(dtype=float)
        outside = (centres < 0).any(axis=1) | (centres[:, 0] > image.shape[1]) | (centres[:, 1] > image.shape[0])
        if outside.any():
            raise MorphotypeInputError(f"{path}: centre of cell {rows[CELL_ID].iloc[int(np.flatnonzero(outside)[0])]} "
                                       f"lies outside the image of shape {image.shape}")
        crops = crop_and_resize(image, deepprofiler_boxes(centres, box_size, image.shape), box_size)
        pending.append((positions[rows.index].to_numpy(), crops))
        if sum(len(p) for p, _ in pending) >= batch_size:
            yield np.concatenate([p for p, _ in pending]), np.concatenate([c for _, c in pending])
            pending = []
    if pending:
        yield np.concatenate([p for p, _ in pending]), np.concatenate([c for _, c in pending])


def _weights_card(weights: Any) -> dict[str, Any]:
    if str(weights) == "random":
        return {"weights": "random", "weights_sha256": None}
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {"weights": str(weights), "weights_sha256": digest.hexdigest()}


def deep_features(
    table: pd.DataFrame,
    *,
    weights: str | os.PathLike | None,
    recipe: str | None = None,
    box_size: int = 128,
    input_size: int = 224,
    pad_mode: str = "constant",
    batch_size: int = 32,
    random_state: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """EfficientNet-B0 features for every cell of the single-cell table.

    ``table`` needs ``Metadata_CellID``, ``Metadata_Image`` (image file) and
    ``Nuclei_Location_Center_X/Y``. Returns ``Metadata_CellID`` + ``DP__efficientnet_0..1279``
    in the table's row order; ``attrs["card"]`` records recipe, weights (path, SHA-256, layout),
    box and input sizes and versions. ``weights``: see :func:`load_efficientnet` (``None``
    refuses); ``recipe``: see :data:`RECIPES` and :func:`resolve_recipe` (``None``: from the
    weights' layout). ``pad_mode`` applies to the Keras-applications recipe only: DeepProfiler's
    ``crop_and_resize`` fills with zeros.
    """
    from tqdm.auto import tqdm

    model = load_efficientnet(weights, random_state=random_state)
    recipe = resolve_recipe(recipe, model, weights)
    fast = inference_copy(model)
    if recipe == "deepprofiler" and pad_mode != "constant":
        raise MorphotypeInputError(f"pad_mode {pad_mode!r}: the deepprofiler recipe fills outside the image "
                                   f"with zeros (crop_and_resize); use pad_mode 'constant'")
    with _Deterministic(random_state):
        if recipe == "deepprofiler":
            values = np.zeros((len(table), EFFICIENTNET_FEATURES), dtype=np.float32)
            with tqdm(total=len(table), desc="EfficientNet-B0", disable=not progress) as bar:
                for rows, crops in deepprofiler_crop_batches(table, box_size, batch_size):
                    values[rows] = efficientnet_features(fast, crops, input_size=input_size,
                                                         batch_size=batch_size, recipe=recipe, progress=False)
                    bar.update(len(rows))
            constant = int(np.isnan(values).any(axis=1).sum())
            if constant:
                log.warning("%d cell(s) with a constant box have NaN features, as in DeepProfiler", constant)
        else:
            boxes = table_boxes(table, box_size, pad_mode=pad_mode, progress=progress)
            values = efficientnet_features(fast, boxes, input_size=input_size, batch_size=batch_size,
                                           recipe=recipe, progress=progress)
    features = pd.DataFrame(values, columns=[f"{DP_PREFIX}{i}" for i in range(values.shape[1])])
    features.insert(0, CELL_ID, table[CELL_ID].to_numpy())
    features.attrs["card"] = {
        "columns": f"{DP_PREFIX}0..{EFFICIENTNET_FEATURES - 1}", "network": "EfficientNet-B0, avg_pool",
        "recipe": recipe, "recipe_steps": RECIPES[recipe], **_weights_card(weights),
        "weights_layout": model.layout, "box_size": box_size, "input_size": input_size,
        "fill": "zeros (crop_and_resize)" if recipe == "deepprofiler" else pad_mode,
        "random_state": random_state, "versions": software_versions(("torch", "numpy")),
    }
    return features


# --------------------------------------------------------------------------------------------
# In-domain self-supervised encoder (SimCLR)
# --------------------------------------------------------------------------------------------

class NucleusCNN(nn.Module):
    """Small CNN (~0.3 M parameters at width 16): four stride-2 stages of conv-BN-ReLU pairs, global average
    pooling; the first conv already strides so 64x64 crops train in minutes on two CPU cores."""

    def __init__(self, width: int = 16, dim: int = 128, projection_dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, width, 2 * width, 4 * width, dim]
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.backbone = nn.Sequential(*layers)
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, projection_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(x))


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Microscopy-safe random views of (N, 1, h, w) crops in [0, 1]: 90-degree rotations, flips,
    small shifts (zero fill), brightness/contrast jitter, Gaussian blur and a little noise."""
    n = x.shape[0]
    out = torch.empty_like(x)
    rotations = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    for i in range(n):
        view = torch.rot90(x[i], int(rotations[i]), dims=(1, 2))
        if flips[i]:
            view = view.flip(2)
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        view = torch.roll(view, (dy, dx), dims=(1, 2))
        if dy > 0:
            view[:, :dy] = 0
        elif dy < 0:
            view[:, dy:] = 0
        if dx > 0:
            view[:, :, :dx] = 0
        elif dx < 0:
            view[:, :, dx:] = 0
        out[i] = view
    gain = 1 + 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    offset = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    out = out * gain + offset
    sigma = 0.1 + 1.4 * torch.rand(n, generator=generator)
    blur = torch.rand(n, generator=generator) < 0.5
    taps = torch.arange(-3, 4, dtype=x.dtype)
    kernels = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)
    kernels[~blur] = (taps == 0).to(x.dtype)
    # separable per-sample blur as a grouped convolution over the batch
    y = out.transpose(0, 1)  # (1, N, h, w)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=n)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kernels[:, None, :, None], groups=n)
    out = y.transpose(0, 1)
    return out + 0.01 * torch.randn(out.shape, generator=generator)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy over 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    n = z1.shape[0]
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(similarity, targets)


@dataclass
class Encoder:
    """A trained in-domain encoder and its card (everything needed to reproduce it)."""

    model: NucleusCNN
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def crop_size(self) -> int:
        return int(self.card["crop_size"])

    @property
    def dim(self) -> int:
        return int(self.card["architecture"]["dim"])


def train_encoder(
    crops: np.ndarray,
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    temperature: float = 0.2,
    width: int = 16,
    dim: int = 128,
    projection_dim: int = 64,
    n_source_images: int | None = None,
    progress: bool = True,
) -> Encoder:
    """Train a :class:`NucleusCNN` with SimCLR on unlabelled nucleus crops.

    ``crops``: (N, s, s) pixel array, nucleus at the centre (e.g. from :func:`table_boxes`). The
    function takes pixels only -- no labels, no metadata -- so it cannot see phenotypes; callers
    must pass crops of training images only. ``n_source_images`` is recorded in the card.
    """
    from tqdm.auto import tqdm

    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.shape[1] != crops.shape[2] or len(crops) < 2:
        raise MorphotypeInputError(f"train_encoder expects (N >= 2, s, s) crops, got shape {crops.shape}")
    data = torch.from_numpy(to_unit_range(crops))[:, None]
    batch_size = min(batch_size, len(data))
    started = time.perf_counter()
    with _Deterministic(seed):
        generator = torch.Generator().manual_seed(seed)
        model = NucleusCNN(width, dim, projection_dim)
        optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        steps = max(1, epochs * (len(data) // batch_size))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
        losses: list[float] = []
        model.train()
        for _ in tqdm(range(epochs), desc="SimCLR epochs", disable=not progress):
            order = torch.randperm(len(data), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(data) - batch_size + 1, batch_size):  # full batches only
                batch = data[order[start:start + batch_size]]
                loss = nt_xent(model(augment(batch, generator)), model(augment(batch, generator)), temperature)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total, count = total + float(loss.detach()) * len(batch), count + len(batch)
            losses.append(total / count)
            log.info("SimCLR epoch %d loss %.4f", len(losses), losses[-1])
    model.eval()
    card = {
        "architecture": {"name": "NucleusCNN", "width": width, "dim": dim, "projection_dim": projection_dim,
                         "parameters": int(sum(p.numel() for p in model.parameters()))},
        "method": "SimCLR (NT-Xent)", "temperature": temperature, "batch_size": batch_size,
        "learning_rate": learning_rate, "augmentations": "rot90, flip, shift<=4px, gain/offset, gaussian blur, noise",
        "crop_size": int(crops.shape[1]), "input_scaling": "integer pixels / dtype max",
        "training_crops": int(len(crops)), "training_images": n_source_images, "seed": seed, "epochs": epochs,
        "loss_curve": losses, "training_seconds": round(time.perf_counter() - started, 1),
        "versions": software_versions(("torch", "numpy")),
    }
    return Encoder(model, card)


def encoder_held_out_cells(cells: pd.DataFrame, *, split: str, exclude_phenotypes: Sequence[str]) -> set:
    """Cells the encoder must not see: the models' test split (same method and seed) and, for an
    image split, every cell of a held-out image."""
    data = prepare_data(cells, "CP", exclude_phenotypes=exclude_phenotypes)
    sides = split_cells(data.metadata, method=split)
    held_out = set(data.metadata[CELL_ID][sides == "test"])
    if split == "image":
        held_images = set(data.metadata[IMAGE_ID][sides == "test"])
        held_out |= set(cells.loc[cells[IMAGE_ID].isin(held_images), CELL_ID])
    return held_out


def train_encoder_on_training_split(
    cells: pd.DataFrame,
    *,
    split: str = "cell",
    exclude_phenotypes: Sequence[str] = ("Folded",),
    crop_size: int = 64,
    epochs: int = 30,
    batch_size: int = 128,
    seed: int = 0,
) -> Encoder:
    """:func:`train_encoder` on crops of the cells outside :func:`encoder_held_out_cells`; the
    card records how many cells were held out and by which split."""
    held_out = encoder_held_out_cells(cells, split=split, exclude_phenotypes=exclude_phenotypes)
    training = cells[~cells[CELL_ID].isin(held_out)].reset_index(drop=True)
    encoder = train_encoder(table_boxes(training, crop_size), epochs=epochs, seed=seed, batch_size=batch_size,
                            n_source_images=int(training[IMAGE_ID].nunique()))
    encoder.card.update({"held_out_cells": len(held_out), "split": split})
    return encoder


def save_encoder(encoder: Encoder, directory: str | os.PathLike) -> Path:
    """Write ``encoder.pt`` (state dict) and ``encoder.json`` (card) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "encoder.pt") as tmp:
        torch.save(encoder.model.state_dict(), tmp)
    with atomic_path(directory / "encoder.json") as tmp:
        Path(tmp).write_text(json.dumps(encoder.card, indent=2) + "\n")
    return directory


def load_encoder(directory: str | os.PathLike) -> Encoder:
    """Read an encoder written by :func:`save_encoder`."""
    directory = Path(directory)
    card_path, weights_path = directory / "encoder.json", directory / "encoder.pt"
    if not card_path.is_file() or not weights_path.is_file():
        raise MorphotypeInputError(f"{directory} holds no encoder (need encoder.json and encoder.pt)")
    card = json.loads(card_path.read_text())
    arch = card["architecture"]
    model = NucleusCNN(arch["width"], arch["dim"], arch["projection_dim"])
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return Encoder(model.eval(), card)


def encode(encoder: Encoder, crops: np.ndarray, *, batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """(N, dim) backbone embeddings of (N, s, s) crops (s must be the encoder's crop size)."""
    from tqdm.auto import tqdm

    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.shape[1:] != (encoder.crop_size, encoder.crop_size):
        raise MorphotypeInputError(f"encoder expects (N, {encoder.crop_size}, {encoder.crop_size}) crops, "
                                   f"got {crops.shape}")
    out = np.zeros((len(crops), encoder.dim), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(crops), batch_size), desc="encode", disable=not progress):
            batch = torch.from_numpy(to_unit_range(crops[start:start + batch_size]))[:, None]
            out[start:start + batch_size] = encoder.model.embed(batch).numpy()
    return out


def ssl_features(table: pd.DataFrame, encoder: Encoder, *, pad_mode: str = "constant",
                 batch_size: int = 256, progress: bool = True) -> pd.DataFrame:
    """``Metadata_CellID`` + ``SSL__0..D-1`` for every cell of the single-cell table."""
    boxes = table_boxes(table, encoder.crop_size, pad_mode=pad_mode, progress=progress)
    values = encode(encoder, boxes, batch_size=batch_size, progress=progress)
    features = pd.DataFrame(values, columns=[f"{SSL_PREFIX}{i}" for i in range(values.shape[1])])
    features.insert(0, CELL_ID, table[CELL_ID].to_numpy())
    return features
