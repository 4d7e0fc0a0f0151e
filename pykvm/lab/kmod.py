"""Rebuild the nested lab's KVM modules from Debian's own source: ``python -m pykvm.lab.kmod``.

The nested lab boots Debian trixie's ``linux-image-<abi>-cloud-amd64``
(:func:`pykvm.lab.debian.nested_kernel_image`). This module rebuilds just its KVM modules —
``kvm.ko``, ``kvm-amd.ko`` and ``kvm-intel.ko`` (``arch/x86/kvm`` with the ``virt/kvm`` files it
links in) — so that a KVM developer can load a modified module into the lab's L1 kernel
(``--patch FILE`` applies a unified diff first). Every input is a checksummed Debian package of the
same version as the kernel image:

* ``linux-source-<series>`` at the image's exact version (only ``arch/x86/kvm`` and ``virt/kvm``
  are unpacked from its tarball);
* ``linux-headers-<abi>-cloud-amd64``, ``linux-headers-<abi>-common`` and ``linux-kbuild-<abi>``:
  the kernel's ``.config``, ``auto.conf``, ``Module.symvers`` and prebuilt kbuild tools (modpost,
  objtool, resolve_btfids);
* the compiler: the kernel was built by trixie's gcc-14 and ``auto.conf`` carries gcc-14's flags,
  so the build runs in a minimal trixie build root unpacked from trixie's own packages
  (:data:`TOOLCHAIN` and their Depends/Pre-Depends), entered with ``chroot`` inside a private
  mount and network namespace (``unshare``; no network inside).

The result is an external-module build (``make -C /usr/src/linux-headers-<abi>-cloud-amd64
M=...``) with the debug info stripped, as Debian's packaged modules are. Its ``manifest.json``
records the packages, the compiler, the patches and each module's sha256 and ``vermagic``; the build
counts as done only when every module's ``vermagic`` equals that of Debian's own ``kvm.ko`` for
the same kernel. The modules are out-of-tree and unsigned: loading one taints the kernel (``O``,
``E``), which the lab's kernel allows (it does not enforce module signatures).

Caches, under the lab cache (``~/.cache/pykvm/lab``, ``$PYKVM_LAB_CACHE``), each under its file lock:
``kmod/root-<key>`` (the build root, keyed by its packages' sha256s), ``kmod/source-<sha>`` (the KVM
source subtrees), ``kmod/modules-<key>`` (the result, keyed by :func:`build_key`: kernel package
version and the patches' sha256s in order).

Exit status of the command: 0 built (or found in the cache), the directory on stdout's last line;
2 bad arguments; 3 the modules could not be built (one line on stderr: a patch that does not apply,
a compiler error with the log's path, a missing package); 130 / 143 / 129 on SIGINT / SIGTERM /
SIGHUP (the build stopped, temporary files removed).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import posixpath
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .. import _cliutil
from . import proc
from .debian import (NESTED_KERNEL_SUITE, Archive, LabError, Package, extract_deb, merged_usr_links,
                     nested_kernel_image, sha256_file)

PROG = "python -m pykvm.lab.kmod"
KMOD_FORMAT = 1          # bump when the layout of a result directory or the build recipe changes
ROOT_FORMAT = 2          # bump when the build root's layout (fix-ups) changes
EXIT_FAILED = 3

# the source subtrees an x86 KVM build compiles (arch/x86/kvm/Makefile includes virt/kvm's objects)
SOURCE_DIRS = ("arch/x86/kvm", "virt/kvm")
MODULES = ("kvm.ko", "kvm-amd.ko")    # the nested lab's (an AMD CPU under QEMU)
INTEL_MODULE = "kvm-intel.ko"          # with intel=True / --intel
FLAVOUR = "cloud-amd64"

# trixie packages of the build root (with their Depends/Pre-Depends), besides linux-kbuild-<abi>
TOOLCHAIN = ("gcc-14", "gcc", "binutils", "make", "libc6-dev", "coreutils", "sed", "grep", "mawk",
             "dash", "bash", "perl-base", "diffutils", "findutils")
# dependencies a kernel module build never runs: language runtimes of gcc's own libraries
# (sanitizers, OpenMP, transactional memory ...), gprofng, the GCC plugin for GDB
SKIP = frozenset({"libasan8", "liblsan0", "libtsan2", "libubsan1", "libhwasan0", "libgomp1",
                  "libitm1", "libquadmath0", "libatomic1", "libcc1-0", "libgprofng0"})

# what the build root leaves out of its packages (documentation and translations: 53 of 350 MB)
_ROOT_LEFT_OUT = tuple(f"usr/share/{d}/" for d in ("doc", "man", "info", "locale", "lintian"))

LogFn = Callable[[str], None]


class KmodError(LabError):
    """The KVM modules could not be built; the message is the one-line reason."""


def _default_log(msg: str) -> None:
    print(f"[kmod] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# what to build from


@dataclass
class Plan:
    """The packages of one build: the kernel image, its source, headers and the build root's set."""

    image: Package
    source: Package
    headers: list[Package]          # linux-headers-<abi>-cloud-amd64, linux-headers-<abi>-common
    root: list[Package]             # the whole build root (toolchain closure + kbuild + headers)

    @property
    def release(self) -> str:
        """The kernel release (``uname -r``): ``6.12.117+deb13-cloud-amd64``."""
        return self.image.name[len("linux-image-"):]

    @property
    def headers_dir(self) -> str:
        """Where the flavour's headers lie inside the build root."""
        return f"/usr/src/linux-headers-{self.release}"


