"""The API reference (issue 9): Sphinx builds it from the docstrings with warnings as errors,
and every public class, function, method and exit type of the documented modules has a
docstring."""
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")


def documented_modules():
    mods = []
    for name in sorted(os.listdir(os.path.join(DOCS, "api"))):
        if name.endswith(".rst"):
            with open(os.path.join(DOCS, "api", name)) as f:
                mods += re.findall(r"^\.\. automodule:: (\S+)", f.read(), re.M)
    return mods


def public_objects(mod):
    for name, obj in vars(mod).items():
        if name.startswith(("_", "pytest_")) or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            yield f"{mod.__name__}.{name}", obj
            if inspect.isclass(obj):
                for mname, m in vars(obj).items():
                    if mname.startswith(("_", "pytest_")):   # pytest hooks: pytest documents them
                        continue
                    if isinstance(m, property):
                        if not (m.__doc__ or "").strip():
                            yield f"{mod.__name__}.{name}.{mname}", m.fget
                        continue
                    f = m
                    if isinstance(f, (staticmethod, classmethod)):
                        f = f.__func__
                    if inspect.isfunction(f):
                        yield f"{mod.__name__}.{name}.{mname}", f


def test_every_public_object_has_a_docstring():
    missing = []
    mods = documented_modules()
    assert len(mods) >= 20
    for modname in mods:
        mod = importlib.import_module(modname)
        assert (mod.__doc__ or "").strip(), f"module {modname} has no docstring"
        for qual, obj in public_objects(mod):
            if not (inspect.getdoc(obj) or "").strip():
                missing.append(qual)
    assert not missing, f"{len(missing)} public objects lack a docstring:\n" + "\n".join(missing)


def test_sphinx_builds_the_reference_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="pykvm: host lacks Sphinx (pip install '.[test]')")
    r = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html",
                        DOCS, str(tmp_path / "html")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    html = (tmp_path / "html" / "api" / "core.html").read_text()
    assert "pykvm.vcpu.Vcpu" in html or "Vcpu" in html
