"""Throughput of the two deep extractors (nuclei/s) on this machine's CPU.

    PYTHONPATH=src python benchmarks/deep.py [--threads 2] [--nuclei 64] [--encoder DIR]

EfficientNet-B0 runs with random weights (same arithmetic as ImageNet weights; no file needed):
128-pixel boxes resized to 224. The SSL encoder is a freshly initialised ``NucleusCNN`` on
64-pixel crops unless ``--encoder`` names a trained one. Training speed of the encoder
(crops/s for one SimCLR epoch) is printed too.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from morphotype import deep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nuclei", type=int, default=64)
    parser.add_argument("--encoder", default=None, help="directory written by save_encoder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    boxes = rng.integers(0, 256, (args.nuclei, 128, 128), dtype=np.uint8)
    model = deep.load_efficientnet("random")
    deep.efficientnet_features(model, boxes[:4], batch_size=4, progress=False)  # warm-up
    start = time.perf_counter()
    deep.efficientnet_features(model, boxes, batch_size=32, progress=False)
    seconds = time.perf_counter() - start
    print(f"EfficientNet-B0 (128 box -> 224, {args.threads} threads): {args.nuclei / seconds:.1f} nuclei/s")

    if args.encoder:
        encoder = deep.load_encoder(args.encoder)
    else:
        encoder = deep.Encoder(deep.NucleusCNN().eval(), {"crop_size": 64, "architecture": {"dim": 128}})
    crops = rng.integers(0, 256, (max(args.nuclei, 512), encoder.crop_size, encoder.crop_size), dtype=np.uint8)
    deep.encode(encoder, crops[:16], progress=False)
    start = time.perf_counter()
    deep.encode(encoder, crops, progress=False)
    seconds = time.perf_counter() - start
    print(f"SSL encoder ({encoder.crop_size} crop, {args.threads} threads): {len(crops) / seconds:.1f} nuclei/s")

    start = time.perf_counter()
    deep.train_encoder(crops[:256], epochs=1, batch_size=128, progress=False)
    seconds = time.perf_counter() - start
    print(f"SSL encoder training (SimCLR, 2 views, {args.threads} threads): {256 / seconds:.1f} crops/s per epoch")


if __name__ == "__main__":
    main()
