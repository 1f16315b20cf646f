"""Who owned an IP address, and when: the time-aware index behind attribution by IP.

Each (address, owner) pair is a claim with a start and an end. A pod's IP may go to another pod as soon
as the first one is gone, so a claim ends when its owner gives the address up, keeps naming it for a
grace period after that (late flows of a deleted pod), and stops at once when a new owner takes the
address. Addresses shared by design (a node's, which its hostNetwork pods also use) never resolve to one
pod: several live owners of one address mean "no answer", not a guess.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

INF = math.inf

Owner = tuple[Hashable, ...]  # ("pod", uid) | ("service", namespace, name) | ("node", name)


class Ambiguous:
    """Several owners at once: the address names none of them."""

    def __repr__(self) -> str:
        return "AMBIGUOUS"


AMBIGUOUS = Ambiguous()
VARIES = object()  # Timeline.single_answer: the answer changes within the window


@dataclass
class Claim:
    owner: Owner
    start: float
    shared: bool = False  # a node address or a hostNetwork pod's: the node is known, never the pod
    node: str | None = None  # the node a shared address belongs to
    end: float = INF  # when the owner gave the address up
    until: float = INF  # last moment the claim names the address: end + grace, cut where a new owner starts

    def covers(self, lo: float, hi: float) -> bool:
        return self.start <= hi and self.until > lo


def resolve_claims(claims: Iterable[Claim], lo: float, hi: float) -> Owner | Ambiguous | None:
    """The one owner of the address during [lo, hi], AMBIGUOUS, or None when nobody owned it."""
    live = [claim for claim in claims if claim.covers(lo, hi)]
    if not live:
        return None
    owners = {claim.owner for claim in live}
    if len(owners) == 1 and not live[0].shared:
        return live[0].owner
    nodes = {claim.node for claim in live}
    if all(claim.shared for claim in live) and len(nodes) == 1 and None not in nodes:
        return ("node", nodes.pop())
    return AMBIGUOUS


class Timeline:
    """The answers of one address over time: constant between consecutive claim boundaries.

    A window [lo, hi] that lies inside [bounds[i], bounds[i + 1]) has answers[i]: a claim covers such a
    window exactly when it starts at or before bounds[i] and lasts past it.
    """

    def __init__(self, claims: Iterable[Claim]) -> None:
        claims = list(claims)
        self.claims = claims
        self.bounds = sorted({-INF, INF, *(c.start for c in claims), *(c.until for c in claims)})
        self.answers = [resolve_claims(claims, bound, bound) for bound in self.bounds[:-1]]

    def single_answer(self, lo: float, hi: float) -> Owner | Ambiguous | object | None:
        """The answer for every window inside [lo, hi], or VARIES when [lo, hi] spans a change of hands."""
        segment = bisect.bisect_right(self.bounds, lo) - 1
        return self.answers[segment] if hi < self.bounds[segment + 1] else VARIES

    def answer(self, lo: float, hi: float) -> Owner | Ambiguous | None:
        """The answer for the window [lo, hi]."""
        single = self.single_answer(lo, hi)
        return resolve_claims(self.claims, lo, hi) if single is VARIES else single


class IpIndex:
    """Claims by address. Not thread-safe: the catalog that owns it holds the lock."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._claims: dict[str, list[Claim]] = {}
        self._timelines: dict[str, Timeline] = {}  # built on first lookup, dropped when the claims change
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Owner]] = []

    def __len__(self) -> int:
        return len(self._claims)

    def claims(self, ip: str) -> tuple[Claim, ...]:
        return tuple(self._claims.get(ip, ()))

    def timeline(self, ip: str) -> Timeline | None:
        """The address's answers over time; None when nobody ever claimed it (an outside address)."""
        timeline = self._timelines.get(ip)
        if timeline is None:
            claims = self._claims.get(ip)
            if not claims:
                return None
            timeline = self._timelines[ip] = Timeline(claims)
        return timeline

    def claim(self, ip: str, owner: Owner, start: float, shared: bool = False, node: str | None = None) -> None:
        claims = self._claims.setdefault(ip, [])
        if any(c.owner == owner and c.end == INF for c in claims):
            return
        self._timelines.pop(ip, None)
        if not shared:
            # An address held by one pod at a time: the new owner starts after the old ones let go, and
            # the old ones stop naming it (their grace ends) where the new one starts.
            released = [c for c in claims if not c.shared and c.end != INF]
            start = max([start, *(c.end for c in released)])
            for previous in released:
                previous.until = min(previous.until, start)
        claims.append(Claim(owner, start, shared, node))

    def release(self, ip: str, owner: Owner, at: float) -> None:
        claims = self._claims.get(ip, [])
        for claim in claims:
            if claim.owner == owner and claim.end == INF:
                self._timelines.pop(ip, None)
                claim.end = at
                claim.until = at + self.grace
                if not claim.shared:
                    # A newer owner that appeared while this one still looked alive has had it since it
                    # appeared (the watch told us about the release late).
                    newer = [c.start for c in claims if c is not claim and not c.shared and c.start >= claim.start]
                    claim.until = min([claim.until, *newer])

    def add_network(self, cidr: str, owner: Owner) -> None:
        """A whole network named by one owner (static metadata: VM subnets, external peers)."""
        self._networks.append((ipaddress.ip_network(cidr, strict=False), owner))
        self._networks.sort(key=lambda item: -item[0].prefixlen)

    @property
    def networks(self) -> int:
        return len(self._networks)

    def network_owner(self, ip: str) -> Owner | None:
        """The owner of the most specific network containing `ip`."""
        if not self._networks:
            return None
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for network, owner in self._networks:
            if address.version == network.version and address in network:
                return owner
        return None

    def purge(self, now: float) -> int:
        """Drops claims whose grace ended more than one more grace ago (kept that long for late batches)."""
        removed = 0
        for ip in list(self._claims):
            kept = [c for c in self._claims[ip] if c.until + self.grace >= now]
            if len(kept) == len(self._claims[ip]):
                continue
            self._timelines.pop(ip, None)
            removed += len(self._claims[ip]) - len(kept)
            if kept:
                self._claims[ip] = kept
            else:
                del self._claims[ip]
        return removed
