"""Check that the built API reference documents every public name.

``python docs/_check_api.py SITE_DIR``: for each ``docs/api/<module>.md`` the rendered page must
carry an anchor ``fnn.<module>.<name>`` for every name in ``fnn.<module>.__all__``, and every
public module must have a page. Run by ``.ci/run`` after ``mkdocs build --strict``.
"""
from __future__ import annotations

import importlib
import pathlib
import re
import sys

MODULES = ["core", "layers", "activations", "losses", "initializers", "optim", "backprop",
           "gradcheck", "train", "checkpoint", "data", "plot", "precision", "augment", "checks",
           "debug", "torch_weights", "sharding", "regularizers", "perceptron", "models",
           "accelerators"]


def missing(site: pathlib.Path) -> list[str]:
    import fnn
    problems = []
    for mod in sorted(set(MODULES) | {n for n in fnn.__all__
                                      if hasattr(getattr(fnn, n), "__file__")}):
        page = site / "api" / f"{mod}.html"
        if not page.exists():
            problems.append(f"fnn.{mod}: no page {page}")
            continue
        ids = set(re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")))
        names = getattr(importlib.import_module(f"fnn.{mod}"), "__all__", [])
        problems += [f"fnn.{mod}.{n}: not on {page}" for n in names if f"fnn.{mod}.{n}" not in ids]
    return problems


if __name__ == "__main__":
    found = missing(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "site"))
    print("\n".join(found) or "API reference: every public name is documented")
    sys.exit(1 if found else 0)
