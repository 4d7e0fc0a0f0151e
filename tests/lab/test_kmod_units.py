"""Host-side pieces of the KVM module rebuild (pykvm.lab.kmod) that need no download and no build:
cache keys, package resolution against an index given here, patch checks and application,
.modinfo reading on an ELF object built with the host's C compiler, the Makefile adjustment and
the command's argument errors. When the lab cache already holds a build, its modules are checked
against their manifest (a second's work: nothing is built here)."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.lab import kmod
from pykvm.lab.debian import Archive, Index
from pykvm.lab.kmod import KmodError

NESTED_C = """\
static void nested_svm_transition_tlb_flush(struct kvm_vcpu *vcpu)
{
\tkvm_make_request(KVM_REQ_MMU_SYNC, vcpu);
\tkvm_make_request(KVM_REQ_TLB_FLUSH_CURRENT, vcpu);
}
"""

GOOD_PATCH = """\
diff --git a/arch/x86/kvm/svm/nested.c b/arch/x86/kvm/svm/nested.c
--- a/arch/x86/kvm/svm/nested.c
+++ b/arch/x86/kvm/svm/nested.c
@@ -1,5 +1,4 @@
 static void nested_svm_transition_tlb_flush(struct kvm_vcpu *vcpu)
 {
-\tkvm_make_request(KVM_REQ_MMU_SYNC, vcpu);
 \tkvm_make_request(KVM_REQ_TLB_FLUSH_CURRENT, vcpu);
 }
