"""``pykvm sandbox``: run one command in a Linux guest whose root file system is a host
directory, as ``lkvm sandbox`` and virtme-ng do for kernel developers.

What happens, in order:

1. The kernel (``--kernel``; default: the host's running kernel, ``/boot/vmlinuz-$(uname -r)``)
   is read for its release (x86 bzImage: the header's ``kernel_version`` string, Linux boot
   protocol 2.00+; any image: the ``Linux version`` banner, in the image or in its gzip'd
   payload).
2. An initramfs is written to a temporary file: a static busybox (``--busybox``; default
   ``busybox`` on ``PATH``, which must be statically linked: Debian's ``busybox-static``), the
   modules the guest needs to mount its root (virtio transport, ``virtiofs`` with ``fuse``,
   ``overlay``, their dependencies from each module's ``depends=``; those the kernel builds in,
   per ``modules.builtin``, are skipped) from ``--modules`` (default
   ``/lib/modules/<release>``), and :data:`INIT` as ``/init``, with the command written into it
   (each argument quoted for ``sh``).
3. The guest boots with the directory (``--root``, default ``/``) shared through virtio-fs
   (virtiofsd, read-only unless ``--rw``; run as root with the root ``/``, virtiofsd's chroot
   sandbox rather than its namespace one, which cannot pivot into the current root
   everywhere). ``/init`` mounts it and, read-only, puts an overlay with a tmpfs upper layer
   on each top-level directory, so the command may write anywhere below them and nothing
   reaches the host (the top level itself stays read-only: overlayfs will not look up through
   the host's own mounts inside the share, which one overlay over the whole root would cross). It mounts ``/proc``, ``/sys`` and ``/dev`` in the new root, changes into the working
   directory (``--cwd``, default: the host's current directory when it lies in the share, else
   ``/``), runs the command with ``chroot``, prints a marker line carrying its exit status and
   powers the guest off.
4. The guest's console carries the command's output (stdout and stderr together, the console's
   ``\\n`` untranslated); pykvm prints it, minus the kernel's boot messages before the command
   starts and the marker, and exits with the command's status.

Every host file the sandbox reads (the kernel, busybox, the modules it needs and
``modules.builtin``) is read as the boot loader reads guest images (:mod:`pykvm.boot.image`):
a regular file only, opened with ``O_NONBLOCK`` (a FIFO or a device never blocks or streams),
its size checked against a cap before any read (the kernel: the guest RAM and
:data:`~pykvm.boot.MAX_IMAGE_SIZE`; :data:`MAX_BUSYBOX_SIZE`, :data:`MAX_MODULE_SIZE` and
:data:`MAX_LIST_SIZE`), a decompressed module held to :data:`MAX_MODULE_SIZE`, and the
kernel's release read from its header area (or a streamed scan), not from the whole image.

Errors (no kernel, no static busybox, a module the kernel lacks, an input file that is not a
regular file or is too large, virtiofsd missing, a guest that never reaches the command) are
one line each (:class:`SandboxError`; the command line exits 2); a guest that ends without the
marker exits with status 125.
"""
from __future__ import annotations

import lzma
import os
import re
import secrets
import shlex
import shutil
import struct
import sys
import zlib
import tempfile
from pathlib import Path

from .boot.image import (MAX_IMAGE_SIZE, STREAM_CHUNK, LoadError, _data_extents, _open_regular,
                         _read_image, _too_big)
from .errors import PykvmError
from .lab.initramfs import write_part

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, Iterable, List, Optional, Sequence

TAG = "pykvmroot"                        # the virtio-fs tag of the shared root
NO_MARKER = 125                          # exit status when the guest never reported one
# modules the guest loads to mount its root, by architecture (module names, '-' = '_')
MODULES = {"x86_64": ("virtio_pci", "virtio_console", "virtiofs", "overlay"),
           "riscv64": ("virtio_mmio", "virtio_console", "virtiofs", "overlay")}
# Limits on the host files the sandbox reads (each is read as the boot loader reads images:
# regular files only, opened without blocking, the size checked before reading; pykvm.boot.image)
MAX_BUSYBOX_SIZE = 64 << 20              # bytes of --busybox (a static busybox is 1-3 MiB)
MAX_MODULE_SIZE = 64 << 20               # bytes of a module file, and of its decompressed ELF
MAX_LIST_SIZE = 16 << 20                 # bytes of modules.builtin (a few hundred KiB)
MAX_MODULE_ENTRIES = 200_000             # directory entries looked at under --modules

