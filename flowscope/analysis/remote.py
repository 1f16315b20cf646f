"""pandas over a running flowscope server: `read_grpc(server, since=, until=, filter=)` asks an agent or relay
for the records of its ring (no follow) and returns them as a typed DataFrame: the columns of flowscope.schema,
typed as the other readers type them (schema.as_read), as a flow log or a capture reads."""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd

from flowscope.schema import as_read


def read_grpc(
    server: str, since: Any = None, until: Any = None, filter: str = "", records: Literal["flows", "events"] = "flows",
    **client: Any,
) -> pd.DataFrame:  # fmt: skip
    """The flow (or event) records that `server` (unix:///PATH or HOST:PORT) holds between `since` and `until`
    and that `filter` (the filter language of `flowscope top`) passes, in time order. `client` takes the
    settings of flowscope.config.ClientConfig (tls, tls_ca, tls_client_cert, tls_client_key, timeout, ...).
    Raises flowscope.proto.client.ClientError, one sentence, when the server cannot answer or refuses."""
    from flowscope.config import ClientConfig
    from flowscope.proto import codec
    from flowscope.proto.client import Client, request

    connection = Client(ClientConfig(server=server, **client))
    try:
        kind = "flow" if records == "flows" else "event"
        responses = connection.flows(request(allow=[filter] if filter else [], since=since, until=until))
        messages = [getattr(r, kind) for r in responses if r.WhichOneof("response") == kind]
    finally:
        connection.close()
    return as_read(codec.flows_from(messages) if kind == "flow" else codec.events_from(messages), records)
