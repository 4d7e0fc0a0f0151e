"""Host side of a KVM developer's kernel and modules in the labs (``--kernel``, ``--modules``,
``--kvm-module``, ``--param``): argument parsing, kernel releases from image headers, module
vermagic from real ELF files built with the host's gcc, load order, the module-parameter matrix
and the JUnit names per combination. Nothing here boots QEMU (tests/lab/test_labs.py does)."""

from __future__ import annotations

import json
import lzma
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pykvm.lab import build
from pykvm.lab import devkernel as dk
from pykvm.lab import matrix as mx
from pykvm.lab import qemu as q
from pykvm.lab.__main__ import _parse

RELEASE = "6.12.117+deb13-cloud-amd64"
VERMAGIC = f"{RELEASE} SMP preempt mod_unload modversions "


def make_module(path: Path, name: str, vermagic: str = VERMAGIC, depends: str = "") -> Path:
    """A relocatable ELF object (gcc -c) with a .modinfo section as modpost writes one."""
    if not shutil.which("gcc"):
        pytest.fail("gcc is needed to build the test modules (it builds pykvm's guests too)")
    src = path.with_suffix(".c")
    entries = [f"name={name}", f"vermagic={vermagic}", f"depends={depends}", "license=GPL"]
    src.write_text("".join(
        f'__attribute__((section(".modinfo"), used, aligned(1))) static const char m{i}[] = "{e}";\n'
        for i, e in enumerate(entries)))
    obj = path.with_suffix(".o")
    subprocess.run(["gcc", "-c", "-o", str(obj), str(src)], check=True)
    obj.rename(path)
    src.unlink()
    return path


def nested_stack(d: Path, vermagic: str = VERMAGIC) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return [make_module(d / "irqbypass.ko", "irqbypass", vermagic),
            make_module(d / "kvm.ko", "kvm", vermagic, "irqbypass"),
            make_module(d / "kvm-amd.ko", "kvm_amd", vermagic, "kvm")]


def bzimage(path: Path, version: bytes | None) -> Path:
    """The first bytes of an x86 bzImage: the setup header's HdrS and kernel_version pointer."""
    data = bytearray(0x4000)
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    if version is not None:
        struct.pack_into("<H", data, 0x20E, 0x1000 - 0x200)
        data[0x1000:0x1000 + len(version) + 1] = version + b"\0"
    path.write_bytes(bytes(data))
    return path


def riscv_image(path: Path, banner: bytes | None) -> Path:
    data = bytearray(0x2000)
    data[48:56] = b"RISCV\0\0\0"
    data[56:60] = b"RSC\x05"
    if banner is not None:
        data[0x1000:0x1000 + len(banner)] = banner
    path.write_bytes(bytes(data))
    return path


def parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as ei:
        _parse(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err                  # one line, no usage block
    return err


# -- kernel images ---------------------------------------------------------------------------------

def test_bzimage_release_from_its_setup_header(tmp_path):
    k = bzimage(tmp_path / "bzImage", f"{RELEASE} (debian-kernel@lists.debian.org) #1 SMP".encode())
    assert dk.kernel_release(k, "nested") == RELEASE
    assert dk.kernel_release(bzimage(tmp_path / "old", None), "nested") is None


def test_riscv_image_release_from_its_banner(tmp_path):
    k = riscv_image(tmp_path / "Image", b"Linux version 7.2.13+deb14-riscv64 (debian-kernel@) #1 SMP\0")
    assert dk.kernel_release(k, "riscv") == "7.2.13+deb14-riscv64"
    assert dk.kernel_release(riscv_image(tmp_path / "nobanner", None), "riscv") is None


def test_kernel_of_the_wrong_kind_is_refused(tmp_path):
    elf = make_module(tmp_path / "vmlinux", "x")
    with pytest.raises(dk.LabInputError, match="not an x86 bzImage.*ELF"):
        dk.kernel_release(elf, "nested")
    with pytest.raises(dk.LabInputError, match="not a RISC-V Image"):
        dk.kernel_release(bzimage(tmp_path / "bz", b"6.1"), "riscv")


# -- modules -----------------------------------------------------------------------------------------

def test_modinfo_name_depends_vermagic_and_compressed(tmp_path):
    ko = make_module(tmp_path / "kvm-amd.ko", "kvm_amd", depends="kvm,ccp")
    m = dk.read_module(ko, tmp_path / "w")
    assert (m.name, m.depends, m.release, m.ko) == ("kvm_amd", ["kvm", "ccp"], RELEASE, ko)
    xz = tmp_path / "c" / "kvm-amd.ko.xz"
    xz.parent.mkdir()
    xz.write_bytes(lzma.compress(ko.read_bytes(), format=lzma.FORMAT_XZ))
    mx_ = dk.read_module(xz, tmp_path / "w")
    assert mx_.ko.read_bytes() == ko.read_bytes() and mx_.ko.parent == tmp_path / "w"
    assert mx_.manifest()["vermagic"] == VERMAGIC.strip() and len(mx_.manifest()["sha256"]) == 64


def test_not_a_module_is_one_line(tmp_path):
    bad = tmp_path / "kvm.ko"
    bad.write_bytes(b"not an ELF file")
    with pytest.raises(dk.LabInputError, match="not a kernel module"):
        dk.read_module(bad, tmp_path)
    with pytest.raises(dk.LabInputError, match="no such module file"):
        dk.read_module(tmp_path / "absent.ko", tmp_path)


def test_vermagic_of_another_release_is_refused(tmp_path):
    good = dk.read_module(make_module(tmp_path / "kvm.ko", "kvm"), tmp_path)
    bad = dk.read_module(make_module(tmp_path / "kvm-amd.ko", "kvm_amd", "6.1.0-99-amd64 SMP mod_unload "),
                         tmp_path)
    dk.check_release([good], RELEASE, "Debian's vmlinuz")
    dk.check_release([good, bad], None, "a kernel whose release is unreadable")   # warned by the caller
    with pytest.raises(dk.LabInputError) as ei:
        dk.check_release([good, bad], RELEASE, "Debian's vmlinuz")
    msg = str(ei.value)
    assert "\n" not in msg and "6.1.0-99-amd64" in msg and RELEASE in msg and "kvm-amd.ko" in msg


def test_load_order_follows_depends(tmp_path):
    irq, kvm, amd = (dk.read_module(p, tmp_path) for p in nested_stack(tmp_path / "m"))
    assert [m.name for m in dk.load_order([amd, kvm, irq])] == ["irqbypass", "kvm", "kvm_amd"]
    with pytest.raises(dk.LabInputError, match="given twice"):
        dk.load_order([kvm, kvm])


def test_find_modules_in_a_lib_modules_tree(tmp_path):
    tree = tmp_path / "lib/modules" / RELEASE / "kernel"
    nested_stack(tree / "arch/x86/kvm")
    (tree / "virt/lib").mkdir(parents=True)
    (tree / "arch/x86/kvm/irqbypass.ko").rename(tree / "virt/lib/irqbypass.ko")
    make_module(tree / "tun.ko", "tun")
    found = dk.find_modules(tmp_path, "nested")
    assert [p.name for p in found] == ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"]
    assert [p.name for p in dk.find_modules(tmp_path, "nested", with_net=True)][-1] == "tun.ko"
    assert [p.name for p in dk.find_modules(tmp_path, "riscv")] == ["kvm.ko"]
    shutil.copy(tree / "arch/x86/kvm/kvm.ko", tree / "kvm.ko")
    with pytest.raises(dk.LabInputError, match="kvm found 2 times"):
        dk.find_modules(tmp_path, "nested")
    (tmp_path / "empty").mkdir()
    with pytest.raises(dk.LabInputError, match="none of irqbypass.ko, kvm.ko, kvm-amd.ko"):
        dk.find_modules(tmp_path / "empty", "nested")


# -- what a boot loads ------------------------------------------------------------------------------

def debian_list(d: Path) -> list[tuple[Path, str]]:
    paths = nested_stack(d)
    return [(paths[0], ""), (paths[1], ""), (paths[2], "nested=1"), (d / "tun.ko", ""), (d / "dummy.ko", "")]


def test_plan_default_run_changes_nothing(tmp_path):
    plan = dk.plan_boot("nested", "", [], debian_list(tmp_path / "deb"), False, [], "Debian's")
    assert (plan.lines, plan.files, plan.matrix, plan.cmdline, plan.combos) == (None, {}, None, "", 1)


def test_plan_user_module_replaces_debians_of_that_name(tmp_path):
    amd = dk.read_module(make_module(tmp_path / "kvm-amd.ko", "kvm_amd", depends="kvm"), tmp_path / "w")
    plan = dk.plan_boot("nested", "", [amd], debian_list(tmp_path / "deb"), False,
                        ["kvm_amd.npt=0,1", "kvm_amd.nested=1"], "Debian's")
    assert plan.lines == ["irqbypass.ko", "kvm.ko", "/lab/kmod/main/kvm-amd.ko nested=1", "tun.ko", "dummy.ko"]
    assert plan.files == {"/lab/kmod/main/kvm-amd.ko": amd.ko}
    assert plan.combos == 2 and plan.cmdline == ""
    assert plan.matrix["reload"] is True
    assert [e["module"] for e in plan.matrix["stack"]] == ["irqbypass", "kvm", "kvm_amd"]
    assert plan.matrix["stack"][0]["path"] == "/lab/modules/irqbypass.ko"
    assert [c["id"] for c in plan.matrix["combos"]] == ["kvm_amd.npt=0", "kvm_amd.npt=1"]
    assert plan.manifest["modules"][0]["vermagic"] == VERMAGIC.strip()


def test_plan_developer_kernel_without_kvm_modules_is_built_in(tmp_path):
    deb = debian_list(tmp_path / "deb")
    plan = dk.plan_boot("nested", "", [], deb, True, ["kvm_amd.npt=0"], "--kernel bzImage")
    assert plan.lines == [] and plan.manifest["kvm_built_in"]
    assert plan.cmdline == "kvm_amd.nested=1 kvm_amd.npt=0" and plan.matrix["reload"] is False
    with pytest.raises(dk.LabInputError, match="built into --kernel bzImage.*one value"):
        dk.plan_boot("nested", "", [], deb, True, ["kvm_amd.npt=0,1"], "--kernel bzImage")


def test_plan_developer_kernel_loads_only_the_given_modules(tmp_path):
    mods = [dk.read_module(p, tmp_path / "w") for p in reversed(nested_stack(tmp_path / "dev"))]
    plan = dk.plan_boot("nested", "x", mods, debian_list(tmp_path / "deb"), True, [], "--kernel bzImage")
    assert plan.lines == ["/lab/kmod/x/irqbypass.ko", "/lab/kmod/x/kvm.ko", "/lab/kmod/x/kvm-amd.ko nested=1"]


def test_plan_param_for_a_module_outside_the_stack_is_refused(tmp_path):
    with pytest.raises(dk.LabInputError, match="no module tun in the lab's KVM modules"):
        dk.plan_boot("nested", "", [], debian_list(tmp_path / "deb"), False, ["tun.x=1"], "Debian's")


# -- the matrix --------------------------------------------------------------------------------------

def test_param_parsing():
    assert mx.parse_param("kvm-amd.npt=0,1") == mx.ParamSpec("kvm_amd", "npt", ("0", "1"))
    for bad, why in [("npt=0", "expected MODULE.PARAM"), ("kvm_amd.npt", "expected"),
                     ("kvm_amd.npt=0,", "empty value"), ("kvm_amd.npt=0,0", "given twice"),
                     ("kvm_amd.npt=a b", "blank")]:
        with pytest.raises(ValueError, match=why):
            mx.parse_param(bad)
    with pytest.raises(ValueError, match="kvm_amd.npt given twice"):
        mx.parse_params(["kvm_amd.npt=0", "kvm_amd.npt=1"])


def test_matrix_expansion_is_the_cartesian_product():
    specs = mx.parse_params(["kvm_amd.npt=0,1", "kvm_amd.nested=1", "kvm.tdp_mmu=N,Y"])
    combos = mx.expand(specs)
    assert [c.id for c in combos] == [
        "kvm_amd.npt=0,kvm.tdp_mmu=N", "kvm_amd.npt=0,kvm.tdp_mmu=Y",
        "kvm_amd.npt=1,kvm.tdp_mmu=N", "kvm_amd.npt=1,kvm.tdp_mmu=Y"]
    assert combos[1].params == {"kvm_amd": {"npt": "0", "nested": "1"}, "kvm": {"tdp_mmu": "Y"}}
    assert [c.id for c in mx.expand(mx.parse_params(["kvm_amd.npt=0"]))] == ["kvm_amd.npt=0"]
    assert mx.expand([]) == []
    assert mx.describe(mx.merged({"kvm_amd": {"nested": "1"}}, {"kvm_amd": {"npt": "0"}})) == \
        "kvm_amd.nested=1 kvm_amd.npt=0"


def test_arguments(tmp_path, capsys):
    _, o = _parse(["nested", "tests/nested/test_nested.py"])
    assert (o.kernel, o.modules, o.params, o.extra_boots) == (None, [], [], [])
    mods = nested_stack(tmp_path / "m")
    _, o = _parse(["nested", "--modules", str(tmp_path / "m"), "--param", "kvm_amd.npt=0,1"])
    assert [p.name for p in o.modules] == ["irqbypass.ko", "kvm.ko", "kvm-amd.ko"]
    assert o.params == ["kvm_amd.npt=0,1"]
    other = tmp_path / "o" / "kvm-amd.ko"
    other.parent.mkdir()
    shutil.copy(mods[2], other)
    _, o = _parse(["nested", "--modules", str(tmp_path / "m"), "--kvm-module", str(other)])
    assert o.modules[-1] == other.resolve() and len(o.modules) == 3
    k = bzimage(tmp_path / "bzImage", RELEASE.encode())
    _, o = _parse(["nested", "--kernel", str(k)])
    assert o.kernel == k.resolve()
    assert "not an x86 bzImage" in parse_error(capsys, ["nested", "--kernel", str(mods[0])])
    assert "no such file" in parse_error(capsys, ["nested", "--kvm-module", str(tmp_path / "nope.ko")])
    assert "not a module file name" in parse_error(capsys, ["nested", "--kvm-module", str(k)])
    assert "expected MODULE.PARAM" in parse_error(capsys, ["nested", "--param", "npt=0,1"])
    assert "no module kvm_intel" in parse_error(capsys, ["nested", "--param", "kvm_intel.ept=0"])
    assert "not with --shell" in parse_error(capsys, ["nested", "--shell", "--param", "kvm_amd.npt=0"])
    (tmp_path / "empty").mkdir()
    assert "none of" in parse_error(capsys, ["nested", "--modules", str(tmp_path / "empty")])


# -- JUnit per combination ---------------------------------------------------------------------------

def pytest_junit(tmp_path: Path, name: str, body: str) -> bytes:
    """The JUnit XML of a real pytest run of ``body``."""
    t = tmp_path / f"test_{name}.py"
    t.write_text(body)
    xml = tmp_path / f"{name}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(t),
                    f"--junitxml={xml}"], cwd=tmp_path, capture_output=True)
    return xml.read_bytes()