# /init (busybox sh). @TAG@, @MODE@, @NONCE@, @CWD@ and @ARGS@ are filled in by build_initramfs.
INIT = r"""#!/bin/busybox sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
M="@@PYKVM-SANDBOX:@NONCE@"
fail() { echo "$M:ERROR=$*@@"; poweroff -f; sleep 5; }
mnt() { out=$(mount "$@" 2>&1) || fail "mount $*: $out"; }
while read -r mod; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod" || fail "insmod $mod"
done < /lib/modules/modules.list
mkdir -p /share /rw /newroot
mnt -t virtiofs -o @MODE@ @TAG@ /share
mnt --bind /share /newroot
if [ @MODE@ = ro ]; then
  # one overlay per top-level directory: overlayfs refuses to look up through the share's
  # submounts (the host's own mounts: EREMOTE), which an overlay of / would cross at once
  mnt -t tmpfs -o mode=0755 tmpfs /rw
  for p in /share/*; do
    n=${p#/share/}
    [ -d "$p" ] && [ ! -L "$p" ] || continue
    case "$n" in proc|sys|dev) continue ;; esac
    mkdir -p "/rw/$n/upper" "/rw/$n/work"
    ls "$p/" >/dev/null 2>&1    # a host mount there is a virtio-fs submount: mount it first
    out=$(mount -t overlay overlay -o "lowerdir=$p,upperdir=/rw/$n/upper,workdir=/rw/$n/work" \
      "/newroot/$n" 2>&1) ||
      echo "$M:NOTE=/$n stays read-only: ${out#mount: } ($(dmesg | grep overlay | tail -1))@@"
  done
fi
mnt -t proc proc /newroot/proc
mnt -t sysfs sys /newroot/sys
mnt -t devtmpfs dev /newroot/dev
stty -F /newroot/dev/console -opost 2>/dev/null
set -- @ARGS@
dir=@CWD@
[ -d "/newroot$dir" ] || dir=/
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
echo "$M:START@@"
if [ -x /newroot/bin/sh ]; then
  chroot /newroot /bin/sh -c 'cd "$0" && exec "$@"' "$dir" "$@"
else
  chroot /newroot "$@"
fi
rc=$?
echo "$M:EXIT=$rc@@"
sync
poweroff -f
sleep 5
"""


class SandboxError(PykvmError):
    """The sandbox cannot be set up (one line saying what is missing and where to get it)."""


class SandboxTimeout(SandboxError):
    """The run's time limit passed before the command's status came back."""


# -- the kernel ------------------------------------------------------------------------------
_BANNER = re.compile(rb"Linux version (\S{1,200}) \(")
_GZIP_MAGIC = b"\x1f\x8b\x08"            # a gzip member: ID1, ID2, CM=deflate (RFC 1952 2.3.1)
# bytes of an image read for the bzImage setup header and the string its 16-bit kernel_version
# pointer (offset 0x20E) names: at most 0xFFFF + 0x200, plus the string
KERNEL_HEAD = 0x10200 + 256
_CARRY = 256                             # bytes kept between chunks so no banner is cut in two
MAX_GZIP_TRIES = 64                      # gzip members tried for the banner, the first found
MAX_GUNZIP = 64 << 20                    # bytes inflated from one gzip member, at most
MAX_GUNZIP_TOTAL = 128 << 20             # bytes inflated from all of them together, at most


def _word_release(text: bytes) -> Optional[str]:
    """The first word of ``text`` as a release, or None where there is none or it could not be
    one (a release names a directory under /lib/modules: no '/', not '.' or '..')."""
    words = text.split()
    if not words:
        return None
    rel = words[0].decode("ascii", "replace")
    return None if "/" in rel or rel in (".", "..") else rel


