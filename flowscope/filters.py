"""The filter language of `top` (`--filter` and `/`), `observe`, the gRPC APIs (Hubble's FlowFilter maps onto
it) and pandas.

    port=80,443 not namespace=kube-system from-pod=shop/checkout verdict=dropped label=app=web

Terms `field=value` separated by spaces are ANDed; a comma list of values is ORed; `not` or `!` before a
term (or `field!=value`) negates it; `from-`/`to-` pin the source or destination side, and without them a
sided term matches either side (like Hubble). `pod=ns/name` matches pods of that namespace whose name
starts with `name` (`pod=ns/` is the whole namespace), as Hubble's `--pod` does. `label=key=value`,
`label=key!=value`, `label=key` (has the label) and `label=!key` match a side's Kubernetes labels (one
requirement per value; `term("label", ...)` also takes whole selectors such as `app in (a,b),tier=web`).
`observer` is the node that observed the record (`node` matches it too, or either side's node); its values
may hold `*` wildcards. A filter list (`FilterSet`) passes a record that any allow filter matches and no
deny filter does.

A filter is parsed once (`parse_filter`) into terms whose values are already normalised; evaluating it on a
flows or events DataFrame is columnar: comparisons over whole columns, and where a value needs parsing
(CIDR, name prefix) the work is done once per distinct value of the column, never once per row. The terms
read their columns through `Columns`, so the same matchers also run over an Arrow table before it becomes a
frame (flowscope.formats.prefilter, the flow log's pushdown); labels, Python dicts, only from a frame.
"""

from __future__ import annotations

import fnmatch
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import pandas as pd

from flowscope.schema import DIRECTIONS, EVENT_KINDS, PROTOCOL_NAMES

FrameKind = Literal["flows", "events"]
Side = Literal["src", "dst"]

SIDED_FIELDS = ("pod", "namespace", "workload", "label", "ip", "port", "node")
OBJECT_FIELDS = ("label",)  # matched on Python objects (a side's labels), which only a frame holds
UNSIDED_FIELDS = ("observer", "protocol", "direction", "verdict", "reason", "ifname", "type")
FIELDS = SIDED_FIELDS + UNSIDED_FIELDS

VERDICTS = ("forwarded", "dropped")
TYPES = ("flow", *EVENT_KINDS)
# A protocol by its name or number, as flow rows name it (schema.PROTOCOL_NAMES); others stay numbers.
_PROTOCOL_BY_TEXT = {name.upper(): name for name in PROTOCOL_NAMES.values()} | {
    str(number): name for number, name in PROTOCOL_NAMES.items()
}
_REASON = re.compile(r"^[A-Z0-9_]+$")
_DROP_REASON_PREFIX = "SKB_DROP_REASON_"

Mask = np.ndarray  # one bool per row


class FilterError(ValueError):
    """A filter that does not parse; the message names the bad term."""

    def __init__(self, term: str, problem: str) -> None:
        super().__init__(f'bad filter term "{term}": {problem}')
        self.term = term
        self.problem = problem


@dataclass(frozen=True)
class IPNetwork:
    """An address or CIDR, as 128-bit masks split into two 64-bit words so numpy can compare them."""

    version: int
    network: tuple[int, int]
    mask: tuple[int, int]

    @classmethod
    def of(cls, version: int, value: int, prefix: int) -> IPNetwork:
        bits = 32 if version == 4 else 128
        mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
        return cls(version, _words(value & mask), _words(mask))

    def contains(self, versions: np.ndarray, high: np.ndarray, low: np.ndarray) -> Mask:
        return (
            (versions == self.version)
            & ((high & np.uint64(self.mask[0])) == np.uint64(self.network[0]))
            & ((low & np.uint64(self.mask[1])) == np.uint64(self.network[1]))
        )


def _words(value: int) -> tuple[int, int]:
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Term:
    """One `[not] [from-|to-]field=v1,v2` term with its values normalised for matching."""

    text: str
    field: str
    side: Side | None
    values: tuple
    negated: bool

    def mask(self, frame: pd.DataFrame, kind: FrameKind) -> Mask:
        return self.matches(FrameColumns(frame), kind)

    def matches(self, columns: Columns, kind: FrameKind) -> Mask:
        if self.field in SIDED_FIELDS:
            sides: tuple[Side, ...] = (self.side,) if self.side else ("src", "dst")
            matched = np.zeros(columns.rows, dtype=bool)
            for side in sides:
                matched |= _SIDED_MATCHERS[self.field](columns, side, self.values)
            if self.field == "node" and self.side is None:
                matched |= columns.isin("node", self.values)  # the node that observed it
        else:
            matched = _UNSIDED_MATCHERS[self.field](columns, kind, self.values)
        return ~matched if self.negated else matched


