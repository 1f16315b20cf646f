"""Socket-level traffic for the drop, TCP and connection-event kernel tests, run inside a lab namespace:
`Netns.run(sys.executable, socket_traffic.PATH, ...)`. Standard library only; each command prints one JSON
line saying what happened, as the kernel reported it to the socket (ground truth for the probes), with the
process's pid and comm.

  refused  --src A --dst B --dport Q [--count N] connect to a closed port (N times, from N ports); reports
                                                the source ports, whether every connect was refused and
                                                how long it took
  server   ADDRESS PORT --connections N         prints "ready", accepts N connections, reads each to its
                                                end, closes it; reports the connections (remote port, and
                                                the kernel's smoothed RTT of the socket before it closed)
  client   --src A --dst B --dport Q --bytes N [--chunk C] [--pause S] [--wait-acked]
           sends N bytes in chunks of C (pausing S seconds between chunks), half-closes, waits for the peer
           to close; reports the source port and the kernel's TCP_INFO: total_retrans, rtt_us, and
           rtt_us_seen (the smoothed RTT read once connected and after each chunk). With --wait-acked each
           chunk's RTT is read once the peer has acknowledged all of it, so with chunks of one segment every
           value the socket's smoothed RTT takes is in rtt_us_seen
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import sys
import time

PATH = os.path.abspath(__file__)
TCP_INFO_TOTAL_RETRANS = 100  # byte offsets in struct tcp_info (UAPI, stable)
TCP_INFO_RTT = 68
TCP_INFO_UNACKED = 24
ACK_DEADLINE = 30.0  # seconds; bounds a hang only


def family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def tcp_info(sock: socket.socket) -> tuple[int, int]:
    """(total_retrans, rtt_us) from the kernel's TCP_INFO of the socket; rtt_us is its smoothed RTT."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    (total_retrans,) = struct.unpack_from("<I", info, TCP_INFO_TOTAL_RETRANS)
    (rtt_us,) = struct.unpack_from("<I", info, TCP_INFO_RTT)
    return total_retrans, rtt_us


def unacked(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("<I", info, TCP_INFO_UNACKED)[0]


def wait_acked(sock: socket.socket) -> None:
    deadline = time.monotonic() + ACK_DEADLINE
    while unacked(sock):
        if time.monotonic() > deadline:
            raise SystemExit("socket_traffic: the peer did not acknowledge the data in time")
        time.sleep(0.001)


def report(**values: object) -> None:
    with open("/proc/self/comm", encoding="utf-8") as comm:
        print(json.dumps({"pid": os.getpid(), "comm": comm.read().strip(), **values}), flush=True)


def refused(args: argparse.Namespace) -> None:
    sports, refusals = [], 0
    started = time.monotonic()
    for _ in range(args.count):
        with socket.socket(family(args.dst), socket.SOCK_STREAM) as sock:
            sock.bind((args.src, 0))
            sports.append(sock.getsockname()[1])
            try:
                sock.connect((args.dst, args.dport))
            except ConnectionRefusedError:
                refusals += 1
    seconds = time.monotonic() - started
    report(sport=sports[0], sports=sports, refused=refusals == args.count, seconds=seconds)


def server(args: argparse.Namespace) -> None:
    listener = socket.socket(family(args.address), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.address, args.port))
    listener.listen(16)
    print("ready", flush=True)
    connections = []
    for _ in range(args.connections):
        connection, remote = listener.accept()
        with connection:
            while connection.recv(1 << 16):
                pass
            _, rtt_us = tcp_info(connection)
        connections.append({"remote_port": remote[1], "rtt_us": rtt_us})
    listener.close()
    report(connections=connections)


def client(args: argparse.Namespace) -> None:
    sock = socket.socket(family(args.dst), socket.SOCK_STREAM)
    sock.bind((args.src, 0))
    sock.connect((args.dst, args.dport))
    started = time.monotonic()
    rtt_us_seen = [tcp_info(sock)[1]]
    chunk = bytes(args.chunk)
    remaining = args.bytes
    while remaining:
        size = min(remaining, len(chunk))
        sock.sendall(chunk[:size])
        remaining -= size
        if args.wait_acked:
            wait_acked(sock)
        if args.pause and remaining:
            time.sleep(args.pause)
        rtt_us_seen.append(tcp_info(sock)[1])
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(1 << 16):  # the peer's FIN ends this, after it has acknowledged everything
        pass
    total_retrans, rtt_us = tcp_info(sock)
    sport = sock.getsockname()[1]
    sock.close()
    report(
        sport=sport, total_retrans=total_retrans, rtt_us=rtt_us, rtt_us_seen=[*rtt_us_seen, rtt_us],
        seconds=time.monotonic() - started,
    )  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="socket_traffic")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("refused")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dport", type=int, required=True)
    p.add_argument("--count", type=int, default=1)
    p.set_defaults(run=refused)
    p = commands.add_parser("server")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p.add_argument("--connections", type=int, default=1)
    p.set_defaults(run=server)
    p = commands.add_parser("client")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dport", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--chunk", type=int, default=64 * 1024)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--wait-acked", action="store_true")
    p.set_defaults(run=client)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
