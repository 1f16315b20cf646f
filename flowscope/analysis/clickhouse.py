"""pandas over the ClickHouse flow store: the same typed DataFrame as the other readers (schema.as_read), with
the filter language translated to SQL (flowscope.formats.clickhouse.where: parameters bound, never pasted)."""

from __future__ import annotations

import pandas as pd

from flowscope.config import ClickHouseConfig
from flowscope.filters import parse_filter
from flowscope.formats.clickhouse import (
    AUTHENTICATION_CODES,
    ConnectionSettingsError,
    Layout,
    client,
    connection,
    error_code,
    first_line,
    frame_from_columns,
    is_network_error,
    parse_version,
    select_expressions,
    where,
)
from flowscope.schema import as_read


class ClickHouseReadError(RuntimeError):
    """The store cannot be read; the message is one sentence saying why."""


def read_clickhouse(
    url: str,
    since: pd.Timestamp | str | None = None,
    until: pd.Timestamp | str | None = None,
    filter: str = "",
    *,
    table: str = "flows",
    password: str | None = None,
    password_file: str | None = None,
) -> pd.DataFrame:
    """The flows (or, with table="events", the events) of `url`'s database between `since` and `until` (UTC,
    inclusive: a flow whose interval meets the range, an event whose time lies in it, as read_flowlog takes
    them) that `filter` selects, in time order."""
    if table not in ("flows", "events"):
        raise ValueError(f"table is flows or events, not {table!r}")
    settings = ClickHouseConfig(url=url, password=password, password_file=password_file)
    try:
        target = connection(settings)
    except ConnectionSettingsError as err:
        raise ClickHouseReadError(str(err)) from None
    chosen = parse_filter(filter)
    start = pd.Timestamp(since, tz="UTC") if isinstance(since, str) else since
    end = pd.Timestamp(until, tz="UTC") if isinstance(until, str) else until
    connected = client(target, numpy=True)
    try:
        version = parse_version(connected.execute("SELECT version()")[0][0])
        layout = Layout(target.database, version)
        clause = where(chosen, table, start, end)
        names = ", ".join(select_expressions(table))
        order = "time, time_start_ns" if table == "flows" else "time, time_ns"
        data = connected.execute(
            f"SELECT {names} FROM {layout.table(table)} WHERE {clause.sql()} ORDER BY {order}",
            clause.parameters,
            columnar=True,
        )
    except Exception as err:
        if error_code(err) in AUTHENTICATION_CODES:
            raise ClickHouseReadError(
                f"ClickHouse at {target.shown} refused user {target.user!r}: {first_line(err)}."
            ) from None
        if is_network_error(err):
            raise ClickHouseReadError(f"cannot reach ClickHouse at {target.shown}: {first_line(err)}.") from None
        raise ClickHouseReadError(f"ClickHouse at {target.shown}: {first_line(err)}.") from None
    finally:
        connected.disconnect()
    return as_read(frame_from_columns(table, data), table)
