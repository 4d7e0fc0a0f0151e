"""A newc cpio writer and the lab's ``/init``.

The image is built from a staging directory (a root file system laid out on the host) plus a few
synthetic entries (device nodes, which an unprivileged or careful builder should not mknod on the
host).  Every entry is owned by root; modes, symlinks and mtimes come from the staging tree.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

TRAILER = "TRAILER!!!"

# Markers printed by /init on the serial console; {nonce} makes them unique per run so that nothing
# echoed earlier (a kernel command line, a test's own output) can be mistaken for them.
MARK_OUT_BEGIN = "@@PYKVM-LAB:{nonce}:PYTEST-OUTPUT-BEGIN@@"
MARK_OUT_END = "@@PYKVM-LAB:{nonce}:PYTEST-OUTPUT-END@@"
MARK_XML_BEGIN = "@@PYKVM-LAB:{nonce}:JUNIT-BASE64-BEGIN@@"
MARK_XML_END = "@@PYKVM-LAB:{nonce}:JUNIT-BASE64-END@@"
MARK_RC = "@@PYKVM-LAB:{nonce}:PYTEST-EXIT="  # followed by the number and "@@"
MARK_INIT_ERROR = "@@PYKVM-LAB:{nonce}:INIT-ERROR="  # followed by a reason and "@@"


class CpioWriter:
    """Writes a ``newc`` (SVR4, no CRC) cpio archive, the format the Linux initramfs unpacker reads."""

    def __init__(self, fileobj):
        self.f = fileobj
        self.ino = 1
        self.names: set[str] = set()

    def _pad(self, n: int) -> None:
        if n % 4:
            self.f.write(b"\0" * (4 - n % 4))

    def add(self, name: str, mode: int, data: bytes = b"", mtime: int = 0, rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/") or "."
        if name in self.names:
            raise ValueError(f"duplicate cpio entry {name}")
        self.names.add(name)
        raw = name.encode() + b"\0"
        fields = (
            self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, int(mtime), len(data),
            0, 0, rdev[0], rdev[1], len(raw), 0,
        )
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.ino += 1
        self.f.write(hdr)
        self.f.write(raw)
        self._pad(len(hdr) + len(raw))
        self.f.write(data)
        self._pad(len(data))

    def dir(self, name: str, perm: int = 0o755, mtime: int = 0) -> None:
        self.add(name, stat.S_IFDIR | perm, mtime=mtime)

    def file(self, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> None:
        self.add(name, stat.S_IFREG | perm, data, mtime=mtime)

    def symlink(self, name: str, target: str, mtime: int = 0) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime)

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (directories first, sorted, symlinks not followed)."""
        root = Path(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            base = prefix.strip("/")
            if rel_dir != ".":
                base = f"{base}/{rel_dir}" if base else rel_dir
            if base and base not in self.names:
                st = os.lstat(dirpath)
                self.dir(base, stat.S_IMODE(st.st_mode), int(st.st_mtime))
            # symlinked directories show up in dirnames but must be written as links
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                full = os.path.join(dirpath, name)
                arc = f"{base}/{name}" if base else name
                st = os.lstat(full)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(arc, os.readlink(full), int(st.st_mtime))
                elif stat.S_ISREG(st.st_mode):
                    self.file(arc, Path(full).read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime))

    def close(self) -> None:
        self.add(TRAILER, 0)
        # the kernel is happy without it, but conventional archives end on a 512-byte boundary
        pos = self.f.tell() if hasattr(self.f, "tell") else 0
        if pos % 512:
            self.f.write(b"\0" * (512 - pos % 512))


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (mode, data)} of a ``newc`` cpio archive (uncompressed), up to its trailer. Raises
    ValueError for an entry that is not newc or runs past the end."""
    out: dict[str, tuple[int, bytes]] = {}
    at = 0
    while at + 110 <= len(data):
        hdr = data[at:at + 110]
        if hdr[:6] != b"070701":
            raise ValueError(f"not a newc entry at offset {at}")
        mode, size, namesize = int(hdr[14:22], 16), int(hdr[54:62], 16), int(hdr[94:102], 16)
        name = data[at + 110:at + 110 + namesize - 1].decode(errors="replace")
        at = (at + 110 + namesize + 3) & ~3
        if name == TRAILER:
            break
        if at + size > len(data):
            raise ValueError(f"cpio entry {name} runs past the end")
        out[name] = (mode, data[at:at + size])
        at = (at + size + 3) & ~3
    return out


def write_part(out: Path, fill, *, level: int = 6) -> None:
    """Write a gzip'd newc archive to ``out`` atomically: ``fill(writer)`` adds the entries to a
    :class:`CpioWriter` (the trailer is added here); a temporary file beside ``out`` (named
    with the process id) is renamed over it, or removed on any failure. ``level``: gzip's."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0) as gz:
            w = CpioWriter(gz)
            fill(w)
            w.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_initramfs(path: Path, root: Path, extra_files: dict[str, tuple[bytes, int]] | None = None) -> int:
    """Write ``root`` plus /dev/console, /dev/null and ``extra_files`` as a gzip'd newc cpio."""
    path = Path(path)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        w = CpioWriter(gz)
        w.tree(root)
        for d in ("dev", "proc", "sys", "tmp", "run"):
            if d not in w.names:
                w.dir(d, 0o1777 if d == "tmp" else 0o755)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        for name, (data, perm) in (extra_files or {}).items():
            w.file(name, data, perm)
        w.close()
    return path.stat().st_size


