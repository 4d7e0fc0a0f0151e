"""The C run loop's objects for Python (``csrc/pyexit.c``, installed into :mod:`pykvm._native`
when this module is first imported).

- :class:`RunState`: a vCPU's run sequence number (``seq``, bumped by every KVM_RUN; an exit
  handed out at another one is stale) and ``closing`` flag, as C fields the loop reads and bumps
  without running Python.
- :class:`ExitState`: the base of :class:`pykvm.exits.Exit`; the fields the C loop fills for an
  exit handler (``_seq``, ``_decoded``, ``_info``, ``_a``, ``_b``: see ``py_exit()`` in
  ``csrc/runloop.c``).
- :func:`run_handlers`: ``pykvm_loop_run()`` with the GIL released, calling
  :meth:`pykvm.runloop.RunLoop.on` handlers with the GIL taken back for each call only.
"""
from __future__ import annotations

from ._native import lib as _lib

TYPE_CHECKING = False                 # (not typing's: importing typing costs ~5 ms at start-up)

if _lib.pykvm_pyapi_install() != 0:
    raise ImportError("pykvm._native: the run loop's Python types could not be installed")

if TYPE_CHECKING:                     # what the C types look like to a type checker
    from typing import Any, Callable, Dict

    class RunState:
        seq: int
        closing: bool
        run: int                      # host address of kvm_run (read-only)
        run_size: int                 # bytes mapped there (read-only)

        def __init__(self, run_address: int, run_size: int) -> None: ...

    class ExitState:
        _rs: RunState
        _seq: int
        _a: int
        _b: int
        _info: int
        _decoded: bool
        _value: Any                   # a getset descriptor: the exit's data as an int

        def _respond(self, data: Any) -> None: ...

    def run_handlers(loop_address: int, handlers: Dict[int, Callable[..., Any]],
                     exits: Dict[int, Any], vcpu: Any, run_state: RunState, loop: Any,
                     new_exit: Callable[..., Any]) -> int: ...
else:
    from ._native import ExitState, RunState, run_handlers  # installed just above

__all__ = ["ExitState", "RunState", "run_handlers"]
