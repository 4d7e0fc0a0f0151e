"""Random-guest and device fuzzing of pykvm on /dev/kvm: ``python -m pykvm.fuzz`` (docs/fuzzing.md).

The fuzzer is a tool on top of pykvm; nothing in pykvm imports it. Its modules:

* :mod:`~pykvm.fuzz.generator` — random-guest cases (:func:`generate_case`) and the x86
  instruction stream they draw code from;
* :mod:`~pykvm.fuzz.device_generator` — device cases (``--devices``): operations that drive the
  PC machine's devices, and their guest code;
* :mod:`~pykvm.fuzz.cases` — a case of either mode to and from JSON (:func:`case_to_json`,
  :func:`case_from_json`);
* :mod:`~pykvm.fuzz.runner` — one case in a fresh VM (:class:`CaseRunner`) and the worker
  process; :mod:`~pykvm.fuzz.device_runner` — one device case on a PC machine;
* :mod:`~pykvm.fuzz.supervisor` — many cases in worker processes (:class:`Supervisor`):
  findings (crash, hang, exception, leak, vmm_error, cpu), reproducers, the summary;
* :mod:`~pykvm.fuzz.replay` — a reproducer run again (:func:`replay`);
* :mod:`~pykvm.fuzz.cli` — the command line (:func:`main`).
"""
from .cases import case_from_json, case_to_json
from .cli import main
from .generator import MODES, generate_case
from .replay import replay
from .runner import CaseRunner
from .supervisor import Supervisor

__all__ = ["MODES", "generate_case", "case_to_json", "case_from_json", "CaseRunner",
           "Supervisor", "replay", "main"]