INIT_SCRIPT = r"""#!/bin/sh
# pykvm lab /init: generated by pykvm/lab/initramfs.py
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 TERM=dumb NO_COLOR=1 PYTHON_COLORS=0
. /lab/lab.conf
fail() { echo "@@PYKVM-LAB:$NONCE:INIT-ERROR=$*@@"; poweroff -f; sleep 5; exit 1; }
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mkdir -p /root
# the modules to load: the base image's /lab/modules.list (Debian's), or this boot's own list from
# the payload (--kernel, --modules, --kvm-module; PYKVM_LAB_PYTEST names the boot); a name is
# under /lab/modules, a path is absolute
list=/lab/modules.list
run_list="/lab/modules-run${PYKVM_LAB_PYTEST:+-$PYKVM_LAB_PYTEST}.list"
if [ -f "$run_list" ]; then list="$run_list"; echo "[lab] modules from $run_list"; fi
while read -r mod args; do
  [ -n "$mod" ] || continue
  case "$mod" in /*) path="$mod" ;; *) path="/lab/modules/$mod" ;; esac
  insmod "$path" $args || fail "insmod $path $args failed"
done < "$list"
if [ -d /sys/module/kvm ] && [ ! -e /sys/module/kvm/initstate ]; then
  echo "[lab] KVM is built into $(uname -r): nothing to insmod for it"
fi
[ -d /sys/module/kvm ] || fail "no KVM in $(uname -r): no kvm module loaded and none built in"
[ -c /dev/kvm ] || mknod /dev/kvm c 10 232 || fail "no /dev/kvm"
echo "[lab] $(uname -r) $(uname -m); kvm: $(ls -l /dev/kvm)"
if [ "$SHELL_MODE" = 1 ]; then
  echo "[lab] shell (exit or poweroff -f to end); tests: cd /pykvm && python3 -m pytest $TESTS"
  setsid cttyhack sh || sh
  poweroff -f
fi
cd /pykvm || fail "no /pykvm"
echo "@@PYKVM-LAB:$NONCE:PYTEST-OUTPUT-BEGIN@@"
# /lab/pytest-args.json holds: <test paths> -q --junitxml=/tmp/junit.xml -o cache_dir=/tmp/pc [-k EXPR]
PYTHONPATH=/pykvm python3 /lab/run_pytest.py
rc=$?
echo "@@PYKVM-LAB:$NONCE:PYTEST-OUTPUT-END@@"
if [ -f /tmp/junit.xml ]; then
  echo "@@PYKVM-LAB:$NONCE:JUNIT-BASE64-BEGIN@@"
  python3 -c 'import base64,sys; sys.stdout.write(base64.encodebytes(open("/tmp/junit.xml","rb").read()).decode())'
  echo "@@PYKVM-LAB:$NONCE:JUNIT-BASE64-END@@"
fi
echo "@@PYKVM-LAB:$NONCE:PYTEST-EXIT=$rc@@"
sync
poweroff -f
sleep 10
"""

# `python3 -m pytest <args>` with the arguments taken from a JSON list, so that a -k expression with
# spaces or quotes needs no shell quoting.
# PYKVM_LAB_PYTEST=<name> on the lab kernel's command line (it reaches /init's environment) picks
# /lab/pytest-args-<name>.json: a boot of its own for some tests (pykvm/lab/build.py, qemu_tests)
# A boot with a module-parameter matrix (/lab/matrix[-<name>].json, --param) runs pytest once per
# combination, reloading the KVM modules between them (pykvm/lab/matrix.py, guest_main).
RUN_PYTEST = """import json, os, runpy, sys
name = os.environ.get("PYKVM_LAB_PYTEST", "")
args = f"/lab/pytest-args-{name}.json" if name else "/lab/pytest-args.json"
matrix = f"/lab/matrix-{name}.json" if name else "/lab/matrix.json"
if os.path.exists(matrix):
    from pykvm.lab import matrix as m
    sys.exit(m.guest_main(matrix, args))
sys.argv = ["pytest"] + json.load(open(args))
runpy.run_module("pytest", run_name="__main__", alter_sys=True)
"""
