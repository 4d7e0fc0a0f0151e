"""The raw-C contender of ``pykvm bench`` is its own extension, ``pykvm._rawbench``
(csrc/rawbench.c, built by csrc/build_rawbench.py): the run-loop module every machine loads,
``pykvm._native``, carries none of it, and the benchmark's exit kinds are the C module's own
constants."""
import os

from pykvm import _native, _rawbench

RAW_FUNCTIONS = {"pykvm_raw_exit_loop", "pykvm_raw_lifecycle", "pykvm_raw_vms_create",
                 "pykvm_raw_vms_destroy", "pykvm_resident_pages"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_native_module_holds_no_benchmark_code():
    names = set(dir(_native.lib))
    assert not RAW_FUNCTIONS & names
    assert not [n for n in names if n.startswith("PYKVM_RAW_")]
    assert "rawbench.c" not in open(os.path.join(ROOT, "csrc", "build_native.py")).read()


def test_the_rawbench_module_holds_the_contender():
    assert RAW_FUNCTIONS <= set(dir(_rawbench.lib))


def test_bench_uses_the_rawbench_constants():
    from pykvm import bench
    lib = _rawbench.lib
    assert bench._RAW_KIND == {"io_out": lib.PYKVM_RAW_IO_OUT, "io_in": lib.PYKVM_RAW_IO_IN,
                               "mmio_write": lib.PYKVM_RAW_MMIO_WRITE,
                               "mmio_read": lib.PYKVM_RAW_MMIO_READ, "hlt": lib.PYKVM_RAW_HLT}
    assert len(set(bench._RAW_KIND.values())) == len(bench.KINDS)


def test_setup_builds_both_modules():
    text = open(os.path.join(ROOT, "setup.py")).read()
    assert '"csrc/build_native.py:ffibuilder"' in text
    assert '"csrc/build_rawbench.py:ffibuilder"' in text