"""


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "src"
    (tree / "arch/x86/kvm/svm").mkdir(parents=True)
    (tree / "virt/kvm").mkdir(parents=True)
    (tree / "arch/x86/kvm/svm/nested.c").write_text(NESTED_C)
    return tree


# --------------------------------------------------------------------------------------------------
# keys


def test_build_key_names_version_patches_in_order_and_module_set():
    a, b = "a" * 64, "b" * 64
    k = kmod.build_key("6.12.117-1", [a, b])
    assert k == kmod.build_key("6.12.117-1", [a, b])
    assert len(k) == 64 and int(k, 16) >= 0
    others = {kmod.build_key("6.12.117-1", [b, a]), kmod.build_key("6.12.117-1", [a]),
              kmod.build_key("6.12.118-1", [a, b]), kmod.build_key("6.12.117-1", [a, b], intel=True),
              kmod.build_key("6.12.117-1", [])}
    assert k not in others and len(others) == 5


def test_root_key_is_the_set_of_package_sha256s():
    ix = Index("trixie", "amd64", "".join(
        f"Package: p{i}\nVersion: 1\nArchitecture: amd64\nFilename: pool/p{i}.deb\nSize: 1\n"
        f"SHA256: {hashlib.sha256(str(i).encode()).hexdigest()}\n\n" for i in range(3)))
    pkgs = [ix.get(f"p{i}") for i in range(3)]
    assert kmod.root_key(pkgs) == kmod.root_key(list(reversed(pkgs)))
    assert kmod.root_key(pkgs) != kmod.root_key(pkgs[:2])


# --------------------------------------------------------------------------------------------------
# resolution against an index given here (no network)

ABI = "6.12.117+deb13"


def _stanza(name: str, version: str, depends: str = "") -> str:
    h = hashlib.sha256(f"{name} {version}".encode()).hexdigest()
    dep = f"Depends: {depends}\n" if depends else ""
    return (f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n{dep}"
            f"Filename: pool/{name}_{version}.deb\nSize: 1\nSHA256: {h}\n\n")


def _archive(tmp_path: Path, source_versions=("6.12.117-1",)) -> Archive:
    v = "6.12.117-1"
    text = _stanza("linux-image-cloud-amd64", v, f"linux-image-{ABI}-cloud-amd64 (= {v})")
    text += _stanza(f"linux-image-{ABI}-cloud-amd64", v)
    for sv in source_versions:
        text += _stanza("linux-source-6.12", sv, "binutils")
    text += _stanza(f"linux-headers-{ABI}-cloud-amd64", v, f"linux-headers-{ABI}-common (= {v})")
    text += _stanza(f"linux-headers-{ABI}-common", v)
    text += _stanza(f"linux-kbuild-{ABI}", v, "libc6, libelf1t64")
    for name in kmod.TOOLCHAIN + ("libc6", "libelf1t64"):
        text += _stanza(name, "1", "libc6, libasan8" if name == "gcc-14" else "")
    text += _stanza("libasan8", "1")
    archive = Archive(tmp_path / "cache")
    archive._indexes[("trixie", "amd64")] = Index("trixie", "amd64", text)
    return archive


def test_resolve_takes_source_and_headers_at_the_kernel_image_version(tmp_path):
    plan = kmod.resolve(_archive(tmp_path, ("6.12.107-1", "6.12.117-1")))
    assert plan.image.name == f"linux-image-{ABI}-cloud-amd64" and plan.release == f"{ABI}-cloud-amd64"
    assert (plan.source.name, plan.source.version) == ("linux-source-6.12", "6.12.117-1")
    assert [p.name for p in plan.headers] == [f"linux-headers-{ABI}-cloud-amd64", f"linux-headers-{ABI}-common"]
    names = {p.name for p in plan.root}
    assert {"gcc-14", "make", "libc6", "libelf1t64", f"linux-kbuild-{ABI}", f"linux-headers-{ABI}-common"} <= names
    assert "libasan8" not in names                       # kmod.SKIP: never run by a module build
    assert plan.headers_dir == f"/usr/src/linux-headers-{ABI}-cloud-amd64"


def test_resolve_without_the_kernels_source_version_is_one_line(tmp_path):
    with pytest.raises(KmodError) as e:
        kmod.resolve(_archive(tmp_path, ("6.12.107-1",)))
    msg = str(e.value)
    assert "linux-source-6.12 6.12.117-1 (the lab kernel's version) is not in the trixie/amd64 index" in msg
    assert "it has: 6.12.107-1" in msg and "\n" not in msg


# --------------------------------------------------------------------------------------------------
# .modinfo on an ELF object of our own


@pytest.fixture(scope="module")
def fake_module(tmp_path_factory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("pykvm: host lacks a C compiler (gcc or cc)")
    d = tmp_path_factory.mktemp("modinfo")
    (d / "m.c").write_text(
        'static const char modinfo[] __attribute__((section(".modinfo"), used, aligned(1))) =\n'
        '    "license=GPL\\0vermagic=6.12.117+deb13-cloud-amd64 SMP preempt mod_unload modversions \\0"\n'
        '    "name=fake\\0parm=a:first\\0parm=b:second";\n'
        "int fake_init(void) { return 0; }\n")
    subprocess.run([cc, "-c", "-o", str(d / "fake.ko"), str(d / "m.c")], check=True)
    return d / "fake.ko"


def test_read_modinfo_and_vermagic_of_a_ko_and_a_ko_xz(fake_module, tmp_path):
    info = kmod.read_modinfo(fake_module)
    assert info["vermagic"] == "6.12.117+deb13-cloud-amd64 SMP preempt mod_unload modversions "
    assert info["name"] == "fake" and info["license"] == "GPL" and info["parm"] == "b:second"
    xz = tmp_path / "fake.ko.xz"
    xz.write_bytes(lzma.compress(fake_module.read_bytes(), format=lzma.FORMAT_XZ))
    assert kmod.vermagic(xz) == info["vermagic"]


def test_read_modinfo_refuses_non_modules(tmp_path):
    text = tmp_path / "not-elf.ko"
    text.write_text("hello")
    with pytest.raises(KmodError, match="not an ELF object"):
        kmod.read_modinfo(text)
    bad_xz = tmp_path / "bad.ko.xz"
    bad_xz.write_bytes(b"\x7fELF")
    with pytest.raises(KmodError, match="not xz-compressed"):
        kmod.read_modinfo(bad_xz)
    with pytest.raises(KmodError, match="no .modinfo section"):
        kmod.read_modinfo(Path(sys.executable).resolve())


# --------------------------------------------------------------------------------------------------
# patches


@pytest.mark.parametrize("paths,level", [
    (["a/arch/x86/kvm/svm/nested.c", "b/arch/x86/kvm/svm/nested.c"], 1),
    (["linux.orig/virt/kvm/kvm_main.c", "linux/virt/kvm/kvm_main.c"], 1),
    (["arch/x86/kvm/x86.c"], 0),
])
def test_strip_level(paths, level):
    assert kmod._strip_level(paths) == level


def test_check_patch_refuses_files_outside_kvm(tmp_path):
    p = tmp_path / "hdr.patch"
    p.write_text("--- a/include/linux/kvm_host.h\n+++ b/include/linux/kvm_host.h\n@@ -1 +1 @@\n-a\n+b\n")
    with pytest.raises(KmodError) as e:
        kmod.check_patch(p)
    assert "changes include/linux/kvm_host.h, outside arch/x86/kvm and virt/kvm" in str(e.value)
    q = tmp_path / "empty.patch"
    q.write_text("just words\n")
    with pytest.raises(KmodError, match="not a unified diff"):
        kmod.check_patch(q)
    for sneaky in ("arch/x86/kvm/../../../fs/open.c", "arch/x86/kvm/./x86.c", "virt/kvm/../../mm/x.c"):
        r = tmp_path / "sneaky.patch"                 # a path that only looks like KVM's
        r.write_text(f"--- {sneaky}\n+++ {sneaky}\n@@ -1 +1 @@\n-a\n+b\n")
        with pytest.raises(KmodError, match="outside arch/x86/kvm and virt/kvm"):
            kmod.check_patch(r)


def test_apply_patches_applies_a_git_diff(tmp_path):
    tree = _tree(tmp_path)
    p = tmp_path / "ok.patch"
    p.write_text(GOOD_PATCH)
    lines: list[str] = []
    kmod.apply_patches(tree, [p], log=lines.append)
    text = (tree / "arch/x86/kvm/svm/nested.c").read_text()
    assert "KVM_REQ_MMU_SYNC" not in text and "KVM_REQ_TLB_FLUSH_CURRENT" in text
    assert lines == [f"applied {p}"]


def test_a_patch_that_does_not_apply_is_one_line_and_changes_nothing(tmp_path):
    tree = _tree(tmp_path)
    p = tmp_path / "stale.patch"
    p.write_text(GOOD_PATCH.replace("KVM_REQ_MMU_SYNC", "KVM_REQ_MMU_SYNC_OLD"))
    with pytest.raises(KmodError) as e:
        kmod.apply_patches(tree, [p], log=lambda m: None)
    msg = str(e.value)
    assert msg.startswith(f"patch {p} does not apply to Debian's source: ") and "\n" not in msg
    assert "arch/x86/kvm/svm/nested.c: Hunk #1 FAILED" in msg
    assert (tree / "arch/x86/kvm/svm/nested.c").read_text() == NESTED_C
    assert not list(tree.rglob("*.rej")) and not list(tree.rglob("*.orig"))
    # applied once, the same patch again is a reversed one: refused too
    good = tmp_path / "ok.patch"
    good.write_text(GOOD_PATCH)
    kmod.apply_patches(tree, [good], log=lambda m: None)
    with pytest.raises(KmodError, match="does not apply"):
        kmod.apply_patches(tree, [good], log=lambda m: None)


# --------------------------------------------------------------------------------------------------
# the Makefile of the build copy

MAKEFILE = """\
# SPDX-License-Identifier: GPL-2.0

