"""pykvm's pytest support: fixtures, hardware markers and guest-report assertions.

Registered as a ``pytest11`` plugin, so any project that installs pykvm gets:

* markers ``requires_kvm``, ``requires_cap("NAME")``, ``requires_arch("x86_64")``;
* fixtures ``kvm`` (an open :class:`pykvm.Kvm`) and ``guest_vm`` (a factory for a VM running a
  named guest, see :mod:`pykvm.testing.guest`);
* fail-closed skipping: where ``/dev/kvm`` exists, a hardware test that skips for any reason
  other than "this host lacks the feature" is reported as a failure;
* ``--ktap FILE``: write the results as KTAP.
"""
