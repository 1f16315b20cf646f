"""A reader of the kernel's BTF (/sys/kernel/btf/vmlinux): structure member offsets and enum values.

The probes read kernel structures only through offsets resolved here from the running kernel, never from
compile-time headers (the installed headers may belong to another kernel version), and kernel names
(drop reasons, TCP states) come from the kernel's own enums.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow the 12-byte common header, as (fixed, per vlen entry).
_TRAILER = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BtfError(ValueError):
    """BTF that is missing, malformed, or lacks a type or member flowscope needs."""


@dataclass(frozen=True)
class Member:
    offset: int  # bytes from the start of the outer structure
    size: int  # bytes (0 for a bitfield)
    bit_offset: int  # bits from the start of the outer structure
    bitfield_size: int  # 0 when not a bitfield


class Btf:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF data is too short to hold a header.")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError("not BTF data (bad magic).")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._strings_start = hdr_len + str_off
        self._strings_end = self._strings_start + str_len
        # Per type id (index 0 is "void"): kind, kind_flag, vlen, name offset, size-or-type, byte offset.
        self._kind = [0]
        self._kind_flag = [False]
        self._vlen = [0]
        self._name_off = [0]
        self._size_type = [0]
        self._pos = [0]
        self._by_name: dict[str, list[int]] | None = None
        pos, end = self._types_start, self._types_start + type_len
        unpack = struct.Struct("<III").unpack_from
        while pos < end:
            name_off, info, size_type = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            self._kind.append(kind)
            self._kind_flag.append(bool(info >> 31))
            self._vlen.append(vlen)
            self._name_off.append(name_off)
            self._size_type.append(size_type)
            self._pos.append(pos + 12)
            fixed, per_entry = _TRAILER.get(kind, (0, 0))
            pos += 12 + fixed + per_entry * vlen
        if pos != end:
            raise BtfError("BTF type section is malformed.")

    @classmethod
    def load(cls, path: Path = VMLINUX_BTF) -> Btf:
        try:
            return cls(Path(path).read_bytes())
        except OSError as err:
            raise BtfError(f"cannot read BTF at {path}: {err.strerror}.") from None

    def _name(self, offset: int) -> str:
        start = self._strings_start + offset
        stop = self._data.index(b"\0", start, self._strings_end)
        return self._data[start:stop].decode()

    def name(self, type_id: int) -> str:
        return self._name(self._name_off[type_id])

    def _index(self) -> dict[str, list[int]]:
        if self._by_name is None:
            # Every string of the section by its offset, split in one pass (a lookup per type costs seconds
            # in an emulated guest: vmlinux has ~100k types).
            strings = self._data[self._strings_start : self._strings_end].split(b"\0")
            offsets = itertools.accumulate((len(text) + 1 for text in strings), initial=0)
            by_offset = dict(zip(offsets, strings, strict=False))
            index: dict[str, list[int]] = {}
            for type_id, offset in enumerate(self._name_off):
                if offset:
                    text = by_offset.get(offset)  # None: an offset into another string (a shared tail)
                    name = text.decode() if text is not None else self._name(offset)
                    index.setdefault(name, []).append(type_id)
            self._by_name = index
        return self._by_name

    def find(self, name: str, kinds: tuple[int, ...]) -> int:
        for type_id in self._index().get(name, []):
            if self._kind[type_id] in kinds and self._kind[type_id] != KIND_FWD:
                return type_id
        raise BtfError(f"the running kernel's BTF has no {name!r}.")

    def has(self, name: str, kinds: tuple[int, ...]) -> bool:
        return any(self._kind[t] in kinds for t in self._index().get(name, []))

    def _resolve(self, type_id: int) -> int:
        while self._kind[type_id] in _MODIFIERS:
            type_id = self._size_type[type_id]
        return type_id

    def size_of(self, type_id: int) -> int:
        type_id = self._resolve(type_id)
        kind = self._kind[type_id]
        if kind == KIND_PTR:
            return 8
        if kind == KIND_ARRAY:
            elem, _index_type, count = struct.unpack_from("<III", self._data, self._pos[type_id])
            return self.size_of(elem) * count
        return self._size_type[type_id]

    def _members(self, type_id: int) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of each member of a struct or union."""
        pos, flagged = self._pos[type_id], self._kind_flag[type_id]
        members = []
        for i in range(self._vlen[type_id]):
            name_off, member_type, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits, size = (offset & 0xFFFFFF, offset >> 24) if flagged else (offset, 0)
            members.append((self._name(name_off) if name_off else "", member_type, bits, size))
        return members

    def _find_member(self, type_id: int, name: str) -> tuple[int, int, int] | None:
        """Searches named members, then anonymous structs/unions, as C name lookup does."""
        for member_name, member_type, bits, size in self._members(type_id):
            if member_name == name:
                return member_type, bits, size
        for member_name, member_type, bits, _size in self._members(type_id):
            inner = self._resolve(member_type)
            if not member_name and self._kind[inner] in (KIND_STRUCT, KIND_UNION):
                found = self._find_member(inner, name)
                if found is not None:
                    return found[0], bits + found[1], found[2]
        return None

    def member(self, struct_name: str, path: str) -> Member:
        """Offset of `path` (dotted through embedded structures, e.g. "nd_net.net") in `struct struct_name`."""
        type_id = self.find(struct_name, (KIND_STRUCT, KIND_UNION))
        bit_offset, member_type, bitfield = 0, type_id, 0
        for part in path.split("."):
            outer = self._resolve(member_type)
            if self._kind[outer] not in (KIND_STRUCT, KIND_UNION):
                raise BtfError(f"{struct_name}.{path}: {part!r} is not inside a structure.")
            found = self._find_member(outer, part)
            if found is None:
                raise BtfError(f"the running kernel's struct {struct_name} has no member {path!r}.")
            member_type, bits, bitfield = found
            bit_offset += bits
        size = 0 if bitfield else self.size_of(member_type)
        return Member(bit_offset // 8, size, bit_offset, bitfield)

    def enum(self, name: str) -> dict[str, int]:
        """Values of `enum name` (or of the anonymous enum holding a constant `name`)."""
        index = self._index()
        candidates = [t for t in index.get(name, []) if self._kind[t] in (KIND_ENUM, KIND_ENUM64)]
        if candidates:
            return self._enum_values(candidates[0])
        for type_id in range(1, len(self._kind)):
            if self._kind[type_id] in (KIND_ENUM, KIND_ENUM64) and not self._name_off[type_id]:
                values = self._enum_values(type_id)
                if name in values:
                    return values
        raise BtfError(f"the running kernel's BTF has no enum {name!r}.")

    def _enum_values(self, type_id: int) -> dict[str, int]:
        pos, values = self._pos[type_id], {}
        signed = self._kind_flag[type_id]
        for i in range(self._vlen[type_id]):
            if self._kind[type_id] == KIND_ENUM:
                name_off, value = struct.unpack_from("<Ii" if signed else "<II", self._data, pos + 8 * i)
            else:
                name_off, low, high = struct.unpack_from("<III", self._data, pos + 12 * i)
                value = (high << 32) | low
            values[self._name(name_off)] = value
        return values

    def func_proto_params(self, typedef_name: str) -> list[str]:
        """Parameter type names of a function-pointer typedef such as btf_trace_kfree_skb, or of a kernel
        function such as sk_skb_reason_drop (kprobe argument positions)."""
        type_id = self.find(typedef_name, (KIND_TYPEDEF, KIND_FUNC))
        target = self._resolve(self._size_type[type_id])
        if self._kind[target] == KIND_PTR:
            target = self._resolve(self._size_type[target])
        if self._kind[target] != KIND_FUNC_PROTO:
            raise BtfError(f"{typedef_name} is not a function prototype.")
        params = []
        for i in range(self._vlen[target]):
            _name_off, param_type = struct.unpack_from("<II", self._data, self._pos[target] + 8 * i)
            params.append(self.type_name(param_type))
        return params

    def type_name(self, type_id: int) -> str:
        kind = self._kind[type_id]
        if type_id == 0:
            return "void"
        if kind == KIND_PTR:
            return self.type_name(self._size_type[type_id]) + " *"
        if kind in (KIND_CONST, KIND_VOLATILE, KIND_RESTRICT, KIND_TYPE_TAG):
            return self.type_name(self._size_type[type_id])
        prefix = {KIND_STRUCT: "struct ", KIND_UNION: "union ", KIND_ENUM: "enum ", KIND_ENUM64: "enum "}
        return prefix.get(kind, "") + (self.name(type_id) or "<anon>")