def _abi_series(image: Package) -> tuple[str, str]:
    """(abi, series) of ``linux-image-<abi>-cloud-amd64``: (``6.12.117+deb13``, ``6.12``)."""
    m = re.fullmatch(rf"linux-image-((\d+\.\d+)\.[^-]+)-{FLAVOUR}", image.name)
    if not m:
        raise KmodError(f"{image.name}: not a linux-image-<abi>-{FLAVOUR} package name")
    return m.group(1), m.group(2)


def _exact(archive: Archive, suite: str, name: str, version: str) -> Package:
    """Package ``name`` at exactly ``version`` in ``suite``'s amd64 index, or one KmodError line."""
    ix = archive.index(suite, "amd64")
    have = ix.packages.get(name, [])
    for p in have:
        if p.version == version:
            return p
    found = ", ".join(p.version for p in have) or "none"
    raise KmodError(f"{name} {version} (the lab kernel's version) is not in the {suite}/amd64 index "
                    f"(it has: {found}); try again with a refreshed index, or after the mirror catches up")


def resolve(archive: Archive, suite: str = NESTED_KERNEL_SUITE) -> Plan:
    """The packages for rebuilding the KVM modules of the kernel the nested lab boots.

    Raises :class:`KmodError` (a :class:`~pykvm.lab.debian.LabError`) when the index lacks the
    source or a header package at the kernel image's exact version."""
    image = nested_kernel_image(archive, suite)
    abi, series = _abi_series(image)
    source = _exact(archive, suite, f"linux-source-{series}", image.version)
    headers = [_exact(archive, suite, f"linux-headers-{abi}-{FLAVOUR}", image.version),
               _exact(archive, suite, f"linux-headers-{abi}-common", image.version)]
    kbuild = _exact(archive, suite, f"linux-kbuild-{abi}", image.version)
    ix = archive.index(suite, "amd64")
    tools = ix.closure(list(TOOLCHAIN) + [kbuild.name], skip=lambda n: n in SKIP)
    got = next((p for p in tools if p.name == kbuild.name), None)
    if got is None or got.version != image.version:
        raise KmodError(f"{kbuild.name}: the index's version is not {image.version}")
    return Plan(image=image, source=source, headers=headers, root=tools + headers)


# --------------------------------------------------------------------------------------------------
# keys


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\n")
    return h.hexdigest()


def module_names(intel: bool = False) -> tuple[str, ...]:
    """The modules a build makes: :data:`MODULES`, and :data:`INTEL_MODULE` with ``intel``."""
    return MODULES + ((INTEL_MODULE,) if intel else ())


def build_key(kernel_version: str, patch_sha256s: Sequence[str], intel: bool = False) -> str:
    """The cache key of a module build (64 hex digits): the kernel package version and each
    patch's sha256 in the order they apply (two patches swapped are another build), and whether
    ``kvm-intel.ko`` is built too."""
    return _digest([f"kmod-format {KMOD_FORMAT}", f"kernel {kernel_version}",
                    f"modules {' '.join(module_names(intel))}", *patch_sha256s])


