"""A root disk for pykvm's Linux guests: an ext4 image from Debian packages, and the small
initramfs that mounts it from virtio-blk.

Three pieces, each cached by content in the lab cache (``~/.cache/pykvm/lab`` or
``PYKVM_LAB_CACHE``), so a second call with the same inputs costs a file copy:

* :func:`build_root_image` — ``root.img``: a raw ext4 image (``mke2fs -t ext4 -d``) holding
  busybox-static of a Debian suite and :data:`ROOT_INIT` as ``/sbin/init``;
* :func:`kernel_modules` — the kernel's modules a guest needs to reach its root (virtio-blk,
  virtio-rng, the virtio transport, ext4 — whichever of them that kernel builds as modules, with
  their ``depends=`` closure read from each module's ``.modinfo``), taken from the Debian package
  that carries the kernel's modules and decompressed;
* :func:`build_boot_initramfs` — a gzip'd newc initramfs: busybox-static, those modules and
  :data:`BOOT_INIT` as ``/init``, which loads the modules, waits for ``root=`` (default
  ``/dev/vda``), mounts it (read-only with ``ro`` on the command line or when the disk is
  read-only) and ``switch_root``\\ s to ``init=`` (default ``/sbin/init``).

The root's ``/sbin/init`` prints one line per step, each starting with
:data:`pykvm.lab.linux_guest.MARK`: the root it runs on, the disk (``/sys/block/vda``), what an
earlier boot left in ``/pykvm-token``, ``/dev/hwrng`` (the rng-core driver in use and 16 bytes read
from it); then it acts on the kernel command line — ``pykvm.token=T`` writes ``T`` to
``/pykvm-token`` and syncs, ``pykvm.write-probe`` tries to create a file and reports whether the
root took it, ``pykvm.blkbench=SECONDS`` runs ``/usr/bin/blkbench`` on the disk whose serial is
``pykvm-bench`` (:mod:`pykvm.lab.blkbench`) — and gives a shell on the console (prompt
``pykvm:<cwd># ``; leaving it powers off),
or with ``pykvm.batch`` powers off at once. Before powering off it remounts the root read-only,
so the next boot finds a clean file system.

For users: ``python -m pykvm.lab.linux_guest --root-disk [--arch x86_64|riscv64] [--out DIR]``
builds kernel, boot initramfs and root disk and prints the ``pykvm run`` command
(docs/linux-guests.md).

Errors: every failure to get or build a piece is a :class:`pykvm.lab.debian.LabError` with a
one-line reason (a package missing from the index, a checksum mismatch, ``mke2fs`` missing or
failing, a module or one of its dependencies missing from the package).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..sandbox import modinfo_depends
from . import initramfs as ird

FORMAT = 1  # bump when the layout of the root image or the boot initramfs changes
MARK = "pykvm-linux-guest:"            # the same as pykvm.lab.linux_guest.MARK

DEBIAN_ARCH = {"riscv64": "riscv64", "x86_64": "amd64", "amd64": "amd64"}
# busybox-static comes from this suite unless a caller names another (the binary is static, so
# any suite serves any kernel)
DEFAULT_SUITE = "trixie"
DEFAULT_SIZE_MIB = 32
# ext4 features of the root disk (what mke2fs.conf gives ext4, less the newest: orphan_file,
# metadata_csum_seed)
EXT4_FEATURES = "has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize"

# The modules a guest needs for its root on virtio-blk, its rng, its consoles and its network
# (virtio_net with net_failover and failover; af_packet for udhcpc's raw socket), by module name
# ('-' and '_' are the same). Those a kernel builds in are skipped; a name the kernel has neither
# built in nor as a module is left out (a kernel without virtio_console still mounts its root).
GUEST_MODULES = {
    "amd64": ("virtio_pci", "virtio_blk", "virtio_rng", "virtio_console", "ext4", "virtio_net",
              "af_packet"),
    "riscv64": ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_rng", "virtio_console", "ext4",
                "virtio_net", "af_packet"),
}
# vsock over virtio (pykvm run --vsock; /usr/bin/vsockecho in the root image speaks it), added to
# every arch's list above
VSOCK_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")
GUEST_MODULES = {arch: names + VSOCK_MODULES for arch, names in GUEST_MODULES.items()}
# the modules without which the root cannot be mounted (an error if the kernel lacks them)
REQUIRED_MODULES = ("virtio_blk", "ext4")

# Where, inside the kernel's package, the modules above and what they depend on live: one pass
# over the (large) package extracts these, and dependencies are resolved among them.
_MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/block/", "kernel/drivers/char/",
                "kernel/fs/ext4/", "kernel/fs/jbd2/", "kernel/fs/mbcache", "kernel/fs/fuse/",
                "kernel/lib/",
                "kernel/crypto/", "kernel/arch/", "kernel/drivers/net/virtio_net",
                "kernel/drivers/net/net_failover", "kernel/net/core/failover", "kernel/net/packet/",
                "kernel/net/vmw_vsock/", "kernel/fs/overlayfs/")
# virtio-fs (pykvm run --share; the root's init mounts the tags of pykvm.share=): the virtiofs
# module and fuse, which it needs, added to every arch's list above
FS_MODULES = ("fuse", "virtiofs")
GUEST_MODULES = {arch: names + FS_MODULES for arch, names in GUEST_MODULES.items()}
# pykvm sandbox's overlay (tests/*/test_linux_sandbox*.py take the modules from the boot
# initramfs: linux_guest.boot_modules)
GUEST_MODULES = {arch: names + ("overlay",) for arch, names in GUEST_MODULES.items()}

# /init of the boot initramfs (busybox sh)
BOOT_INIT = r"""#!/bin/sh
# pykvm boot initramfs /init, generated by pykvm/lab/rootfs.py: load the modules, mount the root, switch to it
export PATH=/bin
M="pykvm-linux-guest:"
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin 2>/dev/null
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
root=/dev/vda; fstype=ext4; mode=rw; init=/sbin/init
for a in $(cat /proc/cmdline); do
  case "$a" in
    root=*) root=${a#root=} ;;
    rootfstype=*) fstype=${a#rootfstype=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
    init=*) init=${a#init=} ;;
  esac
done
while read -r mod args; do
  [ -n "$mod" ] || continue
  insmod "/lib/modules/$mod" $args || echo "$M insmod $mod failed"
done < /lib/modules/modules.list
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b "$root" ]; then
  echo "$M root $root did not appear; block devices: $(ls /sys/block 2>/dev/null)"
  echo "$M PCI functions: $(cd /sys/bus/pci/devices 2>/dev/null && for f in *; do printf '%s=%s:%s ' $f $(cat $f/vendor $f/device); done)"
  dmesg | grep -iE 'pci|virtio|msi' | tail -30
  poweroff -f; sleep 5
