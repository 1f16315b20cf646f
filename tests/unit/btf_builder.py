"""Builds small BTF blobs for tests: the same format the kernel exposes, with only the types a test needs."""

from __future__ import annotations

import struct

from flowscope.kernel.btf import (
    KIND_ENUM,
    KIND_FUNC_PROTO,
    KIND_INT,
    KIND_PTR,
    KIND_STRUCT,
    KIND_TYPEDEF,
    KIND_UNION,
)


class BtfBuilder:
    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def _name(self, name: str) -> int:
        if not name:
            return 0
        offset = len(self.strings)
        self.strings += name.encode() + b"\0"
        return offset

    def _add(self, blob: bytes) -> int:
        self.types.append(blob)
        return len(self.types)  # type ids start at 1

    def int(self, name: str, size: int) -> int:
        header = struct.pack("<III", self._name(name), KIND_INT << 24, size)
        return self._add(header + struct.pack("<I", size * 8))

    def ptr(self, target: int) -> int:
        return self._add(struct.pack("<III", 0, KIND_PTR << 24, target))

    def composite(self, name: str, size: int, members: list[tuple[str, int, int]], union: bool = False) -> int:
        """members: (name, type id, bit offset)."""
        kind = KIND_UNION if union else KIND_STRUCT
        blob = struct.pack("<III", self._name(name), kind << 24 | len(members), size)
        for member_name, member_type, bits in members:
            blob += struct.pack("<III", self._name(member_name), member_type, bits)
        return self._add(blob)

    def enum(self, name: str, values: dict[str, int]) -> int:
        blob = struct.pack("<III", self._name(name), KIND_ENUM << 24 | len(values), 4)
        for value_name, value in values.items():
            blob += struct.pack("<Ii", self._name(value_name), value)
        return self._add(blob)

    def func_proto(self, params: list[int]) -> int:
        blob = struct.pack("<III", 0, KIND_FUNC_PROTO << 24 | len(params), 0)
        for param in params:
            blob += struct.pack("<II", 0, param)
        return self._add(blob)

    def typedef(self, name: str, target: int) -> int:
        return self._add(struct.pack("<III", self._name(name), KIND_TYPEDEF << 24, target))

    def build(self) -> bytes:
        types = b"".join(self.types)
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)
