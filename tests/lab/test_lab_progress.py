"""Unit tests of what a lab shows and how it shares the cache and ends its children (no QEMU, no network).

* progress: plain lines off a terminal (one per stage, periodic byte meters with a rate), the serial
  console read into stages and pytest counts;
* the cache lock: two processes fetching the same .deb from a (slow, local) mirror at once — one
  download, the other waits and reuses it, the file is intact;
* children: a lab's child and its own children die with the lab (killed outright included), and an
  interrupted ``proc.run`` leaves none behind.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pykvm.lab import initramfs, progress, proc
from pykvm.lab.qemu import ConsoleProgress

ROOT = Path(__file__).resolve().parents[2]


def _py(code: str, **kw) -> subprocess.Popen:
    """A Python child running ``code`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYKVM_LAB_PROGRESS": "plain"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _alive(pid: int) -> bool:
    """Is ``pid`` a live (not zombie) process?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


# --------------------------------------------------------------------------------------------------
# progress


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setenv("PYKVM_LAB_PROGRESS", "plain")
    monkeypatch.setattr(progress, "_silenced", False)
    return monkeypatch


def test_plain_meter_lines(plain, capsys):
    plain.setattr(progress, "PLAIN_EVERY", 0.0)  # a line on every update
    with progress.Meter("pkg 1.0", total=4_000_000) as m:
        for _ in range(4):
            m.update(1_000_000)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[lab]   downloading pkg 1.0: 1.0 MB of 4.0 MB (25%), ")
    assert err[0].endswith(" MB/s")
    assert err[-1].startswith("[lab] downloaded pkg 1.0: 4.0 MB in ") and err[-1].endswith(" MB/s)")
    assert len(err) == 5
    assert progress.current_stage() != "downloading pkg 1.0"  # the stage is restored on close


def test_plain_meter_is_quiet_between_periods(plain, capsys):
    plain.setattr(progress, "PLAIN_EVERY", 3600.0)
    with progress.Meter("pkg", total=10) as m:
        for _ in range(1000):
            m.update(1)
    assert len(capsys.readouterr().err.splitlines()) == 1  # the summary only
    with pytest.raises(RuntimeError):
        with progress.Meter("broken", total=10) as m:
            raise RuntimeError
    assert capsys.readouterr().err == ""  # no summary for a failed transfer


def test_plain_live_line_one_line_per_stage(plain, capsys):
    plain.setattr(progress, "PLAIN_EVERY", 3600.0)
    live = progress.LiveLine("riscv-rv64")
    for _ in range(50):
        live.show("kernel booting", "some console line", "")
    for i in range(50):
        live.show("pytest running", f"{i} tests done | x", f"{i} tests done")
    live.close()
    err = capsys.readouterr().err.splitlines()
    assert [e.split(" (")[0] for e in err] == ["[lab] riscv-rv64: kernel booting",
                                               "[lab] riscv-rv64: pytest running — 0 tests done"]


def test_silence(plain, capsys):
    progress.log("before")
    progress.silence()
    progress.log("after")
    with progress.Meter("x", 1) as m:
        m.update(1)
    assert capsys.readouterr().err == "[lab] before\n"


def test_console_progress_stages_and_counts():
    n = "n0"

    def m(s):
        return s.format(nonce=n)
    w = ConsoleProgress(n)
    assert w.pop_transitions() == [("starting QEMU", "")]
    for line in ["OpenSBI v1.6", "   ____ ", "[    0.000000] Machine model: riscv-virtio,qemu",
                 "[lab] 7.2.13 riscv64; kvm: crw------- 10, 232 /dev/kvm", m(initramfs.MARK_OUT_BEGIN)]:
        w.feed(line)
    w.partial("..s.")  # pytest's dots arrive before their newline
    assert w.tests() == {"passed": 3, "skipped": 1}
    assert w.describe()[2] == "4 tests done, 1 skipped"
    w.feed("..s.F.   [ 60%]")
    w.partial("")
    w.feed("....  [100%]")
    w.feed("1 failed, 8 passed, 1 skipped in 3.2s")
    assert w.tests() == {"passed": 8, "skipped": 1, "failed": 1} and w.percent == 100
    w.feed(m(initramfs.MARK_OUT_END))
    w.feed(m(initramfs.MARK_XML_BEGIN))
    w.feed("PD94bWwgdmVyc2lvbj0iMS4wIj8+")  # base64: not a "last line"
    w.feed(m(initramfs.MARK_XML_END))
    w.feed(m(initramfs.MARK_RC) + "1@@")
    w.feed("[   31.488203] reboot: Power down")  # must not go back to "kernel booting"
    assert [t[0] for t in w.pop_transitions()] == [
        "firmware", "kernel booting", "KVM ready", "pytest starting", "pytest running", "pytest finished",
        "sending results", "powering off"]
    assert w.stage == "powering off" and w.summary == "1 failed, 8 passed, 1 skipped in 3.2s"
    assert w.kernel == "7.2.13 riscv64"


def test_console_progress_init_failure():
    w = ConsoleProgress("n1")
    w.feed("@@PYKVM-LAB:n1:INIT-ERROR=insmod kvm.ko failed@@")
    assert w.describe() == ("/init failed", "insmod kvm.ko failed", "insmod kvm.ko failed")


# --------------------------------------------------------------------------------------------------
# the cache lock


def test_cache_lock_excludes_another_process(tmp_path):
    """Two processes append 'begin'/'end' pairs under the lock: the pairs never interleave."""
    code = f"""
        import sys, time
        from pykvm.lab.proc import cache_lock
        for i in range(5):
            with cache_lock({str(tmp_path)!r}, "deb-x", "x"):
                with open({str(tmp_path / "log")!r}, "a") as f:
                    f.write(sys.argv[1] + " begin\\n"); f.flush(); time.sleep(0.05)
                    f.write(sys.argv[1] + " end\\n")
    """
    ps = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), tag], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}) for tag in "ab"]
    assert [p.wait(timeout=60) for p in ps] == [0, 0]
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 20
    for begin, end in zip(lines[::2], lines[1::2]):
        assert begin.endswith(" begin") and end == begin.replace("begin", "end")
    assert (tmp_path / "locks" / "deb-x.lock").exists()


class _SlowMirror(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) slowly, counting GET requests per path."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        self.files, self.gets = files, {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.files.get(self.path)
                outer.gets[self.path] = outer.gets.get(self.path, 0) + 1
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), 64 << 10):  # ~1.5 s for 1 MiB: the other fetch overlaps
                    self.wfile.write(body[i : i + (64 << 10)])
                    self.wfile.flush()
                    time.sleep(0.1)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_two_labs_fetch_one_deb_once(tmp_path):
    """Two processes sharing one cache fetch the same package at the same time: one downloads,
    the other waits on the lock and reuses the verified file; nothing half-written is left."""
    body = os.urandom(1 << 20)
    sha = hashlib.sha256(body).hexdigest()
    srv = _SlowMirror({"/debian/pool/main/p/pkg_1_all.deb": body})
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        mirror = f"http://127.0.0.1:{srv.server_address[1]}/debian"
        code = f"""
            from pykvm.lab.debian import Archive, Package
            a = Archive({str(tmp_path / "cache")!r}, mirror={mirror!r})
            p = Package("pkg", "1", "all", "pool/main/p/pkg_1_all.deb", {sha!r}, {len(body)})
            print(a.fetch(p))
        """
        ps = [_py(code)]
        end = time.monotonic() + 60                    # the first one is downloading (holds the lock)
        while not srv.gets and ps[0].poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        ps.append(_py(code))
        outs = [p.communicate(timeout=120) for p in ps]
    finally:
        srv.shutdown()
        srv.server_close()
    assert [p.returncode for p in ps] == [0, 0], outs
    deb = tmp_path / "cache" / "debs" / f"{sha}.deb"
    assert [o[0].strip() for o in outs] == [str(deb)] * 2
    assert hashlib.sha256(deb.read_bytes()).hexdigest() == sha
    assert srv.gets == {"/debian/pool/main/p/pkg_1_all.deb": 1}
    assert "downloaded pkg 1: 1.0 MB" in outs[0][1]
    assert "waiting for another lab using the cache (pkg 1)" in outs[1][1]
    assert sorted(x.name for x in (tmp_path / "cache" / "debs").iterdir()) == [deb.name]  # no .part/.tmp


# --------------------------------------------------------------------------------------------------
# children


def test_stop_takes_the_child_group_along():
    p = proc.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = int(p.stdout.readline())
    assert _alive(grandchild) and p.pid in proc.alive()
    proc.stop(p)
    p.stdout.close()
    assert _wait_gone([p.pid, grandchild]) == []
    assert p.pid not in proc.alive()


def test_children_die_with_a_killed_lab():
    """SIGKILL leaves a lab no chance to clean up: PR_SET_PDEATHSIG still takes its child along."""
    parent = _py("""
        import time
        from pykvm.lab import proc
        p = proc.popen(["sleep", "60"])
        print(p.pid, flush=True)
        time.sleep(60)
    """)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.communicate()
    assert _wait_gone([child]) == []


@pytest.mark.parametrize("sig,delay", [
    pytest.param(signal.SIGINT, 0.0, id="SIGINT-as-it-starts"),
    pytest.param(signal.SIGINT, 0.3, id="SIGINT-while-waiting"),
    pytest.param(signal.SIGTERM, 0.3, id="SIGTERM-while-waiting"),
])
def test_interrupted_run_leaves_no_child(sig, delay):
    """SIGINT as proc.run starts its child (0.0: the interrupt may come before proc.run has it in
    hand, so stop_all, as the command line does) or while it waits (0.3): Interrupted, a
    KeyboardInterrupt, and the child's whole process group is gone."""
    lab = _py("""
        import sys
        from pykvm.lab import proc
        proc.install_signal_handlers()
        try:
            proc.run(["sh", "-c", "sleep 60 & echo $! $$; wait"], stdout=sys.stdout)
        except proc.Interrupted as e:
            proc.stop_all()
            print("interrupted", e.name, e.status, proc.alive(), flush=True)
    """, start_new_session=True)
    pids = [int(x) for x in lab.stdout.readline().split()]
    assert all(_alive(x) for x in pids)
    time.sleep(delay)
    os.killpg(lab.pid, sig)  # like Ctrl-C: the whole foreground group
    out, err = lab.communicate(timeout=30)
    assert (lab.returncode, out.strip(), err) == (0, f"interrupted {sig.name} {128 + sig} []", "")
    assert _wait_gone(pids) == []
