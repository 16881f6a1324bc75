"""Runs inside the optional DeepProfiler venv (``make deepprofiler-venv``), never in the main one.

    .venv-deepprofiler/bin/python tests/deepprofiler_reference.py checkpoint OUT.h5 [--seed S]
    .venv-deepprofiler/bin/python tests/deepprofiler_reference.py resampling OUT.npz
    .venv-deepprofiler/bin/python tests/deepprofiler_reference.py profile ROOT

``checkpoint`` writes a deterministic random EfficientNet-B0 in DeepProfiler's layout (qubvel's
``efficientnet.tfkeras``, saved by Keras itself). ``resampling`` records TensorFlow's
``crop_and_resize`` and legacy bilinear resize on small inputs (the main suite's fixture).
``profile`` runs DeepProfiler's own ``profile`` command (its checkout named by
``$DEEPPROFILER_SRC``) on the project folder ROOT. Stand-ins: ``comet_ml`` and
``tensorflow_addons`` (imported, unused when profiling), and ``weights="imagenet"`` becomes
``None`` so nothing is downloaded -- the profile config's checkpoint then sets every weight.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import types

import numpy as np


def _deterministic_weights(model, seed: int) -> None:
    """Every weight from one numpy generator: He-normal kernels (fan-out), BN statistics away
    from the identity so that a wrong input scaling cannot hide."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for weight in layer.weights:
            name, shape = weight.name.split("/")[-1], tuple(weight.shape)
            if "kernel" in name:
                fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) == 4 else shape[-1]
                value = rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
            elif name.startswith(("gamma", "moving_variance")):
                value = rng.uniform(0.5, 1.5, shape)
            else:  # beta, moving_mean, bias
                value = rng.normal(0.0, 0.1, shape)
            values.append(value.astype(np.float32))
        if values:
            layer.set_weights(values)


def write_checkpoint(out: str, seed: int) -> None:
    import efficientnet.tfkeras as efn

    model = efn.EfficientNetB0(include_top=True, weights=None, input_shape=(224, 224, 3))
    _deterministic_weights(model, seed)
    model.save_weights(out)  # HDF5: layer/layer/weight:0, e.g. stem_conv/stem_conv/kernel:0


def resampling_cases() -> dict[str, np.ndarray]:
    """Inputs of the recorded cases: fractional boxes inside and across every edge, two resizes."""
    rng = np.random.default_rng(17)
    image = rng.uniform(0, 255, (15, 22)).astype(np.float32)
    centres = np.array([[10.3, 7.6], [0.2, 0.7], [21.0, 14.4], [3.25, 12.9], [19.5, 1.5], [11.0, 7.0]])
    box = 12.0
    boxes = np.stack([centres[:, 1] - box / 2, centres[:, 0] - box / 2,
                      centres[:, 1] + box / 2, centres[:, 0] + box / 2], axis=1).astype(np.float32)
    boxes[:, [0, 2]] /= image.shape[0]
    boxes[:, [1, 3]] /= image.shape[1]
    return {"image": image, "centres": centres, "box_size": np.array(box), "boxes": boxes, "crop_size": np.array(9),
            "small": rng.uniform(-1, 3, (1, 16, 16)).astype(np.float32),  # 16 -> 28 is 128 -> 224's ratio
            "odd": rng.uniform(0, 1, (1, 9, 7)).astype(np.float32)}


def write_resampling(out: str) -> None:
    import tensorflow as tf

    cases = resampling_cases()
    image = cases["image"][None, :, :, None]
    crops = tf.image.crop_and_resize(image, cases["boxes"], np.zeros(len(cases["boxes"]), np.int32),
                                     [int(cases["crop_size"])] * 2)
    small = tf.compat.v1.image.resize_images(cases["small"][..., None], (28, 28))
    odd = tf.compat.v1.image.resize_images(cases["odd"][..., None], (14, 12))
    np.savez_compressed(out, **cases, tensorflow=np.array(tf.__version__),
                        crop_and_resize=np.asarray(crops)[..., 0],
                        resize_small=np.asarray(small)[..., 0], resize_odd=np.asarray(odd)[..., 0])


def _stand_ins() -> None:
    comet_ml = types.ModuleType("comet_ml")
    comet_ml.Experiment = type("Experiment", (), {})
    sys.modules.setdefault("comet_ml", comet_ml)
    sys.modules.setdefault("tensorflow_addons", types.ModuleType("tensorflow_addons"))
    import efficientnet.model

    build = efficientnet.model.EfficientNet

    def no_download(*args, **kwargs):
        if kwargs.get("weights") == "imagenet":
            kwargs["weights"] = None
        return build(*args, **kwargs)

    efficientnet.model.EfficientNet = no_download


def run_profile(root: str) -> None:
    source = os.environ["DEEPPROFILER_SRC"]
    sys.path.insert(0, source)
    _stand_ins()
    sys.argv = ["deepprofiler", "--root", root, "--config", "config.json", "profile"]
    runpy.run_module("deepprofiler", run_name="__main__")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoint = commands.add_parser("checkpoint")
    checkpoint.add_argument("out")
    checkpoint.add_argument("--seed", type=int, default=0)
    commands.add_parser("resampling").add_argument("out")
    commands.add_parser("profile").add_argument("root")
    args = parser.parse_args()
    if args.command == "checkpoint":
        write_checkpoint(args.out, args.seed)
    elif args.command == "resampling":
        write_resampling(args.out)
    else:
        run_profile(args.root)


if __name__ == "__main__":
    main()
