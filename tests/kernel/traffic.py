"""Known traffic for kernel tests, run inside a lab namespace: `Netns.run(sys.executable, traffic.PATH, ...)`.

Standard library only. Senders print one JSON line saying what they sent (and, for echoes, what came back);
sinks print "ready" once bound, then run until they are stopped.

  udp-send  --src A --dst B --sport P --dport Q --size S --count N [--flows F] [--pps R] [--duration T]
            F flows use source ports P..P+F-1; the N datagrams of each flow are sent round-robin.
            --duration T: instead of N, send for T seconds (at R datagrams per second) and report the counts.
            SIGINT or SIGTERM stops it after the round under way (and it reports what it sent).
  udp-sink  ADDRESS PORT [PORT ...]
  tcp-sink  ADDRESS PORT          reads every connection to its end, then closes it
  tcp-send  --src A --sport P --dst B --dport Q --bytes N
            connects, sends N bytes, half-closes, waits for the peer to close
  icmp-echo --dst B --count N --size S    echo requests one at a time, each waiting for its reply
  raw-send  --proto P --dst B --sport P --dport Q --size S --count N
            IP packets of protocol P whose payload starts with the two ports (SCTP's layout)
  raw-sink  --proto P ADDRESS     takes protocol P packets, so the kernel sends no "unreachable" back
  eth-send  --ifname I --src-mac M --dst-mac M --src A --dst B --sport P --dport Q --size S --count N
            [--vlan ID [--vlan ID]]   whole UDP frames, with 802.1Q (or 802.1ad + 802.1Q) tags
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import time

PATH = os.path.abspath(__file__)
IPV6_HOPOPTS = 54
IP_RECVERR, IPV6_RECVERR = 11, 25  # <linux/in.h>, <linux/in6.h>; Python's socket module lacks them
# An ICMP error for an earlier datagram, reported by the next send on a socket with IP_RECVERR: the kernel
# clears it and sends nothing, so that datagram is sent again.
EARLIER_ICMP_ERRORS = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


def family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def report(**values: object) -> None:
    print(json.dumps(values), flush=True)


def ready() -> None:
    print("ready", flush=True)


def pace(sent: int, started: float, pps: float) -> None:
    if pps > 0:
        delay = started + sent / pps - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def udp_send(args: argparse.Namespace) -> None:
    sockets = []
    for offset in range(args.flows):
        sock = socket.socket(family(args.dst), socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        if args.hop_options:
            # A hop-by-hop header of 8 bytes (PadN only): exercises the probe's IPv6 extension-header walk.
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HOPOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
        # Without IP_RECVERR the kernel hides ENOBUFS from UDP senders (it counts Udp SndbufErrors and returns
        # success), so `refused` would always be 0 whatever the device did with the datagram.
        if family(args.dst) == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.bind((args.src, args.sport + offset))
        sockets.append(sock)
    payload = bytes(args.size)
    destination = (args.dst, args.dport)
    # SIGINT or SIGTERM ends the sending after the round under way, so every flow has sent as many.
    stop = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.append(True))
    started = time.monotonic()
    sent = refused = 0
    rounds = 0
    while not stop and (
        (rounds < args.count) if args.duration is None else (time.monotonic() - started < args.duration)
    ):
        for sock in sockets:
            pace(sent, started, args.pps)
            while True:
                try:
                    sock.sendto(payload, destination)
                    sent += 1
                except OSError as err:
                    if err.errno in EARLIER_ICMP_ERRORS:
                        continue
                    # ENOBUFS: a qdisc dropped it, or the veth peer's backlog was full (after tc and packet
                    # sockets saw the datagram); a retry would count twice. Reported, so a test can refuse it.
                    if err.errno != errno.ENOBUFS:
                        raise
                    refused += 1
                break
        rounds += 1
    for sock in sockets:  # ICMP errors queued under IP_RECVERR: read (consumed), not freed as drops on close
        while select.select([sock], [], [], 0)[0]:
            try:
                sock.recvmsg(65536, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
    report(sent=sent, refused=refused, per_flow=rounds, flows=args.flows, size=args.size)


def udp_sink(args: argparse.Namespace) -> None:
    sockets = []
    for port in args.ports:
        sock = socket.socket(family(args.address), socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        sock.bind((args.address, port))
        sockets.append(sock)
    ready()
    while True:
        readable, _, _ = select.select(sockets, [], [])
        for sock in readable:
            sock.recv(65536)


def tcp_sink(args: argparse.Namespace) -> None:
    server = socket.socket(family(args.address), socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((args.address, args.port))
    server.listen(16)
    ready()
    while True:
        connection, _ = server.accept()
        with connection:
            while connection.recv(1 << 16):
                pass


def tcp_send(args: argparse.Namespace) -> None:
    sock = socket.socket(family(args.dst), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.src, args.sport))
    sock.connect((args.dst, args.dport))
    chunk = bytes(64 * 1024)
    remaining = args.bytes
    while remaining:
        remaining -= sock.send(chunk[: min(remaining, len(chunk))])
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(1 << 16):  # the peer's FIN ends this
        pass
    sock.close()
    report(sent=args.bytes)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(args: argparse.Namespace) -> None:
    v6 = family(args.dst) == socket.AF_INET6
    sock = socket.socket(
        socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    )
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    replies = 0
    for sequence in range(args.count):
        payload = bytes(args.size - 8)
        header = struct.pack("!BBHHH", request, 0, 0, ident, sequence)
        if not v6:  # the kernel fills in ICMPv6 checksums itself (RFC 3542), not ICMP ones
            header = struct.pack("!BBHHH", request, 0, checksum(header + payload), ident, sequence)
        sock.sendto(header + payload, (args.dst, 0))
        deadline = time.monotonic() + 2.0
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data = sock.recv(65536)
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]  # raw IPv4 sockets see the IP header
            kind, _code, _sum, got_ident, got_sequence = struct.unpack("!BBHHH", icmp[:8])
            if kind == reply and got_ident == ident and got_sequence == sequence:
                replies += 1
                break
    report(sent=args.count, replies=replies, size=args.size)


def raw_send(args: argparse.Namespace) -> None:
    sock = socket.socket(family(args.dst), socket.SOCK_RAW, args.proto)
    payload = struct.pack("!HH", args.sport, args.dport) + bytes(args.size - 4)
    for _ in range(args.count):
        sock.sendto(payload, (args.dst, 0))
    report(sent=args.count, size=args.size)


def eth_send(args: argparse.Namespace) -> None:
    """Ethernet frames built here, VLAN tags included, sent as they are through a packet socket (so tc
    egress sees the tags in the frame, as it does where a VLAN device cannot have the NIC insert them)."""
    version = ipaddress.ip_address(args.dst).version
    udp = struct.pack("!HHHH", args.sport, args.dport, 8 + args.size, 0) + bytes(args.size)
    if version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
            ipaddress.ip_address(args.src).packed, ipaddress.ip_address(args.dst).packed,
        )  # fmt: skip
        packet = header[:10] + struct.pack("!H", checksum(header)) + header[12:] + udp
        ethertype = 0x0800
    else:
        packet = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
        packet += ipaddress.ip_address(args.src).packed + ipaddress.ip_address(args.dst).packed + udp
        ethertype = 0x86DD
    tags = b""
    for position, vid in enumerate(args.vlan):
        tpid = 0x88A8 if position == 0 and len(args.vlan) > 1 else 0x8100  # 802.1ad outside 802.1Q
        tags += struct.pack("!HH", tpid, vid)
    frame = bytes.fromhex(args.dst_mac.replace(":", "")) + bytes.fromhex(args.src_mac.replace(":", ""))
    frame += tags + struct.pack("!H", ethertype) + packet
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.ifname, 0))
    for _ in range(args.count):
        sock.send(frame)  # a packet socket raises the device's refusal (ENOBUFS): nothing goes uncounted
    report(sent=args.count, frame=len(frame))


def raw_sink(args: argparse.Namespace) -> None:
    sock = socket.socket(family(args.address), socket.SOCK_RAW, args.proto)
    sock.bind((args.address, 0))
    ready()
    while True:
        sock.recv(65536)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="traffic")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("udp-send")
    for name in ("--src", "--dst"):
        p.add_argument(name, required=True)
    for name in ("--sport", "--dport", "--size"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--flows", type=int, default=1)
    p.add_argument("--pps", type=float, default=0.0)
    p.add_argument("--duration", type=float)
    p.add_argument("--hop-options", action="store_true")
    p.set_defaults(run=udp_send)
    p = commands.add_parser("udp-sink")
    p.add_argument("address")
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(run=udp_sink)
    p = commands.add_parser("tcp-sink")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p.set_defaults(run=tcp_sink)
    p = commands.add_parser("tcp-send")
    for name in ("--src", "--dst"):
        p.add_argument(name, required=True)
    for name in ("--sport", "--dport", "--bytes"):
        p.add_argument(name, type=int, required=True)
    p.set_defaults(run=tcp_send)
    p = commands.add_parser("icmp-echo")
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="ICMP message size (8-byte header included)")
    p.set_defaults(run=icmp_echo)
    p = commands.add_parser("raw-send")
    p.add_argument("--dst", required=True)
    for name in ("--proto", "--sport", "--dport", "--size", "--count"):
        p.add_argument(name, type=int, required=True)
    p.set_defaults(run=raw_send)
    p = commands.add_parser("eth-send")
    for name in ("--ifname", "--src-mac", "--dst-mac", "--src", "--dst"):
        p.add_argument(name, required=True)
    for name in ("--sport", "--dport", "--size", "--count"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--vlan", type=int, action="append", default=[], help="a VLAN id; twice for 802.1ad + 802.1Q")
    p.set_defaults(run=eth_send)
    p = commands.add_parser("raw-sink")
    p.add_argument("--proto", type=int, required=True)
    p.add_argument("address")
    p.set_defaults(run=raw_sink)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
