"""The virtio devices a machine is asked for in plain terms — disks by path, a random number
generator, a virtio console, network interfaces by backend — made into device models (:mod:`pykvm.devices.virtio`). The
machines that have virtio transports (pc: PCI; RISC-V virt: MMIO) build them through
:func:`build`; the models then go to the transport as the platform option ``virtio``.
"""
from __future__ import annotations

import os

from ..devices.virtio.blk import DiskError, VirtioBlk, disk_from_spec
from ..devices.virtio.console import VirtioConsole
from ..devices.virtio.fs import FsError, ShareSpec, VirtioFs, share_from_spec
from ..devices.virtio.net import NetError, VirtioNet, net_from_spec
from ..devices.virtio.rng import VirtioRng
from ..devices.virtio.vsock import VirtioVsock, VsockError, VsockSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, List, Optional, Sequence, Tuple

    from ..devices.virtio import VirtioDevice


def build(disks: Sequence, rng: bool, console: str,
          console_out: Callable[[bytes], None],
          nets: Sequence = (),
          vsock=None, shares: Sequence = ()) -> Tuple[List[VirtioDevice], Optional[VirtioConsole]]:
    """(models, the virtio console or None) for ``disks`` (each a
    :class:`~pykvm.devices.virtio.blk.VirtioBlk` or its description ``FILE[,ro][,serial=NAME]``),
    ``rng``, ``console`` ("serial": none; "virtio": a console whose output goes to
    ``console_out``) and ``nets`` (each a :class:`~pykvm.devices.virtio.net.VirtioNet` or its
    description ``user|tap[,ifname=NAME][,mac=MAC][,mtu=N][,link=up|down]``) and ``vsock``
    (None, a :class:`~pykvm.devices.virtio.vsock.VirtioVsock`, a
    :class:`~pykvm.devices.virtio.vsock.VsockSpec` or its description ``cid=N,uds=PATH``) and
    ``shares`` (each a :class:`~pykvm.devices.virtio.fs.VirtioFs`, a
    :class:`~pykvm.devices.virtio.fs.ShareSpec` or its description ``DIR[,tag=TAG][,ro]``:
    virtio-fs served by virtiofsd, which needs the VM's RAM shared), in that order.
    What this call opened is closed again if a later one fails (a model the caller gave stays
    open). Raises ValueError (:class:`~pykvm.devices.virtio.blk.DiskError` for a disk,
    :class:`~pykvm.devices.virtio.net.NetError` for a network,
    :class:`~pykvm.devices.virtio.vsock.VsockError` for the vsock,
    :class:`~pykvm.devices.virtio.fs.FsError` for a share)."""
    out: List[VirtioDevice] = []
    given: List[VirtioDevice] = []          # the caller's own models: not closed here on failure
    vcon: Optional[VirtioConsole] = None
    try:
        for d in disks:
            if isinstance(d, VirtioBlk):
                if d.closed:
                    raise DiskError(f"{d.path}: this VirtioBlk was closed (make a new one)")
                if any(d is o for o in out):
                    raise DiskError(f"{d.path}: the same VirtioBlk is given twice (one model "
                                    "serves one transport)")
                out.append(d)
                given.append(d)
            elif isinstance(d, str):
                out.append(disk_from_spec(d))
            elif isinstance(d, os.PathLike):
                out.append(VirtioBlk(os.fspath(d)))
            else:
                raise ValueError(f"a disk is a path 'FILE[,ro][,serial=NAME]' or a VirtioBlk, "
                                 f"not {d!r}")
        if rng:
            out.append(VirtioRng())
        if console == "virtio":
            vcon = VirtioConsole(console_out)
            out.append(vcon)
        for n in nets:
            if isinstance(n, VirtioNet):
                if n.closed or any(n is o for o in out):
                    raise NetError(f"{n!r}: closed, or given twice (one model serves one "
                                   "transport)")
                out.append(n)
                given.append(n)
            elif isinstance(n, str):
                out.append(net_from_spec(n))
            else:
                raise NetError(f"a network is 'user|tap[,ifname=NAME][,mac=MAC][,mtu=N]"
                               f"[,link=up|down]' or a VirtioNet, not {n!r}")
        if isinstance(vsock, VirtioVsock):
            if vsock.closed:
                raise VsockError(f"{vsock!r}: this VirtioVsock was closed (make a new one)")
            out.append(vsock)
            given.append(vsock)
        elif isinstance(vsock, (str, VsockSpec)):
            spec = VsockSpec.parse(vsock) if isinstance(vsock, str) else vsock
            out.append(VirtioVsock(spec.cid, spec.uds))
        elif vsock is not None:
            raise VsockError(f"a vsock is 'cid=N,uds=PATH', a VsockSpec or a VirtioVsock, not "
                             f"{vsock!r}")
        specs = []
        for sh in shares:                       # parse every spec before any virtiofsd starts
            if isinstance(sh, VirtioFs):
                if sh.closed or any(sh is o for o in out):
                    raise FsError(f"{sh!r}: closed, or given twice (one model serves one "
                                  "transport)")
            elif isinstance(sh, str):
                sh = ShareSpec.parse(sh)
            elif not isinstance(sh, ShareSpec):
                raise FsError(f"a share is 'DIR[,tag=TAG][,ro]', a ShareSpec or a VirtioFs, not "
                              f"{sh!r}")
            specs.append(sh)
        tags = [s.tag for s in specs]
        if len(set(tags)) != len(tags):
            raise FsError(f"two shares have the same tag (tags: {', '.join(tags)})")
        for sh in specs:
            if isinstance(sh, VirtioFs):
                out.append(sh)
                given.append(sh)
            else:
                out.append(share_from_spec(sh))
    except BaseException:
        for dev in out:
            if not any(dev is g for g in given):
                dev.close()
        raise
    return out, vcon
