"""Train the built-in digit classifier (the `digit-classifier` reward) and save it.

    python recipes/tiny-digits/train_classifier.py --out rlgen/builtin_models/digit-classifier [--steps N --seed 0]

Deterministic for a seed on CPU with the same torch version and thread count; prints the held-out accuracy
on the digits test split (297 images never seen in training).
"""
from __future__ import annotations

import argparse
import time

import torch

from rlgen.api import save_digit_classifier, train_digit_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, test_accuracy = train_digit_classifier(args.steps, args.seed, batch_size=args.batch_size, lr=args.lr,
                                                  log_every=args.log_every)
    seconds = time.perf_counter() - start
    recipe = {"script": "recipes/tiny-digits/train_classifier.py", "steps": args.steps, "seed": args.seed,
              "batch_size": args.batch_size, "lr": args.lr, "optimizer": "AdamW (weight_decay 0.01), one-cycle",
              "label_smoothing": 0.05, "junk_fraction": 0.125, "junk_weight": 0.5,
              "junk": "noise / blob / flat images (1 per 8 digits) trained towards the uniform distribution",
              "threads": args.threads, "torch": torch.__version__,
              "augmentation": "random 1-pixel shifts, 3x3 binomial blur (p=0.5, random strength), contrast x[0.8,1.2], brightness +-0.1, gaussian noise sd<=0.08",
              "data": "sklearn.datasets.load_digits, train split (1500 images, rlgen.diffusion.digits)",
              "train_seconds": round(seconds, 1)}
    save_digit_classifier(model, args.out, test_accuracy=test_accuracy, training=recipe)
    print(f"held-out accuracy {test_accuracy:.4f} (297 test images), trained in {seconds:.1f}s; saved to {args.out}")


if __name__ == "__main__":
    main()