@dataclass(frozen=True)
class Filter:
    """A parsed filter. An empty filter matches everything."""

    text: str
    terms: tuple[Term, ...] = ()

    def flows_mask(self, flows: pd.DataFrame) -> Mask:
        return self._mask(flows, "flows")

    def events_mask(self, events: pd.DataFrame) -> Mask:
        return self._mask(events, "events")

    def flows(self, flows: pd.DataFrame) -> pd.DataFrame:
        return flows if not self.terms else flows[self.flows_mask(flows)]

    def events(self, events: pd.DataFrame) -> pd.DataFrame:
        return events if not self.terms else events[self.events_mask(events)]

    def _mask(self, frame: pd.DataFrame, kind: FrameKind) -> Mask:
        columns = FrameColumns(frame)
        mask = np.ones(len(frame), dtype=bool)
        for term in self.terms:
            mask &= term.matches(columns, kind)
        return mask

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __str__(self) -> str:
        return self.text


MATCH_ALL = Filter("")


@dataclass(frozen=True)
class FilterSet:
    """Allow and deny lists of filters: a record passes if any allow filter matches it (or there is none)
    and no deny filter does (Hubble's whitelist minus blacklist)."""

    allow: tuple[Filter, ...] = ()
    deny: tuple[Filter, ...] = ()

    def flows_mask(self, flows: pd.DataFrame) -> Mask:
        return self._mask(flows, "flows")

    def events_mask(self, events: pd.DataFrame) -> Mask:
        return self._mask(events, "events")

    def _mask(self, frame: pd.DataFrame, kind: FrameKind) -> Mask:
        mask = np.ones(len(frame), dtype=bool)
        if self.allow:
            mask = np.zeros(len(frame), dtype=bool)
            for allowed in self.allow:
                mask |= allowed._mask(frame, kind)
        for denied in self.deny:
            mask &= ~denied._mask(frame, kind)
        return mask

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


def term(field: str, values: Sequence[str], side: Side | None = None, negated: bool = False) -> Term:
    """One term built from its parts (the gRPC APIs' structured filters), its values parsed as the text
    language parses them; no values: a term that matches nothing. Raises FilterError naming the term."""
    prefix = {"src": "from-", "dst": "to-", None: ""}[side]
    text = f"{'not ' if negated else ''}{prefix}{field}={','.join(values)}"
    if field not in FIELDS:
        raise FilterError(text, f"unknown field {field!r}; fields are {', '.join(FIELDS)}")
    if side is not None and field not in SIDED_FIELDS:
        raise FilterError(text, f"{field} has no side")
    try:
        parsed = tuple(_VALUE_PARSERS[field](value) for value in values)
    except ValueError as err:
        raise FilterError(text, str(err)) from None
    return Term(text, field, side, parsed, negated)


def parse_filter(text: str | Iterable[str]) -> Filter:
    """Parses filter text (or its already split words, as from a command line) into a Filter.

    Raises FilterError, whose message names the bad term, when the text is not a valid filter.
    """
    words = text.split() if isinstance(text, str) else [w for part in text for w in part.split()]
    terms: list[Term] = []
    negated = False
    pending_not = ""
    for word in words:
        if word.lower() in ("not", "!"):
            negated = not negated
            pending_not = word
            continue
        terms.append(_parse_term(word, negated))
        negated, pending_not = False, ""
    if pending_not:
        raise FilterError(pending_not, "it must be followed by a term to negate")
    return Filter(" ".join(words), tuple(terms))


