"""The fuzzer is a tool package on top of pykvm (issue 17): ``pykvm.fuzz`` is split into
generator, device generator, cases, runners, supervisor, replay and CLI modules; nothing in
pykvm imports it; ``python -m pykvm.fuzz`` keeps every option; cases of both modes go to and
from JSON through the package's one pair of functions; the old flat modules are gone."""
import ast
import importlib
import json
import os
import subprocess
import sys

import pytest

from pykvm import fuzz
from pykvm.fuzz import device_generator, generator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "pykvm")
MODULES = ("generator", "device_generator", "cases", "runner", "device_runner", "supervisor",
           "replay", "cli", "__main__")


def _imports(path: str, package: str):
    """Absolute names of the modules the file at ``path`` (in ``package``) imports, at module
    level or inside functions."""
    tree = ast.parse(open(path).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return out


def _pykvm_sources():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                package = rel if f == "__init__.py" else rel.rsplit(".", 1)[0]
                yield path, rel.removesuffix(".__init__"), package


def test_nothing_below_the_tools_imports_the_fuzzer():
    tools = ("pykvm.fuzz", "pykvm.cli", "pykvm.bench", "pykvm.lab", "pykvm.testing",
             "pykvm.__main__")
    offenders = []
    for path, mod, package in _pykvm_sources():
        if mod.startswith(tools):
            continue
        if any(n == "pykvm.fuzz" or n.startswith("pykvm.fuzz.") for n in _imports(path, package)):
            offenders.append(mod)
    assert offenders == []


def test_the_fuzzer_imports_no_other_tool():
    for name in MODULES + ("__init__",):
        path = os.path.join(PKG, "fuzz", f"{name}.py")
        names = _imports(path, "pykvm.fuzz")
        other = [n for n in names if n.startswith(("pykvm.cli", "pykvm.bench", "pykvm.lab"))]
        assert other == [], (name, other)


@pytest.mark.parametrize("old", ["pykvm.fuzz_devices", "pykvm.fuzz_stream"])
def test_the_flat_modules_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    assert not os.path.exists(os.path.join(PKG, "fuzz.py"))


def test_every_module_of_the_package_imports():
    for name in MODULES[:-1]:
        importlib.import_module(f"pykvm.fuzz.{name}")
    assert set(fuzz.__all__) == {"MODES", "generate_case", "case_to_json", "case_from_json",
                                 "CaseRunner", "Supervisor", "replay", "main"}


def test_python_m_pykvm_fuzz_keeps_every_option():
    r = subprocess.run([sys.executable, "-m", "pykvm.fuzz", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--devices", "--runs", "--seed", "--jobs", "--deadline", "--modes",
                 "--max-vcpus", "--out", "--json", "--replay", "--quiet"):
        assert flag in r.stdout, flag
    # the hidden test hooks still parse (a bad one is a usage error naming it)
    r = subprocess.run([sys.executable, "-m", "pykvm.fuzz", "--_inject", "bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bad injection" in r.stderr


@pytest.mark.parametrize("make", [generator.generate_case, device_generator.generate_case])
def test_cases_of_both_modes_round_trip_through_the_package_json(make):
    for index in range(5):
        case = make(3, index)
        doc = json.loads(json.dumps(fuzz.case_to_json(case)))
        assert doc["format"] == case["format"]
        assert fuzz.case_from_json(doc) == case


def test_a_document_of_another_format_is_refused():
    with pytest.raises(ValueError):
        fuzz.case_from_json({"format": "something else", "blobs": []})
    with pytest.raises(ValueError):
        generator.case_from_json(fuzz.case_to_json(device_generator.generate_case(1, 1)))
