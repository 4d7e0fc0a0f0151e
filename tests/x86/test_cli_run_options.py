"""`pykvm run --param`, `--cpuid` and `--cpu-features`, and `pykvm regs`' header and MSR names,
end to end through ``python -m pykvm`` on real KVM (issue 21, item 5). The guest
(cli_cpuid.c) prints its pykvm_params[] and the CPUID leaves they name, so each option is
checked by what the guest itself reads."""
import json
import re
import subprocess
import sys

import pytest

from _asm import SPIN, asm16

pytestmark = pytest.mark.requires_arch("x86_64")

PYKVM = [sys.executable, "-m", "pykvm"]
RDTSCP = 1 << 27            # CPUID.80000001H:EDX[27]
LAHF_LM = 1 << 0            # CPUID.80000001H:ECX[0]
HYPERVISOR = 1 << 31        # CPUID.1:ECX[31]


def pykvm(*args, timeout=60):
    return subprocess.run(PYKVM + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def guest_run(image, *args):
    """Run the guest with ``args``; its output as (params list, {(leaf, sub): regs dict})."""
    r = pykvm("run", image, "--no-input", *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r
    params, leaves = None, {}
    for line in r.stdout.splitlines():
        if line.startswith("params "):
            params = [int(x, 16) for x in line.split()[1:]]
        m = re.fullmatch(r"cpuid (\w+)\.(\w+) (.*)", line)
        if m:
            regs = dict(kv.split("=") for kv in m.group(3).split())
            leaves[int(m.group(1), 16), int(m.group(2), 16)] = {k: int(v, 16)
                                                                for k, v in regs.items()}
    assert params is not None and len(params) == 16, r.stdout
    return params, leaves


@pytest.fixture
def image(guest_image):
    return guest_image("cli_cpuid.c")


def one_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_param_values_reach_the_guest_in_order(image):
    """Repeated --param lists join from index 0; decimal, hex and the whole 64 bits arrive."""
    params, leaves = guest_run(image, "--param", "0,0xffffffffffffffff",
                               "--param", "18446744073709551614,42")
    assert params == [0, 2 ** 64 - 1, 2 ** 64 - 2, 42] + [0] * 12
    assert leaves == {}


def test_cpu_features_and_cpuid_change_what_the_guest_reads(image):
    """--cpu-features flips RDTSCP and LAHF_LM (the other way from this host's default, so a
    change is seen whatever the host offers), --cpuid sets a whole register, also of a sub-leaf
    KVM does not list; other sub-leaves and leaves keep their values."""
    leaves_asked = ["0x80000001", "0x24000000a", "0x4000000a", "0", "1"]
    plain = guest_run(image, "--param", f"{len(leaves_asked)}," + ",".join(leaves_asked))[1]
    ext = plain[0x80000001, 0]
    rdtscp_on = not ext["edx"] & RDTSCP
    lahf_on = not ext["ecx"] & LAHF_LM
    features = f"{'+' if rdtscp_on else '-'}rdtscp,lahf_lm={'on' if lahf_on else 'off'}"
    params, leaves = guest_run(image, "--param", f"{len(leaves_asked)}," + ",".join(leaves_asked),
                               f"--cpu-features={features}",
                               "--cpuid", "0x4000000a.2:ecx=0x55aa",
                               "--cpuid", "0x80000001:eax=0x1234")
    got = leaves[0x80000001, 0]
    assert bool(got["edx"] & RDTSCP) == rdtscp_on, (plain, leaves)
    assert bool(got["ecx"] & LAHF_LM) == lahf_on, (plain, leaves)
    assert got["eax"] == 0x1234
    assert got["edx"] & ~RDTSCP == ext["edx"] & ~RDTSCP            # the other bits stay
    assert got["ecx"] & ~LAHF_LM == ext["ecx"] & ~LAHF_LM
    assert leaves[0x4000000a, 2] == {"eax": 0, "ebx": 0, "ecx": 0x55aa, "edx": 0}
    assert leaves[0x4000000a, 0] == plain[0x4000000a, 0]          # its index is significant
    assert leaves[0, 0] == plain[0, 0]
    assert leaves[1, 0]["ecx"] & HYPERVISOR                        # the machine's default stays


def test_cpuid_last_wins_over_cpu_features(image):
    """--cpuid is applied after --cpu-features: the whole register it gives is what the guest
    reads."""
    _, leaves = guest_run(image, "--param", "1,0x80000001", "--cpu-features", "+rdtscp",
                          "--cpuid", "0x80000001:edx=0x800")
    assert leaves[0x80000001, 0]["edx"] == 0x800


def test_param_for_an_image_without_pykvm_params_is_bad_input(tmp_path):
    spin = tmp_path / "spin.bin"
    spin.write_bytes(asm16(SPIN))
    r = pykvm("run", spin, "--no-input", "--param", "1")
    assert r.returncode == 2
    assert one_line(r) == f"pykvm: --param: {spin} has no pykvm_params symbol"
    r = pykvm("run", spin, "--no-input", "--json", "--param", "1")
    assert r.returncode == 2 and json.loads(r.stdout)["exit"] == "bad_input"


@pytest.mark.parametrize("args, says", [
    (["--param", "1,x"], "guest parameter: not an integer: 'x'"),
    (["--param", "0x10000000000000000"], "out of range (0..0xffffffffffffffff)"),
    (["--param", ",".join(["1"] * 17)], "17 values; the guest's pykvm_params[] holds 16"),
    (["--param", ",".join(["1"] * 9), "--param", ",".join(["2"] * 8)], "17 values in all"),
    (["--cpuid", "1:eax"], "is not LEAF[.SUB]:REG=VALUE"),
    (["--cpuid", "1:esi=0"], "the register must be eax, ebx, ecx or edx"),
    (["--cpuid", "1:eax=0x100000000"], "CPUID eax: '0x100000000' is out of range"),
    (["--cpuid", "0x1.zz:eax=0"], "CPUID sub-leaf: not an integer"),
    (["--cpu-features", "+nosuchfeature"], "unknown CPUID feature 'nosuchfeature'"),
    (["--cpu-features", "avx=maybe"], "a feature is =on or =off"),
    (["--cpu-features", "+rdtscp,"], "is not +FEATURE, -FEATURE or FEATURE=on|off"),
])
def test_bad_option_values_are_one_usage_line(image, args, says):
    r = pykvm("run", image, "--no-input", *args)
    assert r.returncode == 2, r
    line = one_line(r)
    assert line.startswith("pykvm run: error: argument --") and says in line, line
    assert r.stdout == ""


def test_regs_has_a_header_and_msr_names():
    from pykvm.arch.x86.msrs import msr_name
    from pykvm.kvm import Kvm
    with Kvm() as kvm:
        listed = kvm.msr_index_list()
    r = pykvm("regs")
    assert r.returncode == 0 and r.stderr == "", r
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["REGISTER", "ONE_REG", "ID", "SIZE", "VALUE"]
    assert lines[1].split()[0] == "rax"
    msr_rows = {int(ln.split()[1], 16): ln for ln in lines if ln.startswith("msr ")}
    assert set(msr_rows) == set(listed)
    named = 0
    for idx, ln in msr_rows.items():
        name = msr_name(idx)
        label = ln.split()[:3] if name else ln.split()[:2]
        assert label == ["msr", f"{idx:#x}"] + ([name] if name else []), ln
        named += bool(name)
    for idx, name in ((0x10, "IA32_TIME_STAMP_COUNTER"), (0x277, "IA32_PAT"),
                      (0x174, "IA32_SYSENTER_CS"), (0xC0000081, "IA32_STAR")):
        if idx in msr_rows:
            assert f"msr {idx:#x} {name} " in msr_rows[idx]
    assert named >= len(msr_rows) // 2, "most MSRs KVM lists should have a name"


def test_regs_json_keeps_its_keys_and_adds_msr_names():
    r = pykvm("regs", "--json")
    assert r.returncode == 0, r
    rows = json.loads(r.stdout)
    from pykvm.arch.x86.msrs import msr_name
    msrs = 0
    for d in rows:
        assert set(d) == {"name", "id", "size", "value", "msr", "msr_name"}, d
        if d["name"].startswith("msr "):
            msrs += 1
            idx = int(d["name"].split()[1], 16)            # the old name stays as it was
            assert d["msr"] == hex(idx) and int(d["id"], 16) & 0xFFFFFFFF == idx
            assert d["msr_name"] == msr_name(idx)
        else:
            assert d["msr"] is None and d["msr_name"] is None
    assert msrs > 0 and rows[0]["name"] == "rax"


# -- GUEST: a file wins over a built-in name; empty and missing names (a newcomer's findings) ---
def _one_line(r) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("name", ["Image", "vmlinux", "myguest"])
def test_a_file_in_the_current_directory_is_run_not_looked_up(tmp_path, name):
    """`pykvm run Image` with ./Image a guest: the file is booted (as QEMU's -kernel Image),
    not refused as an unknown built-in guest's name; a name that is no file still is one."""
    from pykvm import guests
    with open(guests.path("hello"), "rb") as f:
        (tmp_path / name).write_bytes(f.read())
    r = subprocess.run(PYKVM + ["run", name, "--no-input", "--timeout", "30"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "Hello from pykvm guest!" in r.stdout, r
    (tmp_path / name).unlink()
    r = subprocess.run(PYKVM + ["run", name, "--no-input"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and f"no built-in x86_64 guest named '{name}'" in _one_line(r)


def test_an_empty_guest_name_is_refused_not_the_default():
    r = pykvm("run", "", "--no-input")
    assert r.returncode == 2 and "empty name" in _one_line(r) and r.stdout == ""


def test_a_missing_image_is_one_message_however_it_is_named(tmp_path):
    seen = set()
    for name in ("x.bin", "./x.bin", "x.elf", "x.c", str(tmp_path / "x.bin")):
        r = subprocess.run(PYKVM + ["run", name, "--no-input"], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
        line = _one_line(r)
        assert r.returncode == 2 and line == f"pykvm: no such file: {name!r}", line
        seen.add(line.split(":")[1])
    assert seen == {" no such file"}


def test_a_long_guest_name_is_quoted_short():
    """A 5000-character name is not echoed whole: 60 characters, then "..."."""
    r = pykvm("run", "a" * 5000, "--no-input")
    line = _one_line(r)
    assert r.returncode == 2 and f"'{'a' * 60}'..." in line and "a" * 61 not in line
    assert len(line) < 400
