"""cowfs.fastjson gives what json gives: the same text out, the same values and errors in."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cowfs import fastjson

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _same(a: object, b: object) -> bool:
    # NaN != NaN: compare the encoded forms instead
    return json.dumps(a) == json.dumps(b)


@settings(max_examples=150, deadline=None)
@given(documents, st.sampled_from([None, 2]), st.booleans(),
       st.sampled_from([None, (",", ":"), (", ", ": ")]))  # fmt: skip
def test_dumps_writes_what_json_writes(doc: object, indent: int | None, sort_keys: bool,
                                       separators: tuple[str, str] | None) -> None:  # fmt: skip
    assert fastjson.dumps(doc, indent=indent, sort_keys=sort_keys, separators=separators) == (
        json.dumps(doc, indent=indent, sort_keys=sort_keys, separators=separators))


@settings(max_examples=150, deadline=None)
@given(documents, st.sampled_from([None, 2]), st.sampled_from(["", " \n\t\r "]))
def test_loads_reads_what_json_reads(doc: object, indent: int | None, pad: str) -> None:
    text = pad + json.dumps(doc, indent=indent) + pad
    assert _same(fastjson.loads(text), json.loads(text))
    assert _same(fastjson.loads(text.encode()), json.loads(text.encode()))


@pytest.mark.parametrize("text", [
    "", " ", "{", '{"a": 1,}', "[1] [2]", "nul", '"\x01"', "\ufeff{}", '{"a": 1} x', "01",
])  # fmt: skip
def test_bad_documents_fail_as_json_fails(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        fastjson.loads(text)
    assert str(got.value) == str(expected.value)


def test_what_the_encoder_refuses_or_converts_is_json_s_answer() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        fastjson.dumps({"a": {1, 2}})
    with pytest.raises(TypeError, match="not JSON serializable"):
        fastjson.dumps({"a": [object()]}, indent=2)
    # non-str keys are converted by json; the fast path hands them over
    assert fastjson.dumps({1: [True, None]}, indent=2) == json.dumps({1: [True, None]}, indent=2)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        fastjson.dumps(loop)
    with pytest.raises(ValueError, match="Circular"):
        fastjson.dumps({"a": loop}, indent=2)
    assert math.isnan(fastjson.loads("NaN"))
    assert fastjson.loads('{"x": -Infinity}') == {"x": float("-inf")}
