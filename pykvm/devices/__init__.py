"""Device models, one file each, on one protocol (:class:`.bus.Device`: ``read(offset, size)``
and ``write(offset, size, value)``) and the buses they sit on (:mod:`.bus`). A device receives
narrow handles — guest memory, an IRQ line or MSI sink, a clock (:mod:`.clock`) — and never
the machine; a platform (:mod:`pykvm.platform`) decides where each one sits."""
