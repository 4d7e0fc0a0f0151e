"""A KVM developer's kernel and modules in the labs (``--kernel``, ``--modules``, ``--kvm-module``).

Host side only: what the lab needs to know about a kernel image and a set of ``.ko`` files before it
boots them.

* :func:`kernel_release` reads the release a kernel image will report (``uname -r``): an x86
  bzImage from its setup header (Documentation/arch/x86/boot.rst: ``HdrS`` at 0x202, the
  ``kernel_version`` pointer at 0x20E, the string at that value + 0x200), a RISC-V ``Image``
  (Documentation/arch/riscv/boot-image-header.rst: magic2 ``RSC\\x05`` at byte 56, uncompressed)
  from the ``linux_banner`` string ("Linux version <release> ...") inside it;
* :func:`read_module` decompresses a module (``.ko.xz``, ``.ko.zst``, ``.ko.gz``) and reads its
  ``.modinfo`` section (NUL-separated ``key=value`` strings, include/linux/moduleparam.h and
  scripts/mod/modpost.c): ``name``, ``depends`` and ``vermagic`` (include/linux/vermagic.h: the
  release first, then the flags such as ``SMP preempt mod_unload modversions``);
* :func:`find_modules` finds the lab's KVM modules by name under a directory (a flat directory, a
  kernel build tree or a ``lib/modules/<release>`` tree);
* :func:`load_order` puts modules in dependency order (``depends``), :func:`check_release`
  refuses a module built for another release than the kernel that will boot;
* :func:`plan_boot` decides what one boot loads, with which parameters, and its
  module-parameter matrix (:mod:`pykvm.lab.matrix`).

Bad input raises :class:`LabInputError` (a :class:`~pykvm.lab.debian.LabError` whose one-line
message the lab prints; ``python -m pykvm.lab`` exits 2 for it).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import matrix as mx
from . import proc as procs
from .debian import LabError
from .progress import log

# the lab's KVM module stack, in load order (module names as /sys/module spells them)
KVM_STACK = {"nested": ("irqbypass", "kvm", "kvm_amd"), "riscv": ("kvm",)}
# modules L1 needs for the network tests besides KVM (pykvm/lab/build.py, L1_NET_MODULES): taken
# from --modules too when the developer's kernel boots (Debian's would not load into it)
NET_MODULES = ("tun", "dummy")
# the lab's default module parameters (--param values are merged over these)
DEFAULT_PARAMS: dict[str, dict[str, str]] = {"kvm_amd": {"nested": "1"}}
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

BZIMAGE_MAGIC_AT, BZIMAGE_MAGIC = 0x202, b"HdrS"
BZIMAGE_VERSION_PTR_AT = 0x20E
RISCV_MAGIC2_AT, RISCV_MAGIC2 = 56, b"RSC\x05"
LINUX_BANNER = b"Linux version "


class LabInputError(LabError):
    """The lab was given a kernel, module or parameter it cannot use (exit status 2)."""

    status = 2


def module_name(path: Path | str) -> str:
    """The module name a file name implies: ``kvm-amd.ko.xz`` -> ``kvm_amd``."""
    base = Path(path).name
    for suf in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suf):
            base = base[: -len(suf)]
            break
    return base.replace("-", "_")


# --------------------------------------------------------------------------------------------------
# kernel images


def _kind(head: bytes) -> str:
    """What a file looks like, for an error message."""
    if head[:4] == b"\x7fELF":
        return "an ELF file (a vmlinux? the lab boots a bzImage / Image)"
    if head[:2] == b"\x1f\x8b":
        return "gzip data (an Image.gz? give the uncompressed Image)"
    if head[:2] == b"MZ" and head[4:8] == b"zimg":
        return "an EFI zboot image (CONFIG_EFI_ZBOOT; give arch/<arch>/boot/Image)"
    return "not a Linux kernel image"


def check_kernel_image(path: Path, lab: str) -> None:
    """Raise :class:`LabInputError` unless ``path`` is a kernel the ``lab`` can boot: an x86 bzImage
    (nested) or a RISC-V Image (riscv). ``lab``: "nested" or "riscv"."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x400)
    except OSError as e:
        raise LabInputError(f"--kernel {path}: {e.strerror or e}") from None
    if lab == "nested":
        if head[BZIMAGE_MAGIC_AT:BZIMAGE_MAGIC_AT + 4] != BZIMAGE_MAGIC:
            raise LabInputError(f"--kernel {path}: not an x86 bzImage (no 'HdrS' at 0x202): {_kind(head)}")
    elif head[RISCV_MAGIC2_AT:RISCV_MAGIC2_AT + 4] != RISCV_MAGIC2:
        raise LabInputError(f"--kernel {path}: not a RISC-V Image (no 'RSC\\x05' at byte 56): {_kind(head)}")


