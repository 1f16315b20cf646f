"""Who owned an IP address, and when: the time-aware index behind attribution by IP.

Each (address, owner) pair is a claim with a start and an end. A pod's IP may go to another pod as soon
as the first one is gone, so a claim ends when its owner gives the address up, keeps naming it for a
grace period after that (late flows of a deleted pod), and stops at once when a new owner takes the
address. Addresses shared by design (a node's, which its hostNetwork pods also use) never resolve to one
pod: several live owners of one address mean "no answer", not a guess.

Batches are answered column-wise: every address's timeline is also kept in flat numpy arrays (`_Segments`),
rebuilt only for the addresses whose claims changed, and `lookup` answers a whole array of (address,
window) queries with two searchsorted calls. Owners are numbered (`owners`, `owner_id`) so that answers
are integers a caller can index its own tables with.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

INF = math.inf
# Answers of `IpIndex.lookup` that are not an owner id (owner ids are >= 0).
ANSWER_NONE = -1  # nobody owned the address during the window
ANSWER_AMBIGUOUS = -2  # several owners at once
ANSWER_VARIES = -3  # the window spans a change of hands (`lookup` only; `resolve` answers those too)
ANSWER_UNCLAIMED = -4  # nobody ever claimed the address here
# Compact address and owner numbers once this many (and more than half of them) belong to nobody any more.
COMPACT_AFTER = 4096

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


@dataclass
class _Segments:
    """Every claimed address's timeline in flat arrays, ordered by (address id, start): segment i answers
    `answer[i]` from `start[i]` until `end[i]`, the address's next boundary.

    A time is compared by its rank among all boundaries (`times`, sorted, -inf and inf included), so one
    int64 per segment, address id * len(times) + rank of its start, orders every segment of every address:
    the segment of (address, t) is the last key <= address id * len(times) + rank of t.
    """

    address: np.ndarray  # int64
    start: np.ndarray  # float64
    end: np.ndarray  # float64
    answer: np.ndarray  # int64: owner id, ANSWER_NONE or ANSWER_AMBIGUOUS
    times: np.ndarray  # float64
    key: np.ndarray  # int64, ascending
    end_rank: np.ndarray  # int64: rank of `end` in `times`

    @classmethod
    def empty(cls) -> _Segments:
        return cls.build(*(np.zeros(0, dtype) for dtype in (np.int64, float, float, np.int64)))

    @classmethod
    def build(cls, address: np.ndarray, start: np.ndarray, end: np.ndarray, answer: np.ndarray) -> _Segments:
        order = np.lexsort((start, address))
        address, start, end, answer = address[order], start[order], end[order], answer[order]
        times = np.unique(np.concatenate([start, end, [-INF, INF]]))
        key = address * len(times) + np.searchsorted(times, start)
        return cls(address, start, end, answer, times, key, np.searchsorted(times, end))

    def lookup(self, ids: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        """Answer per query (address id, -1 for an address never claimed, and window [lo, hi])."""
        found = np.full(len(ids), ANSWER_UNCLAIMED, np.int64)
        if not len(self.key):
            return found
        rank_lo = np.searchsorted(self.times, lo, side="right") - 1
        rank_hi = np.searchsorted(self.times, hi, side="right") - 1
        segment = np.searchsorted(self.key, ids * len(self.times) + rank_lo, side="right") - 1
        segment = np.maximum(segment, 0)
        # An address with claims has a segment from -inf, so a query lands on one of its own segments; one
        # whose claims were all purged has none and lands on another address's.
        claimed = (ids >= 0) & (self.address[segment] == ids)
        answer = np.where(self.end_rank[segment] <= rank_hi, ANSWER_VARIES, self.answer[segment])
        found[claimed] = answer[claimed]
        return found


class IpIndex:
    """Claims by address. Not thread-safe: the catalog that owns it holds the lock."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._claims: dict[str, list[Claim]] = {}
        self._timelines: dict[str, Timeline] = {}  # built on first lookup, dropped when the claims change
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, Owner]] = []
        self.owners: list[Owner] = []  # by owner id
        self._owner_ids: dict[Owner, int] = {}
        self.epoch = 0  # counts renumberings of owner ids (compaction), after which callers' tables are stale
        self._address_ids: dict[str, int] = {}
        self._address_index: pd.Index | None = None  # the addresses in id order; None until the next lookup
        self._changed: set[str] = set()  # addresses whose claims changed since the segments were built
        self._segments = _Segments.empty()

    def __len__(self) -> int:
        return len(self._claims)

    def claims(self, ip: str) -> tuple[Claim, ...]:
        return tuple(self._claims.get(ip, ()))

    def owner_id(self, owner: Owner) -> int:
        """The number answers give this owner (numbered on first use)."""
        found = self._owner_ids.get(owner)
        if found is None:
            found = self._owner_ids[owner] = len(self.owners)
            self.owners.append(owner)
        return found

    def known_owner_ids(self, owners: Iterable[Owner]) -> list[int]:
        """The numbers of those of `owners` that have one."""
        return [found for owner in owners if (found := self._owner_ids.get(owner)) is not None]

    def _answer_id(self, answer: Owner | Ambiguous | None) -> int:
        if answer is None:
            return ANSWER_NONE
        return ANSWER_AMBIGUOUS if answer is AMBIGUOUS else self.owner_id(answer)

    def _changed_claims(self, ip: str) -> None:
        self._timelines.pop(ip, None)
        self._changed.add(ip)

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
        if ip not in self._address_ids:
            self._address_ids[ip] = len(self._address_ids)
            self._address_index = None
        self.owner_id(owner)
        self._changed_claims(ip)
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
                self._changed_claims(ip)
                claim.end = at
                claim.until = at + self.grace
                if not claim.shared:
                    # A newer owner that appeared while this one still looked alive has had it since it
                    # appeared (the watch told us about the release late).
                    newer = [c.start for c in claims if c is not claim and not c.shared and c.start >= claim.start]
                    claim.until = min([claim.until, *newer])

    def add_network(self, cidr: str, owner: Owner) -> None:
        """A whole network named by one owner (static metadata: VM subnets, external peers)."""
        self.owner_id(owner)
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

    def network_answers(self, addresses: np.ndarray) -> np.ndarray:
        """Per address, the owner id of the most specific network containing it, or ANSWER_UNCLAIMED."""
        if not self._networks:
            return np.full(len(addresses), ANSWER_UNCLAIMED, np.int64)
        owners = [self.network_owner(ip) for ip in addresses.tolist()]
        return np.array([ANSWER_UNCLAIMED if o is None else self.owner_id(o) for o in owners], np.int64)

    # ---- column-wise answers ------------------------------------------------------------------------------

    def lookup(self, addresses: np.ndarray, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        """Per address (text, an object array) and window [lo, hi] (epoch seconds): the owner id,
        ANSWER_NONE, ANSWER_AMBIGUOUS, ANSWER_UNCLAIMED, or ANSWER_VARIES when the window spans a change."""
        self._refresh()
        if self._address_index is None:
            self._address_index = pd.Index(list(self._address_ids), dtype=object)
        return self._segments.lookup(self._address_index.get_indexer(addresses), lo, hi)

    def resolve(self, addresses: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """As `lookup`, with windows across a change of hands answered too (from the claims, per distinct
        (address, window): the rare rows that straddle a hand-over)."""
        found = self.lookup(addresses, lo, hi)
        varies = np.flatnonzero(found == ANSWER_VARIES)
        queries = zip(addresses[varies].tolist(), lo[varies].tolist(), hi[varies].tolist(), strict=True)
        answers: dict[tuple[str, float, float], int] = {}
        for row, query in zip(varies.tolist(), queries, strict=True):
            if query not in answers:
                answers[query] = self._answer_id(self.timeline(query[0]).answer(query[1], query[2]))
            found[row] = answers[query]
        return found

    def _refresh(self) -> None:
        """Rebuilds the segments of the addresses whose claims changed."""
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        address: list[int] = []
        start: list[float] = []
        end: list[float] = []
        answer: list[int] = []
        for ip in changed:
            claims = self._claims.get(ip)
            if not claims:
                continue
            timeline = self._timelines.get(ip) or Timeline(claims)
            address += [self._address_ids[ip]] * len(timeline.answers)
            start += timeline.bounds[:-1]
            end += timeline.bounds[1:]
            answer += [self._answer_id(a) for a in timeline.answers]
        old = self._segments
        kept = ~np.isin(old.address, np.array([self._address_ids[ip] for ip in changed], np.int64))
        self._segments = _Segments.build(
            np.concatenate([old.address[kept], np.array(address, np.int64)]),
            np.concatenate([old.start[kept], np.array(start, float)]),
            np.concatenate([old.end[kept], np.array(end, float)]),
            np.concatenate([old.answer[kept], np.array(answer, np.int64)]),
        )

    def purge(self, now: float) -> int:
        """Drops claims whose grace ended more than one more grace ago (kept that long for late batches)."""
        removed = 0
        for ip in list(self._claims):
            kept = [c for c in self._claims[ip] if c.until + self.grace >= now]
            if len(kept) == len(self._claims[ip]):
                continue
            self._changed_claims(ip)
            removed += len(self._claims[ip]) - len(kept)
            if kept:
                self._claims[ip] = kept
            else:
                del self._claims[ip]
        if removed:
            self._compact()
        return removed

    def _compact(self) -> None:
        """Renumbers addresses and owners when most numbers belong to nobody any more (pod churn)."""
        owners = dict.fromkeys(c.owner for claims in self._claims.values() for c in claims)  # in claim order
        owners.update(dict.fromkeys(owner for _, owner in self._networks))

        def mostly_stale(numbered: int, live: int) -> bool:
            return numbered - live > max(COMPACT_AFTER, live)

        if not (mostly_stale(len(self.owners), len(owners)) or mostly_stale(len(self._address_ids), len(self._claims))):
            return
        self.owners, self._owner_ids = [], {}
        for owner in owners:
            self.owner_id(owner)
        self._address_ids = {ip: number for number, ip in enumerate(self._claims)}
        self._address_index = None
        self._changed = set(self._claims)
        self._segments = _Segments.empty()
        self.epoch += 1
