"""Building and running the two labs.

An initramfs is two concatenated gzip'd newc archives (the kernel unpacks them in order):

* ``base``: Debian userspace (busybox, Python, libraries), host-side pure-Python packages (pytest and
  friends), the KVM modules and precompiled .pyc files.  It depends only on pinned inputs, so it is
  cached under ``<cache>/base/<key>.cpio.gz``;
* ``payload``: this checkout (``pykvm/``, ``tests/``, built guests, the ``pykvm._native`` extension for
  the lab's architecture), ``/init`` and the run's configuration.  Rebuilt on every run.

Every step names itself (:func:`pykvm.lab.progress.stage`) and logs one line; whatever a step writes
to the cache happens under that item's file lock, and temporary files are removed on every way out.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata as md
import json
import lzma
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..outfile import write_report
from . import devkernel as dk
from . import initramfs as ird
from . import linux_guest
from . import matrix as mx
from . import proc as procs
from . import qemu as q
from .debian import (NESTED_KERNEL_SUITE, Archive, LabError, extract_deb, merged_usr_links, nested_kernel_image,
                     sha256_file, version_key)
from .progress import log, stage

BASE_FORMAT = 4  # bump when the layout of the base archive changes

CHECKOUT = Path(__file__).resolve().parents[2]

# pure-Python distributions copied from the host interpreter's site-packages into the image
HOST_PY_DISTS = ["pytest", "pluggy", "iniconfig", "packaging", "pygments", "ioctl-opt", "pyelftools",
                 # the per-test timeout of pyproject.toml ([tool.pytest.ini_options] timeout) inside too
                 "pytest-timeout"]


@dataclass
class LabSpec:
    name: str
    arch: str  # Debian arch of the lab's userspace
    user_suite: str
    user_packages: list[str]
    py: str  # "3.13"
    host_dists: list[str]
    default_tests: list[str]
    timeout: float = 1200.0          # a main boot's hang guard (nested: 390-830 s seen)
    # tests that compare pykvm with QEMU inside the lab: when selected they run in a boot of their
    # own whose initrd also carries the lab's QEMU (q.inner_qemu_part), so the other boots need
    # not unpack it and a QEMU-under-TCG stall there costs that boot only (a nested-SVM L1 has
    # been seen to stop dead under a disk benchmark, QEMU's L2 and pykvm's alike)
    qemu_tests: list[str] = field(default_factory=list)
    # the benchmark boot: 90-130 s for the disk benchmark, about as much again for the network
    # and share benchmark (four more Linux boots)
    qemu_timeout: float = 600.0          # 230-440 s seen, the longer beside the whole suite
    # tests that run in the first CPU model's boot only (riscv: rv64), the others --ignore them
    # (a file) or --deselect them (a node id, "file::test"): device models driven by a Linux
    # guest, which do not depend on the CPU model and each boot Linux several times (minutes
    # under TCG per model)
    once_tests: list[str] = field(default_factory=list)
    # tests that need two lab CPUs when the lab's boots have one (nested): when selected they run
    # in a boot of their own, ``<lab>-smp2``, with two CPUs on one TCG thread (docs/nested.md)
    two_cpu_tests: list[str] = field(default_factory=list)
    # seconds without console output after which a boot (not the benchmark boot) is taken as
    # stalled, stopped and booted once more (None: only the timeout ends it). Its tests then run
    # with a per-test limit :data:`SILENCE_MARGIN` s shorter, so that a test that hangs, rather
    # than an L1 that stops dead, fails in time with pytest-timeout's dump of every thread's
    # stack instead of passing for a stall
    silence: float | None = None


# how much sooner than a lab's silence a test in a watched boot is stopped (pytest-timeout)
SILENCE_MARGIN = 60.0
# seconds without console output after which a nested boot (not the benchmark boot) is taken as
# stalled: its quietest stretch, one test booting L2 Linux guests, is 60-100 s in CI
NESTED_SILENCE = 420.0


RISCV = LabSpec(
    name="riscv",
    arch="riscv64",
    user_suite="trixie",
    user_packages=[
        "busybox-static", "python3.13-minimal", "libpython3.13-minimal", "libpython3.13-stdlib",
        "python3-cffi", "python3-cffi-backend", "python3-pycparser", "python3-ply",
        "libffi8", "libc6", "zlib1g", "libexpat1", "libgcc-s1",
        "passt",                     # user-mode networking (pykvm run --net user)
        # what pyroute2 imports: Python's ssl, sqlite3 (its NDB), bz2, lzma, uuid
        "libssl3t64", "libzstd1", "libsqlite3-0", "libbz2-1.0", "liblzma5", "libuuid1",
        # gdb against `pykvm run --gdb` (tests/riscv/test_gdb_riscv.py): the shared objects its
        # NEEDED chain loads, i.e. Index.closure(["gdb"]) less the packages above and less what is
        # only a package-level dependency (debconf, perl-base, procps, *-common data)
        "gdb", "libbabeltrace1", "libdebuginfod1t64", "libgmp10", "libmpfr6", "libncursesw6",
        "libpython3.13", "libreadline8t64", "libsource-highlight4t64", "libstdc++6", "libtinfo6",
        "libxxhash0", "libdw1t64", "libelf1t64", "libglib2.0-0t64", "libcurl3t64-gnutls",
        "libjson-c5", "libatomic1", "libmount1", "libpcre2-8-0", "libselinux1", "libbrotli1",
        "libgnutls30t64", "libgssapi-krb5-2", "libidn2-0", "libldap2", "libnettle8t64",
        "libnghttp2-14", "libnghttp3-9", "libngtcp2-16", "libngtcp2-crypto-gnutls8", "libpsl5t64",
        "librtmp1", "libssh2-1t64", "libblkid1", "libhogweed6t64", "libp11-kit0", "libtasn1-6",
        "libunistring5", "libkrb5-3", "libcom-err2", "libk5crypto3", "libkrb5support0",
        "libsasl2-2", "libkeyutils1", "libsasl2-modules-db", "libdb5.3t64",
    ],
    py="3.13",
    # pyroute2: the network namespace of the tap test (tests/riscv/test_linux_net_riscv.py)
    # pexpect drives the Linux guest's shell (tests/riscv/test_linux_vsock_control_riscv.py)
    host_dists=HOST_PY_DISTS + ["pyroute2", "pexpect", "ptyprocess"],
    default_tests=["tests/riscv", "tests/lab/inner_smoke"],
    # the rv64 boot runs the most (the once_tests below): 600 s in a fresh-clone CI run, and
    # more than 1200 s in one where the lab VMs ran at half speed (2026-12-07, every lab test
    # about twice its usual time): its hang guard is four times the usual
    timeout=2400.0,
    qemu_tests=["tests/riscv/test_blk_bench_riscv.py",
                "tests/riscv/test_net_fs_bench_riscv.py"],
    once_tests=["tests/riscv/test_linux_net_riscv.py", "tests/riscv/test_linux_share_riscv.py",
                "tests/riscv/test_linux_vsock_control_riscv.py",
                "tests/riscv/test_linux_sandbox_riscv.py",
                # virtio-blk root and the virtio console with Linux: 4-5 minutes under the max
                # model, 2 under rv64 (CI, 2026-12-06), and the device models do not differ
                "tests/riscv/test_virtio_riscv.py",
                # --cpu-type min hides the extensions the rv64 model has too (Svvptc, Ziccrse,
                # Smaia/Ssaia); 3.5 minutes of Linux boots under max, 1.5 under rv64
                "tests/riscv/test_linux.py::test_linux_with_cpu_type_min_has_only_the_base_isa",
                # the gdb stub (the stub and the lab's gdb do not depend on the CPU model; a
                # session takes 12-18 s under rv64, 31 s under max) and a Linux guest
                # snapshotted at its shell (Linux boots twice)
                "tests/riscv/test_gdb_riscv.py",
                "tests/riscv/test_snapshot_riscv.py::test_linux_at_its_shell_continues_in_another_process",
                # pause holding the guest's time still (two 4 s holds per case; the timer does
                # not depend on the CPU model)
                "tests/riscv/test_pause_riscv.py"],
)

NESTED = LabSpec(
    name="nested",
    arch="amd64",
    user_suite="bookworm",
    user_packages=[
        "busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
        "libffi8", "libc6", "zlib1g", "libexpat1", "libgcc-s1",
        "passt",                     # user-mode networking (pykvm run --net user)
        # what pyroute2 imports: Python's ssl, sqlite3 (its NDB), bz2, lzma, uuid
        "libssl3", "libsqlite3-0", "libbz2-1.0", "liblzma5", "libuuid1",
        # gdb 13.1 against `pykvm run --gdb` on real (nested) SVM (tests/nested/test_gdb_nested.py):
        # the packages of the shared objects its NEEDED chain loads (ldd of bookworm's gdb), i.e.
        # Index.closure(["gdb"]) less the packages above and less what is only a package-level
        # dependency (debconf, ucf, dpkg, readline-common, *-common data): 41 packages, 26 MB of
        # .debs (libicu72, for libboost-regex, 9.4 MB of them); the base image grew from 31.1 to
        # 62.0 MB, the initrd from 51.3 to 82.3 MB; boot to "KVM ready" stayed at 9-11 s
        "gdb", "libbabeltrace1", "libboost-regex1.74.0", "libbrotli1", "libcom-err2",
        "libcurl3-gnutls", "libdebuginfod1", "libdw1", "libelf1", "libglib2.0-0", "libgmp10",
        "libgnutls30", "libgssapi-krb5-2", "libhogweed6", "libicu72", "libidn2-0", "libipt2",
        "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0", "libldap-2.5-0",
        "libmpfr6", "libncursesw6", "libnettle8", "libnghttp2-14", "libp11-kit0", "libpcre2-8-0",
        "libpsl5", "libpython3.11", "libreadline8", "librtmp1", "libsasl2-2",
        "libsource-highlight4v5", "libssh2-1", "libstdc++6", "libtasn1-6", "libtinfo6",
        "libunistring2", "libxxhash0", "libzstd1",
    ],
    py="3.11",
    # the host's cffi built pykvm._native (same ABI tag as bookworm's python3.11), so ship the same cffi
    # pexpect drives the Linux guest's console under a pty (tests/nested/test_linux_virtio.py)
    # pyroute2 the network namespace of the tap test (tests/nested/test_linux_net.py)
    host_dists=HOST_PY_DISTS + ["cffi", "pycparser", "pexpect", "ptyprocess", "pyroute2"],
    default_tests=["tests/nested", "tests/lab/inner_smoke"],
    qemu_tests=["tests/nested/test_blk_bench_nested.py",
                "tests/nested/test_net_fs_bench_nested.py"],
    # the nested-SVM suite moves a vCPU thread between CPUs and overcommits them
    two_cpu_tests=["tests/nested/test_svm_tlb.py"],
    silence=NESTED_SILENCE,
)

# virtiofsd (pykvm run --share) in L1: trixie's, with its own libc, libgcc, libcap-ng and
# libseccomp under /lab/virtiofsd (the nested lab's userspace is bookworm's, whose glibc is older
# than the 2.39 it needs, and bookworm has no virtiofsd package), run through that libc's ld.so by
# /usr/bin/virtiofsd (VIRTIOFSD_WRAPPER)
VIRTIOFSD_SUITE = "trixie"
VIRTIOFSD_PACKAGES = ("virtiofsd", "libc6", "libgcc-s1", "libcap-ng0", "libseccomp2")
VIRTIOFSD_LIBS = {"amd64": ("x86_64-linux-gnu", "ld-linux-x86-64.so.2"),
                  "riscv64": ("riscv64-linux-gnu", "ld-linux-riscv64-lp64d.so.1")}
# virtiofsd's namespace sandbox pivot_roots into the share, which Linux refuses where / is the
# initramfs (as in L1): as the passt wrapper of pykvm/lab/linux_guest.py does, it runs in a mount
# namespace of its own on a bind mount of / moved over /
VIRTIOFSD_WRAPPER = r"""#!/bin/sh
# generated by pykvm/lab/build.py: trixie's virtiofsd with its own libraries, on a bind mount of /
L=/lab/virtiofsd/usr/lib/%s
exec busybox unshare -m busybox sh -c 'mkdir -p /run/virtiofsd-root &&
  busybox mount -o rbind / /run/virtiofsd-root && cd /run/virtiofsd-root &&
  busybox mount -o move /run/virtiofsd-root / && exec busybox chroot . "$0" "$@"' \
  $L/%s --library-path $L /lab/virtiofsd/usr/libexec/virtiofsd "$@"
