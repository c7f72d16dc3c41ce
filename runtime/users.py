"""Resolve a docker-style user ("", "uid", "uid:gid", "name", "name:group") against the
container's own /etc/passwd and /etc/group (pure: the caller reads the files)."""

from __future__ import annotations

from cowfs.errors import InvalidInput
from cowfs.record import record


@record(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def _table(text: str, width: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            fields = line.split(":")
            if len(fields) >= width:
                rows.append(fields)
    return rows


def resolve(spec: str, passwd: str = "", group: str = "") -> User:
    users = _table(passwd, 7)
    groups = _table(group, 4)
    name, _, grp = (spec or "0").partition(":")
    entry = next((u for u in users if u[0] == name or (name.isdigit() and u[2] == name)), None)
    if entry is None and not name.isdigit():
        raise InvalidInput(f"unable to find user {name}: no matching entries in passwd file")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry else 0
    home = entry[5] if entry else "/"
    if grp:
        g = next((r for r in groups if r[0] == grp or (grp.isdigit() and r[2] == grp)), None)
        if g is None and not grp.isdigit():
            raise InvalidInput(f"unable to find group {grp}: no matching entries in group file")
        gid = int(g[2]) if g else int(grp)
    supplementary = {gid}
    if entry:
        for g in groups:
            if entry[0] in g[3].split(","):
                supplementary.add(int(g[2]))
    return User(uid, gid, tuple(sorted(supplementary)), home)
