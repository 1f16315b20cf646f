"""The two rtnetlink questions that map a host-side veth to a pod's network namespace.

A dump of this namespace's links says, for each veth, the namespace id (nsid) of its peer's namespace;
RTM_GETNSID says which nsid a process's namespace has here. Both are plain netlink requests, so they are
made with the socket module rather than through a library whose API changes between versions.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTM_GETLINK = 18
RTM_GETNSID = 90
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
IFLA_LINK_NETNSID = 37
NETNSA_NSID = 1
NETNSA_PID = 2
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_IFINFOMSG = struct.Struct("=BxHiII")
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class Link:
    index: int
    peer_nsid: int | None  # IFLA_LINK_NETNSID: the namespace (as numbered here) of a veth's peer


def _attributes(data: bytes, offset: int) -> dict[int, bytes]:
    found = {}
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            break
        found[kind & 0x3FFF] = data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _request(message_type: int, flags: int, payload: bytes) -> list[bytes]:
    """Sends one request; returns the bodies of the answers (raises OSError on a netlink error)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(_HEADER.pack(_HEADER.size + len(payload), message_type, flags, 1, 0) + payload)
        bodies = []
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return bodies
                if kind == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                    if error:
                        raise OSError(error, os.strerror(error))
                    return bodies
                bodies.append(data[offset + _HEADER.size : offset + length])
                offset += (length + 3) & ~3
            if not flags & NLM_F_DUMP:
                return bodies


def links() -> list[Link]:
    """The links of the caller's network namespace."""
    found = []
    for body in _request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        index = _IFINFOMSG.unpack_from(body)[2]
        nsid = _attributes(body, _IFINFOMSG.size).get(IFLA_LINK_NETNSID)
        found.append(Link(index, struct.unpack("=i", nsid)[0] if nsid is not None else None))
    return found


def nsid_of_process(pid: int) -> int | None:
    """The id the caller's namespace gives the network namespace of `pid` (None when it has none)."""
    payload = struct.pack("=Bxxx", socket.AF_UNSPEC) + _ATTR.pack(8, NETNSA_PID) + struct.pack("=I", pid)
    for body in _request(RTM_GETNSID, NLM_F_REQUEST, payload):
        value = _attributes(body, 4).get(NETNSA_NSID)
        if value is not None:
            nsid = struct.unpack("=i", value)[0]
            return nsid if nsid >= 0 else None
    return None
