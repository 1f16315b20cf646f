"""flowscope's records in ClickHouse: the tables (versioned DDL, for one server or a cluster, gated on the
server's version), the columns a FlowBatch becomes, and the filter language as SQL.

Tables, in the database of the URL (default `flowscope`):

    flows, events        raw records (MergeTree, a partition per day, ORDER BY time and identity); every
                         column of flowscope.schema, plus `time` (the interval's end, DateTime, for
                         partitions and Grafana), `src_addr`/`dst_addr` (FixedString(16), IPv4 mapped into
                         IPv6, for CIDR filters) and `block_id` (the insert's id: a retry after an outage
                         checks it, so nothing is written twice). Times are UInt64 nanoseconds since the
                         epoch (`time_start_ns`, ...) on every version (DateTime64 is 20.1 and later).
    flows_1m             per minute, node, direction, protocol and namespace/workload pair: flows, packets,
                         bytes, drops, retransmits, resets (SummingMergeTree, kept by a materialized view;
                         read it with sum() ... GROUP BY: parts merge when they please)
    drops_1m             per minute, node, reason and the flow's two ends: dropped packets and bytes
    schema_versions      the migrations applied (on a cluster replicated to every server)

With a cluster (`--clickhouse-cluster NAME`) every statement runs ON CLUSTER, the tables above are
Distributed over `<name>_local` ReplicatedMergeTree tables (ZooKeeper path
/clickhouse/tables/{shard}/<db>/<table>, replica {replica}: the servers' macros), and the materialized views
feed the local rollups on each shard.

Servers from 20.3 on (the first LTS with all of them) also get LowCardinality identity text, compression
codecs and a TTL on the raw tables; older ones (Debian's 18.16) get the same columns without them.

Nothing here imports clickhouse_driver: the sink (flowscope.exporters.clickhouse) and the reader
(flowscope.analysis) bring the client.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd

from flowscope.config import ClickHouseConfig, url_without_password
from flowscope.filters import Filter, IPNetwork, Term
from flowscope.schema import EVENT_COLUMNS, FLOW_COLUMNS, TEXT, UTC_TIME, conform

log = logging.getLogger(__name__)

MODERN = (20, 3)  # LowCardinality, codecs and TTL from here on
IDENTITY_TEXT = ("namespace", "pod", "workload", "workload_kind", "container", "comm", "node", "identity_source")
LOW_CARDINALITY = {"node", "ifname", "direction", "protocol", "drop_reason", "kind", "location", "state"} | {
    f"{side}_{name}" for side in ("src", "dst") for name in IDENTITY_TEXT
}
_INTEGER = {"UInt8": "UInt8", "UInt16": "UInt16", "UInt32": "UInt32", "UInt64": "UInt64", "Int64": "Int64"}


class SchemaError(ValueError):
    """A server or a table that flowscope cannot use; the message says what to do."""


class ConnectionSettingsError(ValueError):
    """A URL or password setting that cannot be used; the message is one sentence saying what to do."""


AUTHENTICATION_CODES = {192, 193, 194, 516}  # UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD, AUTHENTICATION_FAILED


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class Layout:
    """How the tables look on one server (or cluster): its version's features and where tables live."""

    database: str
    version: tuple[int, ...]
    cluster: str | None = None
    ttl_days: int = 30

    @property
    def modern(self) -> bool:
        return self.version >= MODERN

    def on_cluster(self) -> str:
        return f" ON CLUSTER {quote_name(self.cluster)}" if self.cluster else ""

    def table(self, name: str, local: bool = False) -> str:
        """The qualified name of a table; `local`: the shard's own table behind a Distributed one."""
        suffix = "_local" if local and self.cluster else ""
        return f"{quote_name(self.database)}.{quote_name(name + suffix)}"


def quote_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise SchemaError(f"{name!r} is not a ClickHouse name flowscope uses (letters, digits and _)")
    return f"`{name}`"


# ---- reaching the server ----------------------------------------------------------------------------------


@dataclass
class Connection:
    """Where and as whom: from the URL, with the password from the settings rather than the URL if given."""

    host: str
    port: int
    user: str
    password: str
    database: str
    secure: bool
    options: dict[str, str] = field(default_factory=dict)

    @property
    def shown(self) -> str:
        """The URL without the password, for logs and errors."""
        scheme = "clickhouses" if self.secure else "clickhouse"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.database}"