BODY = ("import os, pytest\n"
        "def test_a(): pass\n"
        "@pytest.mark.parametrize('n', [1])\n"
        "def test_b(n): assert os.environ.get('FAIL') != '1'\n"
        "def test_c(): pytest.skip('no')\n")


def test_junit_names_and_table_per_combination(tmp_path, monkeypatch):
    j0 = pytest_junit(tmp_path, "zero", BODY)
    monkeypatch.setenv("FAIL", "1")
    j1 = pytest_junit(tmp_path, "one", BODY)
    suites = mx.tag_suites(j0, "kvm_amd.npt=0", "kvm_amd.nested=1 kvm_amd.npt=0", "kvm_amd.nested=1 kvm_amd.npt=N")
    suites += mx.tag_suites(j1, "kvm_amd.npt=1", "kvm_amd.nested=1 kvm_amd.npt=1", "kvm_amd.nested=1 kvm_amd.npt=Y")
    suites.append(mx.error_suite("kvm_amd.npt=2", "load_modules", "insmod: Invalid argument"))
    merged = mx.merge_suites(suites)
    # the lab's own JUnit (one boot: names as the inner run made them)
    root = q.merge_junit([q.BootResult("nested", 1, "", junit=merged)], tmp_path / "nested.xml", "nested")
    names = [tc.get("name") for tc in root.iter("testcase")]
    assert "test_a[kvm_amd.npt=0]" in names and "test_b[1][kvm_amd.npt=1]" in names
    assert "load_modules[kvm_amd.npt=2]" in names
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("7", "1", "1", "2")
    tc = next(t for t in root.iter("testcase") if t.get("name") == "test_a[kvm_amd.npt=0]")
    assert {p.get("name"): p.get("value") for p in tc.iter("property")} == {"lab_combination": "kvm_amd.npt=0"}
    suite_props = {p.get("name"): p.get("value") for p in list(root.iter("testsuite"))[0].find("properties")}
    assert suite_props["lab_module_values"] == "kvm_amd.nested=1 kvm_amd.npt=N"
    table = mx.combo_table(ET.tostring(root))
    assert table[0].split()[:4] == ["combination", "passed", "failed", "skipped"]
    assert table[1].split()[:4] == ["kvm_amd.npt=0", "2", "0", "1"]
    assert table[2].split()[:4] == ["kvm_amd.npt=1", "1", "1", "1"] and table[2].endswith("test_b[1][kvm_amd.npt=1]")
    assert table[3].split()[:4] == ["kvm_amd.npt=2", "0", "1", "0"]


