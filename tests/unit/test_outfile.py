"""pykvm.outfile (issue 16, fault 9): a report path is written through (symlink, character
device, FIFO) or refused (directory, socket, block device), never replaced; a regular file is
replaced atomically; every failure is one line with the cause's errno. Real files, FIFOs, device
nodes and file systems; no mocks."""
import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from pykvm.outfile import ReportPathError, check_report_path, write_report


def _leftovers(d):
    return [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_new_file_gets_umask_mode_and_no_temp_is_left(tmp_path):
    p = tmp_path / "sub" / "dir" / "r.txt"                    # missing directories are made
    old = os.umask(0o027)
    try:
        write_report(p, "hello\n")
    finally:
        os.umask(old)
    assert p.read_text() == "hello\n"
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert _leftovers(p.parent) == []


def test_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("old contents, longer than the new ones\n")
    os.chmod(p, 0o604)
    before = p.stat().st_ino
    keep = open(p)                                    # a reader that opened the old file
    write_report(p, b"new\n")
    assert p.read_text() == "new\n"
    assert keep.read() == "old contents, longer than the new ones\n"   # never half a file
    keep.close()
    assert p.stat().st_ino != before                  # renamed over, not rewritten in place
    assert stat.S_IMODE(p.stat().st_mode) == 0o604
    assert _leftovers(tmp_path) == []


def test_symlink_is_written_through_and_stays_a_symlink(tmp_path):
    """A link to a regular file: the target is replaced atomically in its own directory (a new
    inode renamed over it), the link stays as it was."""
    sub = tmp_path / "sub"
    sub.mkdir()
    target = sub / "target.txt"
    target.write_text("previous\n")
    ino = target.stat().st_ino
    link = tmp_path / "link"
    link.symlink_to(target)
    write_report(link, "through\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "through\n" and target.stat().st_ino != ino
    assert _leftovers(sub) == [] and _leftovers(tmp_path) == []


def test_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "made.txt")
    write_report(link, "x")
    assert link.is_symlink() and (tmp_path / "made.txt").read_text() == "x"


def test_fifo_is_written_through_to_its_reader(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    t.start()
    data = os.urandom(256 << 10)                      # more than a pipe holds: blocking writes
    deadline = time.monotonic() + 10
    while True:                                       # the reader's open() may not have begun
        try:
            write_report(fifo, data)
            break
        except ReportPathError as e:
            assert e.errno == errno.ENXIO and time.monotonic() < deadline
            time.sleep(0.01)
    t.join(10)
    assert got == [data]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_fifo_without_a_reader_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ReportPathError) as ei:
        write_report(fifo, "x", what="KTAP")
    assert ei.value.errno == errno.ENXIO
    assert str(ei.value).startswith(f"cannot write KTAP to {fifo}: ") and "\n" not in str(ei.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_character_device_node_is_written_through_not_replaced(tmp_path):
    null = os.stat("/dev/null")
    node = tmp_path / "mynull"
    os.mknod(node, stat.S_IFCHR | 0o666, null.st_rdev)
    write_report(node, "into the device\n")
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev
    link = tmp_path / "stdout-like"
    link.symlink_to("/dev/null")
    write_report(link, "x")
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_full_device_is_one_line_with_enospc():
    with pytest.raises(ReportPathError) as ei:
        write_report("/dev/full", "x" * 10000, what="KTAP")
    assert ei.value.errno == errno.ENOSPC
    assert str(ei.value) == "cannot write KTAP to /dev/full: No space left on device"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_open_file_through_proc_fd_is_appended_not_truncated(tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as f:
        f.write("earlier output\n")
        f.flush()
        write_report(f"/proc/self/fd/{f.fileno()}", "report\n")
        link = tmp_path / "stdout"                    # as /dev/stdout -> /proc/self/fd/1
        link.symlink_to(f"/proc/self/fd/{f.fileno()}")
        write_report(link, "again\n")
    assert log.read_text() == "earlier output\nreport\nagain\n"
    assert link.is_symlink()


@pytest.mark.parametrize("kind", ["directory", "socket", "file-as-directory", "empty"])
def test_paths_that_cannot_take_a_report_are_refused(tmp_path, kind):
    if kind == "directory":
        p = str(tmp_path)
    elif kind == "socket":
        p = str(tmp_path / "sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(p)
    elif kind == "file-as-directory":
        (tmp_path / "f").write_text("")
        p = str(tmp_path / "f" / "r.txt")
    else:
        p = ""
    for call in (lambda: check_report_path(p, "KTAP"), lambda: write_report(p, "x", "KTAP")):
        with pytest.raises(ReportPathError) as ei:
            call()
        assert str(ei.value).startswith("cannot write KTAP to ") and "\n" not in str(ei.value)
    if kind == "socket":
        assert stat.S_ISSOCK(os.lstat(p).st_mode)
        s.close()
    if kind == "directory":
        assert os.path.isdir(p)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="mounting a tmpfs needs root and unshare(1)")
@pytest.mark.parametrize("via", ["file", "symlink"])
def test_full_file_system_leaves_the_old_file_and_no_temp(tmp_path, via):
    """A 16 KiB tmpfs, filled: replacing a report there (named directly, or through a symlink
    to it) fails with ENOSPC in one line, the old report is intact and no temporary file stays
    behind."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    name = "r.txt" if via == "file" else "l"
    code = ("import os, sys\n"
            "from pykvm.outfile import write_report, ReportPathError\n"
            "d = sys.argv[1]\n"
            "write_report(os.path.join(d, 'r.txt'), 'old\\n')\n"
            f"if {name!r} == 'l':\n"
            "    os.symlink('r.txt', os.path.join(d, 'l'))\n"
            "with open(os.path.join(d, 'fill'), 'wb', buffering=0) as f:\n"
            "    try:\n"
            "        while True:\n"
            "            f.write(b'x' * 4096)\n"
            "    except OSError:\n"
            "        pass\n"
            "try:\n"
            f"    write_report(os.path.join(d, {name!r}), 'n' * 65536)\n"
            "except ReportPathError as e:\n"
            "    print(e.errno, e)\n"
            "print(open(os.path.join(d, 'r.txt')).read().strip())\n"
            "print(sorted(os.listdir(d)))\n")
    script = (f"mount -t tmpfs -o size=16k tmpfs {mnt} || exit 77; "
              f"exec {sys.executable} -c \"$0\" {mnt}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True,
                       text=True, timeout=60)
    if r.returncode == 77:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"{errno.ENOSPC} cannot write report to {mnt}/{name}: No space left on device"
    assert lines[1] == "old"
    assert lines[2] == ("['fill', 'r.txt']" if via == "file" else "['fill', 'l', 'r.txt']")


def test_lab_junit_xml_goes_through_a_symlink_and_fails_in_one_line(tmp_path):
    """The lab's own results (python -m pykvm.lab: <out>/<lab>.xml) follow the same rules."""
    from pykvm.lab import qemu
    target = tmp_path / "real.xml"
    link = tmp_path / "riscv.xml"
    link.symlink_to(target)
    res = [qemu.BootResult("riscv-max", 3, "no results")]
    qemu.merge_junit(res, link, "riscv")
    assert link.is_symlink() and target.read_bytes().startswith(b"<?xml")
    with pytest.raises(ReportPathError) as ei:
        qemu.merge_junit(res, "/dev/full", "riscv")
    assert str(ei.value) == "cannot write the JUnit XML to /dev/full: No space left on device"