"""


def _virtiofsd_wanted(arch: str):
    """Which files of the :data:`VIRTIOFSD_PACKAGES` go under /lab/virtiofsd: the program and
    the shared objects directly in the arch's library directory."""
    triplet = VIRTIOFSD_LIBS[arch][0]

    def want(r: str) -> bool:
        if r == "usr/libexec/virtiofsd":
            return True
        head, _, name = r.rpartition("/")
        return head == f"usr/lib/{triplet}" and ".so" in name
    return want


RISCV_CMDLINE = "console=ttyS0 earlycon=sbi panic=-1 quiet loglevel=4"
NESTED_CMDLINE = "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init"


@dataclass
class ExtraBoot:
    """One more boot of a lab, after its usual ones, with modules and parameters of its own: how a
    caller (a test command, a CI job) runs some tests against, say, rebuilt KVM modules beside a
    run on Debian's. Give it to :class:`Options` (``extra_boots``); ``python -m pykvm.lab`` has
    no option for it.

    ``name``: lower-case letters, digits, ``-`` and ``_`` (not ``more`` or ``qemu``); the boot is
    ``<lab>-<name>`` (riscv: ``riscv-<first CPU model>-<name>``) and its results are named so in
    the lab's JUnit. ``tests``: inner test paths, as on the command line. ``modules``: module
    files loaded instead of Debian's of the same name (``.ko``, ``.ko.xz``, ``.ko.zst``;
    :func:`pykvm.lab.devkernel.find_modules` lists those of a directory); [] loads the same
    modules as the lab's main boot. ``params``: ``MOD.PARAM=V1,V2`` strings as ``--param`` takes
    (a matrix in this boot). ``timeout``: seconds (default: the lab's per boot, times the number of
    combinations). The boot uses the lab's kernel (``--kernel`` or Debian's); each module's
    vermagic is checked against it as for ``--kvm-module``, and a mismatch, a bad ``params`` or an
    unknown name stops the lab before it boots (exit status 2).

    Example: ``Options(..., extra_boots=[ExtraBoot("rebuilt", ["tests/nested/test_nested.py"],
    modules=find_modules(Path("build/kvm"), "nested"))])``."""

    name: str
    tests: list[str]
    modules: list[Path] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    timeout: float | None = None


@dataclass
class Options:
    cache: Path
    out: Path
    keep: bool = False
    timeout: float | None = None
    cpus: list[str] | None = None
    k: str | None = None
    tests: list[str] | None = None
    shell: bool = False
    refresh: bool = False
    kernel_suite: str = "sid"
    verbose: bool = False  # echo the serial console instead of the live status line
    smp: int | None = None  # the lab VM's CPUs for the main and extra boots (None: nested 1, riscv 2)
    # a KVM developer's kernel and modules (pykvm/lab/devkernel.py): --kernel boots this image
    # instead of Debian's (L2 Linux guests keep Debian's); --modules / --kvm-module files are
    # loaded instead of Debian's modules of the same name
    kernel: Path | None = None
    modules: list[Path] = field(default_factory=list)
    # --param MOD.PARAM=V1,V2: the tests run once per combination (pykvm/lab/matrix.py)
    params: list[str] = field(default_factory=list)
    extra_boots: list[ExtraBoot] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# helpers


