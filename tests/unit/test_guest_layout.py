"""Issue 17, item 6: selftest-shaped tests. A hardware test's guest is a source beside it
(``tests/x86/<name>.c`` next to ``tests/x86/test_*.py``), ``guests/`` holds only the built-in
guests, and ``guests/Makefile`` finds its sources by globbing and sorts them into modes by the
rule ``pykvm.guestbuild`` applies to users' guests (the entry point a source names; a
``#define PYKVM_LINK_LOW`` line for a multiboot guest linked at 0x8000). No KVM needed."""
import glob
import os
import re
import shutil
import subprocess

import pytest

from pykvm import guestbuild
from pykvm.guestbuild import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
X86_TESTS = os.path.join(ROOT, "tests", "x86")
GUESTS = os.path.join(ROOT, "guests")
HAVE_TOOLS = all(shutil.which(t) for t in ("make", "gcc", "ld", "objcopy"))
# a guest source named as a string literal in a test: "pc_acpi.c", 'spin.c'
NAMED = re.compile(r"""["']([A-Za-z0-9_]+\.[cS])["']""")
INCLUDED = re.compile(r'^\s*#\s*include\s+"([^"]+\.c)"', re.M)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _named_by_tests():
    names = set()
    for t in glob.glob(os.path.join(X86_TESTS, "test_*.py")):
        names |= set(NAMED.findall(_read(t)))
    return names


def test_every_guest_beside_a_test_is_used_by_one():
    """A source in tests/x86 is named by a test there (or included by such a source)."""
    sources = {os.path.basename(p) for p in glob.glob(os.path.join(X86_TESTS, "*.c"))}
    assert sources, "tests/x86 holds the hardware tests' guest sources"
    used = _named_by_tests() & sources
    for s in list(used):
        used |= set(INCLUDED.findall(_read(os.path.join(X86_TESTS, s))))
    # _edges_guest.c is written (and removed) by test_cli_edges.py itself
    assert {s for s in sources - used if not s.startswith("_edges_guest")} == set()


def test_every_guest_a_test_names_is_beside_it():
    """``guest_vm("x.c")`` in tests/x86 means tests/x86/x.c, not a file elsewhere."""
    for t in glob.glob(os.path.join(X86_TESTS, "test_*.py")):
        text = _read(t)
        if "pytester" in text:          # tests of the plugin itself write guests to a tmp tree
            continue
        for call in re.findall(r"""guest_(?:vm|image)\(\s*["']([^"']+\.[cS])["']""", text):
            assert os.path.isfile(os.path.join(X86_TESTS, call)), (os.path.basename(t), call)


def test_no_guest_source_in_both_places():
    beside = {os.path.basename(p) for p in glob.glob(os.path.join(X86_TESTS, "*.c"))}
    builtin = {os.path.basename(p) for p in glob.glob(os.path.join(GUESTS, "x86", "*.c"))}
    assert beside and builtin and not beside & builtin


@pytest.mark.skipif(not HAVE_TOOLS, reason="host toolchain (make, gcc, binutils) not available")
def test_makefile_modes_are_guestbuilds():
    """The Makefile's glob finds every guests/x86/*.c, and puts each in the mode guestbuild
    gives the same source."""
    r = subprocess.run(["make", "-s", "-C", GUESTS, "modes"], capture_output=True, text=True,
                       check=True)
    got = {}
    for line in r.stdout.splitlines():
        mode, _, names = line.partition(":")
        for n in names.split():
            got[n] = mode.strip()
    want = {}
    for src in glob.glob(os.path.join(GUESTS, "x86", "*.c")):
        mode = guestbuild._guess_mode(src)
        low = mode == "protected" and guestbuild._LINK_LOW.search(_read(src))
        want[os.path.splitext(os.path.basename(src))[0]] = \
            {"long": "64", "protected": "32 low" if low else "32", "real": "16"}[mode]
    assert got == want


LOW_GUEST = ('#include "pykvm_guest.h"\n'
             '#define PYKVM_LINK_LOW 1\n'
             'void guest_main32(uint32_t magic, void *info) { (void)magic; (void)info; }\n')


@pytest.mark.skipif(not HAVE_TOOLS, reason="host toolchain (make, gcc, binutils) not available")
def test_link_low_marker_same_bytes_from_make_and_guestbuild(tmp_path, monkeypatch):
    """A multiboot source with ``#define PYKVM_LINK_LOW`` is linked at 0x8000 by both builders,
    byte for byte; without the line it is linked at 1 MiB."""
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "guests"
    shutil.copytree(GUESTS, tree, ignore=shutil.ignore_patterns("*.o", "*.d", "out"))
    (tree / "x86" / "low.c").write_text(LOW_GUEST)
    (tree / "x86" / "high.c").write_text(LOW_GUEST.replace("#define PYKVM_LINK_LOW 1\n", ""))
    out = tmp_path / "out"
    subprocess.run(["make", "-s", "-C", str(tree), f"OUT={out}", f"{out}/x86/low.elf",
                    f"{out}/x86/high.elf"], check=True, capture_output=True)
    for name, entry in (("low", 0x800C), ("high", 0x10000C)):
        made = (out / "x86" / f"{name}.elf").read_bytes()
        assert int.from_bytes(made[24:28], "little") == entry, name     # ELF32 e_entry
        ours = build(tree / "x86" / f"{name}.c", source_root=str(tree))
        assert "-x86_64-protected-" in ours
        with open(ours, "rb") as f:
            assert f.read() == made, f"{name}.c: guestbuild and guests/Makefile differ"
