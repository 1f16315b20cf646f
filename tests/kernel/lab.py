"""A network-namespace lab for kernel tests: namespaces joined by veth pairs and bridges, IPv4 and IPv6
addresses, commands run inside, and a teardown that leaves nothing behind, even after a failure.

Each test area passes its own prefix and subnets (tc: "fstc-", 10.201.0.0/16, fd00:201::/64), so labs of
areas that run at the same time never collide. Namespaces are named <prefix><pid>-<n>-<role>; interfaces
are created directly inside their namespaces, so their names only need to be unique within one namespace.

    with Lab("fstc-", "10.201.0.0/16", "fd00:201::/64") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        left, right = lab.link(a, "fstcA", b, "fstcB", subnet=1)  # 10.201.1.1/24, fd00:201::1:1/112 <-> .2
        a.run("ip", "addr")

Fresh interfaces are kept quiet where that does not change what is tested: IPv6 duplicate address detection
and router solicitations are off, and `link()` installs permanent neighbour entries, so no ARP or neighbour
discovery packet precedes (or delays) the first packet of a test. Multicast listener reports still appear:
assertions should select the flows they check by their 5-tuple.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from functools import cached_property

_counter = itertools.count(1)

# Applied to every namespace before interfaces are created in it (defaults are inherited by new interfaces).
QUIET_IPV6 = {
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.default.dad_transmits": "0",
    "net.ipv6.conf.default.router_solicitations": "0",
    "net.ipv6.conf.default.accept_ra": "0",
}


class LabError(RuntimeError):
    pass


def _check(argv: list[str], result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def host(*argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs a command in the test's own network namespace."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    return _check(list(argv), result) if check else result


@dataclass
class Netns:
    lab: Lab
    name: str
    role: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command inside the namespace and waits for it; raises LabError when it fails and check is set."""
        full = self.command(*argv)
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        return _check(full, result) if check else result

    def popen(self, *argv: str, **kwargs) -> subprocess.Popen:
        """Starts a command inside the namespace; the lab stops it at teardown if it still runs."""
        kwargs.setdefault("text", True)
        process = subprocess.Popen(self.command(*argv), **kwargs)  # `ip netns exec` execs: same pid
        self.lab.processes.append(process)
        return process

    def sysctl(self, name: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{name}={value}")

    def link(self, ifname: str) -> dict:
        """`ip -j link show` of one interface."""
        return json.loads(self.run("ip", "-j", "link", "show", "dev", ifname).stdout)[0]

    def tc_filters(self, ifname: str, hook: str) -> list[dict]:
        """`tc -j filter show` of one clsact hook ("ingress" or "egress"); [] without a clsact qdisc (tc says
        so with exit status 0; a failure, e.g. no such interface, raises LabError rather than reading as none)."""
        return json.loads(self.run("tc", "-j", "filter", "show", "dev", ifname, hook).stdout or "[]")

    def qdiscs(self, ifname: str) -> list[dict]:
        return json.loads(self.run("tc", "-j", "qdisc", "show", "dev", ifname).stdout)


@dataclass
class Port:
    """An interface inside a lab namespace, with the addresses the lab gave it."""

    netns: Netns
    name: str
    ipv4: list[ipaddress.IPv4Interface] = field(default_factory=list)
    ipv6: list[ipaddress.IPv6Interface] = field(default_factory=list)

    @cached_property
    def ifindex(self) -> int:
        return int(self.netns.link(self.name)["ifindex"])

    @cached_property
    def mac(self) -> str:
        return self.netns.link(self.name)["address"]

    @property
    def ip4(self) -> str:
        """The first IPv4 address, without prefix length."""
        return str(self.ipv4[0].ip)

    @property
    def ip6(self) -> str:
        return str(self.ipv6[0].ip)


class Lab:
    def __init__(self, prefix: str, ipv4_net: str, ipv6_net: str, quiet_ipv6: bool = True) -> None:
        if not prefix.endswith("-"):
            raise ValueError("the prefix ends with '-', e.g. 'fstc-'")
        self.prefix = prefix
        self.ipv4_net = ipaddress.IPv4Network(ipv4_net)
        self.ipv6_net = ipaddress.IPv6Network(ipv6_net)
        self.quiet_ipv6 = quiet_ipv6
        self.tag = f"{os.getpid()}-{next(_counter)}"
        self.namespaces: list[Netns] = []
        self.processes: list[subprocess.Popen] = []
        remove_stale_namespaces(prefix)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def subnet(self, index: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
        """The index-th /24 of the lab's IPv4 range and the index-th /112 of its IPv6 range."""
        v4 = list(itertools.islice(self.ipv4_net.subnets(new_prefix=24), index, index + 1))
        v6 = list(itertools.islice(self.ipv6_net.subnets(new_prefix=112), index, index + 1))
        if not v4 or not v6:
            raise ValueError(f"subnet {index} is outside {self.ipv4_net} or {self.ipv6_net}")
        return v4[0], v6[0]

    def namespace(self, role: str) -> Netns:
        netns = Netns(self, f"{self.prefix}{self.tag}-{role}", role)
        host("ip", "netns", "add", netns.name)
        self.namespaces.append(netns)
        netns.run("ip", "link", "set", "lo", "up")
        if self.quiet_ipv6:
            for name, value in QUIET_IPV6.items():
                netns.sysctl(name, value)
        return netns

    def veth(self, a: Netns, a_name: str, b: Netns, b_name: str) -> tuple[Port, Port]:
        """A veth pair with one end in each namespace, both up."""
        for name in (a_name, b_name):
            if len(name) > 15:
                raise ValueError(f"interface name {name!r} is longer than 15 characters")
        a.run("ip", "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name)
        a.run("ip", "link", "set", a_name, "up")
        b.run("ip", "link", "set", b_name, "up")
        return Port(a, a_name), Port(b, b_name)

    def bridge(self, netns: Netns, name: str, ports: tuple[Port, ...] = ()) -> Port:
        """A bridge (no STP, forwarding at once) with the given ports enslaved, up."""
        netns.run("ip", "link", "add", name, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        for port in ports:
            if port.netns is not netns:
                raise ValueError(f"{port.name} is not in {netns.name}")
            netns.run("ip", "link", "set", port.name, "master", name)
        netns.run("ip", "link", "set", name, "up")
        return Port(netns, name)

    def address(self, port: Port, cidr: str) -> None:
        interface = ipaddress.ip_interface(cidr)
        extra = ["nodad"] if interface.version == 6 else []
        port.netns.run("ip", "addr", "add", cidr, "dev", port.name, *extra)
        (port.ipv4 if interface.version == 4 else port.ipv6).append(interface)

    def neighbours(self, port: Port, peer: Port) -> None:
        """Permanent neighbour entries on `port` for every address of `peer` (same link or bridge)."""
        for address in [*peer.ipv4, *peer.ipv6]:
            port.netns.run(
                "ip", "neigh", "replace", str(address.ip), "lladdr", peer.mac, "dev", port.name, "nud", "permanent"
            )

    def link(self, a: Netns, a_name: str, b: Netns, b_name: str, subnet: int) -> tuple[Port, Port]:
        """A veth pair with host 1 and host 2 of `subnet(subnet)` (both families) and static neighbours."""
        left, right = self.veth(a, a_name, b, b_name)
        self.address_pair(left, right, subnet)
        return left, right

    def address_pair(self, left: Port, right: Port, subnet: int) -> None:
        """Host 1 and host 2 of `subnet(subnet)` (both families) on two ports of one link, and static neighbours."""
        v4, v6 = self.subnet(subnet)
        for port, host_number in ((left, 1), (right, 2)):
            self.address(port, f"{v4[host_number]}/{v4.prefixlen}")
            self.address(port, f"{v6[host_number]}/{v6.prefixlen}")
        self.neighbours(left, right)
        self.neighbours(right, left)

    def offloads(self, port: Port, enabled: bool) -> None:
        """Turns the device's segmentation and receive offloads (TSO, GSO, GRO, ...) on (the veth default) or
        off. Off, TCP still hands the device multi-segment (GSO) skbs, segmented in software on their way
        out (after tc, before packet sockets see them); `one_segment_per_skb` stops that at the source."""
        state = "on" if enabled else "off"
        features = ("tso", "gso", "gro", "sg", "tx-gso-partial", "tx-udp-segmentation")
        args = [item for feature in features for item in (feature, state)]
        # ethtool exits non-zero when one feature cannot change (e.g. fixed); the rest still change.
        port.netns.run("ethtool", "-K", port.name, *args, check=False)
        shown = port.netns.run("ethtool", "-k", port.name).stdout
        for feature in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
            if f"{feature}: {state}" not in shown:
                raise LabError(f"{feature} of {port.name} did not turn {state}")

    def one_segment_per_skb(self, port: Port) -> None:
        """Makes the stack build one wire segment per skb on this device (gso_max_segs 1)."""
        port.netns.run("ip", "link", "set", port.name, "gso_max_segs", "1")

    def close(self) -> None:
        """Stops the processes the lab started, then deletes its namespaces (their interfaces go with them)."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes.clear()
        for netns in reversed(self.namespaces):
            _delete_namespace(netns.name)
        self.namespaces.clear()


def _delete_namespace(name: str) -> None:
    # Anything still running in the namespace was started by a test (e.g. a child of a process it killed).
    pids = host("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    host("ip", "netns", "del", name, check=False)


def remove_stale_namespaces(prefix: str) -> None:
    """Deletes namespaces with this prefix whose creating test process has died (a crashed earlier run)."""
    for line in host("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _delete_namespace(name)
