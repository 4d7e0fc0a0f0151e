"""Every pykvm command at the edges of host resources and of its own output (issue 16, faults
8, 9 and 11), run as a real process under real limits:

* a host-side failure (RLIMIT_NOFILE, RLIMIT_AS so that threads cannot start, no KVM device) is
  one line on stderr naming the resource, status 8 (pykvm.status.VMM_ERROR), never a traceback,
  never 2 (bad input) or a guest's status, and with --json exactly one JSON object;
* an option the machine cannot honour (more vCPUs than the pc machine's MADT can describe) is
  bad input (2), one line naming the limit;
* output that cannot be written (stdout closed, /dev/full, an fd open only for reading) is one
  line and a failure status, never 0;
* a report path (guest build -o) that is a symlink is written through, a directory refused.
"""
import json
import os
import resource
import stat
import subprocess
import sys

import pytest

from pykvm import status

pytestmark = pytest.mark.requires_kvm

PYKVM = [sys.executable, "-m", "pykvm"]
ERROR_KEYS = {"exit", "exit_code", "console", "exits", "seconds", "detail"}

# every command of `pykvm` that reaches KVM, with and without --json where it has it
KVM_COMMANDS = [["run"], ["run", "--json"], ["run", "--vcpus", "2", "--json"], ["caps"],
                ["caps", "--json"], ["regs"], ["regs", "--json"]]


def _env(**extra):
    env = dict(os.environ)
    for k in ("LD_PRELOAD", "PYKVM_SANITIZED_NATIVE"):   # a sanitizer runtime needs more room
        env.pop(k, None)
    env.update(extra)
    return env


def _limited(**limits):
    def preexec():
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
    return preexec


def run_cli(args, *, timeout=90, env=None, **kw):
    kw.setdefault("capture_output", True)
    return subprocess.run(PYKVM + list(args), text=True, timeout=timeout,
                          env=env or _env(), **kw)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def json_object(stdout: str) -> dict:
    d = json.loads(stdout)                        # exactly one JSON document, nothing else
    assert isinstance(d, dict), stdout
    return d


def assert_error_object(stdout: str, exit_name: str, code: int, detail: str) -> None:
    d = json_object(stdout)
    assert ERROR_KEYS <= set(d), d
    assert (d["exit"], d["exit_code"]) == (exit_name, code), d
    assert d["detail"] == detail