def test_default_run_names_are_unchanged(tmp_path):
    j = pytest_junit(tmp_path, "plain", BODY)
    root = q.merge_junit([q.BootResult("nested", 0, "", junit=j)], tmp_path / "nested.xml", "nested")
    assert sorted(tc.get("name") for tc in root.iter("testcase")) == ["test_a", "test_b[1]", "test_c"]
    assert mx.combo_table(j) == []


def test_combined_status():
    assert mx.combined_status([0, 0]) == 0
    assert mx.combined_status([0, 1, 2]) == 1
    assert mx.combined_status([5, 5]) == 5
    assert mx.combined_status([0, 5]) == 0


# -- inside the lab (run here on a stand-in /sys/module tree; the lab runs it on its own) ------------

def sysfs(tmp_path: Path) -> Path:
    s = tmp_path / "sys_module"
    (s / "kvm_amd/parameters").mkdir(parents=True)
    (s / "kvm_amd/parameters/nested").write_text("1\n")
    (s / "kvm_amd/parameters/npt").write_text("Y\n")
    return s


def test_unknown_parameter_or_module_is_one_clear_line(tmp_path):
    s = str(sysfs(tmp_path))
    assert mx.check_known([{"params": {"kvm_amd": {"npt": "0"}}}], s) == ""
    why = mx.check_known([{"params": {"kvm_amd": {"nopt": "0"}}}], s)
    assert why == "--param kvm_amd.nopt: kvm_amd has no parameter nopt (its parameters: nested, npt)"
    assert "module kvm_intel is not loaded" in mx.check_known([{"params": {"kvm_intel": {"ept": "0"}}}], s)