def _header_release(head: bytes) -> Optional[str]:
    """The release in an x86 bzImage setup header (Linux boot protocol 2.00+: ``HdrS`` at 0x202,
    ``kernel_version`` at 0x20E, a pointer less 0x200 to a NUL-terminated string), or None."""
    if len(head) <= 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    (ptr,) = struct.unpack_from("<H", head, 0x20E)
    start = ptr + 0x200
    if not ptr or start >= len(head):
        return None
    end = head.find(b"\0", start, start + 256)
    return _word_release(head[start:end if end > 0 else start + 256])


def _gunzip_release(read: Callable[[int, int], bytes], at: int, budget: int) -> tuple:
    """(release or None, bytes inflated) for the gzip member at offset ``at``: its output is
    searched for the banner as it is inflated, ``budget`` bytes at most."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pos, used, carry = at, 0, b""
    while used < budget:
        data = d.unconsumed_tail
        if not data:
            data = read(pos, 1 << 16)
            pos += len(data)
            if not data:
                break
        try:
            out = d.decompress(data, min(STREAM_CHUNK, budget - used))
        except zlib.error:
            break
        used += len(out)
        buf = carry + out
        m = _BANNER.search(buf)
        if m:
            return _word_release(m.group(1)), used
        carry = buf[-_CARRY:]
        if d.eof:
            break
    return None, used


def _release(read: Callable[[int, int], bytes], extents: Iterable[tuple], limit: int,
             what: str, limit_name: str) -> Optional[str]:
    """The release of the image that ``read(offset, n)`` gives the bytes of (see
    :func:`kernel_release`). Past the bzImage header, the ``[start, end)`` ranges in
    ``extents`` (those that may hold data: a sparse file's holes are skipped) are read front
    to back in :data:`STREAM_CHUNK` pieces, up to where ``read`` gives no more and no more than
    ``limit`` bytes (past that :class:`~pykvm.boot.LoadError` naming ``limit_name``), and the
    image is never held whole; gzip members are inflated as a stream,
    :data:`MAX_GUNZIP_TOTAL` bytes at most."""
    release = _header_release(read(0, KERNEL_HEAD))
    if release is not None:
        return release
    members: List[int] = []
    next_member = 0
    for lo, hi in extents:
        pos, carry = lo, b""
        while pos < hi:
            chunk = read(pos, min(STREAM_CHUNK, hi - pos, limit + 1 - pos))
            if not chunk:
                break
            if pos + len(chunk) > limit:
                raise _too_big(what, pos + len(chunk), limit, limit_name)
            buf, base = carry + chunk, pos - len(carry)
            m = _BANNER.search(buf)
            if m:
                return _word_release(m.group(1))
            at = buf.find(_GZIP_MAGIC, max(0, next_member - base))
            while at >= 0 and len(members) < MAX_GZIP_TRIES:
                members.append(base + at)
                next_member = base + at + 1
                at = buf.find(_GZIP_MAGIC, at + 1)
            carry = buf[-_CARRY:]
            pos += len(chunk)
    budget = MAX_GUNZIP_TOTAL
    for at in members:
        release, used = _gunzip_release(read, at, min(MAX_GUNZIP, budget))
        if release is not None:
            return release
        budget -= used
        if budget <= 0:
            break
    return None


def kernel_release(image: bytes) -> Optional[str]:
    """The kernel release (``uname -r``) of a Linux image's bytes, or None when it cannot be
    told. x86 bzImage: the header's ``kernel_version`` (Linux boot protocol, offset 0x20E: a
    pointer less 0x200 to a NUL-terminated string whose first word is the release); otherwise
    the ``Linux version <release> (`` banner in the image or in one of the first
    :data:`MAX_GZIP_TRIES` gzip members inside it (RISC-V ``Image`` files are uncompressed;
    Debian's ``vmlinuz`` may be gzip'd). A release holding '/' counts as none."""
    view = memoryview(image).cast("B")
    return _release(lambda off, n: bytes(view[off:off + n]), [(0, len(view))], len(view),
                    "kernel image", "its size")


def read_kernel_release(path: str, limit: int = MAX_IMAGE_SIZE,
                        limit_name: str = "guest RAM (--mem)") -> Optional[str]:
    """:func:`kernel_release` of the kernel file ``path``, read as the boot loader reads images
    (:mod:`pykvm.boot.image`): a regular file only (opened with ``O_NONBLOCK``, so a FIFO or a
    device never blocks or streams), ``limit`` bytes at most (and never more than
    :data:`~pykvm.boot.MAX_IMAGE_SIZE`), checked against its size before any read; a bzImage
    costs :data:`KERNEL_HEAD` bytes of reading, other images are scanned in
    :data:`STREAM_CHUNK` pieces, skipping a sparse file's holes (``SEEK_DATA``). Raises :class:`~pykvm.boot.LoadError` (one line) for a file
    that cannot be read, is not a regular file or is too large."""
    if limit > MAX_IMAGE_SIZE:
        limit, limit_name = MAX_IMAGE_SIZE, "the loader's limit MAX_IMAGE_SIZE"
    fd, st, shown = _open_regular(path, "kernel")
    what = f"kernel {shown}"
    try:
        if st.st_size > limit:
            raise _too_big(what, st.st_size, limit, limit_name)
        # a file whose st_size is 0 (/proc, /sys) is read to its end, ``limit`` bytes at most
        extents = _data_extents(fd, st.st_size) if st.st_size else [(0, limit + 1)]
        return _release(lambda off, n: os.pread(fd, n, off), extents, limit, what, limit_name)
    except OSError as e:
        raise LoadError(f"cannot read {what}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def default_kernel() -> str:
    """The host's running kernel, ``/boot/vmlinuz-$(uname -r)`` (virtme-ng's default)."""
    return f"/boot/vmlinuz-{os.uname().release}"


# -- modules ---------------------------------------------------------------------------------
def module_name(path: str) -> str:
    """A module's name from its file name (``virtio_pci.ko.xz`` -> ``virtio_pci``)."""
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def _read_input(path, limit: int, limit_name: str, what: str, hint: str = "") -> bytes:
    """The bytes of the host file ``path``, read by the boot loader's reader
    (:func:`pykvm.boot.image._read_image`: a regular file only, opened with ``O_NONBLOCK``, no
    more than ``limit`` bytes, checked against its size before reading). Raises
    :class:`SandboxError` with the loader's one-line message and ``hint``."""
    try:
        return bytes(_read_image(path, limit, limit_name, what))
    except LoadError as e:
        raise SandboxError(f"{e}{hint}") from None


