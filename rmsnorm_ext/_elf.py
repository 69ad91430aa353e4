"""The shared libraries an ELF shared object names (DT_NEEDED), read from its headers.

Used to tell whether _C links the C++ runtime as the shared libstdc++.so.6 or carries a
static copy of it (see setup.py `_shared_cxx_runtime`): with a static copy, error messages
that format numbers crashed the process on one machine instead of raising. Reads a few KB
of headers, no external tools (readelf is not always installed).
"""
import struct
from typing import List, Optional


def needed_libraries(path: str) -> Optional[List[str]]:
    """DT_NEEDED entries of a little-endian ELF64 file, in link order; None if it is not one
    or cannot be read."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", ident, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
            f.seek(phoff)
            phdrs = f.read(phentsize * phnum)
            loads, dynamic = [], None
            for i in range(phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", phdrs, i * phentsize)
                if p_type == 1:      # PT_LOAD: maps file offsets to addresses
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == 2:    # PT_DYNAMIC
                    dynamic = (p_offset, p_filesz)
            if dynamic is None:
                return []
            f.seek(dynamic[0])
            dyn = f.read(dynamic[1])
            needed, strtab = [], None
            for off in range(0, len(dyn) - 15, 16):
                tag, val = struct.unpack_from("<qQ", dyn, off)
                if tag == 0:         # DT_NULL
                    break
                if tag == 1:         # DT_NEEDED: an offset into the string table
                    needed.append(val)
                elif tag == 5:       # DT_STRTAB: an address
                    strtab = next((o + val - v for v, o, n in loads if v <= val < v + n), None)
            if strtab is None:
                return None
            names = []
            for off in needed:
                f.seek(strtab + off)
                names.append(f.read(256).split(b"\0", 1)[0].decode(errors="replace"))
            return names
    except (OSError, struct.error):
        return None


def cxx_runtime(path: str) -> str:
    """'shared' (links libstdc++.so.6 or libc++), 'static copy' (links neither: the C++
    runtime was linked into the file itself), or 'unknown'."""
    libs = needed_libraries(path)
    if libs is None:
        return "unknown"
    if any(n.startswith(("libstdc++.so", "libc++.so")) for n in libs):
        return "shared"
    return "static copy"
