"""pykvm's pytest support: fixtures, hardware markers and guest-report assertions.

Registered as a ``pytest11`` plugin (:mod:`pykvm.testing.plugin`), so any project that installs
pykvm gets:

* markers ``requires_kvm``, ``requires_cap("NAME")``, ``requires_arch("x86_64")``;
* fixtures ``kvm`` (an open :class:`pykvm.Kvm`), ``guest_vm`` (a factory for a VM running a
  built-in guest, an image, or a guest source of your own beside the test:
  ``guest_vm("my_guest.c")``) and ``guest_image`` (just the build: the image's path);
* fail-closed skipping: where ``/dev/kvm`` exists, a hardware test that skips for any reason
  other than "this host lacks the feature" is reported as a failure;
* ``--ktap FILE``: write the results as KTAP.

Loading the plugin costs pytest next to nothing: neither this package nor the plugin module
imports pykvm's core; the fixtures do, when a test uses them. Tests that need KVM are skipped,
not errored, on a host without a usable ``/dev/kvm`` (``$PYKVM_DEVICE``) or on an architecture
pykvm does not support.
"""
