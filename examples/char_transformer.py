"""Character-level GPT on Python's documentation: attention, KV-cache sampling, attention maps.

The lesson's last chapter as a working language model. ``pydoc_data.topics`` (the text of
Python's help topics, ~465k characters) split 90/10 exactly as the recurrent character model's
example (``--lstm`` trains that one too and prints both), so their validation bits per
character compare directly. A 3-block GPT
(d 96, 4 heads, context 64, learned positions, tied embedding) trained with the hand-derived
backward; validation bits/char after each epoch; text sampled token by token with the KV cache
(temperature 0.8, top-k 20); every head's attention map for the sampled sequence.

Writes ``OUT/char_transformer_curves.png``, ``OUT/char_transformer_attention.png``,
``OUT/char_transformer_sample.txt`` and ``OUT/char_transformer.safetensors``. Same as
``fnn train char-transformer``.

    python examples/char_transformer.py [--epochs 4] [--lr 3e-3] [--seed 0] [--out out] [--quick]
                                        [--lstm]
"""
import argparse
import os
import time

from fnn.core import summary
from fnn.tasks import char_transformer as task


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help=f"default {task.EPOCHS}")
    ap.add_argument("--lr", type=float, default=None, help=f"peak rate, default {task.LR}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="1 epoch of a tiny model on 20k chars")
    ap.add_argument("--lstm", action="store_true",
                    help="also train char-lstm (same text and split) and print its bits/char")
    args = ap.parse_args(argv)

    vocab = len(task.load_text()[2])
    print(summary(task.model(vocab, args.quick), (task.BATCH, task.SEQ)))
    t0 = time.perf_counter()
    m = task.run(epochs=args.epochs, lr=args.lr, seed=args.seed, out=args.out, quick=args.quick)
    for e, tr, va in zip(m["history"]["epoch"], m["history"]["train_bpc"], m["history"]["val_bpc"]):
        print(f"epoch {e}: train {tr:.3f} bits/char, validation {va:.3f} bits/char")
    print(f"{m['epochs']} epochs in {time.perf_counter() - t0:.0f} s; samples (KV cache, "
          f"temperature 0.8, top-k 20):")
    for text in m["samples"]:
        print(repr(text))
    if args.lstm:
        from fnn.tasks import char_lstm
        r = char_lstm.run(epochs=args.epochs, seed=args.seed, out=args.out, quiet=True,
                          quick=args.quick)
        print(f"validation bits/char: transformer {m['val_bpc']:.3f}, LSTM "
              f"{r['val_bits_per_char']:.3f} ({r['epochs']} epochs, {r['seconds']:.0f} s)")
    for name in ("char_transformer_curves.png", "char_transformer_attention.png",
                 "char_transformer_sample.txt", "char_transformer.safetensors"):
        print("wrote", os.path.join(args.out, name))
    return m


if __name__ == "__main__":
    main()
