"""cowfs.record: the @dataclass subset that the start-up path uses, behaving as dataclasses do."""

from __future__ import annotations

import pytest

from cowfs.record import FrozenInstanceError, asdict, field, record, replace


@record
class Inner:
    a: int
    b: list[int] = field(default_factory=list)


@record
class Outer:
    name: str
    inner: Inner
    items: list[Inner] = field(default_factory=list)
    tag: str = "x"


@record(frozen=True)
class Point:
    x: int
    y: int = 0


def test_positional_keyword_and_default_construction() -> None:
    o = Outer("n", Inner(1), tag="t")
    assert (o.name, o.inner.a, o.items, o.tag) == ("n", 1, [], "t")
    assert Outer(name="n", inner=Inner(a=2)).tag == "x"


def test_a_factory_default_is_made_afresh_for_each_object() -> None:
    a, b = Inner(1), Inner(2)
    a.b.append(5)
    assert b.b == [] and "b" not in Inner.__dict__


@pytest.mark.parametrize("call", [lambda: Inner(), lambda: Inner(1, [], 3),
                                  lambda: Inner(1, c=2), lambda: Inner(1, a=2)])  # fmt: skip
def test_wrong_arguments_are_type_errors(call) -> None:
    with pytest.raises(TypeError):
        call()


def test_equality_and_repr_as_a_dataclass_has_them() -> None:
    assert Inner(1, [2]) == Inner(1, [2]) and Inner(1) != Inner(2)
    assert Inner(1) != (1, [])  # another type is never equal
    text = "Outer(name='n', inner=Inner(a=1, b=[]), items=[], tag='x')"
    assert repr(Outer("n", Inner(1))) == text


def test_mutable_records_are_unhashable_and_frozen_ones_hash_by_value() -> None:
    with pytest.raises(TypeError):
        hash(Inner(1))
    assert hash(Point(1, 2)) == hash(Point(1, 2)) and {Point(1), Point(1)} == {Point(1)}


def test_a_frozen_record_refuses_assignment_and_deletion() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.y
    assert p == Point(1, 0)


def test_replace_copies_with_changes_and_leaves_the_original() -> None:
    p = Point(1, 2)
    assert replace(p, y=5) == Point(1, 5) and p == Point(1, 2)
    with pytest.raises(TypeError):
        replace(p, z=1)


def test_asdict_recurses_into_records_lists_and_dicts_and_copies() -> None:
    o = Outer("n", Inner(1, [2]), [Inner(3)])
    d = asdict(o)
    assert d == {"name": "n", "inner": {"a": 1, "b": [2]}, "items": [{"a": 3, "b": []}],
                 "tag": "x"}  # fmt: skip
    d["inner"]["b"].append(9)
    assert o.inner.b == [2]


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError):

        @record
        class Bad:
            a: int = 0
            b: int