def _host_python(version: str) -> str | None:
    """An interpreter of the guest's Python minor version on the host, for precompiling .pyc files."""
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        return sys.executable
    cands = [shutil.which(f"python{version}")]
    cands += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")), reverse=True)
    for c in cands:
        if not c:
            continue
        try:
            out = procs.run([c, "-c", "import sys;print('%d.%d'%sys.version_info[:2])"],
                            capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == version:
            return c
    return None


def _compile_pyc(python: str, root: Path, dirs: list[str]) -> None:
    """Precompile ``root/<dirs>`` with ``python`` (unchecked-hash .pyc: the image never changes)."""
    script = (
        "import compileall, py_compile, sys\n"
        "root = sys.argv[1]\n"
        "ok = True\n"
        "for d in sys.argv[2:]:\n"
        "    ok &= compileall.compile_dir(root + '/' + d, ddir='/' + d, quiet=2, workers=0,\n"
        "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
    )
    existing = [d for d in dirs if (root / d).is_dir()]
    if existing:
        procs.run([python, "-c", script, str(root), *existing], check=False,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _decompress_module(src: Path, dest: Path) -> None:
    data = src.read_bytes()
    if src.name.endswith(".xz"):
        data = lzma.decompress(data)
    elif src.name.endswith(".zst"):
        data = procs.run(["zstd", "-dc", str(src)], check=True, capture_output=True).stdout
    elif src.name.endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    dest.write_bytes(data)


def _copy_host_dists(names: list[str], dest: Path) -> dict[str, str]:
    """Copy the files of installed distributions ``names`` into ``dest`` (a dist-packages dir)."""
    versions = {}
    for name in names:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError as e:
            raise LabError(f"host Python lacks {name} (pip install {name})") from e
        versions[name] = dist.version
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue
            src = Path(str(dist.locate_file(f)))
            if not src.is_file():
                continue
            out = dest / Path(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
    return versions


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# kernels


def riscv_kernel(archive: Archive, suite: str) -> tuple[dict, Path, list[tuple[Path, str]]]:
    """Newest ``linux-binary-<ver>-riscv64`` (≥ 6.14) in ``suite`` with its ``linux-modules``: the
    kernel Image and kvm.ko (decompressed)."""
    ix = archive.index(suite, "riscv64")
    cands = []
    for n in ix.names_matching(r"linux-binary-(\d+\.\d+[^ ]*)-riscv64"):
        ver = n[len("linux-binary-") : -len("-riscv64")]
        if ("linux-modules-" + ver + "-riscv64") not in ix:
            continue
        major, minor = (int(x) for x in ver.split(".")[:2])
        if (major, minor) < (6, 14):
            continue
        cands.append((ix.get(n).version, ver, n))
    if not cands:
        raise LabError(f"no linux-binary-*-riscv64 >= 6.14 with modules in {suite}/riscv64")
    cands.sort(key=lambda c: version_key(c[0]))
    pkgver, kver, binname = cands[-1]
    binp, modp = ix.get(binname), ix.get(f"linux-modules-{kver}-riscv64")
    kdir = archive.cache / "unpacked" / f"kernel-riscv-{binp.sha256[:16]}-{modp.sha256[:16]}-net"
    stamp = kdir / ".done"
    log(f"riscv: kernel {kver} ({binname} {pkgver}, {suite})")
    bin_deb, mod_deb = archive.fetch(binp, "kernel"), archive.fetch(modp, "kernel modules")
    if not stamp.exists():
        with archive.lock(f"unpacked-{kdir.name}", f"unpacking {binname}"):
            if not stamp.exists():
                kdir.mkdir(parents=True, exist_ok=True)
                extract_deb(bin_deb, kdir, lambda r: r.endswith("/vmlinuz") or "/vmlinuz-" in r)
                wanted = ("/kernel/arch/riscv/kvm/kvm.ko",) + L1_NET_MODULES
                got = extract_deb(mod_deb, kdir, lambda r: any(w in r for w in wanted),
                                  label=f"kvm.ko, tun.ko, dummy.ko from {modp.name}")
                kvm_got = [g for g in got if "/kvm/kvm.ko" in g]
                if not kvm_got:
                    raise LabError(f"{modp.name}: no kernel/arch/riscv/kvm/kvm.ko*")
                stamp.write_text(json.dumps({"kvm": kvm_got, "net": [g for g in got if g not in kvm_got]}))
    vml = sorted(kdir.glob("usr/lib/modules/*/vmlinuz")) + sorted(kdir.glob("boot/vmlinuz-*"))
    if not vml:
        raise LabError(f"{binname}: no vmlinuz inside")
    got = json.loads(stamp.read_text())
    kvm = [kdir / r for r in got["kvm"]]
    net = _l1_net_modules(got.get("net", []), modp.name)
    # modules_deb: for the root-disk guest (linux_guest.lab_part), as the nested lab's kernel has
    info = {"kernel_package": binname, "kernel_version": kver, "package_version": pkgver, "suite": suite,
            "modules_deb": str(mod_deb)}
    return info, vml[0], [(kvm[0], "")] + [(kdir / r, "") for r in net]


# Modules L1 loads for the network tests (tests/*/test_linux_net*.py): tun for pykvm's tap backend,
# dummy for an interface with a default route, which passt (--net user) needs to copy its
# addresses from (the lab's QEMU gives L1 no network card)
L1_NET_MODULES = ("/kernel/drivers/net/tun.ko", "/kernel/drivers/net/dummy.ko")


def _l1_net_modules(got: list[str], package: str) -> list[str]:
    """The paths among ``got`` of :data:`L1_NET_MODULES`, in that order; LabError for one missing."""
    out = []
    for w in L1_NET_MODULES:
        path = next((g for g in got if w in g), None)
        if path is None:
            raise LabError(f"{package}: module {w.rsplit('/', 1)[-1]} not found")
        out.append(path)
    return out


def nested_kernel(archive: Archive, suite: str = NESTED_KERNEL_SUITE) -> tuple[dict, Path, list[tuple[Path, str]]]:
    img = nested_kernel_image(archive, suite)  # shared with pykvm.lab.kmod (the KVM module rebuild)
    kdir = archive.cache / "unpacked" / f"kernel-x86-{img.sha256[:16]}-net"
    stamp = kdir / ".done"
    wanted = ("/kernel/virt/lib/irqbypass.ko", "/kernel/arch/x86/kvm/kvm.ko", "/kernel/arch/x86/kvm/kvm-amd.ko")
    log(f"nested: kernel {img.name} {img.version} ({suite})")
    deb = archive.fetch(img, "kernel + modules")
    if not stamp.exists():
        with archive.lock(f"unpacked-{kdir.name}", f"unpacking {img.name}"):
            if not stamp.exists():
                kdir.mkdir(parents=True, exist_ok=True)
                got = extract_deb(deb, kdir, lambda r: r.startswith("boot/vmlinuz-")
                                  or any(w in r for w in wanted + L1_NET_MODULES), label=img.name)
                stamp.write_text(json.dumps(got))
    got = json.loads(stamp.read_text())
    mods = []
    for w, args in zip(wanted, ("", "", "nested=1")):
        path = next((g for g in got if w in g), None)
        if path is None:
            raise LabError(f"{img.name}: module {w} not found")
        mods.append((kdir / path, args))
    mods += [(kdir / p, "") for p in _l1_net_modules(got, img.name)]
    vml = sorted(kdir.glob("boot/vmlinuz-*"))
    if not vml:
        raise LabError(f"{img.name}: no /boot/vmlinuz-*")
    # modules_deb: the package with the kernel's modules, for the root-disk guest (linux_guest.lab_part)
    info = {"kernel_package": img.name, "package_version": img.version, "suite": suite, "modules_deb": str(deb)}
    return info, vml[0], mods


# --------------------------------------------------------------------------------------------------
# the two archive parts


def build_base(archive: Archive, spec: LabSpec, modules: list[tuple[Path, str]], opts: Options) -> tuple[Path, dict]:
    ix = archive.index(spec.user_suite, spec.arch)
    pkgs = [ix.get(n) for n in spec.user_packages]
    debs = [archive.fetch(p, "lab userspace") for p in pkgs]
    vix = archive.index(VIRTIOFSD_SUITE, spec.arch)
    vpkgs = [vix.get(n) for n in VIRTIOFSD_PACKAGES]
    vdebs = [archive.fetch(p, "virtiofsd") for p in vpkgs]
    compiler = _host_python(spec.py)
    dist_versions = {n: md.version(n) for n in spec.host_dists}
    key = _hash({
        "format": BASE_FORMAT, "debs": [p.sha256 for p in pkgs], "dists": dist_versions,
        "modules": [(str(m), a, m.stat().st_size) for m, a in modules], "pyc": bool(compiler),
        "init": ird.INIT_SCRIPT,
        "virtiofsd": [[p.sha256 for p in vpkgs], VIRTIOFSD_WRAPPER],
    })
    out = archive.cache / "base" / f"{spec.name}-{key}.cpio.gz"
    info = {"base_key": key, "host_python_packages": dist_versions,
            "pyc_precompiled_with": compiler and procs.run(
                [compiler, "-c", "import sys;print(sys.version.split()[0])"],
                capture_output=True, text=True).stdout.strip()}
    if not compiler:
        info["pyc_note"] = f"no host python{spec.py}: guest .pyc not precompiled (slower imports)"
        log(info["pyc_note"])
    if out.exists():
        log(f"{spec.name}: base image cached ({out.name}, {out.stat().st_size / 1e6:.1f} MB)")
        return out, info
    with archive.lock(f"base-{out.name}", f"building {out.name}"):
        if out.exists():  # another lab built it while this one waited
            return out, info
        _build_base_image(spec, debs, modules, compiler, out, virtiofsd_debs=vdebs)
    return out, info


def _build_base_image(spec: LabSpec, debs: list[Path], modules: list[tuple[Path, str]], compiler: str | None,
                      out: Path, virtiofsd_debs: list[Path] = ()) -> None:
    stage(f"building the {spec.name} base image")
    log(f"{spec.name}: building the base image (Debian userspace, host Python packages, KVM modules)")
    t0 = time.monotonic()
    # the staging tree lives in the cache (same file system as `out`) and goes on every way out
    with tempfile.TemporaryDirectory(prefix=f"pykvm-lab-{spec.name}-{os.getpid()}-", dir=out.parent.parent) as td:
        root = Path(td) / "root"
        merged_usr_links(root)
        drop = ("usr/share/doc/", "usr/share/man/", "usr/share/lintian/", "usr/share/locale/")
        for deb in debs:
            extract_deb(deb, root, lambda r: not r.startswith(drop))
        if not (root / "usr/bin/busybox").exists():
            raise LabError("busybox-static did not provide /usr/bin/busybox")
        if virtiofsd_debs:
            for deb in virtiofsd_debs:
                extract_deb(deb, root / "lab/virtiofsd", _virtiofsd_wanted(spec.arch))
            if not (root / "lab/virtiofsd/usr/libexec/virtiofsd").exists():
                raise LabError("the virtiofsd package did not provide /usr/libexec/virtiofsd")
            wrapper = root / "usr/bin/virtiofsd"
            wrapper.write_text(VIRTIOFSD_WRAPPER % VIRTIOFSD_LIBS[spec.arch])
            wrapper.chmod(0o755)
        for name in ("sh", "mount", "insmod", "mknod", "poweroff", "sync", "sleep", "setsid", "cttyhack",
                     "ls", "cat", "uname", "mkdir", "base64"):
            link = root / "usr/bin" / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to("busybox")
        # passt, started as root, changes to the user nobody and exits when getpwnam finds none
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        py = root / "usr/bin" / "python3"
        if not py.exists():
            py.symlink_to(f"python{spec.py}")
        dist = root / "usr/lib/python3/dist-packages"
        dist.mkdir(parents=True, exist_ok=True)
        _copy_host_dists(spec.host_dists, dist)
        moddir = root / "lab/modules"
        moddir.mkdir(parents=True)
        lines = []
        for m, args in modules:
            name = m.name.split(".ko")[0] + ".ko"
            _decompress_module(m, moddir / name)
            lines.append(f"{name} {args}".strip())
        (moddir.parent / "modules.list").write_text("\n".join(lines) + "\n")
        if compiler:
            log(f"{spec.name}: precompiling guest .pyc with {compiler}")
            _compile_pyc(compiler, root, [f"usr/lib/python{spec.py}", "usr/lib/python3/dist-packages"])
        log(f"{spec.name}: writing the base image")
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(out, lambda tmp: ird.write_initramfs(tmp, root))
    log(f"{spec.name}: base image {out.stat().st_size / 1e6:.1f} MB built in {time.monotonic() - t0:.1f} s")


def _write_atomically(dest: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``dest``; ``tmp`` (named per process) never stays behind."""
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_guests() -> str:
    makefile = CHECKOUT / "guests" / "Makefile"
    if not makefile.exists():
        return "guests/Makefile absent: no guests built"
    outdir = CHECKOUT / "build" / "guests"
    r = procs.run(["make", "-C", str(CHECKOUT / "guests"), f"OUT={outdir}", f"-j{os.cpu_count() or 1}"],
                  capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"make -C guests failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return f"guests built into {outdir}"


def build_native(spec: LabSpec, archive: Archive, workdir: Path) -> tuple[Path | None, str]:
    """pykvm._native for the lab's architecture.

    With ``csrc/build_native.py`` (a cffi ``ffibuilder``, API mode): emit its C and compile it with
    the lab's compiler against the lab Python's headers.  Without it, the nested lab reuses a
    host-built ``pykvm/_native*.so`` (host pyenv 3.11 and bookworm's python3.11 share the ABI tag
    cpython-311-x86_64-linux-gnu); the RISC-V lab goes without.
    """
    builder = CHECKOUT / "csrc" / "build_native.py"
    if spec.name == "riscv":
        suffix, cc = ".cpython-313-riscv64-linux-gnu.so", "riscv64-linux-gnu-gcc"
    else:
        suffix, cc = ".cpython-311-x86_64-linux-gnu.so", "gcc"
        host_suffix = sysconfig.get_config_var("EXT_SUFFIX")
        if host_suffix != suffix:
            raise LabError(f"host EXT_SUFFIX {host_suffix} != bookworm python3.11's {suffix}")
    if not builder.exists():
        if spec.name == "nested":
            built = sorted(CHECKOUT.glob("pykvm/_native" + suffix))
            if built:
                return built[0], f"host-built {built[0].name}"
        return None, "csrc/build_native.py absent: pykvm._native not built"
    if not shutil.which(cc):
        raise LabError(f"{cc} not found (needed to build pykvm._native for the {spec.name} lab)")
    incs = [sysconfig.get_paths()["include"]]
    if spec.name == "riscv":
        ix = archive.index(RISCV.user_suite, "riscv64")
        dev = archive.fetch(ix.get("libpython3.13-dev"), "headers for pykvm._native")
        hdr = archive.cache / "unpacked" / f"py313dev-{ix.get('libpython3.13-dev').sha256[:16]}"
        if not (hdr / ".done").exists():
            with archive.lock(f"unpacked-{hdr.name}", "unpacking libpython3.13-dev"):
                if not (hdr / ".done").exists():
                    extract_deb(dev, hdr, lambda r: r.startswith("usr/include/"))
                    (hdr / ".done").touch()
        incs = [str(hdr / "usr/include/python3.13"), str(hdr / "usr/include/riscv64-linux-gnu/python3.13"),
                str(hdr / "usr/include")]
        if not (Path(incs[1]) / "pyconfig.h").exists():
            raise LabError("libpython3.13-dev riscv64: no pyconfig.h")
    return compile_cffi_module(builder, workdir, cc, incs, suffix), f"built from {builder.name} with {cc}"


def compile_cffi_module(builder: Path, workdir: Path, cc: str, includes: list[str], suffix: str) -> Path:
    """Emit the C of ``builder``'s ``ffibuilder`` and compile it into ``<module><suffix>``."""
    workdir.mkdir(parents=True, exist_ok=True)
    c_file = workdir / "_native.c"
    meta = workdir / "native.json"
    script = (
        "import json, runpy, sys\n"
        "ns = runpy.run_path(sys.argv[1], run_name='pykvm_lab_build')\n"
        "fb = ns['ffibuilder']\n"
        "fb.emit_c_code(sys.argv[2])\n"
        "mod, _src, _ext, kw = fb._assigned_source\n"
        "json.dump({'module': mod, 'kw': {k: v for k, v in kw.items() if isinstance(v, (list, str))}},"
        " open(sys.argv[3], 'w'))\n"
    )
    r = procs.run([sys.executable, "-c", script, str(builder), str(c_file), str(meta)],
                  cwd=builder.parent.parent, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{builder.name}: {r.stderr.strip().splitlines()[-1:]}")
    m = json.loads(meta.read_text())
    kw = m["kw"]
    base = builder.parent.parent

    def rel(p: str) -> str:
        return str(p if os.path.isabs(p) else base / p)
    out = workdir / (m["module"].rsplit(".", 1)[-1] + suffix)
    argv = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(c_file)]
    argv += [rel(s) for s in kw.get("sources", [])]
    argv += [f"-I{i}" for i in includes] + [f"-I{rel(i)}" for i in kw.get("include_dirs", [])]
    argv += [f"-D{d[0]}={d[1]}" if isinstance(d, list) and d[1] is not None else f"-D{d if isinstance(d, str) else d[0]}"
             for d in kw.get("define_macros", [])]
    argv += list(kw.get("extra_compile_args", [])) + list(kw.get("extra_link_args", []))
    argv += [f"-l{lib}" for lib in kw.get("libraries", [])]
    r = procs.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"compiling pykvm._native with {cc} failed: {r.stderr.strip()[-400:]}")
    return out


# Builds from outside this checkout that inner tests use when the host has them, named by an
# environment variable: (variable, lab, where the files go in the lab's checkout, which files).
# Without the variable nothing is added and the tests that need them skip ("pykvm: host lacks").
EXTRA_TREES = [
    # kvm-unit-tests built for riscv64 (tests/riscv/test_kut.py, tests/riscv/kut.py)
    ("PYKVM_KUT_RISCV_DIR", "riscv", "build/kut-riscv", ("riscv/*.flat", "*.json")),
]


def copy_extra_trees(lab: str, dst: Path) -> dict:
    """Copy the :data:`EXTRA_TREES` of ``lab`` whose variable is set into the checkout copy
    ``dst``; returns {variable: what was copied} for the manifest."""
    info = {}
    for var, for_lab, where, patterns in EXTRA_TREES:
        src = os.environ.get(var)
        if for_lab != lab or not src:
            continue
        src_dir = Path(src).expanduser()
        files = sorted({f for pat in patterns for f in src_dir.glob(pat) if f.is_file()})
        if not files:
            raise LabError(f"{var}={src}: no {' or '.join(patterns)} there")
        for f in files:
            out = dst / where / f.relative_to(src_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
        info[var] = f"{src_dir}: {len(files)} files into {where}"
        log(f"{lab}: {info[var]}")
    return info


def boot_split(spec: LabSpec, tests: list[str]) -> tuple[list[str], list[str], list[str], list[str]]:
    """``tests`` split by boot: (the main boot's, the benchmark boot's, the ``-smp2`` boot's,
    the later main boots' arguments: :func:`later_boot_args`)."""
    main, qemu_only = split_tests(spec, tests)
    main, two_cpu = split_tests(spec, main, spec.two_cpu_tests)
    return main, qemu_only, two_cpu, later_boot_args(spec, main)


def pytest_args(spec: LabSpec, split: tuple[list[str], list[str], list[str], list[str]],
                common: list[str], boot_tests: dict[str, list[str]] | None = None
                ) -> dict[str, list[str]]:
    """The inner pytest's arguments per boot, {file name under /lab: argv after "pytest"}, from
    the selected tests' :func:`boot_split` ``split``: ``pytest-args.json`` (the main boot),
    ``-qemu`` (the benchmark boot), ``-smp2``, ``-more`` and one per extra boot in
    ``boot_tests``; ``common`` ends each. The boots watched for silence
    (:attr:`LabSpec.silence`; all but the benchmark boot and the extra boots) also get
    ``--timeout`` :data:`SILENCE_MARGIN` s under it."""
    watched = common + ([f"--timeout={spec.silence - SILENCE_MARGIN:g}"] if spec.silence else [])
    main, qemu_only, two_cpu, more = split
    out = {"pytest-args.json": main + watched, "pytest-args-qemu.json": qemu_only + common}
    if two_cpu:
        out["pytest-args-smp2.json"] = two_cpu + watched
    if more:
        out["pytest-args-more.json"] = more + watched
    for name, paths in (boot_tests or {}).items():
        bmain, bqemu = split_tests(spec, paths)
        out[f"pytest-args-{name}.json"] = bmain + bqemu + common
    return out


def build_payload(spec: LabSpec, archive: Archive, opts: Options, tests: list[str], nonce: str,
                  workdir: Path, compiler: str | None, extra: dict[str, bytes | Path] | None = None,
                  boot_tests: dict[str, list[str]] | None = None) -> tuple[Path, dict]:
    """The per-run archive part (see the module's docstring). ``extra``: more files, {path under
    the payload's root: content or host file} (a boot's modules and their lists); ``boot_tests``:
    {extra boot name: its inner test paths}, written as ``/lab/pytest-args-<name>.json``."""
    root = workdir / "payload"
    if root.exists():
        shutil.rmtree(root)
    dst = root / "pykvm"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "_native*.so",
                                    "_rawbench*.so")       # host builds: not the lab's arch
    shutil.copytree(CHECKOUT / "pykvm", dst / "pykvm", ignore=ignore)
    if (CHECKOUT / "tests").is_dir():
        shutil.copytree(CHECKOUT / "tests", dst / "tests", ignore=ignore)
    for f in ("conftest.py", "pyproject.toml", "pytest.ini", "setup.cfg"):
        if (CHECKOUT / f).exists():
            shutil.copy2(CHECKOUT / f, dst / f)
    # labs running at once share this checkout's build/guests: one make (and copy) at a time
    with procs.cache_lock(CHECKOUT / "build", "guests", message="waiting for another lab's make -C guests"):
        info = {"guests": build_guests()}
        guests = CHECKOUT / "build" / "guests"
        if guests.is_dir():
            shutil.copytree(guests, dst / "build" / "guests")
    native, info["native"] = build_native(spec, archive, workdir / "native")
    if native:
        shutil.copy2(native, dst / "pykvm" / native.name)
    log(f"{spec.name}: pykvm._native: {info['native']}")
    info.update(copy_extra_trees(spec.name, dst))
    if compiler:
        _compile_pyc(compiler, root, ["pykvm/pykvm", "pykvm/tests"])
    lab = root / "lab"
    lab.mkdir()
    common = ["-q", "-rfEs", "--junitxml=/tmp/junit.xml", "-o", "cache_dir=/tmp/pc"]
    if (CHECKOUT / "pykvm" / "testing" / "plugin.py").exists():
        # on the host it is a pytest11 entry point of the installed package; the lab has no install
        common += ["-p", "pykvm.testing.plugin"]
    if opts.k:
        common += ["-k", opts.k]
    split = boot_split(spec, tests)
    for file, args in pytest_args(spec, split, common, boot_tests).items():
        (lab / file).write_text(json.dumps(args))
    main, qemu_only, two_cpu, more = split
    for rel_path, content in (extra or {}).items():
        dest = root / rel_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content)
    (lab / "run_pytest.py").write_text(ird.RUN_PYTEST)
    (lab / "lab.conf").write_text(f"NONCE={nonce}\nSHELL_MODE={1 if opts.shell else 0}\nTESTS='{' '.join(tests)}'\n")
    init = root / "init"
    init.write_text(ird.INIT_SCRIPT)
    init.chmod(0o755)
    out = workdir / "payload.cpio.gz"
    ird.write_initramfs(out, root)
    info["tests"], info["qemu_tests"], info["two_cpu_tests"] = main, qemu_only, two_cpu
    info["more"] = more                        # the later main boots' arguments ([]: no such boot)
    return out, info


def split_tests(spec: LabSpec, tests: list[str], own: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(the main boots' pytest arguments, the QEMU boot's test paths) for the selected ``tests``:
    each of ``spec.qemu_tests`` (or of ``own``: the tests of another boot of their own) that a
    selected path covers (the file itself, a node id in it, or a folder above it) goes to that
    boot; the main boots get the rest, with ``--ignore`` for those under a selected folder.
    Either list may come back empty (then that boot is left out)."""
    own_tests = spec.qemu_tests if own is None else own
    main: list[str] = []
    qemu: list[str] = []
    for t in tests:
        raw, sep, node = t.partition("::")
        path = os.path.normpath(raw) if raw else "."
        if os.path.isabs(path):
            try:
                path = os.path.relpath(path, CHECKOUT)
            except ValueError:
                pass
        hit = [q for q in own_tests if path == "." or q == path or q.startswith(path + "/")]
        if not hit:
            main.append(t)
        elif path in own_tests:
            name = path + sep + node               # the file or a node id in it: QEMU boot only
            if name not in qemu:
                qemu.append(name)
        else:
            main += [t] + [f"--ignore={q}" for q in hit]
            qemu += [q for q in hit if q not in qemu]
    if main and all(a.startswith("--ignore=") for a in main):
        main = []
    return main, qemu


def _l1_panicked(serial_log: Path) -> bool:
    """Whether the lab kernel's console (``serial_log``) shows it panicked (a benchmark boot
    is then booted once more; the reason is printed)."""
    try:
        with open(serial_log, "rb") as f:
            return b"Kernel panic - not syncing" in f.read()
    except OSError:
        return False


def later_boot_args(spec: LabSpec, main: list[str]) -> list[str]:
    """The pytest arguments of the main boots after the first (riscv: the second CPU model):
    ``main`` with ``--ignore`` for each file of ``spec.once_tests`` and ``--deselect`` for each
    node id ("file::test") there, or [] when those are all that ``main`` selects (then only the
    first model's boot runs). ``main`` unchanged without once_tests."""
    if not spec.once_tests:
        return main
    files = [o for o in spec.once_tests if "::" not in o]
    nodes = [o for o in spec.once_tests if "::" in o]

    def once(arg: str) -> bool:
        path, _, name = arg.partition("::")
        p = os.path.normpath(path)
        if any(p == o or p.startswith(o + "/") for o in files):
            return True
        return bool(name) and any(f"{p}::{name}".startswith(o) for o in nodes)

    # pytest collects a path named on its command line even when --ignore names it: those are
    # left out here, --ignore covers the ones under a folder that is named
    kept = [a for a in main if a.startswith("-") or not once(a)]
    if not [a for a in kept if not a.startswith("-")]:
        return []
    return kept + [f"--ignore={o}" for o in files] + [f"--deselect={o}" for o in nodes]


def select_tests(spec: LabSpec, requested: list[str] | None) -> list[str]:
    paths = requested or spec.default_tests
    present = [p for p in paths if (CHECKOUT / p.split("::")[0]).exists()]
    missing = sorted(set(paths) - set(present))
    if missing:
        log(f"{spec.name}: skipping absent test paths: {' '.join(missing)}")
    if not present:
        raise LabError(f"none of the inner test paths exist: {' '.join(paths)}")
    return present


# --------------------------------------------------------------------------------------------------
# a developer's kernel and modules, the module-parameter matrix, extra boots

EXTRA_BOOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
RESERVED_BOOTS = ("more", "qemu", "smp2")  # PYKVM_LAB_PYTEST names of the lab's own boots


def _user_modules(lab: str, opts: Options, workdir: Path, manifest: dict) -> dict[str, list[dk.ModuleFile]]:
    """{boot: the modules given for it} ("" for the main boots, else an extra boot's name), read
    and decompressed into ``workdir/kmod``; with ``--kernel`` also its release, recorded in
    ``manifest``, and each module's vermagic checked against it. Raises
    :class:`pykvm.lab.devkernel.LabInputError`."""
    user = {"": [dk.read_module(m, workdir / "kmod" / "main") for m in opts.modules]}
    for eb in opts.extra_boots:
        if not EXTRA_BOOT_NAME.match(eb.name) or eb.name in RESERVED_BOOTS or eb.name == "main":
            raise dk.LabInputError(f"extra boot name {eb.name!r}: use lower-case letters, digits, - and _ "
                                   f"(not {', '.join(RESERVED_BOOTS)} or main)")
        if eb.name in user:
            raise dk.LabInputError(f"extra boot {eb.name} given twice")
        if not eb.tests:
            raise dk.LabInputError(f"extra boot {eb.name}: no tests")
        user[eb.name] = [dk.read_module(m, workdir / "kmod" / eb.name) for m in eb.modules]
    if opts.kernel:
        stage("reading the kernel under test")
        release = dk.kernel_release(opts.kernel, lab)
        manifest["kernel_under_test"] = {"path": str(opts.kernel), "sha256": sha256_file(opts.kernel),
                                         "release": release}
        log(f"{lab}: kernel under test {opts.kernel} ({release or 'release unreadable'})")
        _check_releases(lab, user, release, f"--kernel {opts.kernel}")
    return user


def _check_releases(lab: str, user: dict[str, list[dk.ModuleFile]], release: str | None, kernel: str) -> None:
    if release is None and any(user.values()):
        log(f"{lab}: WARNING: cannot read the release of {kernel}: module vermagic not checked")
    for mods in user.values():
        dk.check_release(mods, release, kernel)


def _plan_boots(lab: str, opts: Options, user: dict[str, list[dk.ModuleFile]], debian_kernel: Path,
                debian_modules: list[tuple[Path, str]], manifest: dict) -> dict[str, dk.BootModules]:
    """{boot: what it loads} (:func:`pykvm.lab.devkernel.plan_boot`); the modules given for Debian's
    kernel are checked against its release here. Raises LabInputError."""
    kernel = f"--kernel {opts.kernel}" if opts.kernel else f"Debian's {debian_kernel.name}"
    if not opts.kernel and any(user.values()):
        release = dk.kernel_release(debian_kernel, lab)
        manifest["kernel_release"] = release
        _check_releases(lab, user, release, kernel)
    plans = {}
    for eb in [None, *opts.extra_boots]:
        boot = eb.name if eb else ""
        own = bool(eb and user[boot])          # an extra boot without modules loads the main boot's
        plan = dk.plan_boot(lab, boot if own else "", user[boot] if own else user[""], debian_modules,
                            bool(opts.kernel), eb.params if eb else opts.params, kernel)
        if eb or plan.lines is not None or plan.matrix is not None:
            manifest.setdefault("boots", {})[boot or "main"] = plan.manifest
        plans[boot] = plan
    return plans


def _boot_files(spec: LabSpec, opts: Options, plans: dict[str, dk.BootModules]
                ) -> tuple[dict[str, bytes | Path], dict[str, list[str]]]:
    """The payload's files for ``plans`` ({path under its root: content}: the modules, each boot's
    ``lab/modules-run[-<boot>].list`` and ``lab/matrix[-<boot>].json``; the main boots' files
    serve the later riscv CPU models' and the QEMU boot too) and {extra boot: its tests}."""
    files: dict[str, bytes | Path] = {}
    boot_tests = {}
    for boot, plan in plans.items():
        suffixes = [f"-{boot}"] if boot else ["", *(f"-{r}" for r in RESERVED_BOOTS)]
        for lab_path, host in plan.files.items():
            files[lab_path.lstrip("/")] = host
        for suf in suffixes:
            if plan.lines is not None:
                files[f"lab/modules-run{suf}.list"] = ("\n".join(plan.lines) + "\n").encode()
            if plan.matrix is not None:
                files[f"lab/matrix{suf}.json"] = json.dumps(plan.matrix, indent=1).encode()
    for eb in opts.extra_boots:
        boot_tests[eb.name] = select_tests(spec, eb.tests)
    return files, boot_tests


# --------------------------------------------------------------------------------------------------
# running a lab


def run_lab(lab: str, opts: Options) -> int:
    """Prepare, boot and collect one lab; the exit status (see ``python -m pykvm.lab --help``).

    Two runs of the same lab into the same ``--out`` take turns (a file lock there); the cache may be
    shared by any number of labs.  On every way out — an interrupt included — QEMU and other children
    are stopped (in :func:`pykvm.lab.qemu.boot` and :func:`pykvm.lab.proc.run`) and this run's
    staging files are removed (kept with ``--keep``)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    stage(f"waiting for {opts.out}")
    with procs.cache_lock(opts.out, f"lab-{lab}", message=f"waiting for the other {lab} lab writing to {opts.out}"):
        workdir = opts.out / lab
        try:
            return _run_lab(lab, opts, workdir)
        finally:
            if not opts.keep:
                shutil.rmtree(workdir / "payload", ignore_errors=True)
                shutil.rmtree(workdir / "native", ignore_errors=True)
                shutil.rmtree(workdir / "kmod", ignore_errors=True)
                (workdir / "payload.cpio.gz").unlink(missing_ok=True)


def _run_lab(lab: str, opts: Options, workdir: Path) -> int:
    t_start = time.monotonic()
    spec = RISCV if lab == "riscv" else NESTED
    workdir.mkdir(parents=True, exist_ok=True)
    xml_out = opts.out / f"{lab}.xml"
    archive = Archive(opts.cache)
    stage("resolving packages")
    log(f"{lab}: resolving packages (cache {archive.cache})")
    manifest: dict = {"lab": lab}
    try:
        if opts.refresh:
            for suite in {spec.user_suite, opts.kernel_suite if lab == "riscv" else NESTED_KERNEL_SUITE}:
                archive.index(suite, spec.arch, refresh=True)
        tests = select_tests(spec, opts.tests)
        # the developer's kernel and modules are checked before anything is downloaded for them
        user = _user_modules(lab, opts, workdir, manifest)
        stage("getting the kernel")
        if lab == "riscv":
            kinfo, kernel, modules = riscv_kernel(archive, opts.kernel_suite)
            stage("getting QEMU")
            qemu = q.trixie_riscv_qemu(archive)
        else:
            kinfo, kernel, modules = nested_kernel(archive)
            stage("getting QEMU")
            qemu = q.x86_qemu(archive)
        log(f"{lab}: {qemu.version}")
        manifest.update(kernel=kinfo, qemu=qemu.version)
        plans = _plan_boots(lab, opts, user, kernel, modules, manifest)
        extra, boot_tests = _boot_files(spec, opts, plans)
        stage("getting the base image")
        base, binfo = build_base(archive, spec, modules, opts)
        manifest.update(binfo)
        stage("getting the Linux guest")
        mdeb = kinfo.get("modules_deb")
        lpart, manifest["linux_guest"] = linux_guest.lab_part(archive, spec, kernel,
                                                              modules_deb=Path(mdeb) if mdeb else None)
        nonce = secrets.token_hex(8)
        stage("building the payload")
        log(f"{lab}: building the payload (this checkout, guests, pykvm._native for {spec.arch})")
        payload, pinfo = build_payload(spec, archive, opts, tests, nonce, workdir, _host_python(spec.py),
                                       extra, boot_tests)
        manifest.update(pinfo)
        stage("writing the initrd")
        initrd, initrd_qemu = workdir / "initrd.img", workdir / "initrd-qemu.img"

        def concat(parts):
            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    for part in parts:
                        with open(part, "rb") as p:
                            shutil.copyfileobj(p, f)
            return write

        _write_atomically(initrd, concat((base, lpart, payload)))
        with_qemu = ""
        extra_qemu = any(split_tests(spec, t)[1] for t in boot_tests.values())
        if pinfo["qemu_tests"] or opts.shell or extra_qemu:
            # QEMU for the lab's own arch (pykvm/lab/blkbench.py compares pykvm with it): only in
            # the boot that runs spec.qemu_tests (and a --shell)
            qpart, qinfo = q.inner_qemu_part(archive, spec.user_suite, spec.arch, spec.user_packages, spec.name)
            manifest.update(qinfo)
            _write_atomically(initrd_qemu, concat((base, lpart, qpart, payload)))
            with_qemu = f", {initrd_qemu.stat().st_size / 1e6:.1f} MB with QEMU"
        # the L1 kernel: --kernel, else Debian's (which L2 Linux guests use either way)
        _write_atomically(workdir / "vmlinuz", lambda tmp: shutil.copy2(opts.kernel or kernel, tmp))
        log(f"{lab}: initrd {initrd.stat().st_size / 1e6:.1f} MB{with_qemu}; "
            f"prepared in {time.monotonic() - t_start:.1f} s")
    except LabError as e:
        code = getattr(e, "status", 3)         # 2: a kernel, module or --param the lab cannot use
        _write_manifest(opts.out, lab, archive, manifest, error=str(e))
        q.merge_junit([q.BootResult(lab, code, str(e))], xml_out, lab)
        print(f"lab {lab}: FAILED: {e}")
        return code
    main = bool(pinfo["tests"]) or opts.shell
    qemu_boot = bool(pinfo["qemu_tests"]) and not opts.shell
    runs: list[tuple[str, list[str], float]] = []     # (name, QEMU arguments, timeout)
    main_plan = plans[""]
    # a matrix runs the tests once per combination in the same boot
    timeout = (opts.timeout or spec.timeout) * main_plan.combos
    qemu_timeout = (opts.timeout or spec.qemu_timeout) * main_plan.combos
    # module parameters of a KVM built into --kernel go on its command line
    kcmd = f" {main_plan.cmdline}" if main_plan.cmdline else ""

    def extra_boots(name_prefix: str, machine) -> None:
        for eb in opts.extra_boots:
            plan = plans[eb.name]
            image = initrd_qemu if split_tests(spec, boot_tests[eb.name])[1] else initrd
            kparams = f" {plan.cmdline}" if plan.cmdline else ""
            runs.append((f"{name_prefix}-{eb.name}", machine(image, f" PYKVM_LAB_PYTEST={eb.name}", kparams),
                         eb.timeout or (opts.timeout or spec.timeout) * plan.combos))
    if lab == "riscv":
        def riscv(cpu: str, image: Path, extra: str = "", kparams: str = kcmd) -> list[str]:
            return [
                # AIA (APLIC + IMSIC, with Smaia/Ssaia on the harts): L1's KVM then offers its
                # in-kernel AIA irqchip (KVM_DEV_TYPE_RISCV_AIA), which pykvm's virtio devices need
                "-machine", "virt,aia=aplic-imsic",
                "-cpu", "rv64,h=true,smaia=true,ssaia=true" if cpu == "rv64" else cpu, "-m", "2G", "-smp", str(opts.smp or 2),
                "-no-reboot", "-nic", "none", "-kernel", str(workdir / "vmlinuz"), "-initrd", str(image),
                # an unknown name=value on the kernel command line reaches /init's environment:
                # the inner tests learn which CPU model they run on (and which tests to run)
                "-append", f"{RISCV_CMDLINE} PYKVM_LAB_CPU={cpu}{extra}{kparams}"]
        cpus = opts.cpus or ["rv64", "max"]
        if main:
            image = initrd_qemu if opts.shell else initrd
            # the first model runs every main test, the others all but spec.once_tests
            runs.append((f"riscv-{cpus[0]}", riscv(cpus[0], image), timeout))
            if pinfo["more"] or opts.shell:
                runs += [(f"riscv-{cpu}", riscv(cpu, image, "" if opts.shell else
                                                " PYKVM_LAB_PYTEST=more"), timeout)
                         for cpu in cpus[1:]]
        if qemu_boot:
            runs.append((f"riscv-{cpus[0]}-qemu", riscv(cpus[0], initrd_qemu, " PYKVM_LAB_PYTEST=qemu"),
                         qemu_timeout))
        if not opts.shell:
            extra_boots(f"riscv-{cpus[0]}", lambda image, cmd, kparams: riscv(cpus[0], image, cmd, kparams))
    else:
        def nested(image: Path, extra: str = "", smp: str = str(opts.smp or 1),
                   kparams: str = kcmd, tcg: str = "") -> list[str]:
            # several L1 CPUs on one TCG thread: with a thread per CPU (MTTCG) the L1 kernel's live
            # code patching (text_poke_bp's int3) races QEMU's translated-code invalidation, and L1
            # died of "Oops: int3" in __schedule, at boot or at a module load, in 3 of 5 two-CPU
            # boots. One thread is slow for the Linux guests (a wake-up on the other CPU waits for
            # the round-robin slice; 4 of them timed out in CI), so only the boots that need two
            # CPUs for their tests (spec.two_cpu_tests, --smp) get it
            tcg = tcg or ("tcg" if smp == "1" else "tcg,thread=single")
            return ["-accel", tcg, "-cpu", "max", "-smp", smp, "-m", "1024", "-no-reboot", "-nic", "none",
                    "-kernel", str(workdir / "vmlinuz"), "-initrd", str(image),
                    "-append", NESTED_CMDLINE + extra + kparams]
        if main:
            runs.append(("nested", nested(initrd_qemu if opts.shell else initrd), timeout))
        if pinfo["two_cpu_tests"] and not opts.shell:
            runs.append(("nested-smp2", nested(initrd, " PYKVM_LAB_PYTEST=smp2", smp=str(max(2, opts.smp or 2))),
                         timeout))
        if qemu_boot:
            # (its two VMMs' threads run at once in MTTCG; an int3 death there is booted again)
            runs.append(("nested-qemu", nested(initrd_qemu, " PYKVM_LAB_PYTEST=qemu", smp="2", tcg="tcg"),
                         qemu_timeout))
        if not opts.shell:
            extra_boots("nested", lambda image, cmd, kparams: nested(image, cmd, kparams=kparams))
    results = []
    for name, margs, boot_timeout in runs:
        # a nested boot has gone silent under QEMU's TCG (2026-12-07 CI, twice: at the start of
        # an L2 Linux guest, and in the vsock guest-to-host test): a boot silent for
        # spec.silence s is stopped and booted once more. Its tests' own limit is shorter
        # (LabSpec.silence), so a test that hangs fails with its stacks before that; only an L1
        # that stops dead is booted again. Not the benchmark boot, whose runs are long and quiet
        # (it has its retry)
        silence = spec.silence if not name.endswith("-qemu") else None
        res = q.boot(qemu, margs, workdir / f"serial-{name}.log", nonce, name,
                     boot_timeout, interactive=opts.shell, verbose=opts.verbose, silence=silence)
        if silence and not opts.shell and res.status == 4 and "stalled" in (res.reason or ""):
            print(f"--- {name}: {res.reason}; booting it once more ---", flush=True)
            res = q.boot(qemu, margs, workdir / f"serial-{name}-again.log", nonce, name,
                         boot_timeout, interactive=False, verbose=opts.verbose, silence=silence)
        elif name.endswith("-qemu") and not opts.shell and (res.status == 4 or _l1_panicked(
                workdir / f"serial-{name}.log")):
            # a TCG-run L1 has been seen to stop dead under the disk benchmark (no console output,
            # not even its own timers; QEMU's L2 and pykvm's alike), and to panic on an int3 in
            # its own scheduler while it tore down the benchmark's network namespace (2026-12-06,
            # Debian 6.12 under QEMU 7.2 TCG, two CPUs): that boot gets one more try, and the
            # lab's output says so
            print(f"--- {name}: {'timed out' if res.status == 4 else 'the L1 kernel panicked'} "
                  f"after {res.seconds:.0f} s ({res.reason}); booting it once more ---", flush=True)
            res = q.boot(qemu, margs, workdir / f"serial-{name}-again.log", nonce, name,
                         boot_timeout, interactive=False, verbose=opts.verbose)
        results.append(res)
        if opts.shell:
            return res.status
        if res.junit:
            (workdir / f"junit-{name}.xml").write_bytes(res.junit)
        print(f"--- {name}: inner pytest ({res.seconds:.1f} s in QEMU) ---", flush=True)
        for line in res.summary + q.bench_lines(res.junit):
            print(f"    {line}")
        table = mx.combo_table(res.junit)
        if table:
            print("    per module-parameter combination:")
            for line in table:
                print(f"      {line}")
        if res.reason:
            print(f"    {res.reason}")
        sys.stdout.flush()
    stage("writing the results")
    root = q.merge_junit(results, xml_out, lab)
    manifest["runs"] = [{"name": r.name, "status": r.status, "reason": r.reason, "seconds": round(r.seconds, 1),
                         "log": r.log} for r in results]
    _write_manifest(opts.out, lab, archive, manifest)
    status = next((r.status for r in results if r.status), 0)
    if status == 0 and int(root.get("tests", 0)) == 0:
        status = 5
    total = time.monotonic() - t_start
    fails = [r.reason or f"{r.name}: inner pytest exit status {r.status}" for r in results if r.status]
    print(f"lab {lab}: {root.get('tests')} tests, {root.get('failures')} failures, {root.get('errors')} errors, "
          f"{root.get('skipped')} skipped; {xml_out}, {xml_out.with_suffix('.ktap')}; {total:.0f} s total")
    if fails:
        print(f"lab {lab}: FAILED: {fails[0]}")
    return status


def _write_manifest(out: Path, lab: str, archive: Archive, info: dict, error: str | None = None) -> None:
    path = out / "manifest.json"
    entry = dict(info)
    entry["mirror"] = archive.mirror
    unique = {(m["suite"], m["arch"], m["package"], m["sha256"]): m for m in archive.manifest}
    entry["packages"] = [unique[k] for k in sorted(unique)]
    if error:
        entry["error"] = error
    # both labs may write here at once: read-modify-write under a lock, replace atomically
    with procs.cache_lock(out, "manifest", message=""):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[lab] = entry
        write_report(path, json.dumps(data, indent=2, sort_keys=True) + "\n", "the lab manifest")
