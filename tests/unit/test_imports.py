"""Lean imports and one ioctl path: what importing pykvm loads, and every ioctl call site passing
a row of the ioctl table. (The layers and the absence of import cycles: test_layers.py.)"""
import ast
import json
import os
import subprocess
import sys

import pytest

from test_layers import _modules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "pykvm")

def _imports(name, path, mods):
    """{imported pykvm module: line} for every import statement in the file, at module level
    or inside functions alike."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    out = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in mods and t != name:
                out.setdefault(t, node.lineno)
    return out


def _ioctl_calls():
    """(file, line, source) of every call of ``ioctl(...)`` in the package."""
    for name, path in _modules().items():
        if name == "pykvm._ioctl":
            continue
        text = open(path).read()
        for node in ast.walk(ast.parse(text, path)):
            if isinstance(node, ast.Call):
                f = node.func
                fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                    f, ast.Attribute) else None
                if fname == "ioctl" and not (isinstance(f, ast.Attribute) and isinstance(
                        f.value, ast.Name) and f.value.id == "fcntl"):
                    yield os.path.relpath(path, ROOT), node, ast.get_source_segment(text, node)


def test_every_ioctl_call_site_passes_a_table_row():
    """``ioctl(fd, ioctls.KVM_X, ...)`` (or a variable holding a row, in a helper that takes
    one); never a name string and a request number."""
    bad = []
    n = 0
    for path, node, src in _ioctl_calls():
        n += 1
        op = node.args[1] if len(node.args) > 1 else None
        row = (isinstance(op, ast.Attribute) and isinstance(op.value, ast.Name)
               and op.value.id == "ioctls" and op.attr.startswith("KVM_"))
        passed_on = isinstance(op, ast.Name) and not op.id.startswith("KVM_")
        if not (row or passed_on):
            bad.append(f"{path}:{node.lineno}: {src.splitlines()[0]}")
    assert n >= 30, n
    assert not bad, "ioctl call sites that do not pass a table row:\n" + "\n".join(bad)


def test_ioctl_refuses_anything_but_a_table_row():
    from pykvm._ioctl import ioctl
    from pykvm.abi import ioctls
    with pytest.raises(TypeError, match="row of pykvm.abi.ioctls"):
        ioctl(-1, 0xAE00)
    with pytest.raises(TypeError, match="row of pykvm.abi.ioctls"):
        ioctl(-1, "KVM_GET_API_VERSION", ioctls.KVM_RUN)


def _loaded_after(code):
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_import_pykvm_loads_almost_nothing():
    mods = _loaded_after("import pykvm")
    ours = sorted(m for m in mods if m.startswith("pykvm"))
    assert ours == ["pykvm"], ours
    assert not {"cffi", "_cffi_backend", "elftools", "pycparser"} & mods


@pytest.mark.parametrize("what", ["import pykvm.machine", "from pykvm import Kvm",
                                  "import pykvm.cli"])
def test_core_imports_parse_no_c_and_load_no_other_arch_lab_or_plugin(what):
    mods = _loaded_after(what)
    assert not any(m == "pycparser" or m.startswith(("pycparser.", "cffi.cparser", "elftools"))
                   for m in mods), sorted(m for m in mods if "pycparser" in m or "elftools" in m)
    other = "pykvm.arch.riscv" if os.uname().machine == "x86_64" else "pykvm.arch.x86.mixins"
    unwanted = [m for m in mods if m.startswith((other, "pykvm.lab", "pykvm.testing",
                                                 "pykvm.bench", "pykvm.fuzz"))]
    assert not unwanted, unwanted
