"""The device models' snapshot protocol: ``snapshot_state() -> dict`` and
``restore_state(dict, *, mono_delta=0)``.

A model that mixes in :class:`DeviceState` lists its guest-visible fields in
``SNAPSHOT_FIELDS``; :meth:`DeviceState.snapshot_state` returns them as a JSON-able dict
(:func:`encode`: ``bytes``, ``bytearray``, ``deque``, tuples and dicts with int keys are
tagged, so :func:`decode` gives back the same types) and :meth:`DeviceState.restore_state`
sets them back. Fields that hold a ``time.monotonic_ns()`` instant are listed in
``SNAPSHOT_MONO`` and fields added to monotonic time (an offset to wall time) in
``SNAPSHOT_OFFSET``: a restore in another process passes ``mono_delta`` (its monotonic clock
minus the one the snapshot was taken at), which moves the instants forward and the offsets
back, so the guest sees its clocks where they stood when the snapshot was taken (paused, as
KVM's kvm-clock is by KVM_SET_CLOCK).

A model that cannot be snapshotted (it talks to a host process or device: virtio-net with
passt, virtio-fs with virtiofsd, vsock) does not mix this in; a machine's snapshot refuses it,
naming it.
"""
from __future__ import annotations

import base64
from collections import deque

from ..errors import SnapshotError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, Dict, Tuple


