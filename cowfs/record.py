"""@record: the part of @dataclass that the start-up path uses, without what it costs there.

`import dataclasses` loads inspect (with ast, dis and tokenize), and every @dataclass class
compiles its own __init__, __eq__ and __repr__ with exec: together ~25 ms of a `cowfs run`
start here (~15 ms of imports, ~1 ms per class), about an eighth of a container's
start-to-exit. A @record class gets shared, generic methods instead: keyword or positional
construction in annotation order, defaults and `field(default_factory=...)`, ==, repr,
`frozen=True`, and the module functions `replace` and `asdict`. Type checkers read it as a
dataclass (PEP 681).

Its __init__ is slower per object than a generated one: records are for the few objects of a
command (a container's spec and state, an image), not for per-entry data read in bulk (toc.Entry
stays a dataclass).
"""

from __future__ import annotations

TYPE_CHECKING = False  # `typing` stays off the start path (docs/ARCHITECTURE.md)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_: object) -> Callable:  # PEP 681: for type checkers only
        return lambda decorated: decorated

_MISSING = object()


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], Any]) -> Any:
    """A default made afresh for each object (a list, a dict), as dataclasses.field has it."""
    return _Factory(default_factory)


class FrozenInstanceError(AttributeError):
    pass


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[T] | None = None, *, frozen: bool = False) -> Any:
    """Make `cls` a record: its annotated class attributes are its fields, in order."""

    def wrap(c: type[T]) -> type[T]:
        return _make(c, frozen)

    return wrap if cls is None else wrap(cls)


def _make(cls: type[T], frozen: bool) -> type[T]:
    names = tuple(n for n, a in cls.__dict__.get("__annotations__", {}).items()
                  if not str(a).startswith(("ClassVar", "typing.ClassVar")))  # fmt: skip
    defaults: dict[str, Any] = {}
    for name in names:
        value = cls.__dict__.get(name, _MISSING)
        if value is _MISSING:
            if defaults:
                raise TypeError(f"{cls.__name__}: field {name} without a default follows one with")
            continue
        defaults[name] = value
        if isinstance(value, _Factory):
            delattr(cls, name)  # an object's own value always shadows it anyway
    n = len(names)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > n:
            raise TypeError(f"{cls.__name__}() takes {n} arguments, {len(args)} given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in defaults and key not in names:
                raise TypeError(f"{cls.__name__}() got an unexpected argument {key!r}")
            if key in values:
                raise TypeError(f"{cls.__name__}() got {key!r} twice")
            values[key] = value
        if len(values) < n:
            for name in names:
                if name not in values:
                    default = defaults.get(name, _MISSING)
                    if default is _MISSING:
                        raise TypeError(f"{cls.__name__}() is missing {name!r}")
                    values[name] = default.make() if type(default) is _Factory else default
        self.__dict__.update(values)
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        d, o = self.__dict__, other.__dict__
        return all(d[k] == o[k] for k in names)

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{k}={self.__dict__[k]!r}" for k in names)
        return f"{cls.__qualname__}({inner})"

    cls.__init__ = __init__  # type: ignore[misc]
    cls.__eq__ = __eq__  # type: ignore[method-assign,assignment]
    cls.__repr__ = __repr__  # type: ignore[method-assign,assignment]
    cls.__record_fields__ = names  # type: ignore[attr-defined]
    if frozen:

        def __setattr__(self: Any, key: str, value: Any) -> None:
            raise FrozenInstanceError(f"cannot assign to field {key!r}")

        def __delattr__(self: Any, key: str) -> None:
            raise FrozenInstanceError(f"cannot delete field {key!r}")

        def __hash__(self: Any) -> int:
            return hash(tuple(self.__dict__[k] for k in names))

        cls.__setattr__ = __setattr__  # type: ignore[method-assign,assignment]
        cls.__delattr__ = __delattr__  # type: ignore[method-assign,assignment]
        cls.__hash__ = __hash__  # type: ignore[method-assign,assignment]
    else:
        cls.__hash__ = None  # type: ignore[assignment]  # mutable and compared by value
    return cls


class SlotsRecord:
    """For classes with many objects and hot attribute access (toc.Entry, unionfs.Handle):
    __slots__ and a hand-written __init__, as fast as a generated one; == and repr come from
    the slots, in order."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__qualname__}({inner})"


def fields(obj: Any) -> tuple[str, ...]:
    return obj.__record_fields__


def replace(obj: T, **changes: Any) -> T:
    """A copy of record `obj` with `changes` (a shallow copy, as dataclasses.replace)."""
    values = {k: obj.__dict__[k] for k in fields(obj)}  # type: ignore[attr-defined]
    values.update(changes)
    return type(obj)(**values)


def asdict(obj: Any) -> Any:
    """Records (nested, and inside lists, tuples and dicts) as plain dicts, values deep-copied
    the way dataclasses.asdict copies them."""
    if hasattr(type(obj), "__record_fields__"):
        return {k: asdict(obj.__dict__[k]) for k in obj.__record_fields__}
    if isinstance(obj, list | tuple):
        return type(obj)(asdict(v) for v in obj)
    if isinstance(obj, dict):
        return {asdict(k): asdict(v) for k, v in obj.items()}
    return obj
