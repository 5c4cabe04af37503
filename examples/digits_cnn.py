"""Handwritten digits with a small CNN: local filters, shared weights, pooling — backprop by hand.

The lesson's CNN section on scikit-learn's 8×8 digits (``load_digits``; the fixed stratified
split ``test_size=0.2, random_state=0``: 1437 train / 360 test). Two 3×3 convolutions (32 and
64 filters, ReLU) see local patterns and share their weights across the image; a 2×2 max pool
keeps the strongest response of each neighbourhood; two dense layers classify. Gradients come
from every layer's hand-derived ``backward`` (the convolution's input gradient is a transposed
convolution with the flipped kernel; its kernel gradient the correlation of input and error).
Adam with cosine decay, up to 30 epochs, seed 0; every training batch is augmented inside the
compiled epoch (small random shifts and rotations, ``fnn.augment``); 10% of the training images
are held out for validation, and early stopping on the validation loss (patience 8) picks the
epoch whose weights are kept. The test set is used once, at the end: 99.44-99.72% test accuracy
over seeds 0-2 (98.06-98.33% without augmentation; >= 98% is the bar; measured on an AMD EPYC,
2026-11-30, see ``benchmarks/RESULTS.md``).

Writes ``OUT/digits_cnn_curves.png`` (loss and accuracy per epoch on the training and
validation sets, the restored epoch marked), ``OUT/digits_cnn_errors.png`` (the misclassified
test digits) and ``OUT/digits_cnn.safetensors``. Same as ``fnn train digits-cnn``.

    python examples/digits_cnn.py [--epochs 30] [--lr 2e-3] [--seed 0] [--out out] [--quick]
"""
import argparse
import os
import time

from fnn.core import summary
from fnn.tasks import digits_cnn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help=f"default {digits_cnn.EPOCHS}")
    ap.add_argument("--lr", type=float, default=None, help=f"peak rate, default {digits_cnn.LR}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="2 epochs on 256 images (smoke test)")
    args = ap.parse_args(argv)

    print(summary(digits_cnn.model(), (digits_cnn.BATCH, 8, 8, 1)))
    t0 = time.perf_counter()
    m = digits_cnn.run(epochs=args.epochs, lr=args.lr, seed=args.seed, out=args.out,
                       quick=args.quick)
    print(f"test accuracy {m['test_accuracy']:.2%} ({m['errors']} of 360 wrong), test loss "
          f"{m['test_loss']:.4f}, {m['epochs']} epochs (weights of epoch {m['best_epoch']}, "
          f"validation accuracy {m['val_accuracy']:.2%}) in {time.perf_counter() - t0:.0f} s")
    for name in ("digits_cnn_curves.png", "digits_cnn_errors.png", "digits_cnn.safetensors"):
        print("wrote", os.path.join(args.out, name))
    return m


if __name__ == "__main__":
    main()