def _inflate(d, data: bytes, path: Path) -> bytes:
    """``data`` through the decompressor ``d`` (an ``lzma.LZMADecompressor`` or a
    ``zlib.decompressobj``), :data:`MAX_MODULE_SIZE` bytes of output at most."""
    out = d.decompress(data, MAX_MODULE_SIZE + 1)
    if len(out) > MAX_MODULE_SIZE:
        raise SandboxError(f"module {path} decompresses to more than MAX_MODULE_SIZE "
                           f"({MAX_MODULE_SIZE:#x} bytes)")
    if not d.eof:
        raise SandboxError(f"module {path}: the compressed data end early")
    return out


def decompress_module(path: Path) -> bytes:
    """A module file's ELF bytes (``.ko``, ``.ko.xz``, ``.ko.gz``): a regular file of at most
    :data:`MAX_MODULE_SIZE` bytes, decompressing to no more than that. Raises SandboxError for
    ``.ko.zst`` (Python's standard library cannot read zstd), a file that is not regular, too
    large or unreadable, and bad compressed data."""
    path = Path(path)
    if path.name.endswith(".zst"):
        raise SandboxError(f"module {path}: zstd-compressed modules are not supported; give "
                           f"--modules a directory of decompressed ones")
    data = _read_input(path, MAX_MODULE_SIZE, "MAX_MODULE_SIZE", "module")
    try:
        if path.name.endswith(".xz"):
            return _inflate(lzma.LZMADecompressor(), data, path)
        if path.name.endswith(".gz"):
            return _inflate(zlib.decompressobj(16 + zlib.MAX_WBITS), data, path)
    except (lzma.LZMAError, zlib.error) as e:
        raise SandboxError(f"module {path}: {e}") from None
    return data


