"""The pytest framework itself: a failing guest assertion fails the test with the guest's
file:line and values; --ktap writes parseable KTAP; foreign ELF images boot like under QEMU."""
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.requires_arch("x86_64")

FAILING = textwrap.dedent("""
    def test_guest_math(guest_vm):
        guest_vm("assert_fail").done()

    def test_guest_ok(guest_vm):
        guest_vm("cpuid").sync(stage=1)
""")


def parse_ktap(text):
    """A strict-enough KTAP v1 reader for --ktap's layout (one subtest per test module, see
    pykvm/testing/ktap.py): at each level a version line, a plan and results numbered 1..N,
    a subtest's lines indented two more spaces before its parent's result; returns the
    innermost results (the tests) as (verdict, number, name)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    results, rest = _ktap_level(lines, "")
    assert not rest, rest
    return results


def _ktap_level(lines, ind):
    assert lines[0] == ind + "KTAP version 1", lines[0]
    plan = re.fullmatch(re.escape(ind) + r"1\.\.(\d+)", lines[1])
    assert plan, lines[1]
    lines, n, leaves, sub = lines[2:], 0, [], None
    while lines and lines[0].startswith(ind):
        if lines[0].startswith(ind + "  "):
            assert sub is None, lines[0]
            sub, lines = _ktap_level(lines, ind + "  ")
            continue
        r = re.fullmatch(r"(ok|not ok) (\d+) ([^#]*[^#\s])"
                         r"(?: # (SKIP|XFAIL|XPASS|ERROR)(?: .*)?)?", lines[0][len(ind):])
        assert r and int(r.group(2)) == n + 1, f"not result {n + 1}: {lines[0]!r}"
        leaves += sub if sub is not None else [(r.group(1), int(r.group(2)), r.group(3))]
        lines, n, sub = lines[1:], n + 1, None
    assert sub is None and n == int(plan.group(1)), (n, plan.group(0))
    return leaves, lines


def test_failing_guest_assert_fails_pytest_with_file_line_values(pytester):
    pytester.makepyfile(test_guest=FAILING)
    ktap = pytester.path / "out.ktap"
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--ktap={ktap}")
    res.assert_outcomes(passed=1, failed=1)
    out = res.stdout.str()
    assert re.search(r"guest assertion failed at \S*assert_fail\.c:\d+: 1 \+ 1 == 3 "
                     r"\(left = 2 \(0x2\), right = 3 \(0x3\)\)", out), out
    results = parse_ktap(ktap.read_text())
    assert [r[0] for r in results] == ["not ok", "ok"]


MB_ASM = r"""
    .section .text
    .code32
    .align 4
mbh: .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)
    .globl _start
_start:
    mov $stack_top, %esp
    cmp $0x2BADB002, %eax
    jne bad
    mov $msg, %esi
1:  movb (%esi), %bl
    test %bl, %bl
    jz 3f
2:  mov $0x3fd, %dx
    inb %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    inc %esi
    jmp 1b
3:  mov $0xf4, %dx
    mov $0x21, %eax
    outl %eax, %dx
bad:
    mov $0xf4, %dx
    mov $0x7e, %eax
    outl %eax, %dx
    hlt
    .section .data
msg: .asciz "foreign multiboot kernel says hi\n"
    .section .bss
    .space 4096
stack_top:
"""

ELF64_ASM = r"""
    .text
    .globl _start
_start:
    lea msg(%rip), %rsi
1:  movb (%rsi), %al
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    outb %al, %dx
    inc %rsi
    jmp 1b
2:  mov $0xf4, %dx
    mov $0x05, %eax
    outl %eax, %dx
    hlt
msg: .asciz "foreign elf64 says hi\n"
"""


def _build(tmp_path, name, asm, as_flags, ld_flags):
    s, o, e = (tmp_path / f"{name}.{x}" for x in ("S", "o", "elf"))
    s.write_text(asm)
    subprocess.run(["as"] + as_flags + ["-o", str(o), str(s)], check=True)
    subprocess.run(["ld"] + ld_flags + ["-o", str(e), str(o)], check=True)
    return str(e)


def _pykvm_run(image):
    return subprocess.run([sys.executable, "-m", "pykvm", "run", image, "--timeout", "20"],
                          capture_output=True)


def test_foreign_multiboot_elf_matches_qemu(tmp_path):
    img = _build(tmp_path, "mb", MB_ASM, ["--32"], ["-m", "elf_i386", "-Ttext", "0x200000"])
    ours = _pykvm_run(img)
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is installed by .ci/setup"
    theirs = subprocess.run([qemu, "-accel", "kvm", "-kernel", img, "-nodefaults",
                             "-display", "none", "-serial", "stdio", "-no-reboot",
                             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
                            capture_output=True, timeout=120)
    assert ours.stdout == b"foreign multiboot kernel says hi\n"
    assert ours.stdout.replace(b"\r", b"") == theirs.stdout.replace(b"\r", b"")
    assert ours.returncode == theirs.returncode == (0x21 << 1) | 1


def test_foreign_elf64_boots(tmp_path):
    img = _build(tmp_path, "l", ELF64_ASM, ["--64"], ["-m", "elf_x86_64", "-Ttext", "0x400000"])
    r = _pykvm_run(img)
    assert (r.stdout, r.returncode) == (b"foreign elf64 says hi\n", (5 << 1) | 1)


@pytest.mark.parametrize("content,msg", [
    (b"", "not an ELF"),
    (b"\x7fELF\x02\x01\x01" + b"\0" * 9, "ELF"),
])
def test_bad_images_exit_2_with_one_line(tmp_path, content, msg):
    p = tmp_path / "bad.elf"
    p.write_bytes(content)
    r = _pykvm_run(str(p))
    assert r.returncode == 2
    err = r.stderr.decode()
    assert len(err.strip().splitlines()) == 1 and msg in err and "Traceback" not in err


def test_cli_run_json_and_missing_file(tmp_path):
    import json
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--json"], capture_output=True,
                       text=True)
    d = json.loads(r.stdout)
    assert r.returncode == 0 and {"exit", "exit_code", "console", "exits", "seconds"} <= set(d)
    assert "Hello from pykvm guest!" in d["console"] and d["exit"] == "done"
    r = _pykvm_run(str(tmp_path / "missing.elf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr.decode()


def test_fail_closed_skip_policy(pytester):
    pytester.makepyfile(test_policy=textwrap.dedent("""
        import pytest

        @pytest.mark.requires_kvm
        def test_hw_skips_for_no_good_reason():
            pytest.skip("flaky, skipping")

        @pytest.mark.requires_arch("s390x")
        def test_other_arch():
            pass

        def test_plain_skip_is_fine():
            pytest.skip("not a hardware test")
    """))
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    res.assert_outcomes(failed=1, skipped=2)
    out = res.stdout.str()
    assert "fail-closed: hardware test skipped although" in out
    assert "pykvm: host lacks architecture s390x" in out