fi
dev=${root#/dev/}
[ "$(cat /sys/block/$dev/ro 2>/dev/null)" = 1 ] && mode=ro
mkdir -p /newroot
if ! mount -t "$fstype" -o "$mode" "$root" /newroot; then
  echo "$M mounting $root ($fstype, $mode) failed"
  poweroff -f; sleep 5
fi
read up idle < /proc/uptime
echo "$M root $root mounted $mode ($fstype) at uptime ${up}s"
for d in dev proc sys; do mount --move /$d /newroot/$d; done
exec switch_root /newroot "$init"
"""

# /sbin/init of the root image (busybox sh)
ROOT_INIT = r"""#!/bin/sh
# pykvm root /sbin/init, generated by pykvm/lab/rootfs.py (busybox-static only)
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/run/bin HOME=/root TERM=${TERM:-vt100}
M="pykvm-linux-guest:"
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sys /sys
[ -e /dev/null ] || mount -t devtmpfs dev /dev
mount -t tmpfs run /run && mkdir -p /run/bin && busybox --install -s /run/bin
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null
hostname pykvm
read up idle < /proc/uptime
echo "$M root init: uptime ${up}s, $(uname -r) $(uname -m), root: $(grep ' / ' /proc/mounts | tail -1)"
token=; batch=0; probe=0; bench=; net=; ping=; wget=; netbench=; fsbench=; benchsecs=
for a in $(cat /proc/cmdline); do
  case "$a" in
    pykvm.token=*) token=${a#pykvm.token=} ;;
    pykvm.net=*) net=${a#pykvm.net=} ;;
    pykvm.ping=*) ping=${a#pykvm.ping=} ;;
    pykvm.wget=*) wget=${a#pykvm.wget=} ;;
    pykvm.batch) batch=1 ;;
    pykvm.share=*) shares="$shares ${a#pykvm.share=}" ;;
    pykvm.share-write=*) sharew=${a#pykvm.share-write=} ;;
    pykvm.write-probe) probe=1 ;;
    pykvm.blkbench=*) bench=${a#pykvm.blkbench=} ;;
    pykvm.netbench=*) netbench="$netbench ${a#pykvm.netbench=}" ;;
    pykvm.fsbench=*) fsbench=${a#pykvm.fsbench=} ;;
    pykvm.benchsecs=*) benchsecs=${a#pykvm.benchsecs=} ;;
  esac
done
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  echo "$M disk ${b##*/}: $(cat $b/size) sectors, ro=$(cat $b/ro), serial=$(cat $b/serial 2>/dev/null)"
done
if [ -f /pykvm-token ]; then echo "$M token on disk: $(cat /pykvm-token)"; else echo "$M token on disk: none"; fi
if [ -n "$token" ]; then
  if echo "$token" > /pykvm-token && sync; then echo "$M token written: $token"; else echo "$M token write failed"; fi
fi
if [ "$probe" = 1 ]; then
  if (echo probe > /pykvm-probe) 2>/run/probe.err; then
    rm -f /pykvm-probe; sync; echo "$M write probe: written"
  else
    echo "$M write probe: refused ($(cat /run/probe.err))"
  fi
fi
if [ -c /dev/hwrng ]; then
  rng=/sys/class/misc/hw_random
  echo "$M hwrng: current=$(cat $rng/rng_current 2>/dev/null) available=$(cat $rng/rng_available 2>/dev/null)"
  echo "$M hwrng bytes: $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
else
  echo "$M hwrng: none"
fi
if [ -n "$net" ]; then
  ip link set lo up
  if [ ! -d /sys/class/net/eth0 ]; then
    echo "$M net: no eth0 (interfaces: $(ls /sys/class/net | tr '\n' ' '))"
  else
    drv=$(readlink /sys/class/net/eth0/device/driver)
    echo "$M net eth0: mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu) driver=${drv##*/}"
    ip link set eth0 up
    case "$net" in
      dhcp)
        if udhcpc -i eth0 -n -q -f -t 5 -T 3 -s /usr/share/udhcpc/default.script >/run/udhcpc.log 2>&1
        then echo "$M net dhcp: lease $(cat /run/udhcpc.lease)"
        else echo "$M net dhcp failed: $(tail -3 /run/udhcpc.log | tr '\n' ' ')"; fi ;;
      *) ip addr add "$net" dev eth0 ;;
    esac
    echo "$M net eth0 address: $(ip -o -4 addr show dev eth0 | sed 's/.* inet \([^ ]*\).*/\1/'), default route: $(ip route | grep '^default' | head -1)"
  fi
  if [ -n "$ping" ]; then
    i=0; got=
    while [ $i -lt 30 ] && [ -z "$got" ]; do
      i=$((i + 1))
      got=$(ping -c 1 -W 2 "$ping" 2>/dev/null | grep 'bytes from')
    done
    if [ -n "$got" ]; then echo "$M ping $ping: answered after $i tries: $got"
    else echo "$M ping $ping: no answer after $i tries"; fi
  fi
  if [ -n "$wget" ]; then
    i=0; ok=0
    while [ $i -lt 5 ] && [ $ok = 0 ]; do
      i=$((i + 1))
      # busybox 1.35's static wget crashes with -T: timeout bounds it instead
      timeout 20 wget -q -O /run/wget.out "$wget" 2>/run/wget.err && ok=1 || sleep 1
    done
    if [ $ok = 1 ]; then echo "$M wget $wget: $(head -c 300 /run/wget.out | tr '\n' ' ')"
    else echo "$M wget $wget failed after $i tries: $(cat /run/wget.err | tr '\n' ' ')"; fi
  fi
