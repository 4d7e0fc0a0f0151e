"""A file descriptor that closes exactly once: by close(), by the context manager, or on GC."""
import os
import weakref

from .errors import Closed


class FdObject:
    """Base for objects that own one KVM file descriptor."""

    _fd = -1

    def _own_fd(self, fd: int) -> None:
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise Closed(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            self._fd = -1
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
