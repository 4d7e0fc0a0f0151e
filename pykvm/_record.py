"""Light record classes: what ``@dataclass`` gives pykvm's small value types, without its cost.

Importing :mod:`dataclasses` pulls in :mod:`inspect`, :mod:`ast`, :mod:`dis` and :mod:`tokenize`
(about 11 ms at start-up), and each ``@dataclass`` compiles source text for its methods. A
:class:`Record` subclass gets the same methods from this module, shared by every record class
and built without ``exec``::

    class Segment(Record, frozen=True, slots=True):
        addr: int
        data: bytes
        flags: int = 7
        written: List[int] = field(default_factory=list)

The fields are the class's annotated names, in order, after those of its record bases
(``ClassVar`` annotations are not fields). A class attribute gives a field's default;
``field(default_factory=f)`` calls ``f()`` for each new record (a list, dict or set default must be
given that way: :class:`TypeError` otherwise, as ``@dataclass`` does). A field without a default
after one with a default is a :class:`TypeError` at class creation.

Each record class has:

- ``__init__`` taking the fields positionally or by keyword, in field order (a class may define
  its own ``__init__`` instead, e.g. on a hot path);
- ``__eq__``: equal when the other object is of the same class and every field is equal (a
  different class gives ``NotImplemented``);
- ``__repr__``: ``Name(field=value, ...)`` as ``@dataclass`` writes it;
- ``__hash__``: ``None`` (unhashable, as ``@dataclass(eq=True)``), unless ``frozen=True``: then
  the hash of the field values, and assigning or deleting any attribute raises
  :class:`FrozenInstanceError` (an :class:`AttributeError`);
- ``__slots__`` of the class's own fields with ``slots=True`` (no ``__dict__`` unless a base
  without slots has one);
- ``__match_args__`` (the field names) and ``__reduce__`` (so records copy and pickle).

:func:`as_dict`, :func:`replace` and :func:`fields` do what ``dataclasses.asdict``, ``replace``
and ``fields`` do (``fields`` gives names, not ``Field`` objects).

A class whose body sets ``_fields`` itself (a tuple of names, with ``_defaults``: name -> value)
is taken as it is: its annotations are not read and nothing is added to it but the methods above.

:class:`Protocol` and :func:`runtime_checkable` are what modules on the start-up path derive
their protocol classes from at run time, under ``if TYPE_CHECKING:`` imports of typing's own
(which only the type checker sees), so that :mod:`typing` is not imported at start-up.
"""
from __future__ import annotations

import sys

# typing is for the type checker only: importing it costs ~5 ms of every ``pykvm run``
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, ClassVar, Dict, Tuple, Type, TypeVar, dataclass_transform
else:
    def dataclass_transform(**_kw):
        """No-op stand-in for :func:`typing.dataclass_transform`: only type checkers read it."""
        return lambda cls: cls

__all__ = ["Record", "FrozenInstanceError", "field", "as_dict", "replace", "fields"]

_MISSING: Any = object()
_MUTABLE = (list, dict, set, bytearray)


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen record was assigned or deleted."""


class _Field:
    """What :func:`field` returns: a field's default or its default factory."""
    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Any):
        self.default = default
        self.default_factory = default_factory


