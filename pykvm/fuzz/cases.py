"""A case of any fuzzer mode, told apart by its ``format``: a random-guest case
(:data:`pykvm.fuzz.generator.CASE_FORMAT`), a device case
(:data:`pykvm.fuzz.device_generator.CASE_FORMAT`) or a virtio case
(:data:`pykvm.fuzz.virtio_generator.CASE_FORMAT`). The supervisor, the workers and
``--replay`` handle cases through these functions only.
"""
from . import device_generator, generator, virtio_generator


def generate(gen: dict, index: int) -> dict:
    """Case ``index`` of the run ``gen`` describes: {"seed", "modes", "max_vcpus", "deadline"}
    (seconds) and, for the device mode, "devices": True, for the virtio mode "virtio": True
    (what :class:`Supervisor.gen
    <pykvm.fuzz.supervisor.Supervisor>` holds and a reproducer's "generator" keeps)."""
    make = (virtio_generator.generate_case if gen.get("virtio") else
            device_generator.generate_case if gen.get("devices") else generator.generate_case)
    return make(gen["seed"], index, modes=gen["modes"], max_vcpus=gen["max_vcpus"],
                deadline=gen["deadline"])


def is_device_case(case: dict) -> bool:
    """Whether ``case`` (a case or its JSON form) is a device case."""
    return case.get("format") == device_generator.CASE_FORMAT


def is_virtio_case(case: dict) -> bool:
    """Whether ``case`` (a case or its JSON form) is a virtio case
    (:mod:`pykvm.fuzz.virtio_generator`)."""
    return case.get("format") == virtio_generator.CASE_FORMAT


def case_to_json(case: dict) -> dict:
    """``case`` (any mode) in its JSON form: its blobs as hex (a reproducer's "case")."""
    if is_virtio_case(case):
        return virtio_generator.case_to_json(case)
    if is_device_case(case):
        return device_generator.case_to_json(case)
    return generator.case_to_json(case)


def case_from_json(d: dict) -> dict:
    """The case (any mode) whose JSON form is ``d``; ValueError for a document that is not a
    case of any format, KeyError or TypeError for one whose fields are missing or wrong."""
    if is_virtio_case(d):
        return virtio_generator.case_from_json(d)
    if is_device_case(d):
        return device_generator.case_from_json(d)
    return generator.case_from_json(d)