ccflags-y += -I $(srctree)/arch/x86/kvm
ccflags-$(CONFIG_KVM_WERROR) += -Werror

include $(srctree)/virt/kvm/Makefile.kvm

kvm-y += x86.o
"""


def test_prepare_makefile_points_at_the_build_copy(tmp_path):
    tree = _tree(tmp_path)
    (tree / "arch/x86/kvm/Makefile").write_text(MAKEFILE)
    kmod.prepare_makefile(tree)
    text = (tree / "arch/x86/kvm/Makefile").read_text()
    assert "$(srctree)" not in text
    assert "ccflags-y += -I $(KVM_SRC)/arch/x86/kvm" in text and "include $(KVM_SRC)/virt/kvm/Makefile.kvm" in text
    assert f"-I $(KVM_SRC)/{kmod.TRACE_INCLUDE}" in text
    # trace.h's TRACE_INCLUDE_PATH, ../../arch/x86/kvm, from that include dir reaches the copy
    inc = tree / kmod.TRACE_INCLUDE
    assert (inc / "../../arch/x86/kvm/svm/nested.c").resolve() == (tree / "arch/x86/kvm/svm/nested.c").resolve()


def test_prepare_makefile_refuses_an_unknown_layout(tmp_path):
    tree = _tree(tmp_path)
    (tree / "arch/x86/kvm/Makefile").write_text("obj-m += kvm.o\n")
    with pytest.raises(KmodError, match="layout not understood"):
        kmod.prepare_makefile(tree)


# --------------------------------------------------------------------------------------------------
# the command's argument errors: one line, no traceback, before any download


def _cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYKVM_LAB_CACHE=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-m", "pykvm.lab.kmod", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("args,status,expect", [
    (["--patch", "missing.patch"], 2, "argument --patch: missing.patch: no such file"),
    (["--jobs", "0"], 2, "argument -j/--jobs: must be at least 1: 0"),
    (["--jobs", "many"], 2, "argument -j/--jobs: not a number: 'many'"),
    (["--out", "a-file"], 2, "argument --out: a-file: not a directory"),
    (["--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    (["--patch", "hdr.patch"], 3, "changes include/linux/kvm_host.h, outside arch/x86/kvm and virt/kvm"),
])
def test_command_errors_are_one_line(tmp_path, args, status, expect):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "hdr.patch").write_text("--- a/include/linux/kvm_host.h\n+++ b/include/linux/kvm_host.h\n")
    r = _cmd(*args, cwd=tmp_path)
    assert r.returncode == status, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and lines[0].startswith(kmod.PROG)
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "cache" / "debs").exists() or not any((tmp_path / "cache" / "debs").iterdir())


def test_command_help(tmp_path):
    r = _cmd("--help", cwd=tmp_path)
    assert r.returncode == 0
    for opt in ("--patch FILE", "--out DIR", "--jobs N", "--cache DIR", "--intel", "--rebuild"):
        assert opt in r.stdout


# --------------------------------------------------------------------------------------------------
# the mutations of tests/nested/mutations (issue 22 item 4)

MUTATIONS = sorted((Path(__file__).resolve().parents[1] / "nested" / "mutations").glob("*.patch"))


def _lab_cache() -> Path:
    return Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")).expanduser()


@pytest.mark.parametrize("patch", MUTATIONS, ids=lambda p: p.stem)
def test_mutations_change_kvm_sources_only_and_apply_to_a_cached_source(patch, tmp_path):
    level, _ = kmod.check_patch(patch)
    assert level == 1
    sources = sorted((_lab_cache() / "kmod").glob("source-*/.pykvm-source.json"))
    if not sources:
        pytest.skip("no KVM source in the lab cache (python -m pykvm.lab.kmod unpacks it)")
    for stamp in sources:
        tree = tmp_path / stamp.parent.name
        for d in kmod.SOURCE_DIRS:
            shutil.copytree(stamp.parent / d, tree / d)
        kmod.apply_patches(tree, [patch], log=lambda m: None)
        assert "MUTATION (pykvm)" in "".join(f.read_text() for f in (tree / "arch/x86/kvm/svm").glob("*.[ch]"))


def test_there_are_at_least_two_mutations():
    assert len(MUTATIONS) >= 2


# --------------------------------------------------------------------------------------------------
# a build already in the cache (none is made here)


def _cached_results() -> list[Path]:
    return sorted((_lab_cache() / "kmod").glob("modules-*/manifest.json"))


def test_a_cached_build_matches_its_manifest_and_debians_vermagic():
    found = _cached_results()
    if not found:
        pytest.skip("no KVM module build in the lab cache (python -m pykvm.lab.kmod makes one)")
    for man_path in found:
        man = json.loads(man_path.read_text())
        assert man["vermagic_matches_debian"] is True
        assert set(man["modules"]) >= set(kmod.MODULES)
        for name, m in man["modules"].items():
            ko = man_path.parent / name
            assert hashlib.sha256(ko.read_bytes()).hexdigest() == m["sha256"]
            assert kmod.vermagic(ko) == m["vermagic"] == man["reference_vermagic"]
            assert man["kernel"]["release"] in m["vermagic"]
        assert man["source"]["version"] == man["kernel"]["version"]
        assert man["key"] == kmod.build_key(man["kernel"]["version"], [p["sha256"] for p in man["patches"]],
                                            intel=kmod.INTEL_MODULE in man["modules"])
