"""A file descriptor that closes exactly once: by close(), by the context manager, or on GC."""
from __future__ import annotations

import os
import weakref

from .errors import Closed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    _Self = TypeVar("_Self", bound="FdObject")


class FdObject:
    """Base for objects that own one KVM file descriptor."""

    _fd = -1

    def _own_fd(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def fd(self) -> int:
        """The descriptor; :class:`~pykvm.errors.Closed` once closed."""
        if self._fd < 0:                # inline, not _check_open(): read on every ioctl
            raise Closed(f"{type(self).__name__} is closed")
        return self._fd

    def _check_open(self) -> None:
        """Raise :class:`~pykvm.errors.Closed` if this object's descriptor is closed."""
        if self._fd < 0:
            raise Closed(f"{type(self).__name__} is closed")

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor (idempotent). Closed here, not through the finalizer:
        finalizers stop running once the interpreter has begun to exit (or anything has run
        its atexit functions), and an explicit close must close regardless."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._finalizer.detach() is not None:
                os.close(fd)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