def encode(v: Any) -> Any:
    """``v`` as JSON-able data (module docstring). Raises
    :class:`~pykvm.errors.SnapshotError` for a value of another type."""
    if v is None or isinstance(v, (bool, int, str, float)):
        return v
    if isinstance(v, bytearray):
        return {"$bytearray": base64.b64encode(v).decode()}
    if isinstance(v, (bytes, memoryview)):
        return {"$bytes": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, deque):
        return {"$deque": [encode(x) for x in v]}
    if isinstance(v, tuple):
        return {"$tuple": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, set):
        return {"$set": [encode(x) for x in sorted(v)]}
    if isinstance(v, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            return {k: encode(x) for k, x in v.items()}
        return {"$dict": [[encode(k), encode(x)] for k, x in v.items()]}
    raise SnapshotError(f"a device field of type {type(v).__name__} cannot be snapshotted")


def decode(v: Any) -> Any:
    """The value :func:`encode` made ``v`` from. Raises :class:`~pykvm.errors.SnapshotError`
    for malformed data."""
    try:
        if isinstance(v, list):
            return [decode(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            (tag, x), = v.items()
            if tag == "$bytearray":
                return bytearray(base64.b64decode(x, validate=True))
            if tag == "$bytes":
                return base64.b64decode(x, validate=True)
            if tag == "$deque":
                return deque(decode(i) for i in x)
            if tag == "$tuple":
                return tuple(decode(i) for i in x)
            if tag == "$set":
                return {decode(i) for i in x}
            if tag == "$dict":
                return {decode(k): decode(i) for k, i in x}
        return {k: decode(x) for k, x in v.items()}
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"malformed device state: {e}") from None


class DeviceState:
    """The snapshot protocol for a device model (module docstring)."""

    SNAPSHOT_FIELDS: ClassVar[Tuple[str, ...]] = ()
    SNAPSHOT_MONO: ClassVar[Tuple[str, ...]] = ()
    SNAPSHOT_OFFSET: ClassVar[Tuple[str, ...]] = ()
    # {field: (lowest, highest)} for the integer fields a restore range-checks against the
    # register or index they model; {field: most items} for the queues. Every other int is
    # bounded to 64 bits, every bytes field to its current length, every dict to its keys.
    SNAPSHOT_RANGES: ClassVar[Dict[str, Tuple[int, int]]] = {}
    SNAPSHOT_LENGTHS: ClassVar[Dict[str, int]] = {}

    def snapshot_state(self) -> Dict[str, Any]:
        """The model's guest-visible state as a JSON-able dict (taken under its lock)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                return self._snapshot_fields()
        return self._snapshot_fields()

    def _snapshot_fields(self) -> Dict[str, Any]:
        return {name: encode(getattr(self, name)) for name in self.SNAPSHOT_FIELDS}

    def restore_state(self, state: Dict[str, Any], *, mono_delta: int = 0) -> None:
        """Set the fields of :meth:`snapshot_state`'s ``state`` back; ``mono_delta`` (ns):
        this process's monotonic clock minus the snapshot's. Raises
        :class:`~pykvm.errors.SnapshotError` for a missing, unknown or mistyped field (checked
        before anything is set)."""
        values = self._check_state(state)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:
                self._apply(values, mono_delta)
        else:
            self._apply(values, mono_delta)

    def _check_state(self, state: Dict[str, Any]) -> Dict[str, Any]:
        name = type(self).__name__
        if not isinstance(state, dict):
            raise SnapshotError(f"{name} state is not a mapping")
        missing = [f for f in self.SNAPSHOT_FIELDS if f not in state]
        extra = [f for f in state if f not in self.SNAPSHOT_FIELDS]
        if missing or extra:
            raise SnapshotError(f"{name} state: missing {missing or 'nothing'}, unknown "
                                f"{extra or 'nothing'}")
        try:
            values = {k: decode(v) for k, v in state.items()}
        except RecursionError:
            raise SnapshotError(f"{name} state is nested too deeply") from None
        for k, v in values.items():
            cur = getattr(self, k)
            if cur is not None and v is not None and not _same_kind(cur, v):
                raise SnapshotError(f"{name}.{k} is a {type(v).__name__} in the snapshot, "
                                    f"a {type(cur).__name__} here")
            self._check_value(name, k, cur, v)
        return values

    def _check_value(self, name: str, k: str, cur: Any, v: Any) -> None:
        """Refuse (SnapshotError) a value out of the field's range (class docstring)."""
        rng = self.SNAPSHOT_RANGES.get(k)
        if rng is not None and v is not None and (
                not isinstance(v, int) or not rng[0] <= v <= rng[1]):
            raise SnapshotError(f"{name}.{k} is {_shown(v)}, not {rng[0]}-{rng[1]}")
        if isinstance(cur, (bytes, bytearray)) and isinstance(v, (bytes, bytearray)) and \
                len(v) != len(cur):
            raise SnapshotError(f"{name}.{k} is {len(v)} bytes, not {len(cur)}")
        if isinstance(v, (deque, list, tuple, set)):
            most = self.SNAPSHOT_LENGTHS.get(k, 4096)
            if len(v) > most:
                raise SnapshotError(f"{name}.{k} holds {len(v)} items, more than {most}")
            if any(not _bounded(x) for x in v):
                raise SnapshotError(f"{name}.{k} holds a malformed item")
        elif isinstance(v, dict):
            if isinstance(cur, dict) and cur and set(v) != set(cur):
                raise SnapshotError(f"{name}.{k} has keys {_shown(sorted(map(str, v)))}, not "
                                    f"{_shown(sorted(map(str, cur)))}")
            if any(not _bounded(x) for x in v.values()):
                raise SnapshotError(f"{name}.{k} holds a malformed value")
        elif not _bounded(v):
            raise SnapshotError(f"{name}.{k} is out of range")

    def _apply(self, values: Dict[str, Any], mono_delta: int) -> None:
        for k, v in values.items():
            if k in self.SNAPSHOT_MONO and isinstance(v, int):
                v += mono_delta
            elif k in self.SNAPSHOT_OFFSET and isinstance(v, int):
                v -= mono_delta
            cur = getattr(self, k)
            if isinstance(cur, bytearray) and isinstance(v, (bytes, bytearray)):
                if len(v) != len(cur):
                    raise SnapshotError(f"{type(self).__name__}.{k} is {len(v)} bytes, not "
                                        f"{len(cur)}")
                cur[:] = v                   # others may hold this buffer: keep it
            else:
                setattr(self, k, v)


def _bounded(v: Any) -> bool:
    """A scalar a device field may hold: None, a bool, an int of at most 64 bits (signed or
    not), a float, a string or bytes of at most 64 KiB."""
    if v is None or isinstance(v, (bool, float)):
        return True
    if isinstance(v, int):
        return -(1 << 63) <= v < 1 << 64
    if isinstance(v, (str, bytes, bytearray)):
        return len(v) <= 1 << 16
    return isinstance(v, (dict, list, tuple, deque, set)) and len(v) <= 4096 and all(
        _bounded(x) for x in (v.values() if isinstance(v, dict) else v))


def _shown(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:60] + "..."


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) == isinstance(b, bool) or {type(a), type(b)} <= {bool, int}
    if isinstance(a, int) and isinstance(b, int):
        return True
    if isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)):
        return True
    return isinstance(b, type(a)) or isinstance(a, type(b))
