"""How QEMU's memory core cuts one guest port access into the accesses its device models see
(``flatview_read_continue``/``flatview_write_continue`` and ``memory_access_size`` in QEMU's
``system/physmem.c``), so that pykvm's port devices answer every width and alignment as QEMU's
do.

An access of ``size`` bytes at ``port`` goes, piece by piece, to the region holding the piece's
first port. A piece is as long as what is left, but no longer than the region's largest valid
access nor than the alignment of its offset inside the region (``offset & -offset``), rounded
down to a power of two; it is *not* cut at the region's end (I/O regions are not RAM). Ports no
region claims behave as QEMU's unassigned I/O: reads give all-ones, writes are dropped.
"""
from typing import Iterator, Optional, Sequence, Tuple

# (first port, length in ports, largest valid access in bytes)
Region = Tuple[int, int, int]


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def pieces(port: int, size: int, regions: Sequence[Region]) \
        -> Iterator[Tuple[Optional[int], int, int, int]]:
    """Yield ``(region index or None, offset in the region, piece size, byte position in the
    access)`` for an access of ``size`` bytes (1, 2 or 4) at I/O ``port``. ``None`` is a piece at
    ports no region claims (its offset is then the port itself). At most ``size`` pieces."""
    done = 0
    while done < size:
        p = port + done
        left = size - done
        for i, (base, length, max_size) in enumerate(regions):
            if base <= p < base + length:
                off = p - base
                cap = max_size
                break
        else:
            i, off, cap = None, p, 4
        if off:
            cap = min(cap, off & -off)
        n = _pow2floor(min(left, cap))
        yield i, off, n, done
        done += n
