"""pykvm._record: the light record base that replaced ``@dataclass`` on pykvm's import path.

Each behaviour is checked against what :mod:`dataclasses` does for the same class (the reference
is built here, in the test, never in pykvm), and the converted pykvm classes are checked to keep
their constructors, frozen-ness and hashability. ``import pykvm.machine`` must not import
dataclasses or inspect."""
import copy
import dataclasses
import inspect
import pickle
import subprocess
import sys
from typing import ClassVar, Dict, List, Optional

import pytest

from pykvm._record import FrozenInstanceError, Record, as_dict, field, fields, replace


class Point(Record):
    """A mutable record with a default and a default factory."""
    x: int
    y: int = 0
    tags: List[str] = field(default_factory=list)
    counter: ClassVar[int] = 7


@dataclasses.dataclass
class PointDC:
    x: int
    y: int = 0
    tags: List[str] = dataclasses.field(default_factory=list)
    counter: ClassVar[int] = 7


class Key(Record, frozen=True, slots=True):
    """A frozen, slotted record."""
    name: str
    size: int = 8


@dataclasses.dataclass(frozen=True)
class KeyDC:
    name: str
    size: int = 8


class Outer(Record):
    """A record holding records, in a list and a dict."""
    label: str
    points: List[Point] = field(default_factory=list)
    by_name: Dict[str, Key] = field(default_factory=dict)
    pair: tuple = ()


@dataclasses.dataclass
class OuterDC:
    label: str
    points: List[PointDC] = dataclasses.field(default_factory=list)
    by_name: Dict[str, KeyDC] = dataclasses.field(default_factory=dict)
    pair: tuple = ()


class Point3(Point):
    """A subclass: the base's fields first."""
    z: int = 0


def _repr_body(r: str) -> str:
    return r[r.index("("):]


def test_fields_in_order_classvar_excluded():
    assert fields(Point) == ("x", "y", "tags") == tuple(f.name for f in dataclasses.fields(PointDC))
    assert fields(Point(1)) == fields(Point)
    assert fields(Point3) == ("x", "y", "tags", "z")
    assert Point.counter == 7 and Point(1).counter == 7
    assert Point.__match_args__ == ("x", "y", "tags")
    with pytest.raises(TypeError):
        fields(PointDC(1))


def test_constructor_positional_keyword_defaults_like_dataclass():
    for args, kw in [((1,), {}), ((1, 2), {}), ((), {"x": 3, "y": 4}), ((5,), {"tags": ["a"]}),
                     ((1, 2, ["t"]), {})]:
        r, d = Point(*args, **kw), PointDC(*args, **kw)
        assert (r.x, r.y, r.tags) == (d.x, d.y, d.tags)
        assert _repr_body(repr(r)) == _repr_body(repr(d))
    assert Point3(1, 2, [], 3).z == 3 and Point3(1).z == 0


def test_default_factory_gives_each_record_its_own_object():
    a, b = Point(1), Point(2)
    a.tags.append("x")
    assert b.tags == [] and a.tags == ["x"]


@pytest.mark.parametrize("args,kw", [((), {}), ((1, 2, [], 4), {}), ((1,), {"x": 2}),
                                     ((1,), {"nope": 1})])
def test_bad_calls_raise_typeerror_as_dataclass_does(args, kw):
    with pytest.raises(TypeError):
        PointDC(*args, **kw)
    with pytest.raises(TypeError):
        Point(*args, **kw)


def test_missing_field_names_it():
    with pytest.raises(TypeError, match="'x'"):
        Point()


def test_equality_needs_same_class_and_fields():
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    assert Point(1) != Point3(1)                 # a subclass is another class, as @dataclass
    assert Point(1).__eq__(PointDC(1)) is NotImplemented
    assert Point(1) != (1, 0, [])
    nan = float("nan")                            # the same object: equal, as in tuples
    assert Point(nan) == Point(nan) and PointDC(nan) == PointDC(nan)


def test_mutable_record_is_unhashable_and_assignable():
    p = Point(1)
    with pytest.raises(TypeError):
        hash(p)
    p.y = 9
    assert p.y == 9
    p.extra = 1                                  # no slots: a __dict__, as a plain dataclass
    assert p.extra == 1


def test_frozen_record_refuses_assignment_and_hashes_by_fields():
    k = Key("a")
    with pytest.raises(FrozenInstanceError):
        k.name = "b"
    with pytest.raises(AttributeError):
        k.size = 1
    with pytest.raises(FrozenInstanceError):
        del k.name
    assert k.name == "a"
    assert hash(Key("a", 8)) == hash(Key("a")) == hash(("a", 8)) == hash(KeyDC("a"))
    assert {Key("a"): 1}[Key("a")] == 1
    assert len({Key("a"), Key("a"), Key("b")}) == 2
    assert _repr_body(repr(k)) == _repr_body(repr(KeyDC("a")))


