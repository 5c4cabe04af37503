"""A character-level LSTM language model on the text Python ships, trained with truncated BPTT.

The whole story lives in :mod:`fnn.tasks.char_lstm` (also ``fnn train char-lstm``): Python's
help topics (``pydoc_data.topics``, ~465k characters, the last 10% held out), an
``Embedding → LSTM(stateful) → Dense`` model whose carry flows from one 64-character window to
the next while gradients stop at the window's edge, hand-derived gradients (the LSTM's own
backpropagation through time), Adam with clipping. Prints validation bits per character after
every epoch, then text sampled at ``--temperature``; writes ``OUT/char_lstm_curve.png``,
``OUT/char_lstm_sample.txt`` and a checkpoint.

    python examples/char_lstm.py [--epochs 4] [--hidden 128] [--temperature 0.6] [--out out]
                                 [--quick]
"""
import argparse

from fnn.tasks import char_lstm


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (quick: 1)")
    ap.add_argument("--hidden", type=int, default=None, help="LSTM width, default 128")
    ap.add_argument("--batch", type=int, default=None, help="parallel streams, default 32")
    ap.add_argument("--window", type=int, default=None, help="BPTT window, default 64")
    ap.add_argument("--lr", type=float, default=None, help="Adam learning rate, default 3e-3")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--prompt", default="The ")
    ap.add_argument("--length", type=int, default=400, help="characters to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="a tiny model on 24k characters")
    args = ap.parse_args(argv)
    m = char_lstm.run(epochs=args.epochs, lr=args.lr, seed=args.seed, out=args.out,
                      quick=args.quick, hidden=args.hidden, batch=args.batch,
                      window=args.window, temperature=args.temperature,
                      sample_length=args.length, prompt=args.prompt)
    print(f"\nvalidation {m['val_bits_per_char']:.3f} bits/char after {m['epochs']} epochs "
          f"({m['seconds']:.0f} s)")
    print(f"\nwrote {args.out}/char_lstm_curve.png, char_lstm_sample.txt, char_lstm.safetensors")


if __name__ == "__main__":
    main()