fi
for tag in $shares; do
  # a virtio-fs share (pykvm run --share DIR,tag=TAG): mount it, read token.txt, try to write
  # from-guest.txt (the pykvm.share-write= word), read the symlinks escape and escape-abs and a
  # path up past the mount, list it
  mnt=/run/share-$tag
  mkdir -p $mnt
  if ! mount -t virtiofs "$tag" $mnt 2>/run/share.err; then
    echo "$M share $tag mount failed: $(cat /run/share.err) (filesystems: $(grep -c . /proc/filesystems), virtiofs: $(grep virtiofs /proc/filesystems))"
    continue
  fi
  echo "$M share $tag mounted: $(grep " $mnt " /proc/mounts)"
  echo "$M share $tag token: $(cat $mnt/token.txt 2>&1)"
  if (echo "${sharew:-none}" > $mnt/from-guest.txt) 2>/run/share.werr; then sync; echo "$M share $tag write: written"
  else echo "$M share $tag write: refused ($(cat /run/share.werr))"; fi
  for l in escape escape-abs; do echo "$M share $tag $l: $(cat $mnt/$l 2>&1 | head -c 200 | tr '\n' ' ')"; done
  echo "$M share $tag up: $(cat $mnt/../outside-secret.txt $mnt/../../outside-secret.txt 2>&1 | head -c 200 | tr '\n' ' ')"
  echo "$M share $tag listing: $(ls -a $mnt | tr '\n' ' ')"
  umount $mnt