def test_slots_record_has_no_dict():
    k = Key("a")
    assert not hasattr(k, "__dict__")
    assert Key.__slots__ == ("name", "size")
    assert not hasattr(Point(1), "__slots__") or "__dict__" in dir(Point(1))


def test_frozen_is_inherited():
    class Sub(Key):
        extra: int = 0
    s = Sub("a")
    with pytest.raises(FrozenInstanceError):
        s.extra = 1
    assert fields(Sub) == ("name", "size", "extra")


def test_class_creation_errors():
    with pytest.raises(TypeError, match="mutable default"):
        class Bad(Record):
            items: list = []                     # the error under test
    with pytest.raises(TypeError, match="without a default"):
        class Bad2(Record):
            a: int = 0
            b: int
    with pytest.raises(ValueError):
        field(default=1, default_factory=list)


def test_as_dict_matches_dataclasses_asdict():
    r = Outer("o", [Point(1, 2, ["a"])], {"k": Key("n", 4)}, (Point(3),))
    d = OuterDC("o", [PointDC(1, 2, ["a"])], {"k": KeyDC("n", 4)}, (PointDC(3),))
    assert as_dict(r) == dataclasses.asdict(d)
    out = as_dict(r)
    assert type(out["pair"]) is tuple and out["points"][0]["tags"] is not r.points[0].tags
    with pytest.raises(TypeError):
        as_dict({"a": 1})


def test_replace_makes_a_new_record():
    k = Key("a", 8)
    k2 = replace(k, size=16)
    assert k2 == Key("a", 16) and k == Key("a", 8)
    with pytest.raises(TypeError):
        replace(k, nope=1)


def test_copy_deepcopy_and_pickle_round_trip():
    for r in (Point(1, 2, ["t"]), Key("a", 3), Outer("o", [Point(1)], {"k": Key("n")})):
        assert copy.copy(r) == r
        assert copy.deepcopy(r) == r
        assert pickle.loads(pickle.dumps(r)) == r
    p = Point(1, tags=["x"])
    p.extra = 5
    q = copy.deepcopy(p)
    assert q.extra == 5 and q.tags is not p.tags


def test_signature_for_help_and_sphinx():
    sig = inspect.signature(Point)
    ref = inspect.signature(PointDC)
    assert list(sig.parameters) == list(ref.parameters)
    assert [p.default for p in sig.parameters.values()][:2] == [inspect.Parameter.empty, 0]
    assert str(sig).replace("<factory>", "F") == str(ref).replace("<factory>", "F")


def test_runloop_records_keep_working():
    from pykvm.runloop import LoopConfig, MmioRecord, Stop
    s = Stop("exit", value=3)
    assert (s.kind, s.exit, s.value, s.result) == ("exit", None, 3, None)
    assert repr(s) == "Stop(kind='exit', exit=None, value=3, result=None)"
    assert s == Stop("exit", None, 3) and s != Stop("kick")
    assert not hasattr(s, "__dict__")
    m = MmioRecord(0x1000, 4, False, b"abcd")
    assert m == MmioRecord(0x1000, 4, False, b"abcd")
    c = LoopConfig(serial_base=0x3F8)
    assert c.serial_base == 0x3F8 and c.exit_port_size == 4 and c == LoopConfig(0x3F8)
    assert fields(LoopConfig)[:3] == ("serial_base", "debugcon_port", "exit_port")


def _converted():
    from pykvm.arch.riscv.cpu import CpuTypeResult
    from pykvm.arch.riscv.regs import RiscvReg
    from pykvm.arch.riscv.sbi import SuspendEvent
    from pykvm.arch.x86.nested import NestedReport, NestedState
    from pykvm.boot.image import LoadedImage, LoadPlan, Segment
    from pykvm.boot.linux_image import LinuxImageHeader
    from pykvm.boot.linux_x86 import LinuxImage, SetupHeader
    from pykvm.boot.multiboot import MultibootHeader
    from pykvm.boot.x86_images import PlacedImage
    from pykvm.devices.bus import Mapping
    from pykvm.machine import Event, RunResult
    from pykvm.memory import MemorySlot
    from pykvm.platform.acpi import AcpiTables
    from pykvm.platform.base import MachineControl
    from pykvm.platform.fdt import Node
    from pykvm.report import Report
    frozen = {MachineControl, RiscvReg, SuspendEvent, Segment, MultibootHeader,
              LinuxImageHeader, Mapping}
    mutable = {Report, AcpiTables, Node, NestedReport, NestedState, CpuTypeResult, LoadPlan,
               LoadedImage, SetupHeader, LinuxImage, PlacedImage, Event, RunResult, MemorySlot}
    return frozen, mutable


