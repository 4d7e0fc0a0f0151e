"""Every pykvm entry point at the edges of its output, on real KVM (issue 16, faults 8, 9, 11):
stdout closed or full, stderr closed or full, --help, --json with a bad option, and SIGTERM at
any moment of ``pykvm run --json``. Each outcome is one line on stderr with the status of its
class, never a traceback, never status 0 with the output lost, and with --json exactly one JSON
object on stdout."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _asm import SPIN, asm16

pytestmark = pytest.mark.requires_kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = f"{sys.executable} -m"


def sh(cmd: str, timeout=120):
    return subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def lines(stderr: str):
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.strip()]


# -- SIGTERM at a sweep of moments ------------------------------------------------------------
def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except FileNotFoundError:
        return True
    return False


@pytest.fixture(scope="module")
def spin(tmp_path_factory):
    p = tmp_path_factory.mktemp("edges") / "spin.bin"
    p.write_bytes(asm16(SPIN))
    return str(p)


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "pykvm"],
                                   [os.path.join(os.path.dirname(sys.executable), "pykvm")]],
                         ids=["python-m", "script"])
def test_sigterm_at_every_moment_gives_one_json_object(spin, entry):
    """From the moment the process first catches SIGTERM (pykvm.cli being imported) through
    argument parsing, machine set-up and the run: status 143, one line, one JSON object whose
    exit_code is 143. (Before that the interpreter is still starting: no code of pykvm's runs,
    and the kernel's default action gives the same 128 + 15 to a shell.)"""
    if not os.path.exists(entry[0]):
        pytest.skip("no pykvm script in this environment")
    for delay_ms in range(0, 301, 15):
        p = subprocess.Popen(entry + ["run", spin, "--json", "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 60                 # interpreter start-up on a loaded host
        while not _catches_sigterm(p.pid):
            assert time.monotonic() < end, "pykvm never caught SIGTERM"  # else: a kernel kill
            time.sleep(0.0005)
        time.sleep(delay_ms / 1000)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 143, (delay_ms, p.returncode, out, err)
        assert lines(err) == ["pykvm: interrupted by SIGTERM"], (delay_ms, err)
        obj = json.loads(out)                       # exactly one object: json.loads fails on two
        assert obj["exit"] == "interrupted" and obj["exit_code"] == 143, (delay_ms, obj)


# -- every entry point, every broken stream --------------------------------------------------
# one source per pytest-xdist worker: each worker sets up this module's fixture on its own
EDGES_SOURCE = f"_edges_guest{os.environ.get('PYTEST_XDIST_WORKER', '')}.c"
PYKVM_COMMANDS = ["", "run", "run --json", "caps", "caps --json", "regs", "regs --json",
                  "guests", "guest build SOURCE"]   # SOURCE: this worker's (_cmd)


def _cmd(cmd):
    return cmd.replace("SOURCE", f"tests/x86/{EDGES_SOURCE}")


@pytest.fixture(scope="module")
def guest_source():
    path = os.path.join(ROOT, "tests", "x86", EDGES_SOURCE)
    with open(path, "w") as f:
        f.write('#include "pykvm_guest.h"\nvoid guest_main(void) { }\n')
    yield path
    os.unlink(path)


@pytest.mark.parametrize("cmd", PYKVM_COMMANDS)
@pytest.mark.parametrize("redir", [">&-", ">/dev/full"])
def test_pykvm_lost_stdout_is_never_success(guest_source, cmd, redir):
    r = sh(f"{PY} pykvm {_cmd(cmd)} {redir}")
    assert r.returncode == 8, (cmd, redir, r)
    assert len(lines(r.stderr)) == 1 and "cannot write to stdout" in r.stderr


@pytest.mark.parametrize("cmd", PYKVM_COMMANDS)
@pytest.mark.parametrize("redir", ["2>&-", "2>/dev/full"])
def test_pykvm_broken_stderr(guest_source, cmd, redir):
    """Without stderr a command still does its work and tells its outcome by its status (the
    bare ``pykvm`` prints its help and 2, as with stderr open)."""
    r = sh(f"{PY} pykvm {_cmd(cmd)} {redir}")
    assert r.returncode == (2 if cmd == "" else 0), (cmd, r)
    assert r.stdout and "Traceback" not in r.stdout
    if "--json" in cmd:
        json.loads(r.stdout)


@pytest.mark.parametrize("cmd", ["", "run", "caps", "regs", "guests", "bench", "guest",
                                 "guest build"])
def test_pykvm_help(cmd):
    r = sh(f"{PY} pykvm {_cmd(cmd)} --help")
    assert r.returncode == 0 and "usage:" in r.stdout and lines(r.stderr) == []
    r = sh(f"{PY} pykvm {_cmd(cmd)} --help >/dev/full")
    assert r.returncode == 8 and len(lines(r.stderr)) == 1


@pytest.mark.parametrize("cmd", ["run", "caps", "regs", "bench"])
def test_pykvm_json_bad_option_gives_one_object(cmd):
    r = sh(f"{PY} pykvm {_cmd(cmd)} --json --no-such-option")
    assert r.returncode == 2
    (line,) = lines(r.stderr)
    obj = json.loads(r.stdout)
    assert obj["exit"] == "bad_input" and obj["exit_code"] == 2 and obj["detail"] == line


# -- the fuzzer --------------------------------------------------------------------------------
@pytest.mark.parametrize("args", ["--json", ""], ids=["json", "text"])
@pytest.mark.parametrize("redir", [">/dev/full", ">&-"])
def test_fuzz_lost_stdout(tmp_path, args, redir):
    r = sh(f"{PY} pykvm.fuzz --runs 4 --jobs 1 --quiet --out {tmp_path} {args} {redir}")
    assert r.returncode == 8, r
    assert lines(r.stderr) == ["python -m pykvm.fuzz: cannot write to stdout: "
                               + ("it is closed" if redir == ">&-" else
                                  os.strerror(28))]


@pytest.mark.parametrize("redir", ["2>&-", "2>/dev/full"])
def test_fuzz_broken_stderr_still_runs(tmp_path, redir):
    r = sh(f"{PY} pykvm.fuzz --runs 4 --jobs 1 --out {tmp_path} --json {redir}")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["runs"] == 4
