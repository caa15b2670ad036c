"""What every module of the GGUF exporter shares: the quant type names, the llama-cpp-python
check, the tokenizer files copied beside a model, progress bars and write errors.

A leaf: it imports no sibling, so any module of the package may import it without a cycle.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from edgeqlora.errors import ConfigError, DiskFullError, ExportError, MissingDependencyError

# Written tensor by tensor with gguf's numpy quantizers; no llama.cpp needed.
DIRECT_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# llama.cpp's K-quant mixes: name -> llama_cpp ftype constant (its type choice and kernels).
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M"}
QUANTS = DIRECT_QUANTS + tuple(K_QUANTS)
DEFAULT_QUANT = "q4_k_m"
ADAPTER_QUANTS = ("f32", "f16", "q8_0")
LLAMA_CPP_INSTALL = "pip install 'edgeqlora[gguf]'  (or: pip install llama-cpp-python)"


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def check_quant(quant: str, adapter_only: bool = False) -> str:
    """Normalise and validate ``quant`` before any work starts."""
    q = quant.strip().lower()
    if q not in QUANTS:
        raise ConfigError(f"quant={quant!r} is not a GGUF quant type; valid: {', '.join(QUANTS)}")
    if q in K_QUANTS and not has_llama_cpp():
        raise MissingDependencyError(
            f"quant={q} (a K-quant) needs llama.cpp's quantizer from llama-cpp-python, which is "
            f"not installed: {LLAMA_CPP_INSTALL}; or pick one written without it: "
            f"{', '.join(DIRECT_QUANTS)}")
    return q


def check_adapter_quant(quant: str) -> str:
    q = quant.strip().lower()
    if q not in ADAPTER_QUANTS:
        raise ConfigError(f"adapter quant={quant!r} is not one of {', '.join(ADAPTER_QUANTS)}")
    return q


def progress(items, what: str, enabled: bool):
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=what, transient=True)


def write_error(path: Path, exc: OSError) -> ExportError:
    # numpy's tofile reports a short write as a bare OSError ("117504 requested and 113024
    # written") with no errno: on a full disk that is the disk being full.
    if exc.errno == errno.ENOSPC or (exc.errno is None and disk_full(Path(path))):
        return DiskFullError(f"disk full while writing {path}; free space on that disk and run "
                           "the export again (nothing was kept)")
    return ExportError(f"cannot write {path}: {exc.strerror or exc}")


def disk_full(path: Path) -> bool:
    """Whether the disk holding ``path`` is (nearly) full: llama.cpp's quantizer reports a
    failed write only as a return code."""
    try:
        st = os.statvfs(path.parent)
        return st.f_bavail * st.f_frsize < 16 << 20
    except OSError:
        return False


# Packed long arrays by id() of the list given: (a copy of it, its element type, the bytes).
# The vocabulary's writer calls are replayed with the same lists (metadata.add_vocab), so the
# next GGUF of the same tokenizer reuses the bytes; the copy guards against a list changed in
# place or an id reused.
_packed: dict[int, tuple[list, int, bytes]] = {}
_PACKED_MIN, _PACKED_KEEP = 4096, 8


def gguf_writer(path, arch_name: str):
    """A ``gguf.GGUFWriter`` whose metadata arrays (the vocabulary's 49k tokens, types and
    merges) are packed in one go, and long ones once per content: gguf packs them element by
    element through a generic function (~0.2 s a file, paid for every GGUF written or
    predicted). Hand-written because gguf has no faster path; the bytes are gguf's own
    (tests/test_export_bytes.py pins whole files), and anything but a plain little-endian list
    of strings or numbers goes to gguf."""
    import struct

    import gguf

    T = gguf.GGUFValueType

    class _Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype != T.ARRAY or not isinstance(val, list) or not val or \
                    self.endianess != gguf.GGUFEndian.LITTLE:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            kind = sub_type if sub_type is not None else T.get_type(val[0])
            body = self._pack_list(val, kind)
            if body is None:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = struct.pack("<I", vtype) if add_vtype else b""
            return head + struct.pack("<IQ", kind, len(val)) + body

        def _pack_list(self, val: list, kind) -> bytes | None:
            kept = _packed.get(id(val))
            if kept is not None and kept[1] == kind and kept[0] == val:
                return kept[2]
            first = type(val[0])
            if kind == T.STRING and all(type(v) is str for v in val):
                data = [v.encode("utf-8") for v in val]
                body = b"".join([b for d in data for b in (len(d).to_bytes(8, "little"), d)])
            elif kind in (T.INT32, T.FLOAT32) and first is not bool and \
                    all(type(v) is first for v in val):
                body = struct.pack(f"<{len(val)}{self._simple_value_packing[kind]}", *val)
            else:
                return None
            if len(val) >= _PACKED_MIN:
                while len(_packed) >= _PACKED_KEEP:
                    _packed.pop(next(iter(_packed)))
                _packed[id(val)] = (list(val), kind, body)
            return body

    return _Writer(path, arch_name)

