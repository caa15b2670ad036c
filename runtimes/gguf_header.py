"""One reader for GGUF headers: metadata and the tensor table, without the tensor data.

Used by the runtimes, the exporters' read-back checks and the device fit check. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from edgeqlora.errors import InputError, MissingDependencyError


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    type: str
    ne1: int  # rows (ggml ne[1]): the repack interleave must divide it
    n_elements: int
    n_bytes: int
    # ggml dims (ne[0] first: the row length) and the absolute file offset of the tensor's data.
    dims: tuple[int, ...] = ()
    offset: int = 0


# GGUF metadata value types -> struct format (gguf.GGUFValueType numbering).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this (token lists, merges, scores) are skipped, only their length kept.
_MAX_ARRAY = 4096


def read_gguf_header(path: str | Path, error: type[Exception] = InputError,
                     whole_arrays: bool = False, types: dict[str, tuple] | None = None
                     ) -> tuple[dict[str, Any], list[Tensor]]:
    """Metadata and tensor table of a GGUF file (each tensor's type, ggml dims, sizes and data
    offset), without reading the tensor data. Arrays longer than 4,096 entries (the vocabulary)
    are skipped, their length kept, unless ``whole_arrays`` (then every value is read: a list,
    as ``GGUFReader``'s ``contents()`` gives it; 0.1 s for the 49k-entry vocabulary). A
    ``types`` dict is filled with each key's gguf value type and, for an array, its element
    type (else None), as numbers (``gguf.GGUFValueType``).

    Hand-written because ``gguf.GGUFReader`` builds a numpy view per array element: 9.5 s for
    the 135M model's 98k tokenizer strings on this machine, minutes on a Pi. This reads the
    same layout (llama.cpp ``docs/gguf.md``, v2/v3, little-endian) with ``gguf``'s own type
    numbers and block sizes, skips long arrays keeping their length, and is checked against
    GGUFReader in tests/test_devices.py. Errors are raised as ``error`` (the fit check passes
    DeviceError).
    """
    import mmap
    import struct

    from edgeqlora.errors import require

    gguf = require("gguf", "gguf", "Reading a GGUF file's header")
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror})") from None
    with f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise error(f"{path} is empty, not a GGUF file") from None
    pos = 0
    structs: dict[str, struct.Struct] = {}
    u64 = struct.Struct("<Q").unpack_from

    def take(fmt: str):
        nonlocal pos
        packed = structs.get(fmt) or structs.setdefault(fmt, struct.Struct("<" + fmt))
        value = packed.unpack_from(buf, pos)
        pos += packed.size
        return value[0] if len(value) == 1 else value

    def strings(count: int) -> list[str]:
        """A whole array of strings in one loop (the 49k tokens and merges: half the time of
        a value() call per entry)."""
        nonlocal pos
        out, at = [], pos
        append = out.append
        for _ in range(count):
            n = u64(buf, at)[0]
            at += 8
            raw = buf[at:at + n]
            if len(raw) != n:
                raise struct.error("string runs past the end of the file")
            at += n
            append(raw.decode("utf-8", errors="replace"))
        pos = at
        return out

    def string() -> str:
        nonlocal pos
        n = take("Q")
        raw = buf[pos:pos + n]
        if len(raw) != n:
            raise struct.error("string runs past the end of the file")
        pos += n
        return raw.decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            itype, count = take("I"), take("Q")
            if whole_arrays and itype in _SCALARS:
                fmt = "<" + _SCALARS[itype]
                width = struct.calcsize(fmt)
                items = [v[0] for v in struct.iter_unpack(fmt, buf[pos:pos + count * width])]
                if len(items) != count:
                    raise struct.error("array runs past the end of the file")
                pos += count * width
                return items
            if count > _MAX_ARRAY and not whole_arrays:
                if itype in _SCALARS:
                    pos += count * struct.calcsize("<" + _SCALARS[itype])
                elif itype == _STRING:  # the token strings: lengths only, in a tight loop
                    for _ in range(count):
                        pos += 8 + u64(buf, pos)[0]
                    if pos > len(buf):
                        raise struct.error("array runs past the end of the file")
                else:
                    for _ in range(count):
                        value(itype)
                return _Skipped(count)
            if itype == _STRING:
                return strings(count)
            return [value(itype) for _ in range(count)]
        raise struct.error(f"unknown metadata value type {vtype}")

    try:
        if take("4s") != b"GGUF":
            raise error(f"{path} is not a GGUF file (first bytes are not 'GGUF')")
        version = take("I")
        if version not in (2, 3):
            raise error(f"{path} is GGUF version {version}; this reads versions 2 and 3 "
                              "(a big-endian file reads as a huge version)")
        n_tensors, n_kv = take("Q"), take("Q")
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            vtype = take("I")
            if types is not None:
                types[key] = (vtype, struct.unpack_from("<I", buf, pos)[0]
                              if vtype == _ARRAY else None)
            kv[key] = value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            ttype = take("I")
            offset = take("Q")  # relative to the data section
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise error(f"{path}: tensor {name} has ggml type {ttype}, unknown to "
                                  "this gguf package; upgrade it (pip install -U gguf)") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n = math.prod(dims)
            tensors.append(Tensor(name, qtype.name, dims[1] if len(dims) > 1 else 1, n,
                                  n // block * size, tuple(dims), offset))
        # The data section starts at the next multiple of the alignment (docs/gguf.md).
        align = kv.get("general.alignment", 32)
        start = -(-pos // align) * align
        tensors = [dataclasses.replace(t, offset=start + t.offset) for t in tensors]
        size = len(buf)
    except (struct.error, IndexError, OverflowError, MemoryError) as exc:
        raise error(f"{path} is truncated or not a valid GGUF file ({exc})") from None
    finally:
        buf.close()
    end = max((t.offset + t.n_bytes for t in tensors), default=0)
    if end > size:
        # The header alone reads fine when only the tensor data was cut off (a partial copy).
        raise error(f"{path} is truncated: its tensor data ends at byte {end}, the file has "
                    f"{size} bytes; copy or export it again")
    return kv, tensors


class _Skipped(int):
    """The length of a long metadata array that was skipped."""


def trained_context(path: Path) -> int | None:
    """``<arch>.context_length`` from the header (milliseconds: the vocabulary is skipped), or
    None where the header does not say; llama.cpp's own reading still decides after loading."""
    try:
        fields, _ = read_gguf_header(path)
    except (InputError, MissingDependencyError):
        return None  # llama.cpp reports what is wrong with the file
    value = fields.get(f"{fields.get('general.architecture')}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else None
