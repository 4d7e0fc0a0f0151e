"""virtio-mmio on the pc machine, driven by a tiny guest of our own on the real /dev/kvm: a
virtio-rng device at 0xFEB00000 (QEMU microvm's place), discovered, negotiated and used as
virtio 1.2 sections 3.1 and 4.2 say, its completions signalled through IOAPIC GSI 16, and the
rule breaks a driver can make answered as the spec says with the VM running on."""
from pykvm.devices.virtio import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from pykvm.devices.virtio.mmio import VENDOR_ID, VirtioMmio
from pykvm.devices.virtio.rng import VirtioRng

MAGIC = 0x74726976
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 64


def test_virtio_rng_over_mmio_with_ioapic_interrupts(guest_vm):
    rng = VirtioRng()
    m = guest_vm("virtio_mmio_rng.c", machine="pc", virtio_mmio=[rng])
    [(base, gsi, transport)] = m.platform.virtio_mmio_devices
    assert (base, gsi, type(transport)) == (0xFEB00000, 16, VirtioMmio)

    magic, version, dev_id, vendor, qmax, shm_len, byte_read = m.sync(stage=1)
    qmax0, qmax1 = qmax & 0xFFFF_FFFF, qmax >> 32
    assert (magic, version, dev_id, vendor) == (MAGIC, 2, 4, VENDOR_ID)
    assert (qmax0, qmax1) == (rng.queue_max, 0)       # one queue: queue 1 does not exist
    assert shm_len == 0xFFFF_FFFF                     # no shared memory region: length -1
    assert byte_read == 0                             # registers take aligned 32-bit accesses

    st_nov1, st_reset, st_notify, f_lo, f_hi, f_win2 = m.sync(stage=2)
    assert st_nov1 == ACK | DRIVER                    # FEATURES_OK refused without VERSION_1
    assert st_reset == 0
    assert st_notify == 0                             # notifies before set-up: dropped
    assert f_lo == (1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX)
    assert f_hi == 1 << (F_VERSION_1 - 32) and f_win2 == 0

    accepted, ready_bad, ready_good, st_ok, ready_q1, ready_late = m.sync(stage=3)
    assert accepted == (1 << F_VERSION_1) | (1 << F_EVENT_IDX)
    assert transport.driver_features == accepted      # the write after FEATURES_OK was ignored
    assert ready_bad == 0                             # QueueNum 3: the queue cannot be enabled
    assert ready_good == 1
    assert st_ok == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert ready_q1 == 0 and ready_late == 1          # set-up is final after DRIVER_OK

    irqs, isr_bits, lens, differ, ids, avail_event, nonzero = m.sync(stage=4)
    len1, len2 = lens & 0xFFFF_FFFF, lens >> 32
    assert irqs == 2 and isr_bits == 1                # one used-buffer interrupt per read
    assert (len1, len2, differ) == (32, 32, 1)
    assert ids == (0 << 8) | 1                        # heads 0 and 1 came back
    assert avail_event == 2                           # EVENT_IDX in force: the device asks
    assert nonzero >= 16                              # for the next notification
    assert rng.requests == 2 and rng.bytes_served == 64
    assert transport.interrupts == 2

    st_broken, bits, n_irq, st_after_reset, len3, irqs_total = m.sync(stage=5)
    assert st_broken == ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    assert bits == 2 and n_irq == 1                   # a configuration-change interrupt
    assert st_after_reset == 0
    assert len3 == 32 and irqs_total == 2             # set up again, it serves again
    assert transport.queue_errors == 1 and transport.resets >= 2
    assert transport.interrupts == 4                  # the line rose once per signal
    # InterruptStatus and the line are kept in C: the vCPU's run loop answered the driver's
    # InterruptStatus reads and InterruptACK writes without returning to Python
    served = transport.line.counts()["served"]
    assert served >= 6, served                        # 3 interrupts so far, each read and acked
    # the kvm_pvm host delivers a level-triggered interrupt once more after the first exit
    # that follows its EOI (the line is low by then: the handler finds InterruptStatus 0);
    # never more than once per real one
    (spurious,) = m.sync(stage=6)
    assert spurious <= 4
    m.done()