done
if [ -n "$bench" ]; then
  dev=
  for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = pykvm-bench ] && dev=/dev/${b##*/}; done
  if [ -z "$dev" ]; then echo "$M blkbench: no disk with serial pykvm-bench"
  elif [ ! -x /usr/bin/blkbench ]; then echo "$M blkbench: not in this root image"
  else blkbench "$dev" "$bench" "$M" 2>&1 || echo "$M blkbench failed"; fi
fi
for nb in $netbench; do
  # pykvm.netbench=LABEL,MAC,ADDR,HOST,PORT (pykvm/lab/netbench.py): the interface with MAC takes
  # ADDR (dhcp, or address/prefix), then netbench runs its TCP phases against HOST:PORT
  set -- $(echo "$nb" | tr , ' ')
  ifc=
  for i in /sys/class/net/*; do [ "$(cat $i/address 2>/dev/null)" = "$2" ] && ifc=${i##*/}; done
  if [ -z "$ifc" ]; then echo "$M netbench $1: no interface with MAC $2"; continue; fi
  ip link set lo up; ip link set "$ifc" up
  if [ "$3" = dhcp ]; then
    udhcpc -i "$ifc" -n -q -f -t 5 -T 3 -s /usr/share/udhcpc/default.script >/run/udhcpc.log 2>&1 ||
      echo "$M netbench $1: dhcp failed: $(tail -3 /run/udhcpc.log | tr '\n' ' ')"
  else
    ip addr add "$3" dev "$ifc"
  fi
  netbench tcp "$4" "$5" "${benchsecs:-1}" "$M" "$1" 2>&1 || echo "$M netbench $1 failed"
done
if [ -n "$fsbench" ]; then
  # pykvm.fsbench=TAG (pykvm/lab/netbench.py): read big.bin and the files of small/ in the share,
  # each after dropping the guest's caches
  mkdir -p /run/fsbench
  if mount -t virtiofs "$fsbench" /run/fsbench 2>/run/fsbench.err; then
    sync; echo 3 > /proc/sys/vm/drop_caches
    netbench read /run/fsbench/big.bin "${benchsecs:-1}" "$M" fs 2>&1 || echo "$M netbench fs read failed"
    echo 3 > /proc/sys/vm/drop_caches
    netbench files /run/fsbench/small "$M" fs 2>&1 || echo "$M netbench fs files failed"
    umount /run/fsbench
  else
    echo "$M fsbench $fsbench: mount failed: $(cat /run/fsbench.err)"
  fi
fi
if [ "$batch" != 1 ]; then
  echo "$M shell (exit or Ctrl-D powers off)"
  setsid cttyhack sh -l
