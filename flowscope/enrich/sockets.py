"""Local sockets learned from connect/accept/close events: 5-tuple -> cgroup, netns, pid and comm.

A socket event knows which process (and so which container) owns its end of a connection; tc flows on
the same 5-tuple do not. Joining the flows to this table names both ends of a connection between two
local processes, including two hostNetwork pods that share the node's address, with pid and command.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KEY = ["protocol", "local_ip", "local_port", "remote_ip", "remote_port"]
VALUES = ["cgroup_id", "netns", "pid", "comm"]
LOCAL_SOCKET_KINDS = ("connect", "accept", "close")  # for these, the event's src is the local socket


def _empty() -> pd.DataFrame:
    dtypes = {
        "protocol": "string",
        "local_ip": "string",
        "local_port": "UInt16",
        "remote_ip": "string",
        "remote_port": "UInt16",
        "cgroup_id": "UInt64",
        "netns": "UInt32",
        "pid": "Int64",
        "comm": "string",
        "closed": "float64",  # epoch seconds of the close event, NaN while open
        "seen": "float64",  # epoch seconds of the latest event
    }
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def _epoch_seconds(times: pd.Series) -> np.ndarray:
    values = times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    seconds = values.astype("int64") / 1e9
    seconds[np.isnat(values)] = np.nan
    return seconds


class SocketTable:
    def __init__(self, grace: float, capacity: int = 1 << 18) -> None:
        self.grace = grace
        self.capacity = capacity
        self.evicted = 0  # open sockets forgotten because the table was full (oldest first)
        self._table = _empty()

    def __len__(self) -> int:
        return len(self._table)

    def learn(self, events: pd.DataFrame, now: float) -> None:
        """Adds the sockets of this batch's connect/accept events and marks closed ones."""
        local = events[
            events["kind"].isin(LOCAL_SOCKET_KINDS).fillna(False).to_numpy(dtype=bool)
            & events[["protocol", "src_ip", "src_port", "dst_ip", "dst_port"]].notna().all(axis=1).to_numpy()
        ]
        if local.empty:
            self._prune(now)
            return
        seen = _epoch_seconds(local["time"])
        rows = pd.DataFrame(
            {
                "protocol": local["protocol"].to_numpy(),
                "local_ip": local["src_ip"].to_numpy(),
                "local_port": local["src_port"].to_numpy(),
                "remote_ip": local["dst_ip"].to_numpy(),
                "remote_port": local["dst_port"].to_numpy(),
                "cgroup_id": local["cgroup_id"].to_numpy(),
                "netns": local["netns"].to_numpy(),
                "pid": local["pid"].to_numpy(),
                "comm": local["comm"].to_numpy(),
                "closed": np.where(local["kind"].to_numpy() == "close", seen, np.nan),
                "seen": seen,
            }
        ).astype(self._table.dtypes.to_dict())
        closing = rows["closed"].notna().to_numpy()
        # A close may be reported from softirq or timer context: the process facts of the socket are the
        # ones its connect or accept reported, so a close only marks a known socket closed.
        closes = rows[closing]
        matched = closes.merge(self._table[KEY].reset_index(names="row"), on=KEY, how="left")
        hit = matched["row"].notna().to_numpy()
        if hit.any():
            positions = matched.loc[hit, "row"].to_numpy(dtype=np.int64)
            self._table.loc[positions, ["closed", "seen"]] = matched.loc[hit, ["closed", "seen"]].to_numpy()
        fresh = pd.concat([rows[~closing], closes[~hit]])
        table = pd.concat([self._table, fresh], ignore_index=True) if len(self._table) else fresh
        self._table = table.drop_duplicates(KEY, keep="last").reset_index(drop=True)
        self._prune(now)

    def _prune(self, now: float) -> None:
        table = self._table
        expired = (table["closed"] + self.grace < now).to_numpy()
        if expired.any():
            table = table[~expired]
        if len(table) > self.capacity:
            excess = len(table) - self.capacity
            self.evicted += excess
            table = table.sort_values("seen", kind="stable").iloc[excess:]
        if table is not self._table:
            self._table = table.reset_index(drop=True)

    def lookup(self, protocol: pd.Series, local_ip: pd.Series, local_port: pd.Series, remote_ip: pd.Series,
               remote_port: pd.Series) -> pd.DataFrame:  # fmt: skip
        """cgroup_id, netns, pid and comm of the local socket on each row's 5-tuple (null where unknown)."""
        keys = pd.DataFrame(
            {
                "protocol": protocol.to_numpy(),
                "local_ip": local_ip.to_numpy(),
                "local_port": local_port.to_numpy(),
                "remote_ip": remote_ip.to_numpy(),
                "remote_port": remote_port.to_numpy(),
            }
        ).astype(self._table[KEY].dtypes.to_dict())
        if self._table.empty:
            return _empty()[VALUES].reindex(range(len(keys)))
        return keys.merge(self._table[KEY + VALUES], on=KEY, how="left")[VALUES]