def _parse_term(word: str, negated: bool) -> Term:
    body = word
    while body.startswith("!"):
        negated = not negated
        body = body[1:]
    if "=" not in body:
        raise FilterError(word, "expected field=value, e.g. port=443 or pod=shop/checkout")
    name, _, raw = body.partition("=")
    if name.endswith("!"):
        negated = not negated
        name = name[:-1]
    name = name.lower()
    side: Side | None = None
    for prefix, pinned in (("from-", "src"), ("to-", "dst")):
        if name.startswith(prefix):
            name, side = name[len(prefix) :], pinned
    if name not in FIELDS:
        raise FilterError(word, f"unknown field {name!r}; fields are {', '.join(FIELDS)}")
    if side is not None and name not in SIDED_FIELDS:
        raise FilterError(word, f"{name} has no side; drop the from-/to- prefix")
    items = raw.split(",")
    if not raw or any(not item for item in items):
        raise FilterError(word, "a value is empty")
    try:
        values = tuple(_VALUE_PARSERS[name](item) for item in items)
    except ValueError as err:
        raise FilterError(word, str(err)) from None
    return Term(word, name, side, values, negated)


# --- value parsers: text -> normalised value, ValueError with a short reason -------------------------------


def _parse_pod(item: str) -> tuple[str | None, str]:
    namespace, slash, name = item.rpartition("/")
    if slash and not namespace:
        raise ValueError("the namespace before '/' is empty")
    return (namespace or None, name)


def _parse_workload(item: str) -> tuple[str | None, str]:
    namespace, name = _parse_pod(item)
    if not name:
        raise ValueError("the workload name after '/' is empty")
    return (namespace, name)


def _parse_ip(item: str) -> IPNetwork:
    address, slash, length = item.partition("/")
    version, value = _ip_value(address)
    if value is None:
        raise ValueError(f"{address!r} is not an IPv4 or IPv6 address")
    bits = 32 if version == 4 else 128
    if slash and (not length.isdigit() or int(length) > bits):
        raise ValueError(f"the prefix length must be 0-{bits}")
    return IPNetwork.of(version, value, int(length) if slash else bits)


def _parse_port(item: str) -> tuple[int, int]:
    low, dash, high = item.partition("-")
    try:
        bounds = (int(low), int(high) if dash else int(low))
    except ValueError:
        raise ValueError("a port is a number 0-65535 or a range like 8000-8080") from None
    if not 0 <= bounds[0] <= bounds[1] <= 65535:
        raise ValueError("a port is a number 0-65535 or a range like 8000-8080")
    return bounds


def _parse_protocol(item: str) -> str:
    known = _PROTOCOL_BY_TEXT.get(item.upper())
    if known:
        return known
    if item.isdigit() and int(item) <= 255:
        return str(int(item))
    raise ValueError(f"protocol is one of {', '.join(PROTOCOL_NAMES.values())} or an IP protocol number 0-255")


