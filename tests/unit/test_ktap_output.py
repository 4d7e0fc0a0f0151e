"""``pytest --ktap PATH`` where the report cannot simply be written (issue 16, fault 9): a full
file system or /dev/full is one line on stderr and a failing pytest status with pytest's summary
still printed, never a traceback; a FIFO, a symlink or a device node is written through and
stays what it was; a directory or socket is refused before any test runs; a regular file is
replaced atomically. Each case runs a real pytest in a subprocess."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading

import pytest

TESTS = "def test_one():\n    pass\n\ndef test_two():\n    assert 1 + 1 == 2\n"


def run_pytest(tmp_path, ktap, *, timeout=120, prefix=()):
    (tmp_path / "test_sample.py").write_text(TESTS)
    cmd = list(prefix) + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "test_sample.py", "--ktap", str(ktap)]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def one_line(stderr):
    assert "Traceback" not in stderr and "INTERNALERROR" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def sample(tmp_path):
    return tmp_path


def test_dev_full_is_one_line_and_a_failing_status(sample):
    r = run_pytest(sample, "/dev/full")
    assert r.returncode == pytest.ExitCode.INTERNAL_ERROR, (r.stdout, r.stderr)
    assert one_line(r.stderr) == "pykvm: cannot write KTAP to /dev/full: No space left on device"
    assert "2 passed" in r.stdout                              # pytest's summary still there
    assert "INTERNALERROR" not in r.stdout and "Traceback" not in r.stdout
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_failing_session_keeps_its_own_status(sample):
    (sample / "test_bad.py").write_text("def test_bad():\n    assert False\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_bad.py",
           "--ktap", "/dev/full"]
    r = subprocess.run(cmd, cwd=sample, capture_output=True, text=True, timeout=120)
    assert r.returncode == pytest.ExitCode.TESTS_FAILED
    assert "cannot write KTAP to /dev/full" in one_line(r.stderr)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="mounting a tmpfs needs root and unshare(1)")
def test_full_file_system_is_one_line_and_keeps_the_old_report(sample):
    mnt = sample / "mnt"
    mnt.mkdir()
    (sample / "test_sample.py").write_text(TESTS)
    fill = ("import sys\nf = open(sys.argv[1], 'wb', buffering=0)\n"
            "try:\n    [f.write(b'x' * 1024) for _ in iter(int, 1)]\nexcept OSError:\n    pass\n")
    script = (f"mount -t tmpfs -o size=8k tmpfs {mnt} || exit 77; "
              f"printf 'KTAP version 1\\n1..0\\n' > {mnt}/old.ktap; "
              f"{sys.executable} -c \"$0\" {mnt}/fill; "
              f"{sys.executable} -m pytest -q -p no:cacheprovider test_sample.py "
              f"--ktap {mnt}/old.ktap; rc=$?; cat {mnt}/old.ktap; ls -A {mnt}; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, fill], cwd=sample,
                       capture_output=True, text=True, timeout=120)
    if r.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == pytest.ExitCode.INTERNAL_ERROR, (r.stdout, r.stderr)
    assert one_line(r.stderr) == (f"pykvm: cannot write KTAP to {mnt}/old.ktap: "
                                  "No space left on device")
    assert "2 passed" in r.stdout
    assert r.stdout.splitlines()[-4:] == ["KTAP version 1", "1..0", "fill", "old.ktap"]


def test_fifo_is_written_through(sample):
    fifo = sample / "ktap.fifo"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    t.start()                                   # a reader waits before pytest ends
    r = run_pytest(sample, fifo)
    t.join(30)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert got and got[0].startswith("KTAP version 1\n") and "# Totals: pass:2" in got[0]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_fifo_nobody_reads_is_one_line_not_a_hang(sample):
    fifo = sample / "ktap.fifo"
    os.mkfifo(fifo)
    r = run_pytest(sample, fifo, timeout=60)
    assert r.returncode == pytest.ExitCode.INTERNAL_ERROR
    assert "cannot write KTAP to" in one_line(r.stderr)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_symlink_is_written_through_and_stays_a_symlink(sample):
    target = sample / "real.ktap"
    target.write_text("old\n")
    link = sample / "link.ktap"
    link.symlink_to(target)
    r = run_pytest(sample, link)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("KTAP version 1\n")


def test_dev_stdout_is_written_through_to_the_pipe(sample):
    r = run_pytest(sample, "/dev/stdout")
    assert r.returncode == 0, r.stderr
    assert "KTAP version 1\n" in r.stdout and "# Totals: pass:2" in r.stdout
    assert os.path.islink("/dev/stdout")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_character_device_node_is_written_through_not_replaced(sample):
    null = os.stat("/dev/null")
    node = sample / "null-node"
    os.mknod(node, stat.S_IFCHR | 0o666, null.st_rdev)
    r = run_pytest(sample, node)
    assert r.returncode == 0, r.stderr
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev


@pytest.mark.parametrize("kind", ["directory", "socket", "empty"])
def test_unusable_paths_are_refused_before_any_test(sample, kind):
    if kind == "directory":
        path = str(sample)
    elif kind == "socket":
        path = str(sample / "s.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
    else:
        path = ""
    r = run_pytest(sample, path)
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, (r.stdout, r.stderr)
    assert "--ktap: cannot write KTAP to" in one_line(r.stderr)
    assert "passed" not in r.stdout
    if kind == "socket":
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        s.close()


def test_missing_directory_is_refused_not_made(sample):
    """As `pykvm guest build -o` and `pykvm run --snapshot`: a report in a directory that does
    not exist is a usage error in one line naming it, before any test, and nothing is made."""
    missing = sample / "nodir" / "deeper"
    r = run_pytest(sample, missing / "x.ktap")
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert "--ktap: cannot write KTAP to" in line and "No such file or directory" in line
    assert str(missing) in line and "passed" not in r.stdout
    assert not (sample / "nodir").exists()


def test_regular_file_is_replaced_atomically(sample):
    out = sample / "out.ktap"
    out.write_text("previous report\n")
    os.chmod(out, 0o640)
    ino = out.stat().st_ino
    r = run_pytest(sample, out)
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("KTAP version 1\n")
    assert out.stat().st_ino != ino and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [n for n in os.listdir(sample) if n.endswith(".tmp")] == []