def test_guest_main_runs_each_combination(tmp_path):
    s = sysfs(tmp_path)
    (tmp_path / "test_g.py").write_text(BODY)
    args = tmp_path / "args.json"
    args.write_text(json.dumps([str(tmp_path / "test_g.py"), "-q", "-p", "no:cacheprovider",
                                f"--junitxml={tmp_path / 'junit.xml'}"]))
    conf = tmp_path / "lab.conf"
    conf.write_text("NONCE=abc\n")
    combos = mx.expand(mx.parse_params(["kvm_amd.npt=0,1"]))
    m = tmp_path / "matrix.json"
    # reload False: the stand-in tree cannot load modules; the lab's boots reload them for real
    m.write_text(json.dumps(mx.config([], {"kvm_amd": {"nested": "1"}}, combos, reload=False)))
    assert mx.guest_main(str(m), str(args), str(conf), str(s)) == 0
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert sorted(tc.get("name") for tc in root.iter("testcase")) == sorted(
        f"{n}[kvm_amd.npt={v}]" for n in ("test_a", "test_b[1]", "test_c") for v in (0, 1))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mx.config([], {}, mx.expand(mx.parse_params(["kvm_amd.nopt=0"])), reload=False)))
    assert mx.guest_main(str(bad), str(args), str(conf), str(s)) == 3


