"""Output and path edges of the tools that need no /dev/kvm (issue 16, faults 8, 9, 11):
``pykvm guest build -o``, ``python -m pykvm.lab``'s path options and stdout, the fuzzer's
argument errors and findings directory, and the shared stdout machinery (pykvm._cliutil).
Every failure is one line on stderr with the documented status, never a traceback, never
success with the output lost, and nothing a path names is destroyed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sh(cmd: str, timeout=120, cwd=ROOT):
    """Run ``cmd`` under /bin/sh (so that ``>&-`` and ``>/dev/full`` mean what they say)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


PY = f"{sys.executable} -m"


# -- pykvm guest build -o -----------------------------------------------------------------------
@pytest.fixture
def source(tmp_path):
    src = tmp_path / "g.c"
    src.write_text('#include "pykvm_guest.h"\nvoid guest_main(void) { }\n')
    return src


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hardlink"])
def test_guest_build_refuses_output_naming_the_source(tmp_path, source, how):
    before = source.read_bytes()
    out = {"same": str(source),
           "dotted": str(tmp_path / "." / "sub" / ".." / "g.c"),
           "symlink": str(tmp_path / "link.c"),
           "hardlink": str(tmp_path / "hard.c")}[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        os.symlink(source, out)
    elif how == "hardlink":
        os.link(source, out)
    r = sh(f"{PY} pykvm guest build {source} -o {out}")
    assert r.returncode == 2, r
    assert "input file" in one_line(r.stderr)
    assert source.read_bytes() == before and r.stdout == ""


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_guest_build_output_paths(tmp_path, source):
    """A missing directory is refused as gcc does (nothing created); a file where a directory
    should be, a directory as the output, a real-mode image named *.elf: one line, 2."""
    for out, words in ((tmp_path / "nodir" / "x.elf", "No such file or directory"),
                       (source / "x.elf", "Not a directory"),
                       (tmp_path, "directory")):
        r = sh(f"{PY} pykvm guest build {source} -o {out}")
        assert r.returncode == 2 and words in one_line(r.stderr), (out, r)
    assert not (tmp_path / "nodir").exists()
    real = tmp_path / "r.c"
    real.write_text('#include "pykvm_guest.h"\nvoid guest_main16(void) { }\n')
    r = sh(f"{PY} pykvm guest build {real} -o {tmp_path / 'r.elf'}")
    assert r.returncode == 2 and "OUT.bin" in one_line(r.stderr)
    # a real-mode image whose ELF (OUT.elf) would be the source: refused
    src_elf = tmp_path / "s.elf"
    os.link(real, src_elf)
    r = sh(f"{PY} pykvm guest build {real} -o {tmp_path / 's.bin'}")
    assert r.returncode == 2 and "input file" in one_line(r.stderr)
    assert src_elf.read_bytes() == real.read_bytes()


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_guest_build_output_written_through_or_replaced(tmp_path, source):
    """-o over a regular file replaces it atomically (its mode kept); -o through a symlink
    writes the link's target and keeps the link; -o /dev/null writes through the device."""
    old = tmp_path / "old.elf"
    old.write_bytes(b"old")
    old.chmod(0o640)
    r = sh(f"{PY} pykvm guest build {source} -o {old}")
    assert r.returncode == 0, r.stderr
    assert old.read_bytes()[:4] == b"\x7fELF" and (old.stat().st_mode & 0o777) == 0o640
    link = tmp_path / "link.elf"
    target = tmp_path / "target.elf"
    os.symlink(target.name, link)
    r = sh(f"{PY} pykvm guest build {source} -o {link}")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and target.read_bytes()[:4] == b"\x7fELF"
    r = sh(f"{PY} pykvm guest build {source} -o /dev/null")
    assert r.returncode == 0 and os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# -- python -m pykvm.lab (arguments and stdout only: no lab is run) ----------------------------
@pytest.mark.parametrize("redir,code", [(">/dev/full", 8), (">&-", 8)])
def test_lab_help_on_broken_stdout(redir, code):
    r = sh(f"{PY} pykvm.lab --help {redir}")
    assert r.returncode == code
    assert "cannot write to stdout" in one_line(r.stderr)


def test_lab_help_with_stderr_closed():
    r = sh(f"{PY} pykvm.lab --help 2>&-")
    assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("args", [
    "riscv --out /proc/version",
    "riscv --out /dev/null",
    "nested --cache /dev/null/x",
    "nested --cache /proc/version",
    "riscv --out {file}",
    "riscv --cache {file}/sub",
    "riscv --out ''",
    "bogus",
    "riscv --timeout x",
])
def test_lab_path_options_refused_in_one_line(tmp_path, args):
    f = tmp_path / "file"
    f.write_text("keep")
    r = sh(f"{PY} pykvm.lab " + args.format(file=f), timeout=60)
    assert r.returncode == 2, r
    line = one_line(r.stderr)
    assert line.startswith("python -m pykvm.lab: error:")
    assert f.read_text() == "keep" and os.path.exists("/dev/null")


# -- python -m pykvm.fuzz (arguments only here; runs are in tests/x86/test_cli_edges.py) --------
@pytest.mark.parametrize("redir", [">/dev/full", ">&-"])
def test_fuzz_help_on_broken_stdout(redir):
    r = sh(f"{PY} pykvm.fuzz --help {redir}")
    assert r.returncode == 8
    assert "cannot write to stdout" in one_line(r.stderr)


@pytest.mark.parametrize("args", ["--bogus", "--runs 0", "--replay /nonexistent",
                                  "--out /proc/version --runs 1", "--out /dev/null --runs 1",
                                  "--out {file} --runs 1", "--out {file}/sub --runs 1"])
@pytest.mark.parametrize("as_json", [False, True])
def test_fuzz_bad_arguments(tmp_path, args, as_json):
    f = tmp_path / "file"
    f.write_text("keep")
    cmd = f"{PY} pykvm.fuzz " + args.format(file=f) + (" --json" if as_json else "")
    r = sh(cmd, timeout=60)
    assert r.returncode == 2, r
    line = one_line(r.stderr)
    if as_json:
        obj = json.loads(r.stdout)
        assert obj["exit_code"] == 2 and obj["detail"] == line
    else:
        assert r.stdout == ""
    assert f.read_text() == "keep"


def test_fuzz_reproducer_that_cannot_be_saved_is_told_once(tmp_path, capsys):
    """A findings directory that stops taking reproducers (here: a file put where it was) loses
    no finding silently: one line, the finding kept with file None, and the run's status is 8."""
    from pykvm import fuzz
    out = tmp_path / "findings"
    sup = fuzz.Supervisor(runs=1, seed=0, jobs=1, deadline=0.1, modes=["long"], max_vcpus=1,
                          out_dir=str(out))
    f = sup._finding("crash", 3, detail="first")
    assert f["file"] and json.loads(open(f["file"]).read())["index"] == 3
    shutil.rmtree(out)
    out.write_text("not a directory")
    f2 = sup._finding("hang", 4, detail="second")
    f3 = sup._finding("hang", 5, detail="third")
    assert f2["file"] is None and f3["file"] is None and sup.save_error is not None
    err = capsys.readouterr().err
    assert err.count("cannot write the reproducer") == 1 and "Traceback" not in err
    assert out.read_text() == "not a directory"


def test_fuzz_reproducer_written_through_a_symlink(tmp_path):
    """A reproducer name that is a symlink is written through (the link stays), atomically."""
    from pykvm import fuzz
    out = tmp_path / "findings"
    out.mkdir()
    target = tmp_path / "elsewhere.json"
    os.symlink(target, out / "crash-s0-i7.json")
    sup = fuzz.Supervisor(runs=1, seed=0, jobs=1, deadline=0.1, modes=["long"], max_vcpus=1,
                          out_dir=str(out), quiet=True)
    f = sup._finding("crash", 7, detail="x")
    assert os.path.islink(out / "crash-s0-i7.json")
    assert json.loads(target.read_text())["index"] == 7 and f["file"]


def test_in_process_main_gives_the_callers_signal_handlers_back():
    """cli.main() called from Python (a test, another program) restores the SIGINT/SIGTERM
    handlers it found: one of pykvm's left behind made a child that pyroute2 forks and ends with
    SIGTERM raise pykvm's exception instead of exiting, and run the rest of the test session."""
    import signal

    from pykvm import cli

    def mine(signum, frame):
        pass
    old = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main(["run", "--no-input", "--vcpus", "0"]) == 2
        assert cli.main(["guests", "--help"]) == 0
        assert all(signal.getsignal(s) is mine for s in old)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- a newcomer's findings: guest build -o in real mode, statuses, quoting, digits --------------
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_real_mode_output_is_out_bin_with_out_elf_as_help_says(tmp_path):
    """`guest build -o OUT` of a real-mode guest writes OUT.bin and OUT.elf (its --help), and
    prints OUT.bin, which `pykvm run` takes as the flat binary it is; -o X.bin is that name."""
    real = tmp_path / "r.c"
    real.write_text('#include "pykvm_guest.h"\nvoid guest_main16(void) { }\n')
    r = sh(f"{PY} pykvm guest build {real} -o {tmp_path / 'OUT'}")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "OUT.bin"), r
    assert sorted(os.listdir(tmp_path)) == ["OUT.bin", "OUT.elf", "r.c"]
    r = sh(f"{PY} pykvm guest build {real} -o {tmp_path / 'b.bin'}")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "b.bin"), r
    assert (tmp_path / "b.elf").exists() and not (tmp_path / "b.bin.bin").exists()
    help_text = sh(f"{PY} pykvm guest build --help").stdout
    assert "real mode: OUT.bin, with OUT.elf beside it" in " ".join(help_text.split())


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_guest_build_failure_status_is_what_help_and_the_status_table_say(tmp_path):
    """A source that does not compile is bad input (pykvm.status.BAD_INPUT, the table has no
    1), and `guest build --help` says so."""
    from pykvm import status
    help_text = " ".join(sh(f"{PY} pykvm guest build --help").stdout.split())
    assert "exit status (see pykvm.status): 0 built; 2 bad input" in help_text
    assert "1 the compiler" not in help_text and "compile" in help_text
    bad = tmp_path / "bad.c"
    bad.write_text("void guest_main(void) { oops }\n")
    r = sh(f"{PY} pykvm guest build {bad}")
    assert r.returncode == status.BAD_INPUT and "oops" in r.stderr and "Traceback" not in r.stderr


