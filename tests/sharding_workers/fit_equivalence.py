"""Worker for tests/test_sharding.py: ``fit(distribution=...)`` on 8 simulated CPU devices against
plain ``fit`` on one, printing JSON.

Each case trains 5 epochs of 4 batches (Adam, float32, no shuffle, so both runs see the same
batches) and reports the largest parameter difference, whether params and Adam's moments carry
the shardings asked for, and how many parameters are split. A shuffled data-parallel run
reports that it trained (the shuffle permutes within shards, so its order differs by design).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + \
    " --xla_force_host_platform_device_count=8"
import jax                                                         # noqa: E402
import numpy as np                                                 # noqa: E402

from fnn import optim, sharding                                    # noqa: E402
from fnn.train import Loop, Step, fit                                          # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from train_equivalence import MESHES, models, rules_for, same_shardings  # noqa: E402


def run(name, grad, mesh_name, shuffle=False):
    model, loss, x, t = models()[name]
    kw = dict(epochs=5, batch_size=16, key=jax.random.PRNGKey(1), step=Step(grad=grad),
              loop=Loop(shuffle=shuffle, progress=False))
    if mesh_name is None:
        return fit(model, loss, optim.adam(1e-3), (x, t), **kw), None
    shape, names, kind = MESHES[mesh_name]
    mesh, rules = sharding.make_mesh(shape, names), rules_for(kind)
    return fit(model, loss, optim.adam(1e-3), (x, t),
               distribution=sharding.Distribution(mesh, params=rules), **kw), (mesh, rules)


def main():
    cases = json.loads(sys.argv[1])
    out = []
    for name, grad, mesh_name in cases:
        ref, _ = run(name, grad, None)
        got, (mesh, rules) = run(name, grad, mesh_name)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(got.train_state.params),
                                   jax.tree.leaves(ref.train_state.params)))
        ok, ok_opt, split = same_shardings(got.train_state, mesh, rules)
        out.append({"model": name, "grad": grad, "mesh": mesh_name, "max_diff": diff,
                    "steps": int(got.train_state.step), "params_sharded_as_asked": ok,
                    "opt_state_like_params": ok_opt, "split_params": split})
    shuffled, _ = run("mlp", "manual", "dp", shuffle=True)
    losses = shuffled.history["loss"]
    print(json.dumps({"cases": out, "shuffled_trains": losses[-1] < losses[0]}))


if __name__ == "__main__":
    main()