fi
echo "$M powering off"
sync
grep -q ' / [^ ]* rw' /proc/mounts && mount -o remount,ro / 2>/dev/null
stty -F /dev/console -echo 2>/dev/null      # let the console drain before the power goes
poweroff -f
sleep 5
"""

# udhcpc's script (busybox udhcpc runs it with deconfig, bound, renew, ...; the lease's fields in
# its environment: ip, mask (prefix length), router, dns)
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    set -- $router
    [ -n "$1" ] && ip route add default via "$1" dev "$interface"
    echo "ip=$ip/${mask:-24} router=$1 dns=$(echo $dns)" > /run/udhcpc.lease ;;
esac
exit 0
"""

PROFILE = """export PS1='pykvm:$PWD# '
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/run/bin
"""

# applets linked in the image's /bin (the root's /sbin/init links the rest into /run/bin, which
# works on a read-only root too)
BLKBENCH_SOURCE = Path(__file__).with_name("blkbench.c")
# the network and share benchmark's guest program (pykvm/lab/netbench.py)
NETBENCH_SOURCE = Path(__file__).with_name("netbench.c")

_ROOT_LINKS = ("sh", "mount", "hostname", "mkdir", "cat", "grep", "tail", "uname", "sync", "poweroff",
               "setsid", "cttyhack", "stty", "sleep", "head", "od", "tr", "rm", "ls", "echo", "dmesg")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _archive(archive, cache):
    from .debian import Archive
    if archive is not None:
        return archive
    return Archive(Path(cache or os.environ.get("PYKVM_LAB_CACHE", "~/.cache/pykvm/lab")).expanduser())


def _busybox(archive, suite: str, arch: str) -> tuple[bytes, str, str]:
    """(busybox-static binary, its .deb's sha256, "name version (suite/arch)")."""
    from .debian import LabError, extract_deb
    pkg = archive.index(suite, arch).get("busybox-static")
    deb = archive.fetch(pkg, "root disk busybox")
    with tempfile.TemporaryDirectory(dir=archive.cache) as td:
        got = extract_deb(deb, Path(td), lambda r: r in ("usr/bin/busybox", "bin/busybox"))
        bb = Path(td) / got[0] if got else None
        if bb is None or not bb.is_file():
            raise LabError(f"{pkg.name}: no busybox binary inside")
        return bb.read_bytes(), pkg.sha256, f"{pkg.name} {pkg.version} ({suite}/{arch})"


def mke2fs_path() -> str:
    """The host's ``mke2fs``; :class:`LabError` when there is none (Debian: e2fsprogs)."""
    from .debian import LabError
    m = shutil.which("mke2fs") or next((p for p in ("/usr/sbin/mke2fs", "/sbin/mke2fs")
                                        if os.access(p, os.X_OK)), None)
    if not m:
        raise LabError("mke2fs not found (install e2fsprogs): it builds the root disk")
    return m


def _mke2fs_version(mke2fs: str) -> str:
    r = subprocess.run([mke2fs, "-V"], capture_output=True, text=True)
    return (r.stderr or r.stdout).splitlines()[0].strip() if (r.stderr or r.stdout) else "?"


