from __future__ import annotations

import pytest

from cowfs.errors import UnsafePath
from cowfs.pathsafe import clean, clean_link, join

CLEAN = [
    ("a", "a"),
    ("./a/b", "a/b"),
    ("/etc/passwd", "etc/passwd"),
    ("//a//b//", "a/b"),
    ("a/./b/.", "a/b"),
    ("a/b/../c", "a/c"),
    ("a/..", ""),
    ("./", ""),
    ("/", ""),
    (".", ""),
    ("dir/", "dir"),
    ("a/.wh..wh..opq", "a/.wh..wh..opq"),
    ("..a/b..", "..a/b.."),  # names that only look like '..'
    ("caf\udce9", "caf\udce9"),  # non-UTF-8 bytes carried by surrogateescape
    ("x" * 255, "x" * 255),
]

REFUSED = [
    ("..", "escapes"),
    ("../etc/passwd", "escapes"),
    ("/../x", "escapes"),
    ("a/../../b", "escapes"),
    ("./a/../..", "escapes"),
    ("a\0b", "NUL"),
    ("x" * 256, "longer than 255"),
    ("d/" + "\udce9" * 256, "longer than 255"),
]


@pytest.mark.parametrize(("name", "want"), CLEAN)
def test_clean(name: str, want: str) -> None:
    assert clean(name) == want


@pytest.mark.parametrize(("name", "why"), REFUSED)
def test_clean_refuses(name: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=why):
        clean(name)


@pytest.mark.parametrize(
    ("target", "want"),
    [("./bin/sh", "bin/sh"), ("/bin/sh", "bin/sh"), ("a/../b", "b")],
)
def test_clean_link(target: str, want: str) -> None:
    assert clean_link(target, entry="x") == want


@pytest.mark.parametrize(
    ("target", "why"),
    [("../../etc/shadow", "'x': hard-link target .*escapes"), ("/", "root directory"),
     ("./", "root directory"), ("a\0", "NUL")],
)
def test_clean_link_refuses(target: str, why: str) -> None:
    with pytest.raises(UnsafePath, match=why):
        clean_link(target, entry="x")


def test_join() -> None:
    assert join("", "a") == "a"
    assert join("a/b", "c") == "a/b/c"