def modinfo_depends(ko: bytes) -> List[str]:
    """The ``depends=`` names of an uncompressed module (``.modinfo`` holds NUL-separated
    ``key=value`` strings)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if not m or not m.group(1):
        return []
    return [d.replace("-", "_") for d in m.group(1).decode("ascii", "replace").split(",") if d]


def find_modules(moddir: Path, names: Iterable[str]) -> List[tuple]:
    """``[(name, ELF bytes)]`` in load order (dependencies first) for the modules ``names`` and
    what they depend on, found anywhere under ``moddir`` (a ``/lib/modules/<release>`` tree or
    a flat directory of ``.ko`` files; no more than :data:`MAX_MODULE_ENTRIES` entries are
    looked at). A name listed in ``moddir/modules.builtin`` is skipped; so is one found neither
    there nor as a file when ``modules.builtin`` is absent (the kernel may build it in). Only
    the modules needed are read (:func:`decompress_module`); ``modules.builtin`` must be a
    regular file of at most :data:`MAX_LIST_SIZE` bytes. Raises SandboxError for a module the
    kernel has neither way, and for a file that cannot be read so."""
    moddir = Path(moddir)
    files: Dict[str, Path] = {}
    seen_entries = 0
    for dirpath, dirs, fnames in os.walk(moddir):
        seen_entries += len(dirs) + len(fnames)
        if seen_entries > MAX_MODULE_ENTRIES:
            raise SandboxError(f"modules directory {moddir} holds more than "
                               f"{MAX_MODULE_ENTRIES} entries; give --modules the kernel's "
                               f"/lib/modules/<release>")
        for f in fnames:
            if ".ko" in f:
                files.setdefault(module_name(f), Path(dirpath) / f)
    builtin_file = moddir / "modules.builtin"
    builtin = None
    if os.path.lexists(builtin_file):
        text = _read_input(builtin_file, MAX_LIST_SIZE, "MAX_LIST_SIZE", "modules.builtin")
        builtin = {module_name(line.strip())
                   for line in text.decode("utf-8", "replace").splitlines() if line.strip()}
    out: List[tuple] = []
    seen: set = set()

    def visit(name: str, chain: tuple) -> None:
        if name in seen or (builtin is not None and name in builtin):
            return
        seen.add(name)
        path = files.get(name)
        if path is None:
            if builtin is None and not chain:
                return                    # no modules.builtin: perhaps built in
            needed = f" (needed by {chain[-1]})" if chain else ""
            raise SandboxError(f"the kernel has no {name} module{needed} in {moddir} and does "
                               f"not build it in")
        data = decompress_module(path)
        for dep in modinfo_depends(data):
            visit(dep, chain + (name,))
        out.append((name, data))

    for n in names:
        visit(n.replace("-", "_"), ())
    return out


def static_busybox(path: Optional[str] = None) -> bytes:
    """The bytes of a statically linked busybox: ``path``, else ``busybox`` on PATH; a regular
    file of at most :data:`MAX_BUSYBOX_SIZE` bytes. Raises SandboxError when there is none,
    it cannot be read so, or it is dynamically linked (an ELF with a PT_INTERP program
    header)."""
    found = path or shutil.which("busybox")
    if not found:
        raise SandboxError("no busybox found: give --busybox, or install a static one "
                           "(Debian: busybox-static)")
    data = _read_input(found, MAX_BUSYBOX_SIZE, "MAX_BUSYBOX_SIZE", "busybox",
                       " (give --busybox a static busybox; Debian: busybox-static)")
    if data[:4] != b"\x7fELF" or len(data) < 0x40 or data[4] != 2:
        raise SandboxError(f"busybox {found}: not a 64-bit ELF program")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            break
        if struct.unpack_from("<I", data, off)[0] == 3:           # PT_INTERP
            raise SandboxError(f"busybox {found} is dynamically linked; give a static one "
                               f"(Debian: busybox-static)")
    return data


# -- the initramfs ---------------------------------------------------------------------------
def init_script(argv: Sequence[str], *, nonce: str, cwd: str = "/", writable: bool = False,
                tag: str = TAG) -> str:
    """:data:`INIT` with its fields filled in: ``argv`` quoted for ``sh``, ``cwd`` (an
    absolute path inside the share), ``writable`` (the share mounted read-write, no overlay)."""
    if not argv:
        raise SandboxError("no command given (pykvm sandbox -- CMD [ARG...])")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,36}", tag):
        raise SandboxError(f"bad virtio-fs tag {tag!r}")
    return (INIT.replace("@NONCE@", nonce).replace("@TAG@", tag)
            .replace("@MODE@", "rw" if writable else "ro")
            .replace("@CWD@", shlex.quote(cwd if cwd.startswith("/") else "/" + cwd))
            .replace("@ARGS@", " ".join(shlex.quote(a) for a in argv)))


def build_initramfs(out: Path, *, busybox: bytes, modules: Sequence[tuple], init: str) -> None:
    """Write a gzip'd newc initramfs to ``out``: ``/bin/busybox``, ``modules`` (``[(name,
    ELF bytes)]`` in load order, as ``/lib/modules/<name>.ko`` with ``modules.list``) and
    ``init`` as ``/init``."""
    def fill(w) -> None:
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
            w.dir(d, 0o1777 if d == "tmp" else 0o755)
        w.file("bin/busybox", busybox, 0o755)
        w.symlink("bin/sh", "busybox")
        for name, data in modules:
            w.file(f"lib/modules/{name}.ko", data, 0o644)
        w.file("lib/modules/modules.list", "".join(f"{n}.ko\n" for n, _ in modules).encode())
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("init", init.encode(), 0o755)

    write_part(Path(out), fill, level=1)


# -- the console -----------------------------------------------------------------------------
class ConsoleFilter:
    """Turns the guest's console into the command's output: drops everything before the
    ``START`` marker (the kernel's messages), passes what follows to ``write`` (bytes), and
    takes the ``EXIT=<n>`` marker as the command's status (:attr:`status`), an ``ERROR=``
    marker as :attr:`error`. Markers carry a per-run nonce, so the command's own output cannot
    forge one."""

    def __init__(self, nonce: str, write: Callable[[bytes], None]):
        self._mark = f"@@PYKVM-SANDBOX:{nonce}:".encode()
        self._write = write
        self._buf = b""
        self.started = False
        self.status: Optional[int] = None
        self.error: Optional[str] = None
        self.notes: List[str] = []        # what /init could not do and went on without
        self.early = b""                  # the console before START (kept, bounded, for errors)

    def feed(self, data: bytes) -> None:
        """Take the next console bytes."""
        self._buf += data
        mark = self._mark
        while True:
            i = self._buf.find(mark)
            if i < 0:
                hold = 0                          # a marker's start may end this chunk
                for n in range(min(len(mark) - 1, len(self._buf)), 0, -1):
                    if self._buf.endswith(mark[:n]):
                        hold = n
                        break
                self._emit(self._buf[:len(self._buf) - hold])
                self._buf = self._buf[len(self._buf) - hold:]
                return
            self._emit(self._buf[:i])
            end = self._buf.find(b"@@", i + len(mark))
            if end < 0:
                self._buf = self._buf[i:]
                if len(self._buf) > 256:          # no marker is that long: plain output
                    self._emit(self._buf)
                    self._buf = b""
                return
            self._marker(self._buf[i + len(mark):end].decode("ascii", "replace"))
            rest = self._buf[end + 2:]
            for eol in (b"\r\n", b"\n"):
                if rest.startswith(eol):
                    rest = rest[len(eol):]
                    break
            self._buf = rest

    def _marker(self, what: str) -> None:
        if what == "START":
            self.started = True
        elif what.startswith("EXIT="):
            try:
                self.status = int(what[5:]) & 0xFF
            except ValueError:
                self.status = NO_MARKER
        elif what.startswith("ERROR="):
            self.error = what[6:]
        elif what.startswith("NOTE="):
            self.notes.append(what[5:])

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.started and self.status is None:
            self._write(data)
        elif not self.started:
            self.early = (self.early + data)[-8192:]

    def close(self) -> None:
        """The console ended: pass on what is held back."""
        self._emit(self._buf)
        self._buf = b""


# -- the run ---------------------------------------------------------------------------------
def run(argv: Sequence[str], *, kernel: Optional[str] = None, root: str = "/",
        modules: Optional[str] = None, busybox: Optional[str] = None, writable: bool = False,
        cwd: Optional[str] = None, mem_size: int = 512 << 20, vcpus: int = 1,
        timeout: Optional[float] = 600.0, cmdline: str = "",
        out: Optional[Callable[[bytes], None]] = None,
        note: Optional[Callable[[str], None]] = None,
        machine_factory: Optional[Callable] = None) -> int:
    """Run ``argv`` in a Linux guest whose root is the host directory ``root`` (module
    docstring) and return its exit status (0-255; :data:`NO_MARKER` when the guest ended
    without reporting one). ``kernel``: the image (default :func:`default_kernel`);
    ``modules``: the kernel's modules directory (default ``/lib/modules/<release>``);
    ``busybox``: a static busybox; ``writable``: share ``root`` read-write (no overlay: the
    command's writes reach the host); ``cwd``: the working directory inside the share;
    ``mem_size`` (bytes), ``vcpus``, ``timeout`` (seconds for the whole run; 0 or None: no
    limit; past it :class:`SandboxTimeout`), ``cmdline``
    (more kernel parameters); ``out(bytes)`` receives the command's output (default: this
    process's stdout); ``note(str)``: each thing /init could not do and went on without (a
    top-level directory left read-only, with the reason). Raises :class:`SandboxError` for
    what is missing, and what :class:`pykvm.machine.Machine` raises."""
    from .machine import Machine
    kernel = kernel or default_kernel()
    try:
        release = read_kernel_release(kernel, mem_size)
    except LoadError as e:
        raise SandboxError(f"{e} (give --kernel)") from None
    root_p = Path(root).resolve()
    if not root_p.is_dir():
        raise SandboxError(f"root {root}: not a directory")
    if modules is None:
        if release is None:
            raise SandboxError(f"kernel {kernel}: its release cannot be read; give --modules")
        modules = f"/lib/modules/{release}"
    if not Path(modules).is_dir():
        why = "is not a directory" if Path(modules).exists() else "does not exist"
        raise SandboxError(f"modules directory {modules} {why} (give --modules: the "
                           f"kernel's /lib/modules/<release>)")
    arch = os.uname().machine
    mods = find_modules(Path(modules), MODULES.get(arch, MODULES["x86_64"]))
    bb = static_busybox(busybox)
    if cwd is None:
        here = Path.cwd().resolve()
        rel = here.relative_to(root_p).as_posix() if here.is_relative_to(root_p) else "."
        cwd = "/" if rel == "." else "/" + rel
    nonce = secrets.token_hex(6)
    write = out or _stdout_writer()
    filt = ConsoleFilter(nonce, write)
    share = f"{str(root_p).replace(',', ',,')},tag={TAG}" + ("" if writable else ",ro")
    if str(root_p) == "/" and os.geteuid() == 0:
        # virtiofsd's namespace sandbox pivots into the shared directory, which the current
        # root itself cannot be on every host (EBUSY where / is an initramfs); as root, its
        # chroot sandbox confines it to the same tree
        share += ",sandbox=chroot"
    with tempfile.TemporaryDirectory(prefix="pykvm-sandbox-") as td:
        initrd = Path(td) / "initramfs.cpio.gz"
        build_initramfs(initrd, busybox=bb, modules=mods,
                        init=init_script(argv, nonce=nonce, cwd=cwd, writable=writable))
        console = "console=ttyS0"
        line = f"{console} quiet loglevel=1 panic=-1 rdinit=/init {cmdline}".strip()
        make = machine_factory or Machine
        with make(kernel, initrd=[str(initrd)], cmdline=line, mem_size=mem_size, vcpus=vcpus,
                  shares=[share], on_console=filt.feed) as m:
            res = m.run(timeout=timeout or None)
    filt.close()
    for line in filt.notes:
        if note is not None:
            note(line)
    if getattr(res, "exit", None) == "timeout" and filt.status is None:
        raise SandboxTimeout(f"the guest did not finish within {timeout} s")
    if filt.error is not None:
        raise SandboxError(f"the guest could not set up the sandbox: {filt.error}")
    if filt.status is None:
        tail = filt.early.decode(errors="replace").strip().splitlines()[-5:]
        if not filt.started:
            raise SandboxError("the guest ended before running the command; its console "
                               "ended with: " + " | ".join(tail))
        return NO_MARKER
    return filt.status


def _stdout_writer() -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return write


__all__ = ["run", "SandboxError", "SandboxTimeout", "kernel_release", "read_kernel_release",
           "find_modules", "decompress_module", "build_initramfs",
           "init_script", "ConsoleFilter", "static_busybox", "default_kernel", "MODULES",
           "INIT", "TAG", "NO_MARKER"]