URL_OPTIONS = {"secure", "verify", "ca_certs"}  # ?secure=1 (TLS), verify=0 (no certificate check), ca_certs=FILE
TRUE, FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


def connection(config: ClickHouseConfig) -> Connection:
    """The connection the settings describe; raises ConnectionSettingsError for a URL that does not parse."""
    url = config.url or ""
    parts = urlsplit(url)
    if parts.scheme not in ("clickhouse", "clickhouses") or not parts.hostname:
        raise ConnectionSettingsError(
            f"--clickhouse {url_without_password(url)!r} is not a URL like clickhouse://USER@HOST:9000/DATABASE."
        )
    shown = url_without_password(url)
    options = {
        unquote(name): unquote(value)
        for name, _, value in (
            pair.partition("=") if "=" in pair else (pair, "=", "1") for pair in parts.query.split("&")
        )
        if name
    }
    unknown = sorted(set(options) - URL_OPTIONS)
    if unknown:  # a misspelt secure=1 would send the password in the clear
        raise ConnectionSettingsError(
            f"--clickhouse {shown!r}: unknown option {unknown[0]!r} (known: {', '.join(sorted(URL_OPTIONS))})."
        )
    for name in ("secure", "verify"):
        if name in options and options[name].lower() not in TRUE | FALSE:
            raise ConnectionSettingsError(f"--clickhouse {shown!r}: {name}={options[name]} is not 1 or 0.")
    secure = parts.scheme == "clickhouses" or options.pop("secure", "0").lower() in TRUE
    if not secure and {"verify", "ca_certs"} & set(options):
        raise ConnectionSettingsError(
            f"--clickhouse {shown!r}: verify and ca_certs are for TLS; use clickhouses:// or add secure=1."
        )
    try:
        port = parts.port or (9440 if secure else 9000)  # the native protocol's TLS port when secure
    except ValueError:
        raise ConnectionSettingsError(f"--clickhouse {shown!r}: the port is not a number.") from None
    password = config.password
    if password is None and config.password_file:
        try:
            with open(config.password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\n")
        except OSError as err:
            raise ConnectionSettingsError(
                f"cannot read --clickhouse-password-file {config.password_file} ({err.strerror})."
            ) from None
    if password is None and parts.password is not None:
        log.warning("the ClickHouse password is in the URL, which ps shows; use --clickhouse-password-file")
        password = unquote(parts.password)
    database = parts.path.strip("/") or "flowscope"
    return Connection(
        parts.hostname, port, unquote(parts.username or "default"), password or "", database, secure, options
    )


def client(target: Connection, timeout: float = 10.0, numpy: bool = False) -> Any:
    """A clickhouse-driver Client; `numpy`: columnar SELECTs return numpy arrays (for reading)."""
    from clickhouse_driver import Client

    # Its connection failures come with a traceback at WARNING; flowscope says what happened in one line.
    logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)

    tls = {}
    if target.secure:
        tls = {
            "secure": True,
            "verify": target.options.get("verify", "1").lower() in TRUE,
            **({"ca_certs": target.options["ca_certs"]} if "ca_certs" in target.options else {}),
        }
    return Client(
        target.host, port=target.port, user=target.user, password=target.password, database="default",
        connect_timeout=timeout, send_receive_timeout=max(timeout, 30.0),
        settings={"insert_distributed_sync": 1, **({"use_numpy": True} if numpy else {})},
        client_name="flowscope", **tls,
    )  # fmt: skip


def is_network_error(err: BaseException) -> bool:
    """An outage (the server unreachable or gone mid-query), as opposed to a query the server refused."""
    from clickhouse_driver import errors

    return isinstance(err, errors.NetworkError | errors.SocketTimeoutError | EOFError | OSError)


def error_code(err: BaseException) -> int | None:
    return getattr(err, "code", None)


