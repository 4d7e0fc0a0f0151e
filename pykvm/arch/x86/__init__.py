"""x86_64 support: CPU state, boot modes, CPUID/MSRs, nested virtualization."""