def _status_codes_of_table(doc: str) -> set:
    """The statuses in pykvm.status's table (its first column; "odd" left out)."""
    body = doc.split("======  ")[2].split("\n======")[0]
    codes = set()
    for ln in body.splitlines():
        head = ln[:8].strip().rstrip(",")
        if head.isdigit():
            codes.add(int(head))
    return codes


def test_readme_exit_status_list_matches_the_status_table():
    """README's list and pykvm/status.py's table name the same statuses, both ways."""
    import re

    from pykvm import status
    table = _status_codes_of_table(status.__doc__)
    assert {0, 2, 4, 6, 8, 10, 124, 130, 141, 143, 129, 131, 138, 140} == table
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    para = readme[readme.index("Exit statuses: odd ones"):]
    para = para[:para.index("(table in `pykvm/status.py`")]
    listed = {int(n) for n in re.findall(r"(?<![\w<(+])(\d+)(?![\w)])", para)}
    listed -= {1}                                   # "(V << 1) | 1": the odd statuses
    assert listed == table, (sorted(listed - table), sorted(table - listed))


def test_bench_plot_without_matplotlib_is_refused_before_measuring(tmp_path):
    """--plot's prerequisites are checked first: with matplotlib not importable (a package of
    that name that raises ImportError, first on the path) `pykvm bench --quick --plot` is one
    line and 2, and nothing is measured (nothing printed on stdout, no plot written)."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = f"PYTHONPATH={shadow.parent}:{ROOT}"
    r = sh(f"{env} {PY} pykvm bench --quick --plot {tmp_path / 'x.png'}")
    assert r.returncode == 2 and "needs matplotlib" in one_line(r.stderr), r
    assert r.stdout == "" and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [["run", "--mem", "６４M"], ["run", "--vcpus", "２"],
                                  ["run", "--timeout", "１"], ["run", "--mem", "٦٤M"],
                                  ["run", "--param", "１"], ["run", "--snapshot-at", "１s", "--snapshot", "/tmp/x.snap"],
                                  ["bench", "--exits", "１０"]])
def test_options_take_ascii_digits_only(args):
    """Python's int() and float() take any script's digits; pykvm's options (as QEMU's) do
    not: one line, 2, before anything runs."""
    extra = ["--no-input"] if args[0] == "run" else []
    r = subprocess.run([sys.executable, "-m", "pykvm", *args, *extra],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    value = next(a for a in args if not a.isascii())
    assert r.returncode == 2 and value in one_line(r.stderr), r
    assert r.stdout == ""


@pytest.mark.parametrize("args", [["run", "--mem", "m" * 5000], ["run", "--machine", "q" * 5000],
                                  ["run", "--cpuid", "z" * 5000], ["caps", "--bogus=" + "y" * 5000],
                                  ["run", "--console", "c" * 5000]])
def test_long_values_are_quoted_short(args):
    """A user's value in an error line is repr-escaped and at most 60 characters, then "...",
    whoever made the message (pykvm's option types, argparse, a lower layer)."""
    r = subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    line = one_line(r.stderr)
    ch = args[-1][-1]
    assert r.returncode == 2 and "'..." in line and ch * 61 not in line, line
    assert len(line) < 400


def test_quote_helper():
    from pykvm import _cliutil
    assert _cliutil.quote("abc") == "'abc'"
    assert _cliutil.quote("a\x1b[2J") == repr("a\x1b[2J")
    assert _cliutil.quote("x" * 61) == repr("x" * 60) + "..."
    line = "bad: " + repr("p" * 100) + " and " + "p" * 100
    assert _cliutil.shorten_values(line, ["p" * 100]) == \
        "bad: " + repr("p" * 60) + "... and " + "p" * 100          # bare, under 256: kept
    path = "/" + "d" * 99
    assert _cliutil.shorten_values(f"x {path!r}", [path]) == f"x {path!r}"   # a path: whole
