"""Issue 9: users' own guests beside their tests, built by the fixture with the packaged runtime.

The README's regression-test example runs here verbatim, as its two files in a fresh directory.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from readme_example import write_example

pytestmark = pytest.mark.requires_arch("x86_64")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "cache"))


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(extra)
    return env


def test_readme_example_passes_verbatim(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    names = write_example(d)
    assert sorted(names) == ["msr_guest.c", "test_msr.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                       cwd=d, capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


GUESTS = {
    "long_guest.c": r"""
        #include "pykvm_guest.h"
        void guest_main(void)
        {
            GUEST_SYNC(1, pykvm_params[0] * 2);
            GUEST_ASSERT_EQ(pykvm_params[0], 21);
        }
    """,
    "prot_guest.c": r"""
        #include "pykvm_guest.h"
        void guest_main32(uint32_t magic, void *info)
        {
            (void)info;
            GUEST_SYNC(1, magic);
        }
    """,
    "real_guest.c": r"""
        #include "pykvm_guest.h"
        void guest_main16(void)
        {
            GUEST_SYNC(1, read_cr0() & 1, pykvm_params[0]);
        }
    """,
    "asm_guest.S": r"""
        	.text
        	.globl guest_main
        guest_main:
        	mov $'A', %al
        	mov $0x3f8, %dx
        	outb %al, %dx
        	ret
    """,
}

USER_TESTS = r"""
    from pykvm.report import GuestAssertion
    import pytest

    def test_long(guest_vm):
        m = guest_vm("guests/long_guest.c")
        m.set_params(21)
        assert m.sync(stage=1) == (42,)
        m.done()

    def test_long_assert_names_the_users_file(guest_vm):
        m = guest_vm("guests/long_guest.c")
        m.set_params(5)
        m.sync(stage=1)
        with pytest.raises(GuestAssertion, match=r"long_guest\.c:6: pykvm_params\[0\] == 21"):
            m.done()

    def test_protected_mode_is_taken_from_the_entry_point(guest_vm):
        m = guest_vm("guests/prot_guest.c")
        assert m.sync(stage=1) == (0x2BADB002,)
        m.done()

    def test_real_mode(guest_vm):
        m = guest_vm("guests/real_guest.c", mode="real")
        m.set_params(7)
        assert m.sync(stage=1) == (0, 7)
        m.done()

    def test_assembler_guest(guest_vm):
        m = guest_vm("guests/asm_guest.S")
        r = m.run(timeout=10)
        assert (r.exit, r.console) == ("done", b"A")

    def test_guest_image_only_builds(guest_image):
        p = guest_image("guests/real_guest.c")
        assert p.endswith("real_guest.bin") and __import__("os").path.exists(p[:-4] + ".elf")
"""


def test_guests_beside_the_test_are_built_relative_to_its_file(pytester):
    sub = pytester.mkpydir("suite")
    (sub / "guests").mkdir()
    for name, text in GUESTS.items():
        (sub / "guests" / name).write_text(textwrap.dedent(text))
    (sub / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    # run from elsewhere: the paths must resolve against the test file, not the working dir
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", str(sub))
    res.assert_outcomes(passed=6)
    cache = os.path.join(os.environ["PYKVM_CACHE"], "guests")
    built = sorted(e.split("-")[0] for e in os.listdir(cache) if not e.startswith("."))
    assert built == ["asm_guest", "long_guest", "prot_guest", "real_guest"]   # each built once


def test_compile_error_fails_the_test_with_the_compilers_message(pytester):
    pytester.makefile(".c", broken_guest="#include \"pykvm_guest.h\"\n"
                                         "void guest_main(void) { undefined_call(); }\n")
    pytester.makepyfile(test_broken="""
        def test_broken(guest_vm):
            guest_vm("broken_guest.c")
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=1)
    out = res.stdout.str()
    assert "broken_guest.c:2:" in out and "implicit declaration of function" in out, out
    assert "undefined_call" in out and "Traceback" not in out


def test_pykvm_run_builds_a_source(tmp_path):
    src = tmp_path / "hi.c"
    src.write_text('#include "pykvm_guest.h"\nvoid guest_main(void) { com1_puts("hi\\n"); }\n')
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", str(src)], capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
