"""A one-pass tar reader for layer import: no seeks, headers parsed with slices, not objects.

Python's tarfile in stream mode spends most of a layer import's parse time copying its stream
buffer and building TarInfo objects; this reader does the same job three times faster, which
matters because a layer is parsed on one thread while the store compresses on the others.

It reads what image layers are made of: ustar, POSIX pax (per-entry `x` and global `g` headers),
GNU long names and link targets (`L`, `K`), and sparse files in all of GNU's forms (old `S`
headers, pax 0.0, 0.1 and 1.0). Names and pax values are decoded as UTF-8 with surrogateescape,
as tarfile does. What it does not understand, or what does not add up (checksums, numbers,
sparse maps, headers cut short), is refused with InvalidInput naming the reason; it never guesses.

The stream `f` only needs read(n) (short reads allowed). A member's content must be read through
`open(member)` before the next member is asked for; what is left unread is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from cowfs.errors import InvalidInput

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
MAX_META = 1 << 20  # bytes of a pax header, long name or sparse map: names are not megabytes
_CHUNK = 1 << 20
# As large as the chunks the import's read thread hands over: each is taken whole, uncopied.
_READ_AHEAD = 4 << 20

# Entry types (tar's typeflag byte).
REGTYPE, AREGTYPE, CONTTYPE = b"0", b"\x00", b"7"
LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = b"1", b"2", b"3", b"4", b"5", b"6"
GNU_SPARSE, GNU_DUMPDIR = b"S", b"D"
_REG_TYPES = (REGTYPE, AREGTYPE, CONTTYPE, GNU_SPARSE)


class TarMember:
    """One entry: what tarfile's TarInfo says, for the fields a layer needs."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "devmajor",
                 "devminor", "pax_headers", "sparse", "data_size")  # fmt: skip

    def __init__(self) -> None:
        self.pax_headers: dict[str, str] = {}
        self.sparse: list[tuple[int, int]] | None = None  # (offset, length) of data, if sparse
        self.linkname = ""

    def isreg(self) -> bool:
        return self.type in _REG_TYPES

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def issym(self) -> bool:
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE

    def ischr(self) -> bool:
        return self.type == CHRTYPE

    def isblk(self) -> bool:
        return self.type == BLKTYPE

    def isfifo(self) -> bool:
        return self.type == FIFOTYPE


