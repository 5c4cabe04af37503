"""The module map, checked over the AST of every module under ``fnn/``:

- no import cycle among fnn's modules (module-level imports; ``from fnn.a import b`` is an edge to
  the submodule ``fnn.a.b`` when ``b`` is one, else to ``fnn.a``; the parent packages Python
  imports on the way do not count, or every module would sit in a cycle with ``fnn/__init__``);
- no module uses another *public* module's ``_private`` names (``from fnn.a import _x``, or
  ``m._x`` where ``m`` is bound to a public fnn module); private modules (any part of the dotted
  name starting with ``_``, such as ``fnn.checkpoint._format``) exist to be shared;
- no dispatch by display name: a ``.name`` compared with string constants (``==``, ``!=``,
  ``in``) or parsed (``.name.split(``, ``.startswith(``, ...). Dispatch reads ``layer.kind``.
  ``dtype.name`` is a dtype's identity, not a display name, and is allowed.

Each rule has a self-test feeding it a bad snippet, so the check can fail; and every module
imports first, in a process that has imported nothing of fnn (a cycle the AST misses, such as
one through a function called at import time, fails there).
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSE = (".split", ".rsplit", ".partition", ".rpartition", ".startswith", ".endswith")


# --------------------------------------------------------------------------- reading the package

def module_files(root=os.path.join(ROOT, "fnn")):
    """``{dotted name: (path, is_package)}`` for every ``.py`` under ``root``."""
    out = {}
    base = os.path.dirname(root)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                package = parts[-1] == "__init__"
                out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def is_private(module: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in module.split("."))


def _private_name(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(node: ast.ImportFrom, module: str, package: bool) -> str:
    """The module an ``ImportFrom`` reads from, relative imports resolved."""
    if not node.level:
        return node.module
    parts = module.split(".")
    base = parts if package else parts[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _module_level(body):
    """Statements that run at import time: not function bodies, not ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _module_level(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _module_level(getattr(node, field, []) or [])


def imports(tree: ast.Module, module: str, package: bool, modules, everywhere=False):
    """``[(target, name, bound, line)]`` for the fnn imports of a module (at module level, or
    anywhere with ``everywhere``): ``target`` is the module imported; ``name`` is set for ``from
    M import name`` where ``M.name`` is not a module; ``bound`` is ``(local name, module it
    names)`` when the statement binds a module to a name."""
    nodes = ast.walk(tree) if everywhere else _module_level(tree.body)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fnn":
                    bound = (a.asname, a.name) if a.asname else ("fnn", "fnn")
                    out.append((a.name, None, bound, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, package)
            if not source or source.split(".")[0] != "fnn":
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in modules:
                    out.append((sub, None, (a.asname or a.name, sub), node.lineno))
                else:
                    out.append((source, a.name, None, node.lineno))
    return out


def parse_all(modules):
    return {m: ast.parse(open(path, encoding="utf-8").read(), path)
            for m, (path, _) in modules.items()}


# --------------------------------------------------------------------------- (a) cycles

def import_graph(modules, trees):
    """``{module: {imported module: first line}}`` of module-level imports inside fnn."""
    graph = {m: {} for m in modules}
    for m, (_, package) in modules.items():
        for target, _name, _bound, line in imports(trees[m], m, package, modules):
            if target in modules and target != m:
                graph[m].setdefault(target, line)
    return graph


def find_cycles(graph):
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, comp) for comp in comps]


def _cycle_in(graph, comp):
    """A shortest cycle through the smallest member of ``comp`` (breadth-first)."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]]):
                if w == start:
                    return path + [start]
                if w in comp and w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    raise AssertionError("a strongly connected component without a cycle")


def describe_cycle(cycle, graph, modules):
    return " -> ".join(cycle) + "\n    " + "\n    ".join(
        f"{os.path.relpath(modules[a][0], ROOT)}:{graph[a][b]} imports {b}"
        for a, b in zip(cycle, cycle[1:]))


# --------------------------------------------------------------------------- (b) private names

def private_uses(tree, module, package, modules, path):
    """``["file:line: ..."]`` for every use of a public fnn module's ``_private`` name."""
    found, aliases = [], {}
    for target, name, bound, line in imports(tree, module, package, modules, everywhere=True):
        if name is not None and _private_name(name) and not is_private(target):
            found.append(f"{path}:{line}: from {target} import {name}")
        if bound:
            aliases[bound[0]] = bound[1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private_name(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in aliases:
                continue
            owner = aliases[value.id]
            for part in chain:                       # fnn.a.b._x: walk down the submodules
                if f"{owner}.{part}" not in modules:
                    owner = None
                    break
                owner = f"{owner}.{part}"
            if owner and owner != module and not is_private(owner) \
                    and f"{owner}.{node.attr}" not in modules:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)} ({owner} is public)")
    return found


