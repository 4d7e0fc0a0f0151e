"""The architecture-neutral container of captured KVM state: :class:`ArchState`, named
``bytes`` blobs in the order they must be loaded back, plus the pieces this host could not
capture and why.

The arch modules :mod:`pykvm.arch.x86.snapshot` and :mod:`pykvm.arch.riscv.snapshot` fill and
consume it (``vcpu.save_state()`` / ``vcpu.load_state(state)``, the same on the VM);
:mod:`pykvm.snapfile` writes it to a snapshot file; ``Machine.reset()`` keeps one in memory.
Each blob is the raw bytes of the uAPI structure the ioctl exchanges (the module that made it
documents the layout), so two states compare equal exactly when KVM reported the same state.
"""
from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, Mapping, Optional, Tuple


class ArchState:
    """Named state blobs of one vCPU or one VM, in load order.

    ``blobs``: ``{name: bytes}`` (insertion order = the order :func:`load` applies them);
    ``absent``: ``{name: reason}`` for the pieces this host does not have (e.g. ``"nested"``
    where KVM_CAP_NESTED_STATE is 0), recorded so that a reader sees they were not forgotten.
    Compare two states with ``==`` (blobs and absences)."""

    __slots__ = ("blobs", "absent")

    def __init__(self, blobs: Optional[Mapping[str, bytes]] = None,
                 absent: Optional[Mapping[str, str]] = None):
        self.blobs: Dict[str, bytes] = {k: bytes(v) for k, v in (blobs or {}).items()}
        self.absent: Dict[str, str] = dict(absent or {})

    def __getitem__(self, name: str) -> bytes:
        return self.blobs[name]

    def __contains__(self, name: object) -> bool:
        return name in self.blobs

    def __iter__(self) -> Iterator[str]:
        return iter(self.blobs)

    def items(self) -> Iterator[Tuple[str, bytes]]:
        """(name, bytes) pairs in load order."""
        return iter(self.blobs.items())

    def get(self, name: str, default: Optional[bytes] = None) -> Optional[bytes]:
        """The blob ``name``, or ``default`` where it was not captured."""
        return self.blobs.get(name, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArchState):
            return NotImplemented
        return self.blobs == other.blobs and self.absent == other.absent

    def __hash__(self) -> int:                 # mutable: not hashable, as dict
        raise TypeError("ArchState is not hashable")

    def differences(self, other: ArchState) -> Dict[str, str]:
        """``{name: one line}`` for each blob that differs from ``other``'s (missing on one
        side, other size, or the first differing byte offset); empty when equal."""
        out: Dict[str, str] = {}
        for name in list(self.blobs) + [n for n in other.blobs if n not in self.blobs]:
            a, b = self.blobs.get(name), other.blobs.get(name)
            if a == b:
                continue
            if a is None or b is None:
                out[name] = "missing on the " + ("left" if a is None else "right")
            elif len(a) != len(b):
                out[name] = f"{len(a)} bytes against {len(b)}"
            else:
                first = next(i for i in range(len(a)) if a[i] != b[i])
                out[name] = f"differs from byte {first:#x} ({a[first]:#04x} != {b[first]:#04x})"
        return out

    def size(self) -> int:
        """Bytes held in blobs."""
        return sum(len(v) for v in self.blobs.values())

    def __repr__(self) -> str:
        parts = [f"{k}:{len(v)}" for k, v in self.blobs.items()]
        parts += [f"{k}:absent" for k in self.absent]
        return f"<ArchState {' '.join(parts)}>"
