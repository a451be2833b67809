"""Tar I/O for WebDataset shards: a streaming sample reader and a sharded writer.

The reader parses tar headers itself instead of going through `tarfile`: on small samples (a 4x32x32
latent, a label, a caption) `tarfile` caps a process near 2,000 samples/s while this reads well
over 40,000. It understands ustar, GNU long names and pax `path` records (tars written by
`webdataset.TarWriter`, GNU tar or Python's tarfile), and it never raises on a damaged shard: a
sample cut by a truncation is returned as an error record, so one bad shard costs its damaged
samples, not the whole stream.

Samples follow the WebDataset convention: members `KEY.EXT` in a row form one sample
{"__key__": KEY, EXT: bytes, ...}, KEY being the path up to the first dot of the file name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

from harness.data.errors import DataError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_DATA_TYPES = (b"0", b"\0", b"7")
# A header claiming more is damaged (a sample of 1 GiB is not a sample): it is reported, never allocated.
MAX_MEMBER = 1 << 30
_CHUNK = 1 << 24  # members above this are read in pieces, so a size larger than the stream costs no memory
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ShardReadError(Exception):
    """The tar stream is damaged; `member` names the member being read when known."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for huge values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def iter_members(stream: BinaryIO, *, check_headers: bool = False) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream. Raises ShardReadError when the stream is
    truncated or a header is unreadable (header checksums are checked with check_headers=True).
    This is the loader's innermost loop: keep it lean."""
    read = stream.read
    long_name = None
    pax_path = None
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            if not header:  # a shard cut exactly between two members looks whole but for this
                raise ShardReadError("truncated shard: it ends without the end-of-archive marker")
            raise ShardReadError(f"truncated tar header ({len(header)} of {BLOCK} bytes)")
        if header[0] == 0:
            if header == _ZERO_BLOCK:
                return  # end-of-archive marker
            raise ShardReadError("invalid tar header (empty member name)")
        if check_headers and not _checksum_ok(header):
            raise ShardReadError("tar header checksum mismatch")
        end = header.find(0, 0, 100)
        name = header[: end if end >= 0 else 100].decode("utf-8", "surrogateescape")
        if header[345] and header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        try:
            size = int(header[124:135], 8)  # the usual 11 octal digits + NUL
        except ValueError:
            try:
                size = _octal(header[124:136])
            except ValueError:
                raise ShardReadError(f"invalid tar header (size field of {name!r})", name) from None
        kind = header[156:157]
        if (pax_path or long_name) and kind in _DATA_TYPES:
            name = pax_path or long_name
        if not 0 <= size <= MAX_MEMBER:
            raise ShardReadError(f"invalid tar header: member {name!r} claims {size} bytes (at most "
                                 f"{MAX_MEMBER >> 20} MiB)", name if kind in _DATA_TYPES else None)
        padded = size + (-size % BLOCK)
        blob = read(padded) if padded <= _CHUNK else _read_large(read, padded)
        if len(blob) < size:
            raise ShardReadError(f"truncated member {name!r} ({len(blob)} of {size} bytes)",
                                 name if kind in _DATA_TYPES else None)
        if kind in _DATA_TYPES:
            pax_path = long_name = None
            yield name, (blob if padded == size else blob[:size])
        elif kind == b"L":  # GNU long name for the next member
            long_name = blob[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header for the next member
            pax_path = _pax_path(blob[:size]) or pax_path
        # g (global pax), directories, links, devices: nothing to read


def _read_large(read, size: int) -> bytes:
    """Up to `size` bytes, read in pieces: only what the stream really holds is allocated."""
    parts = []
    while size > 0:
        part = read(min(size, _CHUNK))
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _pax_path(data: bytes) -> str | None:
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:  # a damaged record: stepping by it would never end
            break
        record = data[space + 1: pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def split_name(name: str) -> tuple[str, str] | None:
    """'dir/KEY.latent.npy' -> ('dir/KEY', 'latent.npy'); None for names without an extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:].lower()


def iter_samples(stream: BinaryIO, *, check_headers: bool = False) -> Iterator[dict]:
    """Samples of a tar stream, in order. A damaged stream ends with one error record
    {"__key__": KEY or None, "__error__": message}: KEY is the sample the damage cut (it is not
    returned otherwise); None when the damage fell between members (the samples it took are unknown).
    Meta members (file names starting with "__") are skipped."""
    key = None
    sample = None
    try:
        for name, data in iter_members(stream, check_headers=check_headers):
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot < 0 or name.startswith("__", slash + 1):
                continue
            k, ext = name[:dot], name[dot + 1:]
            if not ext.islower():
                ext = ext.lower()
            if k != key:
                if sample is not None:
                    yield sample
                sample, key = {"__key__": k}, k
            if ext in sample:
                sample["__error__"] = f"duplicate member {name!r}"
            sample[ext] = data
    except (ShardReadError, OSError, ValueError) as err:
        member = getattr(err, "member", None)
        parts = split_name(member) if member else None
        if parts is not None and parts[0] == key:
            yield {"__key__": key, "__error__": str(err)}
            return
        if sample is not None:
            yield sample
        yield {"__key__": parts[0] if parts else None, "__error__": str(err)}
        return
    if sample is not None:
        yield sample


class _HashingWriter:
    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.bytes += len(data)


class ShardWriter:
    """Writes samples to NAME-000000.tar, NAME-000001.tar, ... in `folder`, at most `shard_size`
    samples per shard. A shard is written as `.tar.partial` and renamed when complete, so a crash
    never leaves a truncated `.tar` behind. Headers are plain ustar with a fixed mtime, so the same
    samples give byte-identical shards. `close()` returns [{name, count, bytes, sha256}] per shard.
    A full disk removes the partial shard and raises DataError naming `where` (default: `folder`;
    a caller writing into a staging folder names the folder the user gave)."""

    def __init__(self, folder: str | os.PathLike, name: str, shard_size: int, mtime: int = 0,
                 *, where: str | os.PathLike | None = None):
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.folder, self.name, self.shard_size, self.mtime = Path(folder), name, shard_size, mtime
        self.where = str(where if where is not None else folder)
        self.shards: list[dict] = []
        self._out: _HashingWriter | None = None
        self._count = 0

    def shard_name(self, index: int) -> str:
        return f"{self.name}-{index:06d}.tar"

    def _header(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self.mtime, 0o444
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} must not contain a dot")
        try:
            self._write(key, members)
        except OSError as err:
            self._failed(err)

    def _write(self, key: str, members: dict[str, bytes]) -> None:
        if self._out is None:
            self._out = _HashingWriter(self.folder / (self.shard_name(len(self.shards)) + ".partial"))
            self._count = 0
        out = self._out
        for ext in sorted(members):
            data = members[ext]
            out.write(self._header(f"{key}.{ext}", len(data)))
            out.write(data)
            if len(data) % BLOCK:
                out.write(bytes(BLOCK - len(data) % BLOCK))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        out = self._out  # stays in self._out until renamed, so that a failure here is aborted
        out.write(bytes(2 * BLOCK))  # end-of-archive marker
        out.file.close()  # may be where a full disk shows (the last buffer)
        name = self.shard_name(len(self.shards))
        os.replace(self.folder / (name + ".partial"), self.folder / name)
        self._out = None
        self.shards.append({"name": name, "count": self._count, "bytes": out.bytes,
                            "sha256": out.hash.hexdigest()})

    def close(self) -> list[dict]:
        if self._out is not None:
            try:
                self._finish()
            except OSError as err:
                self._failed(err)
        return self.shards

    def abort(self) -> None:
        """Remove the shard being written (after an error)."""
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.file.close()
            except OSError:  # flushing the buffer fails again on a full disk; the file goes anyway
                pass
            Path(out.file.name).unlink(missing_ok=True)

    def _failed(self, err: OSError):
        """Remove the partial shard; a full disk becomes one line naming the folder and its free space."""
        name, free = self.shard_name(len(self.shards)), _free_bytes(self.folder)  # free: before the clean-up
        self.abort()
        if err.errno not in _DISK_FULL:
            raise err
        written = sum(s["bytes"] for s in self.shards)
        raise DataError(f"{self.where}: disk full while writing {name} ({_size(free)} free, {_size(written)} "
                        "in finished shards); free some space or write elsewhere") from None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
