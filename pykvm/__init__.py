"""pykvm: a virtual machine monitor library over Linux /dev/kvm.

    from pykvm import Kvm
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vm.add_memory(0, 2 << 20)
        vcpu = vm.create_vcpu()
        ...
        exit = vcpu.run()
"""
from .errors import (CapabilityMissing, GuestError, GuestMemoryError, KvmBusy, KvmError,
                     KvmInvalid, KvmNotFound, KvmUnsupported, PykvmError, StaleExit)
from .kvm import Kvm

__version__ = "0.1.0"
__all__ = ["Kvm", "KvmError", "KvmNotFound", "KvmInvalid", "KvmBusy", "KvmUnsupported",
           "CapabilityMissing", "GuestMemoryError", "GuestError", "PykvmError", "StaleExit"]