def _copy_out(cached: Path, out_dir, name: str) -> Path:
    if out_dir is None:
        return cached
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        shutil.copyfile(cached, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# -- the disk benchmark's guest program (pykvm/lab/blkbench.py runs it) ------------------------
def blkbench_compiler(arch: str) -> str | None:
    """The C compiler that builds static programs for ``arch`` (``x86_64``/``amd64`` or
    ``riscv64``) on this host, or None."""
    native = {"x86_64": "x86_64", "amd64": "x86_64", "riscv64": "riscv64"}.get(arch)
    if native is None:
        return None
    if os.uname().machine == native:
        return shutil.which("gcc") or shutil.which("cc")
    return shutil.which(f"{native}-linux-gnu-gcc")


def build_blkbench(arch: str, source: Path = BLKBENCH_SOURCE) -> bytes | None:
    """``source`` (default ``pykvm/lab/blkbench.c``; also ``netbench.c``) built static for
    ``arch``; None where this host has no compiler for it. Raises RuntimeError with the
    compiler's last line when the build fails."""
    cc = blkbench_compiler(arch)
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / source.stem
        r = subprocess.run([cc, "-O2", "-static", "-Wall", "-o", str(out), str(source)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip().splitlines()
            raise RuntimeError(f"{cc} {source.name} failed: {msg[-1] if msg else r.returncode}")
        return out.read_bytes()


# the vsock echo program of the vsock tests (tests/*/test_linux_vsock_control*.py)
VSOCKECHO_SOURCE = Path(__file__).with_name("vsockecho.c")
# the guest programs of the root image, each /usr/bin/<its stem>
GUEST_PROGRAMS = (BLKBENCH_SOURCE, NETBENCH_SOURCE, VSOCKECHO_SOURCE)


def blkbench_source() -> str:
    """What the built program depends on (its source), for cache keys."""
    return BLKBENCH_SOURCE.read_text()


def build_root_image(arch: str, out_dir=None, *, size_mib: int = DEFAULT_SIZE_MIB, archive=None,
                     suite: str = DEFAULT_SUITE, cache=None, info: dict | None = None) -> Path:
    """The root disk: a raw ext4 image of ``size_mib`` MiB (8 to 65536) with busybox-static of
    ``suite``/``arch`` (``x86_64``/``amd64`` or ``riscv64``) and :data:`ROOT_INIT` as /sbin/init.

    Built once per content (busybox's .deb, the init script, size, mke2fs version) under
    ``<cache>/rootfs/``; with ``out_dir`` copied to ``<out_dir>/root.img`` (a fresh, writable copy
    a guest may change) and that path returned, else the cached image itself (do not write to
    it: boot a copy). ``archive`` is a :class:`pykvm.lab.debian.Archive` (default: one on
    ``cache``). ``info``, when given, is filled with what was used. Raises LabError."""
    from .debian import LabError, merged_usr_links
    darch = DEBIAN_ARCH.get(arch)
    if darch is None:
        raise LabError(f"no root disk for arch {arch!r} (x86_64, amd64, riscv64)")
    if not 8 <= int(size_mib) <= 65536:
        raise LabError(f"root disk size {size_mib} MiB out of range (8..65536)")
    archive = _archive(archive, cache)
    mke2fs = mke2fs_path()
    mver = _mke2fs_version(mke2fs)
    bb, bb_sha, bb_desc = _busybox(archive, suite, darch)
    bench_cc = blkbench_compiler(darch)
    key = _key({"format": FORMAT, "busybox": bb_sha, "init": ROOT_INIT, "profile": PROFILE,
                "udhcpc": UDHCPC_SCRIPT,
                "links": _ROOT_LINKS, "features": EXT4_FEATURES, "size": int(size_mib), "mke2fs": mver,
                "blkbench": bench_cc and blkbench_source(),
                "netbench": bench_cc and NETBENCH_SOURCE.read_text(),
                "vsockecho": bench_cc and VSOCKECHO_SOURCE.read_text()})
    cached = archive.cache / "rootfs" / f"root-{darch}-{key}.img"
    if info is not None:
        info.update(root_busybox=bb_desc, root_image_key=key, root_size_mib=int(size_mib), mke2fs=mver,
                    root_blkbench=f"built with {bench_cc}" if bench_cc else "left out (no C compiler for this arch)")
    if not cached.exists():
        with archive.lock(f"rootfs-{cached.name}", f"building {cached.name}"):
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f"root-{os.getpid()}-") as td:
                    root = Path(td) / "root"
                    merged_usr_links(root)
                    for d in ("dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc", "newroot"):
                        (root / d).mkdir(exist_ok=True)
                    (root / "tmp").chmod(0o1777)
                    bbp = root / "usr/bin/busybox"
                    bbp.write_bytes(bb)
                    bbp.chmod(0o755)
                    for a in _ROOT_LINKS:
                        (root / "usr/bin" / a).symlink_to("busybox")
                    for source in GUEST_PROGRAMS:      # /usr/bin/<name>, built static
                        try:
                            prog = build_blkbench(darch, source)
                        except RuntimeError as e:
                            raise LabError(f"root disk: {e}") from None
                        if prog is not None:
                            (root / "usr/bin" / source.stem).write_bytes(prog)
                            (root / "usr/bin" / source.stem).chmod(0o755)
                    init = root / "usr/sbin/init"
                    init.write_text(ROOT_INIT)
                    init.chmod(0o755)
                    (root / "etc/profile").write_text(PROFILE)
                    script = root / "usr/share/udhcpc/default.script"
                    script.parent.mkdir(parents=True)
                    script.write_text(UDHCPC_SCRIPT)
                    script.chmod(0o755)
                    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
                    (root / "etc/group").write_text("root:x:0:\n")
                    (root / "etc/hostname").write_text("pykvm\n")
                    for p in [root, *root.rglob("*")]:
                        os.utime(p, (0, 0), follow_symlinks=False)
                    tmp = Path(td) / "root.img"
                    # a stable UUID and hash seed from the content key: the same inputs give the
                    # same image
                    uuid = "-".join((key[:8], key[8:12], "4" + key[13:16], "8" + key[17:20], key[:12]))
                    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1", MKE2FS_CONFIG="/dev/null")
                    # no mke2fs.conf (MKE2FS_CONFIG=/dev/null): the ext4 features are named here,
                    # the same with every e2fsprogs and understood by kernels since 3.x
                    argv = [mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-L", "pykvm-root",
                            "-U", uuid, "-E", f"root_owner=0:0,hash_seed={uuid}", "-O", EXT4_FEATURES,
                            "-d", str(root), str(tmp), f"{int(size_mib)}M"]
                    r = subprocess.run(argv, capture_output=True, text=True, env=env)
                    if r.returncode != 0:
                        msg = (r.stderr or r.stdout).strip().splitlines()
                        raise LabError(f"mke2fs failed ({r.returncode}): {msg[-1] if msg else ''}")
                    os.replace(tmp, cached)
    return _copy_out(cached, out_dir, "root.img")


# --------------------------------------------------------------------------------------------------
# the kernel's modules


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _decompress(path: Path) -> bytes:
    from .debian import LabError
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        r = subprocess.run(["zstd", "-dc", str(path)], capture_output=True)
        if r.returncode != 0:
            raise LabError(f"zstd -dc {path.name} failed (is zstd installed?)")
        return r.stdout
    return data


def kernel_modules(modules_deb: Path, names, dest: Path, *, archive=None, cache=None,
                   required=REQUIRED_MODULES) -> list[str]:
    """Decompress the modules ``names`` (module names; '-' = '_') and their dependencies from
    ``modules_deb`` (the Debian package holding the kernel's ``/usr/lib/modules/<release>/``:
    ``linux-image-*`` on amd64, ``linux-modules-*`` on riscv64) into ``dest``, as ``<name>.ko``.

    Returns their file names in load order (dependencies first). A name the kernel builds in
    (its ``modules.builtin``) is skipped, as is a name it lacks altogether — unless it is in
    ``required``: then :class:`LabError`. The package's relevant part is unpacked once per .deb
    into ``<cache>/unpacked/``."""
    from .debian import LabError, extract_deb, sha256_file
    archive = _archive(archive, cache)
    modules_deb = Path(modules_deb)
    digest = sha256_file(modules_deb)
    # the directories taken are part of the name: a new one in _MODULE_DIRS unpacks afresh
    kdir = archive.cache / "unpacked" / f"guest-modules-{digest[:16]}-{_key(_MODULE_DIRS)[:8]}"
    stamp = kdir / ".done"
    if not stamp.exists():
        with archive.lock(f"unpacked-{kdir.name}", f"unpacking modules of {modules_deb.name}"):
            if not stamp.exists():
                def want(r: str) -> bool:
                    if not r.startswith("usr/lib/modules/"):
                        return False
                    rest = r.split("/", 4)[4] if r.count("/") >= 4 else ""
                    return (rest in ("modules.builtin", "modules.order")
                            or (".ko" in rest and rest.startswith(_MODULE_DIRS)))
                got = extract_deb(modules_deb, kdir, want, label=f"modules of {modules_deb.name}")
                stamp.write_text(json.dumps(got))
    got = json.loads(stamp.read_text())
    files = {_module_name(g): kdir / g for g in got if ".ko" in Path(g).name}
    builtin: set[str] = set()
    for g in got:
        if g.endswith("/modules.builtin"):
            builtin |= {_module_name(x) for x in (kdir / g).read_text().split()}
    if not builtin and not files:
        raise LabError(f"{modules_deb.name}: no kernel modules inside")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        path = files.get(name)
        if path is None:
            if chain:
                raise LabError(f"{modules_deb.name}: module {name} (needed by {chain[-1]}) not found")
            if name in required:
                raise LabError(f"{modules_deb.name}: the kernel has no {name} (neither built in nor a module)")
            return
        seen.add(name)
        data = _decompress(path)
        for dep in modinfo_depends(data):
            visit(dep, chain + (name,))
        (dest / f"{name}.ko").write_bytes(data)
        order.append(f"{name}.ko")

    for n in names:
        visit(n, ())
    return order


def build_boot_initramfs(arch: str, out=None, *, modules_deb=None, modules=None, archive=None,
                         suite: str = DEFAULT_SUITE, cache=None, info: dict | None = None) -> Path:
    """The boot initramfs (gzip'd newc): busybox-static of ``suite``/``arch``, the kernel modules
    the root needs (:func:`kernel_modules` of ``modules_deb``, names ``modules``, default
    :data:`GUEST_MODULES`; none without ``modules_deb``, for a kernel with everything built in)
    and :data:`BOOT_INIT` as /init. Cached under ``<cache>/rootfs/``; copied to the file ``out``
    when given. ``info`` is filled with what was used. Raises LabError."""
    from .debian import LabError, sha256_file
    darch = DEBIAN_ARCH.get(arch)
    if darch is None:
        raise LabError(f"no boot initramfs for arch {arch!r} (x86_64, amd64, riscv64)")
    archive = _archive(archive, cache)
    names = tuple(modules if modules is not None else GUEST_MODULES[darch])
    bb, bb_sha, bb_desc = _busybox(archive, suite, darch)
    mod_sha = sha256_file(Path(modules_deb)) if modules_deb else None
    key = _key({"format": FORMAT, "busybox": bb_sha, "init": BOOT_INIT, "modules_deb": mod_sha,
                "modules": names if modules_deb else ()})
    cached = archive.cache / "rootfs" / f"boot-initramfs-{darch}-{key}.cpio.gz"
    if not cached.exists():
        with archive.lock(f"rootfs-{cached.name}", f"building {cached.name}"):
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=cached.parent, prefix=f"boot-{os.getpid()}-") as td:
                    moddir = Path(td) / "modules"
                    order = kernel_modules(Path(modules_deb), names, moddir, archive=archive) if modules_deb else []
                    tmp = Path(td) / "initramfs.cpio.gz"
                    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                        w = ird.CpioWriter(gz)
                        for d in ("bin", "dev", "proc", "sys", "tmp", "newroot", "lib", "lib/modules"):
                            w.dir(d, 0o1777 if d == "tmp" else 0o755)
                        w.file("bin/busybox", bb, 0o755)
                        w.symlink("bin/sh", "busybox")
                        for name in order:
                            w.file(f"lib/modules/{name}", (moddir / name).read_bytes(), 0o644)
                        w.file("lib/modules/modules.list", "".join(f"{n}\n" for n in order).encode(), 0o644)
                        w.chardev("dev/console", 5, 1)
                        w.chardev("dev/null", 1, 3, 0o666)
                        w.file("init", BOOT_INIT.encode(), 0o755)
                        w.close()
                    (cached.parent / f"{cached.name}.json").write_text(json.dumps(order))
                    os.replace(tmp, cached)
    if info is not None:
        side = cached.parent / f"{cached.name}.json"
        order = json.loads(side.read_text()) if side.exists() else []
        info.update(boot_busybox=bb_desc, boot_initramfs_key=key, boot_modules=order)
        if not order and modules_deb and any(n in REQUIRED_MODULES for n in names):
            info["boot_modules_note"] = "all needed drivers built into the kernel"
    if out is not None:
        return _copy_out(cached, Path(out).parent, Path(out).name)
    if not cached.exists():
        raise LabError(f"{cached}: not built")
    return cached