def field(*, default: Any = _MISSING, default_factory: Any = _MISSING) -> Any:
    """A field's default for a :class:`Record` class body: ``default`` (a value), or
    ``default_factory`` (a callable taking no argument, called for each new record, e.g.
    ``list``). Raises :class:`ValueError` if both are given."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("field() takes default or default_factory, not both")
    return _Field(default, default_factory)


def _is_classvar(annotation: object) -> bool:
    if isinstance(annotation, str):
        return annotation.startswith(("ClassVar", "typing.ClassVar"))
    # an evaluated ClassVar annotation was made by typing, so typing is loaded if it is one
    typing = sys.modules.get("typing")
    return typing is not None and (annotation is typing.ClassVar
                                   or getattr(annotation, "__origin__", None) is typing.ClassVar)


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")


def _frozen_hash(self: Any) -> int:
    return hash(tuple([getattr(self, n) for n in self._fields]))


class _RecordMeta(type):
    """Builds a record class: fields from the annotations, defaults, slots, frozen-ness."""

    def __new__(mcls, name: str, bases: Tuple[type, ...], ns: Dict[str, Any], *,
                frozen: Any = None, slots: bool = False, **kw: Any) -> "_RecordMeta":
        if frozen is None:
            frozen = any(getattr(b, "_frozen", False) for b in bases)
        if "_fields" not in ns:
            _fill(name, bases, ns, slots)
        elif slots and "__slots__" not in ns:
            ns["__slots__"] = tuple(ns["_fields"])
        ns["_frozen"] = bool(frozen)
        if frozen:
            ns.setdefault("__setattr__", _frozen_setattr)
            ns.setdefault("__delattr__", _frozen_delattr)
            ns.setdefault("__hash__", _frozen_hash)
        else:
            ns.setdefault("__hash__", None)
        return super().__new__(mcls, name, bases, ns, **kw)

    def __init__(cls, name: str, bases: Tuple[type, ...], ns: Dict[str, Any], **kw: Any):
        super().__init__(name, bases, ns)

    @property
    def __signature__(cls) -> Any:
        """The constructor's signature for :func:`inspect.signature`, ``help()`` and Sphinx
        (built when asked, so that :mod:`inspect` is not imported before): the fields with
        their annotations and defaults (``<factory>`` for a default factory), or None for a
        class with its own ``__init__`` (inspect then reads that)."""
        if getattr(cls, "__init__", None) is not Record.__init__:
            return None
        import inspect

        annotations: Dict[str, Any] = {}
        for c in reversed(cls.__mro__):
            annotations.update(c.__dict__.get("__annotations__", {}))
        rec: Any = cls
        params = [inspect.Parameter(
            n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=rec._defaults[n] if n in rec._defaults
            else _FACTORY if n in rec._factories else inspect.Parameter.empty,
            annotation=annotations.get(n, inspect.Parameter.empty)) for n in rec._fields]
        return inspect.Signature(params, return_annotation=None)


class _Factory:
    """Stands for a default factory in a signature."""
    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()


def _fill(name: str, bases: Tuple[type, ...], ns: Dict[str, Any], slots: bool) -> None:
    """Set ``_fields``, ``_defaults``, ``_factories`` (and ``__slots__``) in the namespace ``ns``
    of record class ``name`` from its annotations and class attributes."""
    names: list = []
    defaults: Dict[str, Any] = {}
    factories: Dict[str, Callable[[], Any]] = {}
    for b in reversed(bases):                    # record bases' fields first, as @dataclass
        for n in getattr(b, "_fields", ()):
            if n not in names:
                names.append(n)
        defaults.update(getattr(b, "_defaults", {}))
        factories.update(getattr(b, "_factories", {}))
    own = []
    for n, annotation in ns.get("__annotations__", {}).items():
        if _is_classvar(annotation):
            continue
        if n not in names:
            names.append(n)
        own.append(n)
        defaults.pop(n, None)
        factories.pop(n, None)
        if n not in ns:
            continue
        value = ns[n]
        if isinstance(value, _Field):
            if value.default_factory is not _MISSING:
                factories[n] = value.default_factory
            elif value.default is not _MISSING:
                defaults[n] = value.default
            if slots or value.default is _MISSING:
                del ns[n]
            else:
                ns[n] = value.default
            continue
        if isinstance(value, _MUTABLE):
            raise TypeError(f"{name}.{n}: mutable default {type(value).__name__}: "
                            f"use field(default_factory=...)")
        defaults[n] = value
        if slots:
            del ns[n]
    seen_default = None
    for n in names:
        if n in defaults or n in factories:
            seen_default = n
        elif seen_default is not None:
            raise TypeError(f"{name}: field {n!r} without a default follows field "
                            f"{seen_default!r} with one")
    ns["_fields"] = tuple(names)
    ns["_defaults"] = defaults
    ns["_factories"] = factories
    ns.setdefault("__match_args__", tuple(names))
    if slots and "__slots__" not in ns:
        ns["__slots__"] = tuple(own)


@dataclass_transform(eq_default=True, frozen_default=False, field_specifiers=(field,))
class Record(metaclass=_RecordMeta):
    """Base of record classes (see the module docstring). ``class C(Record, frozen=True,
    slots=True)``: both keywords are optional (default False; a subclass of a frozen record is
    frozen)."""
    __slots__ = ()
    _fields: ClassVar[Tuple[str, ...]] = ()
    _defaults: ClassVar[Dict[str, Any]] = {}
    _factories: ClassVar[Dict[str, Callable[[], Any]]] = {}
    _frozen: ClassVar[bool] = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        cls = self.__class__
        names = cls._fields
        npos = len(args)
        if npos > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments but "
                            f"{npos} were given")
        setter = object.__setattr__
        for n, value in zip(names, args):
            setter(self, n, value)
        if kw:
            for k in kw:
                if k not in names:
                    raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {k!r}")
                if names.index(k) < npos:
                    raise TypeError(f"{cls.__name__}() got multiple values for argument {k!r}")
        if npos == len(names):
            return
        defaults, factories = cls._defaults, cls._factories
        missing = []
        for n in names[npos:]:
            if n in kw:
                setter(self, n, kw[n])
            elif n in defaults:
                setter(self, n, defaults[n])
            elif n in factories:
                setter(self, n, factories[n]())
            else:
                missing.append(n)
        if missing:
            raise TypeError(f"{cls.__name__}() missing {len(missing)} required argument"
                            f"{'s' if len(missing) > 1 else ''}: "
                            + ", ".join(repr(n) for n in missing))

    def __repr__(self) -> str:
        return f"{self.__class__.__qualname__}(" + ", ".join(
            [f"{n}={getattr(self, n)!r}" for n in self._fields]) + ")"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = self._fields
        return tuple([getattr(self, n) for n in names]) == \
            tuple([getattr(other, n) for n in names])

    __hash__: Any = None

    def __reduce__(self) -> Tuple[Any, ...]:
        cls = self.__class__
        values = tuple([getattr(self, n) for n in cls._fields])
        extra = getattr(self, "__dict__", None)
        if extra:
            extra = {k: v for k, v in extra.items() if k not in cls._fields}
        return (cls, values, extra or None)


if TYPE_CHECKING:
    R = TypeVar("R", bound=Record)


def fields(record: Any) -> Tuple[str, ...]:
    """The field names of a record or record class, in order. Raises :class:`TypeError` for
    anything else."""
    cls: Any = record if isinstance(record, type) else record.__class__
    if not issubclass(cls, Record):
        raise TypeError(f"fields() takes a record or a record class, not {cls.__name__}")
    return tuple(cls._fields)


def replace(record: R, **changes: Any) -> R:
    """A new record of the same class with the fields in ``changes`` changed (keywords); raises
    :class:`TypeError` for a name that is not a field."""
    names = fields(record)
    for k in changes:
        if k not in names:
            raise TypeError(f"{record.__class__.__name__} has no field {k!r}")
    cls: Type[R] = record.__class__
    return cls(**{n: changes[n] if n in changes else getattr(record, n) for n in names})


def as_dict(record: Record) -> Dict[str, Any]:
    """``{field: value}`` of ``record``, recursing into records, lists, tuples and dicts inside
    it (new containers of the same types, as ``dataclasses.asdict``; other values are the
    record's own objects, not copies). Raises :class:`TypeError` if ``record`` is not a
    record."""
    if not isinstance(record, Record):
        raise TypeError(f"as_dict() takes a record, not {type(record).__name__}")
    return {n: _export(getattr(record, n)) for n in record._fields}


def _export(v: Any) -> Any:
    if isinstance(v, Record):
        return {n: _export(getattr(v, n)) for n in v._fields}
    if isinstance(v, tuple) and hasattr(v, "_fields"):     # a namedtuple
        return type(v)(*[_export(x) for x in v])
    if isinstance(v, (list, tuple)):
        return type(v)(_export(x) for x in v)
    if isinstance(v, dict):
        return type(v)((_export(k), _export(x)) for k, x in v.items())
    return v


class _ProtocolMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        if type.__instancecheck__(cls, obj):
            return True
        if not cls.__dict__.get("_runtime_checkable", False):
            return False
        return all(callable(getattr(obj, name, None)) for name, v in vars(cls).items()
                   if callable(v) and not name.startswith("__"))


class Protocol(metaclass=_ProtocolMeta):
    """What a module's ``class P(Protocol)`` derives from at run time, in place of
    :class:`typing.Protocol` (which only the type checker sees: importing :mod:`typing` costs
    about 5 ms of every ``pykvm run``). A plain base class: ``isinstance(x, P)`` is true for
    instances of P's subclasses and, when P is marked :func:`runtime_checkable`, for any object
    with a callable attribute for each method P defines, as typing's runtime protocols check."""


def runtime_checkable(cls: Any) -> Any:
    """Stand-in for :func:`typing.runtime_checkable` on a :class:`Protocol` class: lets
    ``isinstance`` check ``cls`` by its methods (see :class:`Protocol`). Returns ``cls``."""
    cls._runtime_checkable = True
    return cls
