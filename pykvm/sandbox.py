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

Errors (no kernel, no static busybox, a module the kernel lacks, virtiofsd missing, a guest
that never reaches the command) are one line each (:class:`SandboxError`); a guest that ends
without the marker exits with status 125.
"""
from __future__ import annotations

import gzip
import io
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
_BANNER = re.compile(rb"Linux version (\S+) \(")


def kernel_release(image: bytes) -> Optional[str]:
    """The kernel release (``uname -r``) of a Linux image, or None when it cannot be told.
    x86 bzImage: the header's ``kernel_version`` (Linux boot protocol, offset 0x20E: a pointer
    less 0x200 to a NUL-terminated string whose first word is the release); otherwise the
    ``Linux version <release> (`` banner in the image or in the first gzip member inside it
    (RISC-V ``Image`` files are uncompressed; Debian's ``vmlinuz`` may be gzip'd)."""
    if len(image) > 0x210 and image[0x202:0x206] == b"HdrS":
        (ptr,) = struct.unpack_from("<H", image, 0x20E)
        start = ptr + 0x200
        if ptr and start < len(image):
            end = image.find(b"\0", start, start + 256)
            words = image[start:end if end > 0 else start + 256].split()
            if words:
                return words[0].decode("ascii", "replace")
    m = _BANNER.search(image)
    if m:
        return m.group(1).decode("ascii", "replace")
    at = image.find(b"\x1f\x8b\x08")
    while at >= 0:
        try:
            data = gzip.GzipFile(fileobj=io.BytesIO(image[at:])).read(64 << 20)
        except (OSError, EOFError, zlib.error):
            data = b""
        m = _BANNER.search(data)
        if m:
            return m.group(1).decode("ascii", "replace")
        at = image.find(b"\x1f\x8b\x08", at + 1)
    return None


def default_kernel() -> str:
    """The host's running kernel, ``/boot/vmlinuz-$(uname -r)`` (virtme-ng's default)."""
    return f"/boot/vmlinuz-{os.uname().release}"


# -- modules ---------------------------------------------------------------------------------
def module_name(path: str) -> str:
    """A module's name from its file name (``virtio_pci.ko.xz`` -> ``virtio_pci``)."""
    return os.path.basename(path).split(".ko")[0].replace("-", "_")


def decompress_module(path: Path) -> bytes:
    """A module file's ELF bytes (``.ko``, ``.ko.xz``, ``.ko.gz``). Raises SandboxError for
    ``.ko.zst`` (Python's standard library cannot read zstd) and unreadable files."""
    try:
        data = Path(path).read_bytes()
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (OSError, lzma.LZMAError, EOFError) as e:
        raise SandboxError(f"module {path}: {e}") from None
    if path.name.endswith(".zst"):
        raise SandboxError(f"module {path}: zstd-compressed modules are not supported; give "
                           f"--modules a directory of decompressed ones")
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
    a flat directory of ``.ko`` files). A name listed in ``moddir/modules.builtin`` is skipped;
    so is one found neither there nor as a file when ``modules.builtin`` is absent (the kernel
    may build it in). Raises SandboxError for a module the kernel has neither way."""
    moddir = Path(moddir)
    files: Dict[str, Path] = {}
    for dirpath, _dirs, fnames in os.walk(moddir):
        for f in fnames:
            if ".ko" in f:
                files.setdefault(module_name(f), Path(dirpath) / f)
    builtin_file = moddir / "modules.builtin"
    builtin = None
    if builtin_file.is_file():
        builtin = {module_name(line.strip()) for line in builtin_file.read_text().splitlines()
                   if line.strip()}
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
    """The bytes of a statically linked busybox: ``path``, else ``busybox`` on PATH. Raises
    SandboxError when there is none or it is dynamically linked (an ELF with a PT_INTERP
    program header)."""
    found = path or shutil.which("busybox")
    if not found:
        raise SandboxError("no busybox found: give --busybox, or install a static one "
                           "(Debian: busybox-static)")
    try:
        data = Path(found).read_bytes()
    except OSError as e:
        raise SandboxError(f"busybox {found}: {e.strerror}") from None
    if data[:4] != b"\x7fELF" or data[4] != 2:
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
        image = Path(kernel).read_bytes()
    except OSError as e:
        raise SandboxError(f"kernel {kernel}: {e.strerror} (give --kernel)") from None
    root_p = Path(root).resolve()
    if not root_p.is_dir():
        raise SandboxError(f"root {root}: not a directory")
    release = kernel_release(image)
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


__all__ = ["run", "SandboxError", "SandboxTimeout", "kernel_release", "find_modules", "build_initramfs",
           "init_script", "ConsoleFilter", "static_busybox", "default_kernel", "MODULES",
           "INIT", "TAG", "NO_MARKER"]