def kernel_release(path: Path, lab: str) -> str | None:
    """The release (``uname -r``) that the kernel image ``path`` will report, or None when the
    image does not say (an x86 setup header without a version string; a compressed RISC-V
    image). Raises :class:`LabInputError` when ``path`` is not a kernel for ``lab`` (see
    :func:`check_kernel_image`)."""
    check_kernel_image(path, lab)
    data = path.read_bytes()
    if lab == "nested":
        (ptr,) = struct.unpack_from("<H", data, BZIMAGE_VERSION_PTR_AT)
        if not ptr:
            return None
        at = ptr + 0x200
        text = data[at:at + 256].split(b"\0", 1)[0]
    else:
        at = data.find(LINUX_BANNER)
        if at < 0:
            return None
        text = data[at + len(LINUX_BANNER):at + len(LINUX_BANNER) + 256].split(b"\0", 1)[0]
    words = text.decode("ascii", "replace").split()
    return words[0] if words else None


# --------------------------------------------------------------------------------------------------
# modules


@dataclass
class ModuleFile:
    """One ``.ko`` the lab will load: ``path`` as given, ``ko`` its decompressed copy (``path``
    itself when it was not compressed), and what its ``.modinfo`` says."""

    path: Path
    ko: Path
    name: str
    vermagic: str
    depends: list[str] = field(default_factory=list)
    sha256: str = ""

    @property
    def release(self) -> str:
        """The kernel release the module was built for (vermagic's first word)."""
        return self.vermagic.split()[0] if self.vermagic.split() else ""

    def manifest(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256,
                "vermagic": self.vermagic.strip(), "depends": self.depends}