def _choice(choices: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(item: str) -> str:
        if item.lower() not in choices:
            raise ValueError(f"{what} is one of {', '.join(choices)}")
        return item.lower()

    return parse


def _parse_reason(item: str) -> str:
    reason = item.upper().removeprefix(_DROP_REASON_PREFIX)
    if not _REASON.match(reason):
        raise ValueError("a drop reason is a kernel name like NO_SOCKET")
    return reason


def _parse_name(item: str) -> str:
    return item


Requirement = tuple[str, str, tuple[str, ...]]  # (key, "in" | "notin" | "exists" | "!exists", values)
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_LABEL_SOURCE = "k8s:"  # Cilium's label source prefix, as Hubble's label selectors may carry it
_LABEL_SET = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


def _parse_label(item: str) -> tuple[Requirement, ...]:
    """A label selector as Kubernetes writes them (requirements ANDed by commas outside parentheses):
    key=value, key==value, key!=value, key in (a,b), key notin (a,b), key, !key."""
    parts, depth, current = [], 0, ""
    for char in item:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return tuple(_parse_requirement(part.strip()) for part in parts)


def _parse_requirement(text: str) -> Requirement:
    sets = _LABEL_SET.match(text)
    if sets:
        key, operator, values = sets.group(1), sets.group(2), tuple(v.strip() for v in sets.group(3).split(","))
    elif "!=" in text:
        key, _, value = text.partition("!=")
        operator, values = "notin", (value.strip(),)
    elif "=" in text:
        key, _, value = text.partition("=")
        operator, values = "in", (value.strip().removeprefix("="),)
    elif text.startswith("!"):
        key, operator, values = text[1:], "!exists", ()
    else:
        key, operator, values = text, "exists", ()
    key = key.strip().removeprefix(_LABEL_SOURCE)
    if not _LABEL_KEY.match(key):
        raise ValueError(f"{key!r} is not a label key (e.g. app or app.kubernetes.io/name)")
    return (key, operator, values)


def _parse_pattern(item: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(item))


_VALUE_PARSERS: dict[str, Callable[[str], object]] = {
    "pod": _parse_pod,
    "namespace": _parse_name,
    "workload": _parse_workload,
    "label": _parse_label,
    "ip": _parse_ip,
    "port": _parse_port,
    "node": _parse_name,
    "observer": _parse_pattern,
    "protocol": _parse_protocol,
    "direction": _choice(DIRECTIONS, "direction"),
    "verdict": _choice(VERDICTS, "verdict"),
    "reason": _parse_reason,
    "ifname": _parse_name,
    "type": _choice(TYPES, "type"),
}


# --- the columns a term reads -----------------------------------------------------------------------------


class Columns(Protocol):
    """Whole columns by name, whatever holds them; an absent column is all null."""

    @property
    def rows(self) -> int: ...

    def isin(self, name: str, values: Iterable[str]) -> Mask:
        """Rows whose text is one of `values` (null: False)."""
        ...

    def by_distinct(self, name: str, matches: Callable[[np.ndarray], Mask]) -> Mask:
        """`matches` evaluated once per distinct non-null text (an object array) and spread over the rows
        (null: False)."""
        ...

    def integers(self, name: str, missing: int) -> np.ndarray:
        """An integer column as int64, `missing` for null."""
        ...

    def objects(self, name: str) -> Sequence[object] | None:
        """A column of Python objects (labels), None when absent."""
        ...


@dataclass(frozen=True)
class FrameColumns:
    """The columns of a pandas frame."""

    frame: pd.DataFrame

    @property
    def rows(self) -> int:
        return len(self.frame)

    def isin(self, name: str, values: Iterable[str]) -> Mask:
        if name not in self.frame.columns:
            return np.zeros(self.rows, dtype=bool)
        return self.frame[name].isin(list(values)).to_numpy(dtype=bool, na_value=False, copy=True)

    def by_distinct(self, name: str, matches: Callable[[np.ndarray], Mask]) -> Mask:
        if name not in self.frame.columns:
            return np.zeros(self.rows, dtype=bool)
        codes, uniques = pd.factorize(self.frame[name], use_na_sentinel=True)
        return spread(matches, np.asarray(uniques, dtype=object), codes)

    def integers(self, name: str, missing: int) -> np.ndarray:
        if name not in self.frame.columns:
            return np.full(self.rows, missing, dtype=np.int64)
        return self.frame[name].to_numpy(dtype=np.int64, na_value=missing)

    def objects(self, name: str) -> Sequence[object] | None:
        return self.frame[name].array if name in self.frame.columns else None


def spread(matches: Callable[[np.ndarray], Mask], distinct: np.ndarray, codes: np.ndarray) -> Mask:
    """`matches` of the distinct values, spread over the rows by their codes (code -1, null: False)."""
    if len(distinct) == 0:
        return np.zeros(len(codes), dtype=bool)
    return np.append(matches(distinct), False)[codes]


# --- column matchers: whole-column operations returning a bool mask -----------------------------------------


def _match_pod(columns: Columns, side: Side, values: tuple) -> Mask:
    result = np.zeros(columns.rows, dtype=bool)
    for namespace, prefix in values:
        matched = columns.by_distinct(
            f"{side}_pod", lambda names, p=prefix: np.array([name.startswith(p) for name in names], dtype=bool)
        )
        if namespace is not None:
            matched &= columns.isin(f"{side}_namespace", [namespace])
        result |= matched
    return result


def _match_workload(columns: Columns, side: Side, values: tuple) -> Mask:
    result = np.zeros(columns.rows, dtype=bool)
    for namespace, name in values:
        matched = columns.isin(f"{side}_workload", [name])
        if namespace is not None:
            matched &= columns.isin(f"{side}_namespace", [namespace])
        result |= matched
    return result


def _match_ip(columns: Columns, side: Side, values: tuple) -> Mask:
    def matches(addresses: np.ndarray) -> Mask:
        parsed = [_ip_value(address) for address in addresses]  # once per distinct address
        versions = np.array([version if value is not None else 0 for version, value in parsed], dtype=np.uint8)
        words = np.array([_words(value or 0) for _, value in parsed], dtype=np.uint64).reshape(-1, 2)
        result = np.zeros(len(addresses), dtype=bool)
        for network in values:
            result |= network.contains(versions, words[:, 0], words[:, 1])
        return result

    return columns.by_distinct(f"{side}_ip", matches)


def _ip_value(text: str) -> tuple[int, int | None]:
    family, version = (socket.AF_INET6, 6) if ":" in text else (socket.AF_INET, 4)
    try:
        return version, int.from_bytes(socket.inet_pton(family, text), "big")
    except (OSError, ValueError):
        return version, None


def _match_port(columns: Columns, side: Side, values: tuple) -> Mask:
    ports = columns.integers(f"{side}_port", -1)
    result = np.zeros(columns.rows, dtype=bool)
    for low, high in values:
        result |= (ports >= low) & (ports <= high)
    return result


def _match_label(columns: Columns, side: Side, values: tuple) -> Mask:
    column = columns.objects(f"{side}_labels")
    result = np.zeros(columns.rows, dtype=bool)
    if column is None:
        return result
    verdicts: dict[int, bool] = {}  # by the labels' identity: the rows of one pod share one dict
    for row, labels in enumerate(column):
        if not isinstance(labels, dict):
            continue
        known = verdicts.get(id(labels))
        if known is None:
            known = verdicts[id(labels)] = any(_selects(selector, labels) for selector in values)
        result[row] = known
    return result


def _selects(selector: tuple[Requirement, ...], labels: dict) -> bool:
    for key, operator, values in selector:
        present = key in labels
        if operator == "exists" and not present:
            return False
        if operator == "!exists" and present:
            return False
        if operator == "in" and not (present and labels[key] in values):
            return False
        if operator == "notin" and present and labels[key] in values:
            return False
    return True


def _match_side_text(name: str) -> Callable[[Columns, Side, tuple], Mask]:
    def match(columns: Columns, side: Side, values: tuple) -> Mask:
        return columns.isin(f"{side}_{name}", values)

    return match


_SIDED_MATCHERS: dict[str, Callable[[Columns, Side, tuple], Mask]] = {
    "pod": _match_pod,
    "namespace": _match_side_text("namespace"),
    "workload": _match_workload,
    "label": _match_label,
    "ip": _match_ip,
    "port": _match_port,
    "node": _match_side_text("node"),
}


def _match_verdict(columns: Columns, kind: FrameKind, values: tuple) -> Mask:
    if kind == "events":
        dropped = columns.isin("kind", ["drop"])
        forwarded = ~dropped
    else:
        drops = columns.integers("drop_packets", 0)
        dropped = drops > 0
        # Not dropped is forwarded: a row of counters only (the retransmits or RTT of a flow whose packets no
        # hook counted) was seen and not dropped; a row of passed and dropped packets is both.
        forwarded = (drops == 0) | (columns.integers("packets", 0) > drops)
    result = np.zeros(columns.rows, dtype=bool)
    if "dropped" in values:
        result |= dropped
    if "forwarded" in values:
        result |= forwarded
    return result


def _match_type(columns: Columns, kind: FrameKind, values: tuple) -> Mask:
    if kind == "events":
        return columns.isin("kind", values)
    # A flow row is a "flow" record and also carries the drops, retransmits and resets of its interval.
    result = np.full(columns.rows, "flow" in values, dtype=bool)
    for event_kind, counter in (("drop", "drop_packets"), ("retransmit", "retransmits"), ("reset", "resets")):
        if event_kind in values:
            result |= columns.integers(counter, 0) > 0
    return result


def _match_unsided_text(name: str) -> Callable[[Columns, FrameKind, tuple], Mask]:
    def match(columns: Columns, kind: FrameKind, values: tuple) -> Mask:
        return columns.isin(name, values)

    return match


def _match_observer(columns: Columns, kind: FrameKind, values: tuple) -> Mask:
    return columns.by_distinct(
        "node", lambda nodes: np.array([any(p.match(n) for p in values) for n in nodes], dtype=bool)
    )


_UNSIDED_MATCHERS: dict[str, Callable[[Columns, FrameKind, tuple], Mask]] = {
    "observer": _match_observer,
    "protocol": _match_unsided_text("protocol"),
    "direction": _match_unsided_text("direction"),
    "verdict": _match_verdict,
    "reason": _match_unsided_text("drop_reason"),
    "ifname": _match_unsided_text("ifname"),
    "type": _match_type,
}