# -- fault 8: host limits ------------------------------------------------------------------------
@pytest.mark.parametrize("args", KVM_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("nofile", [5, 6, 7, 9])
def test_fd_limit_is_one_line_naming_it_with_status_8(args, nofile):
    r = run_cli(args, preexec_fn=_limited(RLIMIT_NOFILE=nofile))
    if r.returncode == 0:                          # the command fits in that many fds
        assert "Traceback" not in r.stderr
        if "--json" in args:
            json.loads(r.stdout)
        return
    assert r.returncode == status.VMM_ERROR, (r.returncode, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith("pykvm: host limit: too many open files "
                           f"(RLIMIT_NOFILE={nofile})"), line
    if "--json" in args:
        assert_error_object(r.stdout, "vmm_error", status.VMM_ERROR, line[len("pykvm: "):])
    else:
        assert r.stdout == "" or args == ["run"]     # run may have streamed some console


def test_fd_limit_5_stops_run_as_a_host_failure():
    r = run_cli(["run", "--json"], preexec_fn=_limited(RLIMIT_NOFILE=5))
    assert r.returncode == status.VMM_ERROR, r.stderr
    assert "RLIMIT_NOFILE=5" in one_line(r.stderr)
    assert json_object(r.stdout)["exit"] == "vmm_error"


def test_threads_that_cannot_start_are_a_host_failure():
    """Under RLIMIT_AS a vCPU thread's stack cannot be mapped: one line, status 8 (the limit
    that stops it depends on the host, so a range is tried; some value must stop it)."""
    stopped = 0
    for mib in (80, 90, 100, 110, 120):
        r = run_cli(["run", "--vcpus", "4", "--json"],
                    preexec_fn=_limited(RLIMIT_AS=mib << 20))
        assert r.returncode in (0, status.VMM_ERROR), (mib, r.returncode, r.stderr)
        d = json_object(r.stdout)
        if r.returncode == 0:
            continue
        stopped += 1
        line = one_line(r.stderr)
        assert d["exit"] == "vmm_error" and d["exit_code"] == status.VMM_ERROR
        assert any(w in line for w in ("thread", "memory", "RLIMIT_AS", "ulimit -v")), line
    assert stopped, "no address-space limit stopped a 4-vCPU run"


def test_more_vcpus_than_the_pc_madt_describes_is_bad_input():
    for flag in ("--vcpus", "--smp"):
        r = run_cli(["run", "--machine", "pc", flag, "300", "--json"])
        assert r.returncode == status.BAD_INPUT, r.stderr
        line = one_line(r.stderr)
        assert "255" in line and "Traceback" not in r.stdout
        assert_error_object(r.stdout, "bad_input", status.BAD_INPUT, line[len("pykvm: "):])


# -- fault 11: every --json command, every outcome ------------------------------------------------
@pytest.mark.parametrize("args", [["caps", "--json"], ["regs", "--json"], ["run", "--json"]],
                         ids=" ".join)
@pytest.mark.parametrize("device,words", [("/nonexistent/kvm", "does not exist"),
                                          ("/etc/hostname", "is not a KVM device"),
                                          ("/dev/null", "is not a KVM device")])
def test_unusable_kvm_device_is_one_json_object(args, device, words):
    for how in ("option", "env"):
        if how == "option":
            r = run_cli(args + ["--device", device])
        else:
            r = run_cli(args, env=_env(PYKVM_DEVICE=device))
        assert r.returncode == status.VMM_ERROR, r.stderr
        line = one_line(r.stderr)
        assert words in line
        assert_error_object(r.stdout, "vmm_error", status.VMM_ERROR, line[len("pykvm: "):])


@pytest.mark.parametrize("args", [
    ["caps", "--json", "--bogus"], ["regs", "--json", "--bogus"], ["regs", "--json", "extra"],
    ["caps", "--json", "--device", ""], ["regs", "--json", "--device", ""],
    ["bench", "--json", "--exits", "0"], ["run", "--json", "--smp", "0"],
], ids=" ".join)
def test_bad_input_is_one_json_object_for_every_json_command(args):
    r = run_cli(args)
    assert r.returncode == status.BAD_INPUT, r.stderr
    line = one_line(r.stderr)
    assert_error_object(r.stdout, "bad_input", status.BAD_INPUT, line)


def test_bench_refuses_a_plot_path_that_is_a_directory_before_measuring(tmp_path):
    r = run_cli(["bench", "--json", "--plot", str(tmp_path)], timeout=30)
    assert r.returncode == status.BAD_INPUT
    line = one_line(r.stderr)
    assert "is a directory" in line
    assert json_object(r.stdout)["exit"] == "bad_input"


# -- fault 9: output that cannot be written ---------------------------------------------------
ALL_COMMANDS = [["run"], ["run", "--json"], ["caps"], ["caps", "--json"], ["regs"],
                ["regs", "--json"], ["guests"], ["--help"]]


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=" ".join)
def test_closed_stdout_is_a_failure(args):
    r = run_cli(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, capture_output=False,
                preexec_fn=lambda: os.close(1))
    assert r.returncode == status.VMM_ERROR
    assert one_line(r.stderr) == "pykvm: cannot write to stdout: it is closed"


@pytest.mark.parametrize("args", [["run"], ["run", "--json"], ["caps", "--json"]], ids=" ".join)
def test_closed_stdout_and_stderr_is_still_a_failure(args):
    def close_both():
        os.close(1)
        os.close(2)
    r = run_cli(args, capture_output=False, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=close_both)
    assert r.returncode == status.VMM_ERROR


@pytest.mark.parametrize("args", ALL_COMMANDS, ids=" ".join)
def test_full_stdout_is_one_line_and_status_8(args):
    with open("/dev/full", "w") as full:
        r = run_cli(args, capture_output=False, stdout=full, stderr=subprocess.PIPE)
    assert r.returncode == status.VMM_ERROR, r.stderr
    assert one_line(r.stderr) == "pykvm: cannot write to stdout: No space left on device"


@pytest.mark.parametrize("args", [["run"], ["run", "--json"], ["caps"], ["guests"]],
                         ids=" ".join)
def test_stdout_open_only_for_reading_is_a_failure(args):
    with open("/dev/null", "r") as ro:
        r = run_cli(args, capture_output=False, stdout=ro, stderr=subprocess.PIPE)
    assert r.returncode == status.VMM_ERROR, r.stderr
    assert one_line(r.stderr) == "pykvm: cannot write to stdout: Bad file descriptor"


def test_full_stdout_and_full_stderr_is_still_a_failure():
    with open("/dev/full", "w") as full:
        r = run_cli(["run", "--json"], capture_output=False, stdout=full, stderr=full)
    assert r.returncode == status.VMM_ERROR


# -- report paths of commands ---------------------------------------------------------------------
GUEST_SRC = ('#include "pykvm_guest.h"\n'
             'void guest_main(void) { GUEST_DONE(); }\n')


def _build(tmp_path, out):
    src = tmp_path / "g.c"
    src.write_text(GUEST_SRC)
    return run_cli(["guest", "build", str(src), "-o", str(out)], timeout=120)


def test_guest_build_output_through_a_symlink_keeps_the_symlink(tmp_path):
    target = tmp_path / "image.elf"
    target.write_text("")
    link = tmp_path / "link.elf"
    link.symlink_to(target)
    r = _build(tmp_path, link)
    if r.returncode == 1 and "not found" in r.stderr:
        pytest.skip(f"{'pykvm: host lacks'} a guest toolchain: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and target.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_guest_build_output_that_cannot_be_a_file_is_refused(tmp_path, kind):
    import socket
    if kind == "directory":
        out = tmp_path / "d"
        out.mkdir()
    else:
        out = tmp_path / "s.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out))
    r = _build(tmp_path, out)
    assert r.returncode == status.BAD_INPUT
    assert "cannot write the image to" in one_line(r.stderr)
    assert stat.S_ISDIR(os.lstat(out).st_mode) or stat.S_ISSOCK(os.lstat(out).st_mode)