def modinfo(ko: Path) -> dict[str, str]:
    """The ``key=value`` strings of the ``.modinfo`` section of the ELF file ``ko`` (the first
    value of a key that repeats, such as ``alias``). Raises :class:`LabInputError` for a file
    that is not ELF or has no ``.modinfo`` section (not a kernel module)."""
    try:
        with open(ko, "rb") as f:
            sec = ELFFile(f).get_section_by_name(".modinfo")
            raw = sec.data() if sec is not None else None
    except (ELFError, OSError, struct.error) as e:
        raise LabInputError(f"{ko}: not a kernel module ({e})") from None
    if raw is None:
        raise LabInputError(f"{ko}: not a kernel module (no .modinfo section)")
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def _decompress(src: Path, dest: Path) -> Path:
    name = src.name
    if name.endswith(".ko"):
        return src
    try:
        if name.endswith(".xz"):
            data = lzma.decompress(src.read_bytes())
        elif name.endswith(".gz"):
            data = gzip.decompress(src.read_bytes())
        elif name.endswith(".zst"):
            r = procs.run(["zstd", "-dc", str(src)], capture_output=True)
            if r.returncode != 0:
                raise OSError(r.stderr.decode(errors="replace").strip() or "zstd failed")
            data = r.stdout
        else:
            return src
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise LabInputError(f"{src}: cannot decompress: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / (module_name(src).replace("_", "-") + ".ko")
    if out.exists():
        out = dest / f"{module_name(src)}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}.ko"
    out.write_bytes(data)
    return out


def read_module(path: Path, workdir: Path) -> ModuleFile:
    """Decompress ``path`` into ``workdir`` if needed and read its name, dependencies and vermagic.
    Raises :class:`LabInputError` for a missing file or one that is not a kernel module."""
    path = Path(path)
    if not path.is_file():
        raise LabInputError(f"{path}: no such module file")
    if not path.name.endswith(MODULE_SUFFIXES):
        raise LabInputError(f"{path}: not a module file name (*.ko, *.ko.xz, *.ko.zst, *.ko.gz)")
    ko = _decompress(path, workdir)
    info = modinfo(ko)
    vermagic = info.get("vermagic", "")
    if not vermagic.split():
        raise LabInputError(f"{path}: no vermagic in its .modinfo")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return ModuleFile(path=path, ko=ko, name=info.get("name") or module_name(path), vermagic=vermagic,
                      depends=[d for d in info.get("depends", "").split(",") if d], sha256=h.hexdigest())


def find_modules(directory: Path, lab: str, with_net: bool = False) -> list[Path]:
    """The lab's KVM modules under ``directory``, found by file name at any depth (a flat
    directory, a kernel build tree, or a ``lib/modules/<release>`` tree; symbolic links to
    directories such as ``build`` and ``source`` are not followed): for ``nested`` irqbypass,
    kvm and kvm-amd, for ``riscv`` kvm; plus tun and dummy with ``with_net``. Each may be
    compressed. Raises :class:`LabInputError` when none is there or one name is found twice."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LabInputError(f"--modules {directory}: not a directory")
    wanted = set(KVM_STACK[lab]) | (set(NET_MODULES) if with_net else set())
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(MODULE_SUFFIXES) and module_name(f) in wanted:
                found.setdefault(module_name(f), []).append(Path(dirpath) / f)
    twice = {n: p for n, p in found.items() if len(p) > 1}
    if twice:
        n, paths = sorted(twice.items())[0]
        shown = ", ".join(str(p) for p in paths[:3]) + (f", and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise LabInputError(f"--modules {directory}: {n} found {len(paths)} times "
                            f"({shown}); name the one to load with --kvm-module")
    if not any(n in found for n in KVM_STACK[lab]):
        names = ", ".join(n.replace("_", "-") + ".ko" for n in KVM_STACK[lab])
        raise LabInputError(f"--modules {directory}: none of {names} (or .ko.xz/.ko.zst) there")
    order = list(KVM_STACK[lab]) + list(NET_MODULES)
    return [found[n][0] for n in order if n in found]


def load_order(mods: list[ModuleFile]) -> list[ModuleFile]:
    """``mods`` with each module after those of ``mods`` it depends on (``.modinfo`` depends);
    otherwise in the given order. A dependency outside ``mods`` is left to the kernel (built in,
    or insmod fails and names it). Raises :class:`LabInputError` for a dependency cycle or two
    modules of one name."""
    by_name: dict[str, ModuleFile] = {}
    for m in mods:
        if m.name in by_name:
            raise LabInputError(f"module {m.name} given twice: {by_name[m.name].path} and {m.path}")
        by_name[m.name] = m
    out: list[ModuleFile] = []
    state: dict[str, int] = {}            # 1: being placed, 2: placed

    def place(m: ModuleFile, chain: list[str]) -> None:
        if state.get(m.name) == 2:
            return
        if state.get(m.name) == 1:
            raise LabInputError(f"module dependency cycle: {' -> '.join(chain + [m.name])}")
        state[m.name] = 1
        for d in m.depends:
            if d in by_name:
                place(by_name[d], chain + [m.name])
        state[m.name] = 2
        out.append(m)
    for m in mods:
        place(m, [])
    return out


def check_release(mods: list[ModuleFile], release: str | None, kernel: str) -> None:
    """Refuse (:class:`LabInputError`, one line) the first of ``mods`` built for another release
    than ``release``, the release of ``kernel`` (a description for the message). ``release``
    None: nothing to compare with (the caller warns)."""
    if release is None:
        return
    for m in mods:
        if m.release != release:
            raise LabInputError(f"{m.path}: built for {m.release} (vermagic '{m.vermagic.strip()}'), "
                                f"but the lab boots {release} ({kernel}); refusing to load it")


# --------------------------------------------------------------------------------------------------
# what one boot loads


@dataclass
class BootModules:
    """What one boot of a lab loads (:func:`plan_boot`).

    ``lines``: the boot's ``/lab/modules-run[-<boot>].list`` (``<path> <args>`` per module, in
    load order; a bare name is under the base image's /lab/modules), or None for the base
    image's own list (Debian's modules, nothing changed). ``files``: {path in the lab: host file}
    for the payload. ``matrix``: the boot's ``/lab/matrix[-<boot>].json`` (None without
    ``--param``). ``cmdline``: added to the kernel command line (module parameters of a KVM built
    into the kernel). ``combos``: how many times the tests run. ``manifest``: for manifest.json."""

    lines: list[str] | None
    files: dict[str, Path]
    matrix: dict | None
    cmdline: str
    combos: int
    manifest: dict


def base_name(path: Path) -> str:
    """The name a Debian module has in the base image's /lab/modules (build.py): ``kvm-amd.ko``."""
    return path.name.split(".ko")[0] + ".ko"