def _damaged(why: str) -> InvalidInput:
    return InvalidInput(f"damaged or truncated archive ({why})")


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _num(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 or 0xff)."""
    first = field[0]
    if first == 0x80:
        return int.from_bytes(field[1:], "big")
    if first == 0xFF:
        return int.from_bytes(field, "big", signed=True)
    try:
        return int(field.split(b"\0", 1)[0], 8)  # int() skips the spaces around the digits
    except ValueError:
        pass
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)  # an empty field is 0
    except ValueError:
        raise _damaged(f"bad number {field!r} in a header") from None


def _pax_records(data: bytes) -> list[tuple[str, str]]:
    """'%d key=value\\n' records, in order (GNU sparse 0.0 repeats keys)."""
    out = []
    pos = 0
    end = len(data)
    while pos < end and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            raise _damaged("bad pax record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _damaged("bad pax record length") from None
        rec_end = pos + length
        if length <= 0 or rec_end > end or data[rec_end - 1] != 0x0A:
            raise _damaged("bad pax record")
        key, eq, value = data[space + 1 : rec_end - 1].partition(b"=")
        if not eq:
            raise _damaged("pax record without '='")
        out.append((key.decode("utf-8", "surrogateescape"),
                    value.decode("utf-8", "surrogateescape")))  # fmt: skip
        pos = rec_end
    return out


def _int_value(pax: dict[str, str], key: str) -> int:
    try:
        return int(pax[key])
    except ValueError:
        raise _damaged(f"bad pax {key} {pax[key]!r}") from None


class TarReader:
    """Iterate members of the tar stream `f`; read contents with open()."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.global_pax: dict[str, str] = {}
        self._left = 0  # bytes of the current member's data (and padding) not yet consumed
        self._buf = b""  # read ahead of the current position
        self._off = 0
        self.ended = False  # an end-of-archive block was seen

    # -- raw reads -----------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        """n bytes (fewer only at the end of the stream). Small reads come from a read-ahead
        buffer: one read of the stream serves the headers and contents of many small files."""
        buf, off = self._buf, self._off
        if off + n <= len(buf):
            self._off = off + n
            return buf[off : off + n]
        parts = [buf[off:]]
        got = len(buf) - off
        self._buf, self._off = b"", 0
        while got < n:
            want = n - got
            more = self.f.read(want if want >= _READ_AHEAD else _READ_AHEAD)
            if not more:
                break
            if len(more) > want:
                self._buf, self._off = more, want
                more = more[:want]
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n > 0:
            data = self._read(min(n, _CHUNK))
            if not data:
                raise _damaged("archive ends inside an entry")
            n -= len(data)

    def drain(self) -> None:
        """Read the stream to its end (what follows the end-of-archive blocks is hashed too)."""
        self._buf, self._off = b"", 0
        while self.f.read(_CHUNK):
            pass

    def _meta(self, size: int, what: str) -> bytes:
        """The data of a pax header, long name or sparse map (small; padded to blocks)."""
        if size < 0 or size > MAX_META:
            raise _damaged(f"{what} of {size} bytes")
        padded = -(-size // BLOCK) * BLOCK
        data = self._read(padded)
        if len(data) < padded:
            raise _damaged(f"archive ends inside a {what}")
        return data[:size]

    # -- members -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[TarMember]:
        while True:
            if self._left:
                self._skip(self._left)
                self._left = 0
            m = self._next()
            if m is None:
                return
            yield m

    def _next(self) -> TarMember | None:
        pax: dict[str, str] = {}
        sparse00: list[int] = []  # GNU sparse 0.0: offset, numbytes, offset, ...
        longname = longlink = None
        while True:
            buf = self._read(BLOCK)
            if not buf:
                return None  # a stream that stops at a member boundary (tarfile accepts it)
            if len(buf) < BLOCK:
                raise _damaged("archive ends inside a header")
            if buf == _ZERO_BLOCK:
                self.ended = True
                return None
            chksum = _num(buf[148:156])
            unsigned = sum(buf) - sum(buf[148:156]) + 256  # the field counts as 8 spaces
            if chksum != unsigned:
                # Some old tars summed signed chars.
                high = sum(1 for b in buf[:148] if b > 127) + sum(1 for b in buf[156:] if b > 127)
                if chksum != unsigned - 256 * high:
                    raise _damaged("bad header checksum")
            typ = buf[156:157]
            size = _num(buf[124:136])
            if typ == b"x":
                for key, value in _pax_records(self._meta(size, "pax header")):
                    if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                        sparse00.append(_int_value({key: value}, key))
                    else:
                        pax[key] = value
                continue
            if typ == b"g":
                self.global_pax.update(_pax_records(self._meta(size, "pax global header")))
                continue
            if typ == b"L":
                longname = _nts(self._meta(size, "long name"))
                continue
            if typ == b"K":
                longlink = _nts(self._meta(size, "long link name"))
                continue
            return self._member(buf, typ, size, {**self.global_pax, **pax}, sparse00,
                                longname, longlink)  # fmt: skip

    def _member(self, buf: bytes, typ: bytes, size: int, pax: dict[str, str],
                sparse00: list[int], longname: str | None,
                longlink: str | None) -> TarMember:  # fmt: skip
        m = TarMember()
        magic = buf[257:265]
        name = _nts(buf[0:100])
        if magic == _POSIX_MAGIC and buf[345] != 0:
            name = _nts(buf[345:500]) + "/" + name
        m.name = longname if longname is not None else name
        m.linkname = longlink if longlink is not None else _nts(buf[157:257])
        m.mode = _num(buf[100:108])
        m.uid = _num(buf[108:116])
        m.gid = _num(buf[116:124])
        m.mtime = _num(buf[136:148])
        m.devmajor = _num(buf[329:337]) if buf[329] else 0
        m.devminor = _num(buf[337:345]) if buf[337] else 0
        if typ == AREGTYPE and m.name.endswith("/"):
            typ = DIRTYPE  # v7 tars mark directories by the slash only
        elif typ == GNU_DUMPDIR:
            typ = DIRTYPE  # its data (a listing of names) is skipped below
        m.type = typ
        m.pax_headers = pax
        if pax:
            if "path" in pax:
                m.name = pax["path"]
            if "linkpath" in pax:
                m.linkname = pax["linkpath"]
            for key in ("size", "uid", "gid"):
                if key in pax:
                    value = _int_value(pax, key)
                    if key == "size":
                        size = value
                    else:
                        setattr(m, key, value)
        if size < 0:
            raise _damaged(f"negative size {size}")
        m.size = m.data_size = size
        has_data = typ in _REG_TYPES or typ == GNU_DUMPDIR or typ not in (
            LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE)  # fmt: skip
        if typ == GNU_SPARSE:
            self._gnu_sparse(m, buf)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or sparse00:
            self._pax_sparse(m, pax, sparse00)
        if has_data:
            self._left = -(-m.data_size // BLOCK) * BLOCK
        return m

    def _gnu_sparse(self, m: TarMember, buf: bytes) -> None:
        """Old GNU sparse: a map in the header (and extension blocks), real size at 483."""
        pairs = []
        block, start, count, ext_at = buf, 386, 4, 482
        while True:
            for i in range(count):
                off = start + 24 * i
                if block[off] == 0:
                    break
                pairs.append((_num(block[off : off + 12]), _num(block[off + 12 : off + 24])))
            if not block[ext_at]:
                break
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                raise _damaged("archive ends inside a sparse map")
            if len(pairs) * 24 > MAX_META:
                raise _damaged("sparse map too long")
            start, count, ext_at = 0, 21, 504
        m.sparse = pairs
        m.size = _num(buf[483:495])

    def _pax_sparse(self, m: TarMember, pax: dict[str, str], sparse00: list[int]) -> None:
        if pax.get("GNU.sparse.major") == "1" and pax.get("GNU.sparse.minor") == "0":
            # 1.0: the map is text at the start of the data, padded to whole blocks.
            m.size = _int_value(pax, "GNU.sparse.realsize")
            numbers, used = self._sparse_map_10()
            m.data_size -= used
            m.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))
        elif "GNU.sparse.map" in pax:  # 0.1
            m.size = _int_value(pax, "GNU.sparse.size")
            try:
                numbers = [int(x) for x in pax["GNU.sparse.map"].split(",") if x]
            except ValueError:
                raise _damaged("bad GNU.sparse.map") from None
            if len(numbers) % 2:
                raise _damaged("odd GNU.sparse.map")
            m.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))
        elif sparse00:  # 0.0
            if len(sparse00) % 2:
                raise _damaged("unpaired GNU.sparse.offset/numbytes")
            m.size = _int_value(pax, "GNU.sparse.size")
            m.sparse = list(zip(sparse00[::2], sparse00[1::2], strict=True))
        else:
            raise _damaged("unsupported GNU sparse version "
                           f"{pax.get('GNU.sparse.major')}.{pax.get('GNU.sparse.minor')}")
        if "GNU.sparse.name" in pax:
            m.name = pax["GNU.sparse.name"]
        m.type = GNU_SPARSE

    def _sparse_map_10(self) -> tuple[list[int], int]:
        text = b""
        used = 0
        while True:
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                raise _damaged("archive ends inside a sparse map")
            used += BLOCK
            text += block
            lines = text.split(b"\n")
            try:
                count = int(lines[0])
            except ValueError:
                raise _damaged("bad sparse map") from None
            if count < 0 or count * 48 > MAX_META:
                raise _damaged("bad sparse map size")
            if len(lines) - 1 >= 1 + 2 * count:
                try:
                    numbers = [int(x) for x in lines[1 : 1 + 2 * count]]
                except ValueError:
                    raise _damaged("bad sparse map") from None
                return numbers, used

    # -- contents ------------------------------------------------------------------------------

    def open(self, m: TarMember) -> _Content | _SparseContent:
        """The content of the member just yielded (m.size bytes, holes of sparse files as zeros)."""
        if m.sparse is not None:
            return _SparseContent(self, m)
        return _Content(self, m.size)


class _Content:
    """The bytes of a plain member, straight from the stream."""

    def __init__(self, reader: TarReader, size: int) -> None:
        self.r = reader
        self.left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        data = self.r._read(n)
        if len(data) < n:
            raise _damaged("archive ends inside a file")
        self.left -= n
        self.r._left -= n
        return data

    def close(self) -> None:
        pass


class _SparseContent:
    """A sparse member read as its full size: zeros where the map has holes."""

    def __init__(self, reader: TarReader, m: TarMember) -> None:
        self.r = reader
        self.size = m.size
        self.pos = 0
        self.data = _Content(reader, m.data_size)
        segments = []
        end = 0
        total = 0
        for off, length in m.sparse or ():
            if off < end or length < 0 or off + length > m.size:
                raise _damaged("sparse map out of order or out of range")
            segments.append((off, length))
            end = off + length
            total += length
        if total != m.data_size:
            raise _damaged(f"sparse map names {total} bytes of data, the entry has {m.data_size}")
        self.segments = segments
        self.seg = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.size - self.pos:
            n = self.size - self.pos
        parts = []
        while n > 0:
            if self.seg < len(self.segments):
                off, length = self.segments[self.seg]
                if self.pos < off:  # a hole
                    k = min(n, off - self.pos)
                    parts.append(bytes(k))
                elif self.pos < off + length:
                    k = min(n, off + length - self.pos)
                    parts.append(self.data.read(k))
                else:
                    self.seg += 1
                    continue
            else:  # the hole after the last segment
                k = n
                parts.append(bytes(k))
            self.pos += k
            n -= k
        return b"".join(parts)

    def close(self) -> None:
        pass
