"""Ctrl-C on a real lab: ``python -m pykvm.lab riscv`` interrupted at several moments.

The lab runs in its own process group (as a shell job does) and gets SIGINT the way a terminal's
Ctrl-C delivers it, to the whole group, at three moments: as soon as it says what it does (resolving
packages, reading or fetching indexes), while it builds the payload (``make``, the cross compiler and
the .pyc precompiler run then), and while QEMU boots the lab kernel.  Each time it must exit 130 with
one closing line on stderr and no traceback, leave none of its processes behind (QEMU included:
every process that descended from it before the signal is gone, and no ``qemu-system-*`` process
mentions this run's output directory), and leave no temporary files in its output directory or the
cache.  About 30-60 s for the three, on a warm cache.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")).expanduser()

pytestmark = pytest.mark.lab_boot

# (name, stderr line to wait for, seconds to wait after it, a process that must be running then)
MOMENTS = [
    ("resolving", r"\[lab\] riscv: resolving packages", 0.0, None),
    ("building the payload", r"\[lab\] riscv: building the payload", 0.5, None),
    ("booting QEMU", r"\[lab\] riscv-rv64: (kernel booting|KVM ready|pytest)", 0.5, "qemu-system-riscv64"),
]


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every live process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if rest[0] == "Z":
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        out[int(d)] = (int(rest[1]), cmd)
    return out


def _descendants(root: int) -> dict[int, str]:
    table = _procs()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            found[k] = table[k][1]
            todo.append(k)
    return found


def _still_there(pids: dict[int, str], seconds: float = 5.0) -> dict[int, str]:
    """Which of ``pids`` still run the same command after ``seconds`` (pid reuse aside)?"""
    deadline = time.monotonic() + seconds
    while True:
        now = _procs()
        left = {p: c for p, c in pids.items() if p in now and now[p][1] == c}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _leftovers(out: Path, pid: int) -> list[str]:
    """Temporary files of lab process ``pid``: its staging in ``out``, its named temporaries in the cache."""
    found = [str(p) for p in (out / "riscv" / "payload", out / "riscv" / "native", out / "riscv" / "payload.cpio.gz")
             if p.exists()]
    found += [str(p) for p in out.rglob("*") if re.search(r"\.(tmp|part)\d+$", p.name)]
    for p in list(CACHE.glob("*")) + list(CACHE.glob("*/*")):
        if p.name.endswith((f".tmp{pid}", f".part{pid}")) or p.name.startswith(f"pykvm-lab-riscv-{pid}-"):
            found.append(str(p))
    return found


def _skip_unless_buildable() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_labs import _can_build

    why = _can_build()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("moment,pattern,after,must_run", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_sigint_leaves_nothing_behind(moment, pattern, after, must_run, tmp_path):
    _skip_unless_buildable()
    out = tmp_path / "out"
    lab = subprocess.Popen(
        [sys.executable, "-m", "pykvm.lab", "riscv", "--cpu", "rv64", "--out", str(out), "--timeout", "300"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYKVM_LAB_PROGRESS": "plain"},
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in lab.stderr:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))
            if re.search(pattern, line):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # a cold cache downloads ~330 MB first; a warm one gets to QEMU in 10-30 s
        end = time.monotonic() + 900
        while not seen.wait(0.5):
            assert lab.poll() is None, (f"lab ended (status {lab.returncode}) before {moment!r}:\n"
                                        + "\n".join(lines[-20:]))
            assert time.monotonic() < end, f"lab never got to {moment!r}:\n" + "\n".join(lines[-20:])
        time.sleep(after)
        before = _descendants(lab.pid)
        if must_run:
            assert any(must_run in c for c in before.values()), f"no {must_run} running at {moment!r}: {before}"
        os.killpg(lab.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        rc = lab.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
    err = "\n".join(lines)
    assert rc == 130, f"exit {rc} after SIGINT at {moment!r}:\n{err}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert re.fullmatch(r"lab riscv: interrupted by SIGINT while .+; QEMU and all child processes stopped, "
                        r"temporary files removed", lines[-1]), err
    assert all(line.startswith("[lab] ") for line in lines[:-1]), err  # progress lines, then the one closing line
    assert _still_there(before) == {}, f"left running after SIGINT at {moment!r}"
    ours = {p: c for p, (_, c) in _procs().items() if "qemu-system-" in c and str(out) in c}
    assert ours == {}, f"QEMU of this run still running: {ours}"
    assert _leftovers(out, lab.pid) == []
