"""Throughput of the deep extractors (nuclei/s) on this machine's CPU.

    PYTHONPATH=src python benchmarks/deep.py [--threads 2] [--nuclei 64] [--encoder DIR]

EfficientNet-B0 runs with random weights (same arithmetic as real weights; no file needed) on
128-pixel boxes around fractional centres in one 1024 x 1024 frame, resized to 224, under both
recipes: ``deepprofiler`` (crop_and_resize, legacy resize, per-crop min-max) and
``keras-applications`` (integer boxes, half-pixel resize, ImageNet normalisation); each figure
includes cutting the boxes and is the best of ``--repeats`` runs (the machine may be shared). Beside them, Keras's own forward pass (qubvel's ``efficientnet.tfkeras``
B0, the network DeepProfiler runs, ``predict`` with batch 32) on the same boxes' network input,
when TensorFlow can be imported here or the optional ``.venv-deepprofiler`` exists
(``make deepprofiler-venv``). The SSL encoder is a freshly initialised ``NucleusCNN`` on 64-pixel
crops unless ``--encoder`` names a trained one; its training speed (crops/s for one SimCLR
epoch) is printed too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DP_PYTHON = Path(__file__).resolve().parents[1] / ".venv-deepprofiler" / "bin" / "python"


def best_rate(run, nuclei: int, repeats: int) -> float:
    """Nuclei/s of the fastest of ``repeats`` runs (the machine is shared: slower runs measure others)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return nuclei / min(seconds)


def keras_forward(inputs: np.ndarray, threads: int, repeats: int) -> float:
    """Nuclei/s of qubvel's Keras EfficientNet-B0 (avg_pool) on (N, S, S) grey network input."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import efficientnet.tfkeras as efn

    model = efn.EfficientNetB0(include_top=False, weights=None, pooling="avg",
                               input_shape=(inputs.shape[1], inputs.shape[2], 3))
    rgb = np.repeat(inputs[..., None], 3, axis=-1)
    model.predict(rgb[:4], batch_size=4, verbose=0)  # warm-up
    return best_rate(lambda: model.predict(rgb, batch_size=32, verbose=0), len(rgb), repeats)


def keras_figure(inputs: np.ndarray, threads: int, repeats: int) -> str:
    try:
        import efficientnet  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError:
        if not DP_PYTHON.exists():
            return "not measured (no TensorFlow here and no .venv-deepprofiler: make deepprofiler-venv)"
        with tempfile.TemporaryDirectory() as folder:
            np.save(Path(folder) / "inputs.npy", inputs)
            done = subprocess.run([str(DP_PYTHON), __file__, "--keras-only", str(Path(folder) / "inputs.npy"),
                                   "--threads", str(threads), "--repeats", str(repeats)], capture_output=True, text=True, check=False,
                                  env={"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
            if done.returncode != 0:
                return f"failed in .venv-deepprofiler: {done.stderr.strip().splitlines()[-1:]}"
            return done.stdout.strip().splitlines()[-1]
    return f"{keras_forward(inputs, threads, repeats):.1f} nuclei/s"


def efficientnet_rates(nuclei: int, threads: int, repeats: int) -> None:
    from morphotype import deep
    from morphotype.deepprofiler_input import (
        crop_and_resize,
        deepprofiler_boxes,
        deepprofiler_network_input,
    )

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1024, 1024), dtype=np.uint8)
    centres = rng.uniform(0, 1024, (nuclei, 2))
    model = deep.load_efficientnet("random")
    recipes = {
        "deepprofiler": lambda: crop_and_resize(frame, deepprofiler_boxes(centres, 128, frame.shape), 128),
        "keras-applications": lambda: deep.extract_boxes(frame, centres, 128),
    }
    fast = deep.inference_copy(model)  # what deep_features runs
    for recipe, cut in recipes.items():
        deep.efficientnet_features(fast, cut()[:4], batch_size=4, recipe=recipe, progress=False)  # warm-up
        def run(cut=cut, recipe=recipe):
            deep.efficientnet_features(fast, cut(), batch_size=32, recipe=recipe, progress=False)

        rate = best_rate(run, nuclei, repeats)
        print(f"EfficientNet-B0, {recipe} recipe (128 box -> 224, {threads} threads): {rate:.1f} nuclei/s")
    inputs = deepprofiler_network_input(recipes["deepprofiler"](), 224)
    print(f"Keras EfficientNet-B0 forward pass only (qubvel efficientnet, same boxes, {threads} threads): "
          f"{keras_figure(inputs, threads, repeats)}")


def encoder_rates(nuclei: int, threads: int, encoder_dir: str | None) -> None:
    from morphotype import deep

    rng = np.random.default_rng(0)
    if encoder_dir:
        encoder = deep.load_encoder(encoder_dir)
    else:
        encoder = deep.Encoder(deep.NucleusCNN().eval(), {"crop_size": 64, "architecture": {"dim": 128}})
    crops = rng.integers(0, 256, (max(nuclei, 512), encoder.crop_size, encoder.crop_size), dtype=np.uint8)
    deep.encode(encoder, crops[:16], progress=False)
    start = time.perf_counter()
    deep.encode(encoder, crops, progress=False)
    seconds = time.perf_counter() - start
    print(f"SSL encoder ({encoder.crop_size} crop, {threads} threads): {len(crops) / seconds:.1f} nuclei/s")

    start = time.perf_counter()
    deep.train_encoder(crops[:256], epochs=1, batch_size=128, progress=False)
    seconds = time.perf_counter() - start
    print(f"SSL encoder training (SimCLR, 2 views, {threads} threads): {256 / seconds:.1f} crops/s per epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nuclei", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="EfficientNet: best of this many runs")
    parser.add_argument("--encoder", default=None, help="directory written by save_encoder")
    parser.add_argument("--keras-only", default=None, help=argparse.SUPPRESS)  # inside .venv-deepprofiler
    args = parser.parse_args()
    if args.keras_only:
        print(f"{keras_forward(np.load(args.keras_only), args.threads, args.repeats):.1f} nuclei/s")
        return
    import torch

    torch.set_num_threads(args.threads)
    efficientnet_rates(args.nuclei, args.threads, args.repeats)
    encoder_rates(args.nuclei, args.threads, args.encoder)


if __name__ == "__main__":
    sys.exit(main())
