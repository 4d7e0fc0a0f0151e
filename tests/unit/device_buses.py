"""The buses the device unit tests reach their devices through, as the guest's accesses do."""
from pykvm.devices.bus import MMIO_LIMIT, PIO_LIMIT, Bus
from pykvm.devices.edu import Edu


def pio(dev):
    """A port bus with ``dev`` attached where its class says (``PIO_RANGES``)."""
    bus = Bus("pio", PIO_LIMIT)
    bus.attach(dev)
    return bus


def mmio(dev):
    """An MMIO bus holding ``dev`` where it decodes now: its ``MMIO_RANGES`` (the VT-d page) or
    edu's BAR 0 window, as the platform maps them."""
    bus = Bus("mmio", MMIO_LIMIT)
    if isinstance(dev, Edu):
        if dev.bar0_window() is not None:
            bus.insert(dev.bar0_window(), Edu.MMIO_SIZE, dev, max_access=Edu.MMIO_MAX_ACCESS)
    else:
        bus.attach(dev)
    return bus