def _args(params: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def plan_boot(lab: str, boot: str, user: list[ModuleFile], debian: list[tuple[Path, str]],
              dev_kernel: bool, params: list[str], kernel: str) -> BootModules:
    """What boot ``boot`` ("" for the lab's main boots, else an extra boot's name) of ``lab``
    loads: the modules ``user`` (read with :func:`read_module`, release already checked) in place
    of Debian's ``debian`` [(file, insmod arguments)] of the same name — none of Debian's when
    ``dev_kernel`` (the developer's kernel boots; then no KVM module at all means KVM is built
    in) — in dependency order, with the lab's default parameters (:data:`DEFAULT_PARAMS`), and
    the matrix of ``params`` (``--param`` strings). ``kernel`` describes the kernel for messages.
    Raises :class:`LabInputError` for a bad ``--param``, an unknown module, or several values for
    a parameter of a KVM built into the kernel."""
    try:
        specs = mx.parse_params(params)
    except ValueError as e:
        raise LabInputError(str(e)) from None
    kvm_names = KVM_STACK[lab]
    load_order(user)                            # two modules of one name: refused here
    by_name = {m.name: m for m in user}
    where = f"/lab/kmod/{boot or 'main'}"
    files = {f"{where}/{m.ko.name}": m.ko for m in user}
    # (name, path in the lab, insmod arguments, module) in the order Debian's list has them
    entries: list[tuple[str, str, str, ModuleFile]] = []
    if not dev_kernel:
        for path, args in debian:
            name = module_name(path)
            if name in by_name:
                m = by_name.pop(name)
                entries.append((name, f"{where}/{m.ko.name}", _args(DEFAULT_PARAMS.get(name, {})), m))
            else:
                entries.append((name, base_name(path), args, ModuleFile(path, path, name, "")))
    for m in user:
        if m.name in by_name:                   # the rest of the user's, after Debian's
            entries.append((m.name, f"{where}/{m.ko.name}", _args(DEFAULT_PARAMS.get(m.name, {})), m))
    ordered = load_order([e[3] for e in entries])
    entries = sorted(entries, key=lambda e: ordered.index(e[3]))
    for m in ordered:
        missing = [d for d in m.depends if d not in {e[0] for e in entries}]
        if missing and m in user:
            log(f"{lab}: {m.name} depends on {', '.join(missing)}, which is not among the modules "
                f"to load (built into {kernel}?)")
    stack = [e for e in entries if e[0] not in NET_MODULES]
    builtin = dev_kernel and not any(e[0] in kvm_names for e in stack)
    info: dict = {"modules": [m.manifest() for m in user]}
    if dev_kernel:
        missing_net = [n for n in NET_MODULES if n not in {e[0] for e in entries}]
        if missing_net:
            log(f"{lab}: {', '.join(missing_net)} not among the given modules: the network tests "
                f"need them built into {kernel} or given with --modules/--kvm-module")
    if builtin:
        log(f"{lab}: no KVM module given for {kernel}: KVM must be built in; nothing to insmod "
            "for it (the lab's /init says which)")
        info["kvm_built_in"] = True
    lines = None if (not user and not dev_kernel) else [f"{p} {a}".strip() for _, p, a, _ in entries]
    cmdline = ""
    if builtin:
        defaults = {m: dict(p) for m, p in DEFAULT_PARAMS.items() if m in kvm_names}
        known = list(kvm_names)
    else:
        defaults = {e[0]: dict(DEFAULT_PARAMS.get(e[0], {})) for e in stack if DEFAULT_PARAMS.get(e[0])}
        known = [e[0] for e in stack]
    try:
        mx.check_modules(specs, known)
    except ValueError as e:
        raise LabInputError(str(e)) from None
    combos = mx.expand(specs)
    matrix = None
    if builtin:
        many = next((s for s in specs if len(s.values) > 1), None)
        if many:
            raise LabInputError(f"--param {many.key}={','.join(many.values)}: KVM is built into "
                                f"{kernel}, so its parameters cannot change between combinations; "
                                "give one value (set on the kernel command line) or KVM as modules "
                                "(--modules)")
        cmdline = mx.describe(mx.merged(defaults, combos[0].params if combos else {}))
    if combos:
        matrix = mx.config([{"module": n, "path": p if p.startswith("/") else f"/lab/modules/{p}"}
                            for n, p, _, _ in stack], defaults, combos, reload=not builtin)
        info["combinations"] = [c.id for c in combos]
        info["params"] = params
    if lines is not None:
        info["module_list"] = lines
    return BootModules(lines, files, matrix, cmdline, max(1, len(combos)), info)