def root_key(packages: Iterable[Package]) -> str:
    """The cache key of a build root (64 hex digits): its packages' sha256s, as a set."""
    return _digest([f"root-format {ROOT_FORMAT}", *sorted(p.sha256 for p in packages)])


# --------------------------------------------------------------------------------------------------
# .modinfo


def read_modinfo(path: Path) -> dict[str, str]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` section (``vermagic``,
    ``srcversion``, ``depends``, ``name`` ...), from a ``.ko`` or an xz-compressed ``.ko.xz``.

    A key that occurs more than once (``alias``, ``parm``) keeps its last value. Raises
    :class:`KmodError` for a file that is not an ELF object or has no ``.modinfo`` section."""
    path = Path(path)
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        try:
            data = lzma.decompress(data)
        except lzma.LZMAError as e:
            raise KmodError(f"{path}: not xz-compressed ({e})") from None
    try:
        sec = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as e:
        raise KmodError(f"{path}: not an ELF object ({e})") from None
    if sec is None:
        raise KmodError(f"{path}: no .modinfo section (not a kernel module)")
    info: dict[str, str] = {}
    for entry in sec.data().split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info[key] = value
    return info


def vermagic(path: Path) -> str:
    """The ``vermagic`` string of a module (``6.12.117+deb13-cloud-amd64 SMP preempt mod_unload
    modversions ``): what the kernel compares before it loads the module."""
    info = read_modinfo(path)
    if "vermagic" not in info:
        raise KmodError(f"{path}: .modinfo has no vermagic")
    return info["vermagic"]


def reference_vermagic(archive: Archive, image: Package) -> str:
    """The ``vermagic`` of Debian's own ``kvm.ko`` in ``image`` (unpacked once, then cached)."""
    kdir = archive.cache / "kmod"
    kdir.mkdir(parents=True, exist_ok=True)
    stamp = kdir / f"reference-{image.sha256[:16]}.json"
    if not stamp.exists():
        deb = archive.fetch(image, "kmod: Debian's kvm.ko (vermagic reference)")
        with archive.lock(f"kmod-{stamp.name}", f"{image.name}'s kvm.ko"):
            if not stamp.exists():
                with tempfile.TemporaryDirectory(dir=kdir, prefix=".ref-") as tmp:
                    got = extract_deb(deb, Path(tmp), lambda r: bool(re.search(r"/arch/x86/kvm/kvm\.ko(\.xz)?$", r)),
                                      label=f"{image.name} (kvm.ko)")
                    if not got:
                        raise KmodError(f"{image.name}: no kernel/arch/x86/kvm/kvm.ko")
                    ref = {"package": image.name, "version": image.version, "path": got[0],
                           "vermagic": vermagic(Path(tmp) / got[0])}
                _write_json(stamp, ref)
    return json.loads(stamp.read_text())["vermagic"]


# --------------------------------------------------------------------------------------------------
# patches


def _patch_paths(text: str) -> list[str]:
    """The file paths a unified diff names on its ``---``/``+++`` lines (``/dev/null`` left out)."""
    out = []
    for line in text.splitlines():
        if line.startswith(("--- ", "+++ ")):
            p = line[4:].split("\t", 1)[0].strip()
            if p != "/dev/null" and p not in out:
                out.append(p)
    return out


def _strip_level(paths: list[str]) -> int:
    """1 for ``a/``/``b/``-prefixed paths (git) or tree-prefixed ones (``linux.orig/arch/...``), 0 for
    paths that already start at the source root (``arch/x86/kvm/...``)."""
    def inside(p: str) -> bool:
        return any(p.startswith(d + "/") for d in SOURCE_DIRS)

    if any(inside(p) for p in paths):
        return 0
    if all(p.split("/", 1)[0] in ("a", "b") or ("/" in p and inside(p.split("/", 1)[1])) for p in paths):
        return 1
    return 0


def check_patch(patch: Path) -> tuple[int, bytes]:
    """(strip level, bytes) of a unified diff against the kernel source root, or one KmodError
    line: unreadable, no file named, or a file outside :data:`SOURCE_DIRS` (the kernel itself and
    its headers stay Debian's, so only KVM's own sources can change)."""
    try:
        data = Path(patch).read_bytes()
    except OSError as e:
        raise KmodError(f"patch {patch}: {e.strerror or e}") from None
    paths = _patch_paths(data.decode("utf-8", "replace"))
    if not paths:
        raise KmodError(f"patch {patch}: not a unified diff (no ---/+++ file lines)")
    level = _strip_level(paths)
    for p in paths:
        rel = p.split("/", level)[-1] if level else p
        norm = posixpath.normpath(rel)             # arch/x86/kvm/../../../fs/x.c is fs/x.c
        if rel.startswith("/") or norm != rel.rstrip("/") or \
                not any(norm.startswith(d + "/") for d in SOURCE_DIRS):
            raise KmodError(f"patch {patch}: changes {rel}, outside {' and '.join(SOURCE_DIRS)} "
                            "(only the KVM modules are rebuilt; the kernel and its headers stay Debian's)")
    return level, data


def _patch_complaint(res: subprocess.CompletedProcess) -> str:
    """patch(1)'s first complaint, with the file it was patching: ``arch/x86/kvm/x86.c: Hunk #1
    FAILED at 120.``"""
    current = ""
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    for ln in lines:
        m = re.match(r"(?:checking|patching) file (.+)$", ln)
        if m:
            current = m.group(1).strip("'")
        elif re.search(r"FAILED|can't find|No file|malformed|Reversed|Only garbage|unexpected", ln, re.I):
            return f"{current}: {ln}" if current else ln
    return lines[-1] if lines else f"exit status {res.returncode}"


def apply_patches(tree: Path, patches: Sequence[Path], log: LogFn = _default_log) -> None:
    """Apply unified diffs to ``tree`` (a copy of the kernel source's :data:`SOURCE_DIRS`), in
    order, with ``patch --fuzz=0`` (a hunk may move, never apply on changed context).

    Each patch is first tried with ``--dry-run``: one that does not apply changes nothing and
    raises :class:`KmodError` naming the patch and patch(1)'s first complaint."""
    exe = shutil.which("patch")
    if patches and exe is None:
        raise KmodError("--patch needs the patch command (apt-get install patch)")
    for p in patches:
        level, _ = check_patch(p)
        argv = [str(exe), f"-p{level}", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch",
                "--reject-file=-", "-d", str(tree), "-i", str(Path(p).resolve())]
        dry = proc.run(argv + ["--dry-run"], capture_output=True, text=True)
        if dry.returncode != 0:
            raise KmodError(f"patch {p} does not apply to Debian's source: {_patch_complaint(dry)}")
        done = proc.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise KmodError(f"patch {p}: patch(1) failed after a clean dry run: {done.stdout.strip()[-200:]}")
        log(f"applied {p}")


# --------------------------------------------------------------------------------------------------
# build root and source


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_root(archive: Archive, plan: Plan, log: LogFn = _default_log) -> Path:
    """The trixie build root of ``plan`` (downloaded, checksummed, unpacked once; cached by
    :func:`root_key`)."""
    key = root_key(plan.root)[:20]
    root = archive.cache / "kmod" / f"root-{key}"
    stamp = root / ".pykvm-root.json"
    if stamp.exists():
        return root
    debs = [(p, archive.fetch(p, "kmod build root")) for p in plan.root]
    with archive.lock(f"kmod-root-{key}", "the KVM build root"):
        if stamp.exists():
            return root
        if root.exists():
            shutil.rmtree(root)  # a half-made root from an interrupted run
        root.mkdir(parents=True)
        t0 = time.monotonic()
        log(f"unpacking the trixie build root ({len(debs)} packages) into {root}")
        for p, deb in debs:
            big = p.size > 5_000_000
            extract_deb(deb, root, lambda r: not r.startswith(_ROOT_LEFT_OUT), label=p.name if big else None)
        merged_usr_links(root)
        # what maintainer scripts and alternatives would have made
        for link, target in (("usr/bin/sh", "dash"), ("usr/bin/awk", "mawk")):
            if not os.path.lexists(root / link):
                (root / link).symlink_to(target)
        (root / "tmp").mkdir(exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        (root / "dev").mkdir(exist_ok=True)
        (root / "dev" / "null").touch()  # a bind-mount target for the host's /dev/null
        (root / "build").mkdir(exist_ok=True)
        for exe in ("usr/bin/make", "usr/bin/x86_64-linux-gnu-gcc-14", "usr/bin/sh", "usr/bin/awk",
                    f"{plan.headers_dir[1:]}/Makefile"):
            if not os.path.lexists(root / exe):
                raise KmodError(f"build root {root}: /{exe} missing after unpacking")
        _write_json(stamp, {"packages": [[p.name, p.version, p.sha256] for p in plan.root]})
        log(f"build root ready in {time.monotonic() - t0:.0f} s")
    return root


def kvm_source(archive: Archive, source: Package, log: LogFn = _default_log) -> Path:
    """``arch/x86/kvm`` and ``virt/kvm`` of Debian's kernel source package (cached by its sha256).

    The package holds ``usr/src/linux-source-<series>.tar.xz``; it is streamed once and only the
    two subtrees are written."""
    top = archive.cache / "kmod" / f"source-{source.sha256[:16]}"
    stamp = top / ".pykvm-source.json"
    if stamp.exists():
        return top
    deb = archive.fetch(source, "kmod: KVM source")
    with archive.lock(f"kmod-source-{source.sha256[:16]}", f"{source.name} (KVM subtrees)"):
        if stamp.exists():
            return top
        if top.exists():
            shutil.rmtree(top)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=archive.cache / "kmod", prefix=".source-"))
        try:
            got = extract_deb(deb, tmp, lambda r: bool(re.fullmatch(r"usr/src/linux-source-[^/]+\.tar\.xz", r)),
                              label=source.name)
            if not got:
                raise KmodError(f"{source.name} {source.version}: no usr/src/linux-source-*.tar.xz")
            log(f"reading {', '.join(SOURCE_DIRS)} from {got[0]}")
            n = _extract_subtrees(tmp / got[0], top)
            if not all((top / d / "Makefile").exists() or (top / d / "Makefile.kvm").exists() for d in SOURCE_DIRS):
                raise KmodError(f"{got[0]}: no {' or '.join(SOURCE_DIRS)} Makefile")
        except BaseException:
            shutil.rmtree(top, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _write_json(stamp, {"package": source.name, "version": source.version, "sha256": source.sha256,
                            "files": n})
        log(f"KVM source ready ({n} files) in {time.monotonic() - t0:.0f} s")
    return top


def _extract_subtrees(tarball: Path, dest: Path) -> int:
    """Write the regular files of :data:`SOURCE_DIRS` from ``linux-source-*.tar.xz`` into ``dest``."""
    n = 0
    with tarfile.open(tarball, "r|xz") as tf:
        for m in tf:
            parts = m.name.split("/", 1)
            if len(parts) < 2 or not m.isfile():
                continue
            rel = parts[1]
            if not any(rel.startswith(d + "/") for d in SOURCE_DIRS) or ".." in rel.split("/"):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            f = tf.extractfile(m)
            assert f is not None
            with open(out, "wb") as w:
                shutil.copyfileobj(f, w)
            os.chmod(out, m.mode & 0o755 | 0o644)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# the build


# the include dir that makes trace.h's TRACE_INCLUDE_PATH (../../arch/x86/kvm, relative to an
# include dir: in-tree it resolves through include/uapi) reach the build copy's arch/x86/kvm
TRACE_INCLUDE = ".kmod/include"


def prepare_makefile(tree: Path) -> None:
    """Point ``arch/x86/kvm/Makefile`` of the build copy at the copy itself instead of ``$(srctree)``
    (the headers, which hold no KVM source): its own include dir and ``virt/kvm/Makefile.kvm``
    become ``$(KVM_SRC)/...`` (make's command line sets ``KVM_SRC``), and the tracepoint headers'
    include path gets a directory to resolve against."""
    mk = tree / "arch/x86/kvm/Makefile"
    text = mk.read_text()
    new = text.replace("$(srctree)/arch/x86/kvm", "$(KVM_SRC)/arch/x86/kvm")
    new = new.replace("$(srctree)/virt/kvm/", "$(KVM_SRC)/virt/kvm/")
    if "$(KVM_SRC)/arch/x86/kvm" not in new or "$(KVM_SRC)/virt/kvm/Makefile.kvm" not in new:
        raise KmodError(f"{mk}: no $(srctree)/arch/x86/kvm include or virt/kvm/Makefile.kvm (layout not understood)")
    new = new.replace("\n", f"\nccflags-y += -I $(KVM_SRC)/{TRACE_INCLUDE}  # pykvm.lab.kmod: trace.h\n", 1)
    mk.write_text(new)
    (tree / TRACE_INCLUDE).mkdir(parents=True, exist_ok=True)


def _chroot_argv(root: Path, work: Path, script: str) -> list[str]:
    """Run ``script`` with trixie's sh inside ``root``, ``work`` mounted at ``/build``, in private
    mount and network namespaces (nothing shows outside; no network). As root, plain namespaces;
    otherwise a user namespace mapping the caller to root."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise KmodError("needs the unshare command (util-linux) to enter the build root")
    argv = [unshare, "--mount", "--net", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        argv.append("--map-root-user")
    host_sh = (
        'mount --bind "$1" "$2/build" && mount --bind /dev/null "$2/dev/null" && '
        'exec chroot "$2" /usr/bin/env -i PATH=/usr/bin:/usr/sbin HOME=/build LC_ALL=C.UTF-8 '
        'TMPDIR=/tmp /usr/bin/sh -c "$3"'
    )
    return argv + ["/bin/sh", "-c", host_sh, "kmod", str(work), str(root), script]


_QUIET = re.compile(r"^\s+(CC|AS|LD|MODPOST|BTF|OBJTOOL|STRIP)\b.*?(\S+)$")


def _run_make(argv: list[str], logfile: Path, log: LogFn) -> None:
    """Run the build, its output into ``logfile``; each object kbuild names becomes a progress line."""
    with open(logfile, "w") as lf:
        p = proc.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                       bufsize=1)
        try:
            assert p.stdout is not None
            for line in p.stdout:
                lf.write(line)
                m = _QUIET.match(line)
                if m:
                    what = os.path.normpath(m.group(2).replace("/build/src/", ""))
                    log(f"{m.group(1)} {what}")
            p.wait()
        except BaseException:
            proc.stop(p)
            raise
        proc.forget(p)
    if p.returncode != 0:
        text = logfile.read_text(errors="replace").splitlines()
        first = next((ln for ln in text if re.search(r"\berror\b|\*\*\*|Error \d", ln)), None)
        why = (first or (text[-1] if text else f"exit status {p.returncode}")).strip().replace("/build/src/", "")
        raise KmodError(f"the KVM build failed: {why} (full log: {logfile})")


def build_kvm_modules(archive: Archive, patches: Sequence[Path | str] = (), jobs: int | None = None,
                      log: LogFn = _default_log, out: Path | None = None, rebuild: bool = False,
                      intel: bool = False) -> Path:
    """Build ``kvm.ko`` and ``kvm-amd.ko`` (and ``kvm-intel.ko`` with ``intel``) for the nested
    lab's kernel with ``patches`` applied (unified diffs against the kernel source root, in order);
    return the directory holding them and ``manifest.json``.

    ``jobs``: parallel compiler jobs (default: the CPUs this process may use). ``out``: a directory
    the result is copied into (the return value then); otherwise the result stays in the cache,
    ``<cache>/kmod/modules-<key>`` (with the compiler's output in ``build.log``). A result already in the cache for the same kernel version and
    patches is reused unless ``rebuild``. ``log`` gets the progress lines.

    Raises :class:`KmodError` (a :class:`~pykvm.lab.debian.LabError`) with a one-line reason: a
    patch that does not apply, a compiler error (the line and the log's path), a package missing
    at the kernel's version, a module whose ``vermagic`` differs from Debian's ``kvm.ko``."""
    t_start = time.monotonic()
    patch_paths = [Path(p) for p in patches]
    patch_info = []
    for p in patch_paths:
        check_patch(p)  # readable, a diff, KVM files only: before any download
        patch_info.append({"file": str(p.resolve()), "sha256": sha256_file(p)})
    plan = resolve(archive)
    names = module_names(intel)
    key = build_key(plan.image.version, [p["sha256"] for p in patch_info], intel)
    result = archive.cache / "kmod" / f"modules-{key[:20]}"
    log(f"kernel {plan.image.name} {plan.image.version}; {len(patch_paths)} patch(es); key {key[:20]}")
    with archive.lock(f"kmod-modules-{key[:20]}", "a KVM module build with the same key"):
        if rebuild or not _result_ok(result):  # the old result stays until the new one replaces it
            _build(archive, plan, patch_paths, patch_info, names, key, result, jobs, log, t_start)
        else:
            log(f"reusing the cached build in {result}")
    if out is None:
        return result
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names + ("manifest.json",):
        shutil.copy2(result / name, out / name)
    return out


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for descendants so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _result_ok(result: Path) -> bool:
    """A finished result: a manifest whose modules are all there with their recorded sha256."""
    try:
        man = json.loads((result / "manifest.json").read_text())
        return all(sha256_file(result / name) == m["sha256"] for name, m in man["modules"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(archive: Archive, plan: Plan, patch_paths: list[Path], patch_info: list[dict], names: tuple[str, ...],
           key: str, result: Path, jobs: int | None, log: LogFn, t_start: float) -> None:
    times: dict[str, float] = {}
    t = time.monotonic()
    for p in plan.root + [plan.source, plan.image]:
        archive.fetch(p, "kmod")
    times["download_s"] = time.monotonic() - t
    t = time.monotonic()
    src = kvm_source(archive, plan.source, log)
    times["source_s"] = time.monotonic() - t
    kdir = archive.cache / "kmod"
    work = Path(tempfile.mkdtemp(dir=kdir, prefix=f".build-{key[:12]}-"))
    logfile = kdir / f"build-{key[:20]}.log"
    try:
        tree = work / "src"
        for d in SOURCE_DIRS:
            shutil.copytree(src / d, tree / d)
        apply_patches(tree, patch_paths, log)  # a patch that does not apply fails before the build root
        prepare_makefile(tree)
        t = time.monotonic()
        root = build_root(archive, plan, log)
        times["build_root_s"] = time.monotonic() - t
        ref = reference_vermagic(archive, plan.image)
        (work / "out").mkdir()
        n = jobs or len(os.sched_getaffinity(0))
        kbuild_dir = "/build/src/arch/x86/kvm"
        # without kvm-intel.ko, its objects are left out of the Makefile's obj- list (kvm.ko's own
        # C code sees CONFIG_KVM_INTEL through autoconf.h, unchanged)
        no_intel = "" if INTEL_MODULE in names else "CONFIG_KVM_INTEL= "
        script = (
            f"x86_64-linux-gnu-gcc-14 --version | head -n1 > /build/out/compiler && "
            f"make -C {plan.headers_dir} M={kbuild_dir} KVM_SRC=/build/src DEB_BUILD_ARCH=amd64 {no_intel}"
            f"-j{n} modules && for m in {' '.join(names)}; do "
            f"x86_64-linux-gnu-strip --strip-debug -o /build/out/$m {kbuild_dir}/$m || exit 1; "
            f"echo \"  STRIP   $m\"; done"
        )
        log(f"compiling {', '.join(SOURCE_DIRS)} with trixie's gcc-14, make -j{n} (log: {logfile})")
        t = time.monotonic()
        cpu0 = _children_cpu()
        _run_make(_chroot_argv(root, work, script), logfile, log)
        times["compile_s"] = time.monotonic() - t
        times["compile_cpu_s"] = _children_cpu() - cpu0
        modules: dict[str, dict] = {}
        for name in names:
            path = work / "out" / name
            vm = vermagic(path)
            if vm != ref:
                raise KmodError(f"{name}: vermagic {vm!r} differs from Debian's kvm.ko {ref!r}")
            modules[name] = {"sha256": sha256_file(path), "size": path.stat().st_size, "vermagic": vm}
        log(f"vermagic of all {len(names)} modules equals Debian's kvm.ko: {ref.strip()}")
        auto_conf = root / plan.headers_dir[1:] / "include/config/auto.conf"
        cc_text = re.search(r'^CONFIG_CC_VERSION_TEXT="?(.*?)"?$', auto_conf.read_text(), re.M)
        times["total_s"] = time.monotonic() - t_start
        manifest = {
            "format": KMOD_FORMAT,
            "key": key,
            "kernel": {"package": plan.image.name, "version": plan.image.version, "release": plan.release,
                       "suite": plan.image.suite, "sha256": plan.image.sha256},
            "source": {"package": plan.source.name, "version": plan.source.version, "sha256": plan.source.sha256},
            "headers": [{"package": p.name, "version": p.version, "sha256": p.sha256} for p in plan.headers],
            "compiler": (work / "out" / "compiler").read_text().strip(),
            "kernel_compiler": cc_text.group(1) if cc_text else "",
            "build_root": {"dir": root.name, "packages": len(plan.root)},
            "patches": patch_info,
            "modules": modules,
            "reference_vermagic": ref,
            "vermagic_matches_debian": True,
            "stripped": "--strip-debug (as Debian's packaged modules)",
            "times_s": {k: round(v, 1) for k, v in times.items()},
        }
        staged = work / "result"
        staged.mkdir()
        for name in names:
            shutil.copy2(work / "out" / name, staged / name)
        _write_json(staged / "manifest.json", manifest)
        shutil.move(str(logfile), staged / "build.log")
        if result.exists():
            shutil.rmtree(result)
        os.replace(staged, result)
        log(f"built in {times['total_s']:.0f} s (downloads {times['download_s']:.0f} s, build root "
            f"{times['build_root_s']:.0f} s, source {times['source_s']:.0f} s, compile {times['compile_s']:.0f} s "
            f"using {times['compile_cpu_s']:.0f} CPU s): "
            + ", ".join(f"{n} {m['size'] / 1e6:.1f} MB" for n, m in modules.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# the command


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (no usage block), status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _patch_arg(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file" if not p.exists() else f"{text}: not a file")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return p


def _jobs_arg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def _dir_arg(text: str) -> Path:
    p = Path(text).expanduser()
    if not text or (p.exists() and not p.is_dir()):
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog=PROG,
        description="Rebuild the nested lab's KVM modules (kvm.ko, kvm-amd.ko, kvm-intel.ko) for its "
        "Debian kernel, from Debian's linux-source and linux-headers packages of the same version, "
        "with trixie's gcc-14 in a minimal trixie build root (chroot, no network). Optional patches "
        "(unified diffs against the kernel source root, e.g. arch/x86/kvm/svm/nested.c) apply first. "
        "The result (modules and manifest.json, with each module's vermagic checked against Debian's "
        "kvm.ko) is cached by kernel version and patches; its directory is printed on stdout's last "
        "line. Needs root or unprivileged user namespaces.",
        epilog="exit status: 0 built or found in the cache (the directory on stdout's last line); "
        "2 bad arguments; 3 the modules could not be built (one line on stderr says why); "
        "130, 143, 129 on SIGINT, SIGTERM, SIGHUP (the build stopped, temporary files removed)",
    )
    p.add_argument("--patch", action="append", type=_patch_arg, default=[], metavar="FILE",
                   help="a unified diff to apply before building (repeatable; applied in order)")
    p.add_argument("--out", type=_dir_arg, metavar="DIR",
                   help="copy the modules and manifest.json into DIR (default: leave them in the cache)")
    p.add_argument("-j", "--jobs", type=_jobs_arg, metavar="N", help="parallel compiler jobs (default: nproc)")
    p.add_argument("--cache", type=_dir_arg, metavar="DIR",
                   default=Path(os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")),
                   help="the lab cache (default ~/.cache/pykvm/lab, or $PYKVM_LAB_CACHE)")
    p.add_argument("--intel", action="store_true", help="build kvm-intel.ko too (the nested lab needs only "
                   "kvm.ko and kvm-amd.ko; kvm-intel.ko adds a quarter to the compile time)")
    p.add_argument("--rebuild", action="store_true", help="build even when the cache holds this build")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command: returns its exit status (see the module docstring)."""
    proc.install_signal_handlers()
    a = _parse(argv)
    try:
        archive = Archive(a.cache.expanduser())
        d = build_kvm_modules(archive, a.patch, jobs=a.jobs, out=a.out, rebuild=a.rebuild, intel=a.intel)
    except proc.Interrupted as e:
        proc.stop_all()
        print(f"{PROG}: interrupted by {e.name}; the build stopped, temporary files removed",
              file=sys.stderr, flush=True)
        return e.status
    except LabError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(d.resolve(), flush=True)
    return 0


def _program() -> int:
    """The command as a program: stdout that cannot take the directory line is one line on
    stderr and status 8, never a traceback (as every pykvm tool)."""
    return _cliutil.run_program(main, PROG, 8, 2)


if __name__ == "__main__":
    sys.exit(_program())