def first_line(err: BaseException) -> str:
    """The server's own words (a ServerException's message without the stack), or the error's first line."""
    text = str(getattr(err, "message", "") or err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line.removeprefix("DB::Exception: ").split(". Stack trace")[0].rstrip(".")


# ---- columns ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # the type on an old server
    dtype: str  # the schema's pandas dtype ("" for columns of the table only)
    codec: str = ""  # a compression codec on modern servers

    def sql(self, modern: bool) -> str:
        kind = self.type
        if modern and self.name in LOW_CARDINALITY:
            kind = f"LowCardinality({kind})"
        codec = f" CODEC({self.codec})" if modern and self.codec else ""
        return f"{quote_name(self.name)} {kind}{codec}"


def _record_column(name: str, dtype: str) -> Column:
    if dtype == UTC_TIME:
        return Column(f"{name}_ns", "Nullable(UInt64)", dtype, "Delta, ZSTD")
    if dtype == TEXT or dtype == "object":
        return Column(name, "Nullable(String)", dtype)
    if dtype in _INTEGER:
        return Column(name, f"Nullable({_INTEGER[dtype]})", dtype, "ZSTD" if dtype.endswith("64") else "")
    raise SchemaError(f"column {name} of dtype {dtype} has no ClickHouse type")


def columns(records: Mapping[str, str]) -> list[Column]:
    """The table's columns for records of `records` (FLOW_COLUMNS or EVENT_COLUMNS)."""
    table = [Column("time", "DateTime", "", "Delta, ZSTD")]
    for name, dtype in records.items():
        table.append(_record_column(name, dtype))
        if name in ("src_ip", "dst_ip"):
            table.append(Column(f"{name[:3]}_addr", "FixedString(16)", ""))
    table.append(Column("block_id", "String", ""))
    return table


FLOW_TABLE = columns(FLOW_COLUMNS)
EVENT_TABLE = columns(EVENT_COLUMNS)
TABLES = {"flows": FLOW_TABLE, "events": EVENT_TABLE}
TIME_SOURCE = {"flows": "time_end", "events": "time"}  # the record time that `time` holds, to the second


# ---- DDL --------------------------------------------------------------------------------------------------


def _engine(layout: Layout, table: str, summing: bool = False) -> str:
    base = "SummingMergeTree" if summing else "MergeTree"
    if not layout.cluster:
        return f"{base}()"
    path = f"'/clickhouse/tables/{{shard}}/{layout.database}/{table}'"
    return f"Replicated{base}({path}, '{{replica}}')"


def _raw_table(layout: Layout, name: str) -> list[str]:
    body = ",\n  ".join(column.sql(layout.modern) for column in TABLES[name])
    ttl = f"\nTTL time + INTERVAL {int(layout.ttl_days)} DAY" if layout.modern and layout.ttl_days else ""
    order = "(time, ifNull(node, ''), ifNull(src_namespace, ''), ifNull(src_workload, ''), ifNull(dst_namespace, ''))"
    statements = [
        f"CREATE TABLE IF NOT EXISTS {layout.table(name, local=True)}{layout.on_cluster()} (\n  {body}\n)\n"
        f"ENGINE = {_engine(layout, name)}\nPARTITION BY toYYYYMMDD(time)\nORDER BY {order}{ttl}"
    ]
    if layout.cluster:
        statements.append(_distributed(layout, name))
    return statements


# Records of one flow stay on one shard (its addresses and ports hash there); rollups are only read.
SHARDING = "cityHash64(ifNull(src_ip, ''), ifNull(dst_ip, ''), ifNull(src_port, 0), ifNull(dst_port, 0))"


def _distributed(layout: Layout, name: str) -> str:
    key = SHARDING if name in TABLES else "rand()"
    return (
        f"CREATE TABLE IF NOT EXISTS {layout.table(name)}{layout.on_cluster()} AS {layout.table(name, local=True)}\n"
        f"ENGINE = Distributed({quote_name(layout.cluster or '')}, {quote_name(layout.database)}, "
        f"{quote_name(name + '_local')}, {key})"
    )


ROLLUP_KEYS = {
    "flows_1m": ("node", "direction", "protocol", "src_namespace", "src_workload", "dst_namespace", "dst_workload"),
    "drops_1m": ("node", "drop_reason", "src_namespace", "src_workload", "dst_namespace", "dst_workload"),
}
ROLLUP_SUMS = {
    "flows_1m": ("flows", "packets", "bytes", "drop_packets", "drop_bytes", "retransmits", "resets"),
    "drops_1m": ("drop_packets", "drop_bytes"),
}


def _rollup(layout: Layout, name: str) -> list[str]:
    keys, sums = ROLLUP_KEYS[name], ROLLUP_SUMS[name]
    body = ",\n  ".join(
        [
            "`minute` DateTime",
            *(Column(k, "String", "").sql(layout.modern) for k in keys),
            *(f"`{s}` UInt64" for s in sums),
        ]
    )
    order = ", ".join(("minute", *keys))
    selected = ", ".join(
        ["toStartOfMinute(time) AS minute", *(f"ifNull({k}, '') AS {k}" for k in keys)]
        + [("count() AS flows" if s == "flows" else f"sum(ifNull({s}, 0)) AS {s}") for s in sums]
    )
    # HAVING, not WHERE: old servers read the column's name in WHERE as the sum's alias
    having = "\nHAVING drop_packets > 0" if name == "drops_1m" else ""
    statements = [
        f"CREATE TABLE IF NOT EXISTS {layout.table(name, local=True)}{layout.on_cluster()} (\n  {body}\n)\n"
        f"ENGINE = {_engine(layout, name, summing=True)}\nPARTITION BY toYYYYMMDD(minute)\nORDER BY ({order})",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {layout.table(name + '_mv')}{layout.on_cluster()}\n"
        f"TO {layout.table(name, local=True)} AS\nSELECT {selected}\nFROM {layout.table('flows', local=True)}\n"
        f"GROUP BY {', '.join(('minute', *keys))}{having}",
    ]
    if layout.cluster:
        statements.append(_distributed(layout, name))
    return statements


def migrations(layout: Layout) -> list[tuple[int, list[str]]]:
    """The versioned DDL: (version, statements), applied in order, each version once (schema_versions)."""
    return [
        (
            1,
            [
                *_raw_table(layout, "flows"),
                *_raw_table(layout, "events"),
                *_rollup(layout, "flows_1m"),
                *_rollup(layout, "drops_1m"),
            ],
        ),
    ]


def bootstrap(layout: Layout) -> list[str]:
    """What exists before any migration: the database and the table that records which ran. On a cluster that
    table is one ReplicatedMergeTree with a replica on every server of every shard (one ZooKeeper path, replica
    `{shard}-{replica}`), so that whichever server an agent connects to knows every version applied."""
    engine = "MergeTree()"
    if layout.cluster:
        engine = (
            f"ReplicatedMergeTree('/clickhouse/flowscope/{layout.database}/schema_versions', '{{shard}}-{{replica}}')"
        )
    return [
        f"CREATE DATABASE IF NOT EXISTS {quote_name(layout.database)}{layout.on_cluster()}",
        f"CREATE TABLE IF NOT EXISTS {layout.table('schema_versions')}{layout.on_cluster()} "
        f"(version UInt32, applied DateTime) ENGINE = {engine} ORDER BY version",
    ]


# ---- rows to insert ----------------------------------------------------------------------------------------


def _nullable(series: pd.Series) -> list[Any]:
    return series.astype(object).where(series.notna(), None).tolist()


def _addresses(series: pd.Series) -> list[bytes]:
    """Text addresses as 16 bytes (IPv4 mapped into IPv6), zeros where there is none; once per distinct one."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    table = [_address_bytes(text) for text in uniques] + [bytes(16)]
    return [table[code] for code in codes.tolist()]


def _address_bytes(text: str) -> bytes:
    try:
        if ":" in text:
            return socket.inet_pton(socket.AF_INET6, text)
        return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return bytes(16)


def time_seconds(table: str, frame: pd.DataFrame) -> np.ndarray:
    """The `time` column of `frame`'s records in `table`: seconds since the epoch (a missing time is 0)."""
    when = frame[TIME_SOURCE[table]]
    return when.to_numpy(dtype="datetime64[s]", na_value=np.datetime64(0, "s")).astype("int64")


def insert_columns(table: str, frame: pd.DataFrame, block_id: str) -> tuple[list[str], list[list[Any]]]:
    """The column names and columnar data of an INSERT of `frame`'s records into `table`."""
    names, data = [], []
    for column in TABLES[table]:
        names.append(column.name)
        if column.name == "time":
            data.append(time_seconds(table, frame).tolist())
        elif column.name == "block_id":
            data.append([block_id] * len(frame))
        elif column.name.endswith("_addr"):
            data.append(_addresses(frame[column.name.replace("_addr", "_ip")]))
        elif column.dtype == UTC_TIME:
            source = frame[column.name.removesuffix("_ns")]
            nanos = source.to_numpy(dtype="datetime64[ns]").astype("int64")
            data.append(
                [None if missing else int(n) for n, missing in zip(nanos.tolist(), source.isna().tolist(), strict=True)]
            )
        elif column.dtype == "object":
            data.append(
                [None if value is None else json.dumps(value, sort_keys=True) for value in frame[column.name].tolist()]
            )
        else:
            data.append(_nullable(frame[column.name]))
    return names, data


# ---- reading back ------------------------------------------------------------------------------------------


def _is_number(dtype: str) -> bool:
    return dtype == UTC_TIME or dtype in _INTEGER


def select_expressions(table: str) -> list[str]:
    """What a read selects: the schema's columns in its order, numbers as a value and a null flag (so that the
    client decodes them into numpy arrays) and text as it is."""
    records = FLOW_COLUMNS if table == "flows" else EVENT_COLUMNS
    selected = []
    for name, dtype in records.items():
        column = quote_name(f"{name}_ns" if dtype == UTC_TIME else name)
        selected += [f"ifNull({column}, 0)", f"isNull({column})"] if _is_number(dtype) else [column]
    return selected


def _text(values: Any) -> pd.arrays.ArrowStringArray:
    """Text values (None for null) as the schema's string array, built once per distinct value."""
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    return pd.array(np.asarray(uniques, dtype=object), dtype=TEXT).take(codes, allow_fill=True)


def frame_from_columns(table: str, data: Sequence[Any]) -> pd.DataFrame:
    """The columns of select_expressions(table) (a columnar, numpy SELECT) as a frame of the schema's columns and
    dtypes."""
    records = FLOW_COLUMNS if table == "flows" else EVENT_COLUMNS
    columns: dict[str, Any] = {}
    parts = iter(data)
    for name, dtype in records.items():
        if not data:
            columns[name] = pd.array([], dtype=dtype if dtype != "object" else object)
            continue
        if _is_number(dtype):
            values, missing = np.asarray(next(parts)), np.asarray(next(parts), dtype=bool)
            if dtype == UTC_TIME:
                times = pd.Series(pd.to_datetime(values.astype("int64"), unit="ns", utc=True))
                times[missing] = pd.NaT
                columns[name] = times
            else:
                columns[name] = pd.arrays.IntegerArray(values.astype(dtype.lower()), missing)
        elif dtype == "object":
            columns[name] = [None if text is None else json.loads(text) for text in next(parts)]
        else:
            columns[name] = _text(next(parts))
    return conform(pd.DataFrame(columns), records)


# ---- the filter language as SQL ----------------------------------------------------------------------------


@dataclass
class Where:
    """A WHERE clause with its parameters (clickhouse-driver binds %(name)s; nothing is pasted into SQL)."""

    table: str
    clauses: list[str]
    parameters: dict[str, Any]

    def sql(self) -> str:
        return " AND ".join(f"({c})" for c in self.clauses) if self.clauses else "1"

    def bind(self, value: Any) -> str:
        name = f"p{len(self.parameters)}"
        self.parameters[name] = value
        return f"%({name})s"


def where(filter: Filter, table: str, since: pd.Timestamp | None = None, until: pd.Timestamp | None = None) -> Where:
    """The SQL of `filter` over `table`, and of a time range: the same records filters.Filter selects, and the
    same range read_flowlog takes (a flow whose interval meets [since, until], an event whose time lies in it;
    to the nanosecond). `time` (the end, to the second: the sorting key's first column) bounds what is read."""
    clause = Where(table, [], {})
    end, start = ("time_end_ns", "time_start_ns") if table == "flows" else ("time_ns", "time_ns")
    if since is not None:
        since = pd.Timestamp(since)
        clause.clauses.append(f"time >= toDateTime({clause.bind(math.floor(since.timestamp()))})")
        clause.clauses.append(f"{end} IS NULL OR {end} >= {clause.bind(since.value)}")
    if until is not None:
        until = pd.Timestamp(until)
        clause.clauses.append(f"{start} IS NULL OR {start} <= {clause.bind(until.value)}")
        if table == "events":  # an event's time is its end: the key bounds it (a flow's end may come later)
            clause.clauses.append(f"time <= toDateTime({clause.bind(math.floor(until.timestamp()))})")
    for term in filter.terms:
        clause.clauses.append(_term_sql(term, table, clause))
    return clause


def _term_sql(term: Term, table: str, clause: Where) -> str:
    if term.field in ("pod", "namespace", "workload", "ip", "port", "node"):
        sides = (term.side,) if term.side else ("src", "dst")
        parts = [_sided_sql(term.field, side, term.values, clause) for side in sides]
        if term.field == "node" and term.side is None:
            parts.append(_in("node", term.values, clause))
        sql = " OR ".join(f"({p})" for p in parts)
    else:
        sql = _unsided_sql(term.field, term.values, table, clause)
    return f"NOT ({sql})" if term.negated else sql


def _in(column: str, values: Sequence[Any], clause: Where) -> str:
    # ifNull: a NULL never matches, and NOT of it is true, as the pandas masks treat missing values; a
    # column the table does not have (events have no direction) matches nothing, as in pandas
    if column not in {c.name for c in TABLES[clause.table]}:
        return "0"
    return f"ifNull({column} IN {clause.bind(tuple(values))}, 0)"


def _sided_sql(field: str, side: str, values: tuple, clause: Where) -> str:
    alternatives = []
    for value in values:
        if field == "pod":
            namespace, prefix = value
            match = f"ifNull(startsWith({side}_pod, {clause.bind(prefix)}), 0)"
            if namespace is not None:
                match += f" AND {_in(side + '_namespace', [namespace], clause)}"
            alternatives.append(match)
        elif field == "workload":
            namespace, name = value
            match = _in(f"{side}_workload", [name], clause)
            if namespace is not None:
                match += f" AND {_in(side + '_namespace', [namespace], clause)}"
            alternatives.append(match)
        elif field == "ip":
            low, high = _bounds(value)
            alternatives.append(
                f"{side}_ip IS NOT NULL AND {_in('ip_version', [value.version], clause)} AND {side}_addr "
                f"BETWEEN unhex({clause.bind(low.hex())}) AND unhex({clause.bind(high.hex())})"
            )
        elif field == "port":
            low, high = value
            alternatives.append(f"ifNull({side}_port BETWEEN {clause.bind(low)} AND {clause.bind(high)}, 0)")
        else:  # namespace, node
            alternatives.append(_in(f"{side}_{field}", [value], clause))
    return " OR ".join(f"({a})" for a in alternatives)


def _bounds(network: IPNetwork) -> tuple[bytes, bytes]:
    """The first and last 16-byte address of a network, IPv4 mapped into IPv6 as src_addr holds it."""
    high, low = network.network
    mask_high, mask_low = network.mask
    first = (high << 64) | low
    last = first | (((1 << 128) - 1) ^ ((mask_high << 64) | mask_low))
    if network.version == 4:
        span = (1 << 32) - 1
        first, last = (0xFFFF << 32) | (first & span), (0xFFFF << 32) | (last & span)
    return first.to_bytes(16, "big"), last.to_bytes(16, "big")


def _unsided_sql(field: str, values: tuple, table: str, clause: Where) -> str:
    if field in ("protocol", "direction", "ifname"):
        return _in(field, values, clause)
    if field == "reason":
        return _in("drop_reason", values, clause)
    if field == "verdict":
        if table == "events":
            dropped, forwarded = "ifNull(kind = 'drop', 0)", "NOT ifNull(kind = 'drop', 0)"
        else:
            dropped = "ifNull(drop_packets, 0) > 0"
            forwarded = "ifNull(drop_packets, 0) = 0 OR ifNull(packets, 0) > ifNull(drop_packets, 0)"
        chosen = [dropped] * ("dropped" in values) + [forwarded] * ("forwarded" in values)
        return " OR ".join(f"({c})" for c in chosen)
    if field == "type":
        if table == "events":
            return _in("kind", values, clause)
        chosen = ["1"] if "flow" in values else []
        for kind, counter in (("drop", "drop_packets"), ("retransmit", "retransmits"), ("reset", "resets")):
            if kind in values:
                chosen.append(f"ifNull({counter}, 0) > 0")
        return " OR ".join(f"({c})" for c in chosen) or "0"
    raise SchemaError(f"the filter field {field} has no SQL form")