def test_guest_main_failure_marker(tmp_path, capsys):
    s = sysfs(tmp_path)
    args = tmp_path / "args.json"
    args.write_text(json.dumps(["--junitxml=/nonexistent/junit.xml"]))
    conf = tmp_path / "lab.conf"
    conf.write_text("NONCE=n0nce\n")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(mx.config([], {}, mx.expand(mx.parse_params(["kvm_amd.x=0"])), reload=False)))
    assert mx.guest_main(str(bad), str(args), str(conf), str(s)) == 3
    out = capsys.readouterr().out
    res = q.parse_console(out.splitlines(), "n0nce", "nested")
    assert res.status == 3 and "kvm_amd has no parameter x" in res.reason


# -- the runner's files for extra boots -------------------------------------------------------------

def test_extra_boot_names_and_files(tmp_path):
    opts = build.Options(cache=tmp_path, out=tmp_path, extra_boots=[build.ExtraBoot("more", ["tests/lab"])])
    with pytest.raises(dk.LabInputError, match="extra boot name 'more'"):
        build._user_modules("nested", opts, tmp_path, {})
    mods = nested_stack(tmp_path / "m")
    opts = build.Options(cache=tmp_path, out=tmp_path, params=["kvm_amd.npt=0,1"],
                         extra_boots=[build.ExtraBoot("rebuilt", ["tests/lab/inner_smoke"], modules=mods,
                                                      params=["kvm_amd.nested=1"])])
    user = build._user_modules("nested", opts, tmp_path / "w", {})

    plans = {b: dk.plan_boot("nested", b, user[b], debian_list(tmp_path / "deb"), False,
                             opts.params if not b else opts.extra_boots[0].params, "Debian's")
             for b in ("", "rebuilt")}
    files, tests = build._boot_files(build.NESTED, opts, plans)
    assert tests == {"rebuilt": ["tests/lab/inner_smoke"]}
    assert {"lab/matrix.json", "lab/matrix-more.json", "lab/matrix-qemu.json", "lab/matrix-rebuilt.json",
            "lab/modules-run-rebuilt.list", "lab/kmod/rebuilt/kvm.ko"} <= set(files)
    assert "lab/modules-run.list" not in files               # the main boots: Debian's, from the base
    assert files["lab/modules-run-rebuilt.list"].decode().splitlines()[:3] == [
        "/lab/kmod/rebuilt/irqbypass.ko", "/lab/kmod/rebuilt/kvm.ko", "/lab/kmod/rebuilt/kvm-amd.ko nested=1"]


def test_smp_argument(capsys):
    assert _parse(["nested"])[1].smp is None                     # the lab's default
    assert _parse(["nested", "--smp", "2", "tests/nested/test_svm_tlb.py"])[1].smp == 2
    assert "1 to 8 CPUs" in parse_error(capsys, ["nested", "--smp", "0"])
    assert "not a number of CPUs" in parse_error(capsys, ["riscv", "--smp", "two"])