def test_converted_pykvm_classes_keep_frozenness_and_hashability():
    frozen, mutable = _converted()
    for cls in frozen | mutable:
        assert issubclass(cls, Record) and not dataclasses.is_dataclass(cls), cls
        assert cls._frozen == (cls in frozen), cls
        assert (cls.__hash__ is None) == (cls in mutable), cls
        assert "__init__" not in cls.__dict__, cls      # the fields are the constructor


def test_converted_classes_construct_as_before():
    from pykvm.arch.x86.nested import NestedReport
    from pykvm.boot.image import LoadedImage, LoadPlan, Segment
    from pykvm.machine import RunResult
    from pykvm.platform.fdt import Node
    from pykvm.report import Report
    seg = Segment(0x1000, b"ab", 0x10)
    assert (seg.flags, seg.vaddr, seg.index, seg.end) == (7, None, 0, 0x1010)
    assert hash(seg) == hash(Segment(0x1000, b"ab", 0x10))
    plan = LoadPlan("elf64", "x86_64", "long", 0x1000, [seg])
    img = LoadedImage(plan, 0x1000, "long")
    assert img.written == [] and img.boot_regs == {} and img.written is not \
        LoadedImage(plan, 0x1000, "long").written
    r = Report("sync", (1, 2), vcpu=1)
    assert repr(r) == ("Report(kind='sync', args=(1, 2), text='', file='', line=0, values=None, "
                       "message='', vcpu=1, where='')")
    assert r.stage == 1 and r == Report("sync", (1, 2), vcpu=1)
    rr = RunResult("done", 0, b"hi", {}, 0.5)
    assert rr.reports == [] and rr.as_dict()["console"] == "hi"
    n = Node("root").set("a", 1)
    n.child("c", b=2)
    assert n.children == [Node("c", {"b": 2})]
    nr = NestedReport(False, "none", "why", ["e"], switches={"nested": 1})
    assert nr.as_dict() == {"available": False, "backend": "none", "reason": "why",
                            "evidence": ["e"], "vendor": None, "module": None,
                            "switches": {"nested": 1}, "cpuid_vmx": False, "cpuid_svm": False,
                            "nested_state_size": 0, "hyperv_enlightened_vmcs": 0,
                            "x86_guest_mode": 0}


def test_import_machine_loads_neither_dataclasses_nor_inspect():
    code = ("import sys, pykvm.machine; "
            "print(sorted(m for m in ('dataclasses', 'inspect', 'ast', 'dis') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_optional_annotations_are_fine():
    class WithOptional(Record):
        a: Optional[int] = None
    assert WithOptional().a is None and WithOptional(3).a == 3


def test_string_annotations_as_the_future_import_writes_them():
    # modules on the start-up path use `from __future__ import annotations`: every annotation
    # reaches the record class as a string, ClassVar ones included
    ns = {"__annotations__": {"a": "int", "k": "ClassVar[int]", "b": "Optional[List[int]]"},
          "k": 7, "b": None}
    Rec = type(Record)("Rec", (Record,), ns)
    assert fields(Rec) == ("a", "b") and Rec.k == 7
    assert Rec(1) == Rec(1, None) and repr(Rec(2, [3])) == "Rec(a=2, b=[3])"
    assert str(inspect.signature(Rec)) == "(a: 'int', b: 'Optional[List[int]]' = None) -> None"


def test_protocol_stand_in_checks_methods_only_when_runtime_checkable():
    from pykvm._record import Protocol, runtime_checkable
    from pykvm.devices.bus import Device
    from pykvm.devices.i8042 import I8042

    class Reader(Protocol):
        def read(self, offset: int, size: int) -> int: ...

    @runtime_checkable
    class Checked(Protocol):
        def read(self, offset: int, size: int) -> int: ...

    class HasRead:
        def read(self, offset, size):
            return 0

    class NotCallable:
        read = 5

    assert not isinstance(HasRead(), Reader)          # structural only with runtime_checkable
    assert isinstance(HasRead(), Checked) and not isinstance(NotCallable(), Checked)
    assert not isinstance(object(), Checked)

    class Sub(Checked):
        pass
    assert isinstance(Sub(), Checked)                  # nominal subclasses too
    # the bus's Device protocol: a device model is one, a thing without write() is not
    assert isinstance(I8042(), Device) and not isinstance(HasRead(), Device)
