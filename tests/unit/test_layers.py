"""The package's layers, enforced over every module of ``pykvm/``: each import — at module level
or inside a function — points to the same or a lower layer, the import graph has no cycle, and
imports inside functions appear only where start-up time asks for them (the command line, the
package's lazy facade, the tools), never to get around a cycle or an upward import.

The layers, lowest first (docs/architecture.md draws them)."""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "pykvm")

LAYERS = [
    ("abi", ("pykvm._host", "pykvm.abi", "pykvm._native", "pykvm._loopstate", "pykvm.errors", "pykvm._ktap",
             "pykvm.status", "pykvm.outfile", "pykvm._record",
             "pykvm.snapfile")),             # the snapshot file format (pure Python)
    ("ioctl", ("pykvm._ioctl", "pykvm._fd", "pykvm.stats")),
    ("arch", ("pykvm.arch",)),
    ("memory/exits", ("pykvm.memory", "pykvm.exits", "pykvm.report")),
    ("kvm/vm/vcpu", ("pykvm.vcpu", "pykvm.vm", "pykvm.kvm")),
    ("runloop", ("pykvm.runloop",)),
    ("boot", ("pykvm.boot", "pykvm.guestbuild", "pykvm.guests")),
    ("devices", ("pykvm.devices",)),
    ("platform", ("pykvm.platform",)),
    ("snapshot", ("pykvm.snapshot",)),   # Machine.snapshot()/restore() (docs/snapshots.md)
    ("rewind", ("pykvm.rewind",)),   # Machine.reset(): dirty-page copy-back (docs/reset.md)
    ("machine", ("pykvm.machine",)),
    ("control", ("pykvm.control",)),  # a running machine's control socket
    ("debug", ("pykvm.gdbstub",)),   # the GDB remote-protocol stub (uses Machine)
    ("facade", ("pykvm",)),          # the package's lazy public names (PEP 562)
    ("tools", ("pykvm.cli", "pykvm.__main__", "pykvm._cliutil", "pykvm._terminal",
               "pykvm.testing", "pykvm.fuzz", "pykvm.bench", "pykvm._rawbench", "pykvm.lab",
               "pykvm.sandbox")),
]
COMPILED = ("pykvm._native", "pykvm._rawbench")     # extension modules (no .py to read)
# modules whose functions may import (downward) to keep start-up cheap
LAZY_OK = ("pykvm", "pykvm.cli", "pykvm.bench", "pykvm.testing.plugin", "pykvm.lab",
           "pykvm.fuzz")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(PKG):
        if "__pycache__" in dirpath:
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[: -len(".__init__")]
                mods[name] = path
    return mods


def _importable():
    return set(_modules()) | set(COMPILED)


def _layer(name):
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (rank, len(p))
    return None if best is None else best[0]


class _Imports(ast.NodeVisitor):
    """(line, in a function?, imported pykvm module) for every import of one module."""

    def __init__(self, name, path, mods):
        self.name, self.mods, self.depth, self.out = name, set(mods) | set(COMPILED), 0, []
        self.is_pkg = path.endswith("__init__.py")

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def _add(self, node, targets):
        for t in targets:
            if t in self.mods and t != self.name:
                self.out.append((node.lineno, self.depth > 0, t))

    def visit_Import(self, node):
        self._add(node, [a.name for a in node.names])

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.name.split(".") if self.is_pkg else self.name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in self.mods]
        self._add(node, subs or [mod])


@functools.lru_cache(maxsize=1)
def _graph():
    mods = _modules()
    edges = {}
    for name, path in mods.items():
        v = _Imports(name, path, mods)
        v.visit(ast.parse(open(path).read(), path))
        edges[name] = v.out
    return mods, edges


def test_the_rooms_exist():
    for pkg in ("boot", "devices", "platform", "arch", "abi", "fuzz", "testing"):
        assert os.path.isfile(os.path.join(PKG, pkg, "__init__.py")), pkg


def test_every_module_has_a_layer():
    mods, _ = _graph()
    assert not [m for m in mods if _layer(m) is None], "place these modules in LAYERS"


def test_imports_point_down_or_across_never_up():
    mods, edges = _graph()
    up = [f"{os.path.relpath(mods[m], ROOT)}:{line}: {m} ({LAYERS[_layer(m)][0]}) imports "
          f"{t} ({LAYERS[_layer(t)][0]})"
          for m, es in edges.items() for line, _, t in es if _layer(t) > _layer(m)]
    assert not up, "upward imports:\n" + "\n".join(up)


def test_no_import_cycle_in_the_whole_package():
    mods, edges = _graph()
    graph = {m: {t for _, _, t in es} for m, es in edges.items()}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not comps, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in comps)


def test_imports_inside_functions_only_where_start_up_asks_for_them():
    mods, edges = _graph()
    bad = [f"{os.path.relpath(mods[m], ROOT)}:{line}: imports {t} inside a function"
           for m, es in edges.items() for line, inside, t in es
           if inside and not any(m == p or m.startswith(p + ".") for p in LAZY_OK)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", [n for n, _ in LAYERS])
def test_each_layer_has_modules(layer):
    mods, _ = _graph()
    rank = [n for n, _ in LAYERS].index(layer)
    assert any(_layer(m) == rank for m in mods)


def test_machines_loaded_by_name_are_platform_modules():
    """The one dynamic import (a machine's module, loaded when it is chosen) stays inside the
    platform layer, and every machine named exists."""
    from pykvm import platform
    mods, _ = _graph()
    for name, (_arch, module, cls) in platform.MACHINES.items():
        full = "pykvm.platform" + module
        assert full in mods and _layer(full) == _layer("pykvm.platform"), name
        assert f"class {cls}" in open(mods[full]).read(), name
