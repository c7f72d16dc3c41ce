"""JSON for the start path: the stdlib's C scanner and encoder, without `import json`.

`import json` loads `re` (and with it enum): ~10 ms of every `cowfs run` and of every FUSE
daemon's start here, for regular expressions the C accelerator (`_json`) never uses. These
two functions call that accelerator directly and give the same results as json.loads and
json.dumps; anything they do not handle themselves (a malformed document, a BOM, a type the
encoder refuses, no `_json` at all) goes to the json module, so errors and edge cases stay
exactly the stdlib's. tests/test_fastjson.py holds them to that.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # not CPython: the json module does everything
    _json = None

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"  # JSON's whitespace (str.strip() would take more)
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What the C scanner reads from a json.JSONDecoder: its default settings."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


_scan = _json.make_scanner(_Context()) if _json is not None else None


def loads(doc: str | bytes | bytearray) -> Any:
    """json.loads(doc)."""
    if _scan is not None:
        try:
            text = doc if isinstance(doc, str) else bytes(doc).decode("utf-8")
            start = len(text) - len(text.lstrip(_WS))
            if not text.startswith("\ufeff"):
                value, end = _scan(text, start)
                if not text[end:].strip(_WS):
                    return value
        except (StopIteration, ValueError):
            pass  # json.loads says what is wrong, as it would have
    import json

    return json.loads(doc)


def _refuse(obj: object) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False,
          separators: tuple[str, str] | None = None) -> str:  # fmt: skip
    """json.dumps(obj, indent=indent, sort_keys=sort_keys, separators=separators), for
    documents of dicts with str keys, lists, str, int, float, bool and None."""
    if _json is not None and (separators is None or indent is None):
        try:
            if indent is None:
                items, keys = separators or (", ", ": ")
                return "".join(_encoder(sort_keys, items, keys)(obj, 0))
            out: list[str] = []
            _pretty(obj, "\n", " " * indent, sort_keys, out)
            return "".join(out)
        except (TypeError, ValueError, RecursionError):
            pass  # json.dumps says what it refuses (a loop: RecursionError here), or handles it
    import json

    return json.dumps(obj, indent=indent, sort_keys=sort_keys, separators=separators)


def _encoder(sort_keys: bool, item_separator: str = ", ", key_separator: str = ": ") -> Any:
    assert _json is not None
    return _json.make_encoder({}, _refuse, _json.encode_basestring_ascii, None, key_separator,
                              item_separator, sort_keys, False, True)  # fmt: skip


class _NotPlain(TypeError):
    pass


def _pretty(obj: Any, newline: str, step: str, sort_keys: bool, out: list[str]) -> None:
    # json's indented layout: each member on its own line, ",\n" between them, scalars and
    # empty containers as the compact encoder writes them.
    if isinstance(obj, dict) and obj:
        inner = newline + step
        keys = sorted(obj) if sort_keys else obj
        out.append("{")
        for i, key in enumerate(keys):
            if type(key) is not str:
                raise _NotPlain("non-str key")  # json converts those: let it
            out.append(("," if i else "") + inner + _json.encode_basestring_ascii(key) + ": ")
            _pretty(obj[key], inner, step, sort_keys, out)
        out.append(newline + "}")
    elif isinstance(obj, list | tuple) and obj:
        inner = newline + step
        out.append("[")
        for i, item in enumerate(obj):
            out.append(("," if i else "") + inner)
            _pretty(item, inner, step, sort_keys, out)
        out.append(newline + "]")
    else:
        out.extend(_encoder(sort_keys)(obj, 0))
