"""pykvm: a virtual machine monitor library over Linux /dev/kvm.

Example::

    from pykvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.add_memory(0, 2 << 20)
        vcpu = vm.create_vcpu()
        ...
        exit = vcpu.run()
"""
__version__ = "0.1.0"
__all__ = ["Kvm", "KvmError", "KvmNotFound", "KvmInvalid", "KvmBusy", "KvmUnsupported",
           "CapabilityMissing", "GuestMemoryError", "GuestError", "PykvmError", "StaleExit",
           "Closed", "Busy", "HostMemoryError"]

# The public names are loaded on first use (PEP 562), so ``import pykvm`` and the ``pykvm``
# command start without loading the ABI, the native helper or the loader.


def __getattr__(name):
    if name == "Kvm":
        from .kvm import Kvm
        return Kvm
    if name in __all__:
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'pykvm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