# --------------------------------------------------------------------------- (c) name dispatch

def _is_name_attr(node):
    return (isinstance(node, ast.Attribute) and node.attr == "name"
            and not (isinstance(node.value, ast.Attribute) and node.value.attr == "dtype")
            and not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func)
                     in ("np.dtype", "jnp.dtype", "numpy.dtype")))


def _strings(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    return (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts))


def name_dispatch(tree, path):
    """``["file:line: code"]`` for every ``.name`` compared with strings or parsed."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_name_attr(s) for s in sides) and any(_strings(s) for s in sides):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and f".{node.func.attr}" in PARSE and _is_name_attr(node.func.value):
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


# --------------------------------------------------------------------------- the checker can fail

def _package(tmp_path, files):
    for rel, text in {"__init__.py": "", **files}.items():
        path = tmp_path / "fnn" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = module_files(str(tmp_path / "fnn"))
    return modules, parse_all(modules)


def test_checker_finds_cycles(tmp_path):
    modules, trees = _package(tmp_path, {
        "a.py": "import os\nfrom fnn.b import g\n",
        "b.py": "from fnn import a\ndef g():\n    from fnn import c\n",     # c: lazy, no edge
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fnn.a\n",
        "p/__init__.py": "from fnn.p.q import x\n",
        "p/q.py": "from .r import y\nx = 1\n",
        "p/r.py": "from . import q\ny = 2\n",
        "s.py": "import fnn.p.q\n"})                                 # fnn.p is only a parent
    graph = import_graph(modules, trees)
    assert graph["fnn.a"] == {"fnn.b": 2} and graph["fnn.b"] == {"fnn.a": 1}
    assert graph["fnn.c"] == {} and graph["fnn.s"] == {"fnn.p.q": 1}
    cycles = find_cycles(graph)
    assert sorted(cycles) == [["fnn.a", "fnn.b", "fnn.a"], ["fnn.p.q", "fnn.p.r", "fnn.p.q"]]
    text = describe_cycle(cycles[0], graph, modules)
    assert "fnn.a -> fnn.b -> fnn.a" in text and "a.py:2 imports fnn.b" in text
    assert find_cycles({"x": {"y": 1}, "y": {}}) == []
    assert find_cycles({"x": {"x": 1}}) == [["x", "x"]]


def test_checker_finds_private_names(tmp_path):
    modules, trees = _package(tmp_path, {
        "a.py": "_x = 1\ndef f():\n    return _x\n",
        "b.py": "from fnn.a import _x\n",
        "c.py": "import fnn.a as m\ny = m._x\n",
        "d.py": "from fnn import a\ndef f():\n    return a._x, a.__name__, a.f\n",
        "e.py": "import fnn.a\ny = fnn.a._x\n",
        "f.py": "def f():\n    from .a import _x\n    return _x\n",
        "_priv.py": "_y = 2\n",
        "ok.py": "from fnn._priv import _y\nfrom fnn import _priv\nz = _priv._y\n"
                 "from fnn.a import f\nclass C:\n    _x = 1\nw = C._x\n"})
    found = sorted(f for m, (path, pkg) in modules.items()
                   for f in private_uses(trees[m], m, pkg, modules, m))
    assert found == ["fnn.b:1: from fnn.a import _x",
                     "fnn.c:2: m._x (fnn.a is public)",
                     "fnn.d:3: a._x (fnn.a is public)",
                     "fnn.e:2: fnn.a._x (fnn.a is public)",
                     "fnn.f:2: from fnn.a import _x"]
    assert is_private("fnn.checkpoint._format") and is_private("fnn._x.y")
    assert not is_private("fnn.checkpoint") and not is_private("fnn.__main__")


def test_checker_finds_name_dispatch():
    bad = ["layer.name == 'serial'", "'Relu' != child.name", "m.name in ('a', 'b')",
           "'(' in layer.name", "layer.name.split('(')[0]", "model.name.startswith('GPT(')",
           "l.name.rsplit(',', 1)", "x.children[0][1].name.endswith(')')"]
    fine = ["layer.kind == 'serial'", "arr.dtype.name == 'float32'",
            "np.dtype(t).name in ('bfloat16',)", "f'{layer.name}: bad'", "layer.name == other",
            "k.name"]
    tree = ast.parse("\n".join(bad + fine))
    found = name_dispatch(tree, "x.py")
    assert sorted(int(f.split(":")[1]) for f in found) == list(range(1, len(bad) + 1)), found
    assert "x.py:6: model.name.startswith('GPT(')" in found


# --------------------------------------------------------------------------- the checks on fnn

MODULES = module_files()
TREES = parse_all(MODULES)


def _rel(m):
    return os.path.relpath(MODULES[m][0], ROOT)


def test_no_import_cycles():
    graph = import_graph(MODULES, TREES)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in fnn:\n  " + "\n  ".join(
        describe_cycle(c, graph, MODULES) for c in cycles)


def test_no_module_uses_another_modules_private_names():
    found = [f for m, (_, pkg) in MODULES.items()
             for f in private_uses(TREES[m], m, pkg, MODULES, _rel(m))]
    assert not found, "private names of public modules used elsewhere (move the shared code " \
        "to a private module, or make it public):\n  " + "\n  ".join(found)


def test_no_dispatch_on_display_names():
    found = [f for m in MODULES for f in name_dispatch(TREES[m], _rel(m))]
    assert not found, "code that reads a layer's display name (dispatch on layer.kind):\n  " \
        + "\n  ".join(found)


def test_docstrings_point_inside_the_repository():
    """The design is ``docs/design.md``; no module sends readers to a ``DESIGN.md`` elsewhere."""
    found = [f"{_rel(m)}:{n}" for m, (path, _) in MODULES.items()
             for n, line in enumerate(open(path, encoding="utf-8"), 1) if "DESIGN.md" in line]
    assert not found, "references to DESIGN.md (write docs/design.md): " + ", ".join(found)


def test_python_dash_m_launch_runs_a_module_not_yet_imported():
    """``python -m fnn.sharding.launch`` imports ``fnn.sharding`` first; were ``launch`` imported
    there, runpy would warn that it was imported before it ran (sharding.__getattr__ loads it
    lazily instead)."""
    graph = import_graph(MODULES, TREES)
    assert "fnn.sharding.launch" not in graph["fnn.sharding"]


# modules that once failed when imported first ("partially initialized module")
ONCE_CYCLIC = ("fnn.combinators", "fnn.layers.batch_norm", "fnn.layers.multi_head_attention",
               "fnn.layers.attention", "fnn.layers.norm")
# ``import fnn.x`` runs fnn/__init__.py first, which imports everything in one fixed order; so
# each child starts from a bare ``fnn`` package (its __init__ not run) and ``fnn.x`` is the
# first of fnn's modules to execute (subpackages' __init__s still run, as they always do)
IMPORT_FIRST = r"""
import importlib, os, sys, traceback, types
import jax, jax.numpy, numpy        # the slow part, shared; nothing of fnn is imported yet
failed = 0
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        try:
            bare = types.ModuleType("fnn")
            bare.__path__ = [sys.argv[1]]
            sys.modules["fnn"] = bare
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        print(f"importing {name} first fails", file=sys.stderr)
        failed += 1
sys.exit(failed)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first():
    names = sorted(m for m in MODULES if m != "fnn.__main__")
    assert set(ONCE_CYCLIC) <= set(names)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", IMPORT_FIRST, os.path.join(ROOT, "fnn"), *names], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
