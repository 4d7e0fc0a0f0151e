"""What ``pykvm run`` imports at start-up (issue 18 item 2, boot at the interpreter's floor): the
modules on that path (the command line, the machine, this host's platforms) import none of
:mod:`typing` (about 5 ms), :mod:`dataclasses` and :mod:`inspect` (about 11 ms with :mod:`ast`,
:mod:`dis` and :mod:`tokenize`) or pyelftools (``elftools``: about 20 ms; only the DWARF line
reader, which a crash report asks for, imports it).

They keep their annotations (``from __future__ import annotations``: never evaluated) and take
typing's names under ``if TYPE_CHECKING:``, where only the type checker reads them. Each check
runs a fresh interpreter, since this test process has imported all of these long ago."""
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("typing", "dataclasses", "inspect", "elftools")


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True,
                          timeout=120)


IMPORT_PATH = """
import json, sys
import pykvm.cli, pykvm.machine
from pykvm._host import HOST_ARCH
from pykvm.platform import MACHINES, machine_class
names = [n for n, (arch, _, _) in MACHINES.items() if arch == HOST_ARCH]
for n in names:
    machine_class(n)
print(json.dumps({"machines": names,
                  "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY,)


def _first_importer(module: str) -> str:
    """Where (file:line in pykvm) ``module`` is first imported on the import path above."""
    finder = ("import sys, traceback\n"
              "class F:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              f"        if name == {module!r}:\n"
              "            st = [f'{f.filename}:{f.lineno}' for f in traceback.extract_stack()\n"
              "                  if '/pykvm/' in f.filename]\n"
              "            print(st[-1] if st else '?', flush=True)\n"
              "sys.meta_path.insert(0, F())\n")
    lines = _fresh(finder + IMPORT_PATH).stdout.splitlines()
    return lines[0] if len(lines) > 1 else "?"


def test_cli_machine_and_host_platforms_import_no_heavy_module():
    r = _fresh(IMPORT_PATH)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["machines"], "no machine for this host"
    where = {m: _first_importer(m) for m in out["heavy"]}
    assert out["heavy"] == [], (f"importing pykvm.cli, pykvm.machine and the machines "
                                f"{out['machines']} loads {out['heavy']}, first imported at {where}")


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
@pytest.mark.parametrize("which", ["tiny_elf64", "tiny_multiboot"])
def test_pykvm_run_of_a_tiny_guest_imports_no_heavy_module(which, tmp_path):
    from pykvm import bench

    image = tmp_path / f"{which}.elf"
    image.write_bytes(getattr(bench, which)())
    # -X importtime lists every module the whole run imports, on stderr
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "pykvm", "run", str(image)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr[-2000:]     # tiny_multiboot exits with 1 (its port)
    loaded = {line.rsplit("|", 1)[1].strip().split(".")[0]
              for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "pykvm" in loaded
    assert loaded.isdisjoint(HEAVY), f"pykvm run {which} loads {sorted(loaded & set(HEAVY))}"
