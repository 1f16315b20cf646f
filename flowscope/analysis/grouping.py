"""How flows are grouped into rows: by flow, pod, workload, namespace, process or node — shared by `top`, the
pandas helpers (flowscope.analysis) and the exporters that aggregate (Prometheus).

Grouping by pod, workload, namespace, process or node counts a flow for both of its ends (a pod's row is
what it sent plus what it received). Pods and workloads without identity fall back to their IP address,
so a node without Kubernetes still shows who talks. For the other groupings an end without identity is
left out unless neither end has one; those flows show as "(unknown)".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flowscope.display import endpoint, side_name

GROUPINGS = ("flow", "pod", "workload", "namespace", "process", "node")
UNKNOWN = "(unknown)"


def text_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A text column as an object array with "" for null (keys must not be null to group and align)."""
    if name not in frame.columns:
        return np.full(len(frame), "", dtype=object)
    column = frame[name]
    if isinstance(column.dtype, pd.CategoricalDtype):  # the readers' identity text: a string per category, shared
        return np.append(np.asarray(column.cat.categories, dtype=object), "")[column.cat.codes.to_numpy()]
    if not isinstance(column.dtype, pd.StringDtype):
        column = column.astype("string")
    return column.to_numpy(dtype=object, na_value="")


def number_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), -1, dtype=np.int64)
    return frame[name].to_numpy(dtype=np.int64, na_value=-1)


@dataclass(frozen=True)
class Grouping:
    """How rows are keyed: the identity fields of one end of a flow, and how a key reads."""

    name: str
    fields: tuple[str, ...]  # identity fields of one side (src_/dst_ prefixed in the frames)
    ip_fallback: bool  # an end without identity is keyed by its address

    @property
    def key_names(self) -> tuple[str, ...]:
        if self.name == "flow":
            return ("protocol", "src_ip", "src_port", "dst_ip", "dst_port")
        return (*self.fields, "ip") if self.ip_fallback else self.fields

    def side_keys(self, frame: pd.DataFrame, side: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The key columns of one end and whether that end has identity."""
        keys: dict[str, np.ndarray] = {}
        for name in self.fields:
            column = f"{side}_{name}"
            keys[name] = number_column(frame, column) if name == "pid" else text_column(frame, column)
        known = np.zeros(len(frame), dtype=bool)
        for name, values in keys.items():
            known |= values != (-1 if name == "pid" else "")
        if self.ip_fallback:
            keys["ip"] = np.where(known, "", text_column(frame, f"{side}_ip"))
        return keys, known

    def keyed(self, frame: pd.DataFrame, values: Sequence[str]) -> pd.DataFrame:
        """`frame`'s `values` columns with this grouping's key columns; a row per counted end of a flow.

        Column "row" is the position of the row in `frame` that the key came from.
        """
        if self.name == "flow":
            keys = {
                "protocol": text_column(frame, "protocol"),
                "src_ip": text_column(frame, "src_ip"),
                "src_port": number_column(frame, "src_port"),
                "dst_ip": text_column(frame, "dst_ip"),
                "dst_port": number_column(frame, "dst_port"),
            }
            return _keyed_part(frame, keys, np.ones(len(frame), dtype=bool), values)
        src_keys, src_known = self.side_keys(frame, "src")
        dst_keys, dst_known = self.side_keys(frame, "dst")
        if self.ip_fallback:
            src_rows = dst_rows = np.ones(len(frame), dtype=bool)
        else:
            src_rows, dst_rows = src_known | ~dst_known, dst_known
        parts = [_keyed_part(frame, src_keys, src_rows, values), _keyed_part(frame, dst_keys, dst_rows, values)]
        return pd.concat(parts, ignore_index=True)

    def label(self, key: tuple, arrow: str = "→", pods: dict[str, str] | None = None) -> str:
        """How a key reads; a flow's ends by their pods where `pods` (address -> namespace/pod) knows them."""
        parts = dict(zip(self.key_names, key, strict=True))
        if self.name == "flow":
            names = pods or {}
            source = endpoint(names.get(parts["src_ip"], parts["src_ip"]), parts["src_port"])
            target = endpoint(names.get(parts["dst_ip"], parts["dst_ip"]), parts["dst_port"])
            return f"{parts['protocol'] or '?'} {source} {arrow} {target}"
        if self.name == "process":
            comm, pid = parts["comm"], parts["pid"]
            identity = (f"{comm or '?'}[{pid}]" if pid >= 0 else comm) if comm or pid >= 0 else ""
        elif parts[self.fields[-1]]:
            namespace = parts["namespace"] if len(self.fields) > 1 else ""
            identity = f"{namespace}/{parts[self.fields[-1]]}" if namespace else parts[self.fields[-1]]
        else:
            identity = ""
        return identity or parts.get("ip") or UNKNOWN

    def with_ip_fallback(self) -> Grouping:
        return Grouping(self.name, self.fields, True)


def _keyed_part(frame: pd.DataFrame, keys: dict[str, np.ndarray], rows: np.ndarray, values: Sequence[str]):
    part = {name: column[rows] for name, column in keys.items()}
    part["row"] = np.flatnonzero(rows)
    part.update({v: counter_values(frame[v])[rows] for v in values})
    return pd.DataFrame(part)


def counter_values(column: pd.Series) -> np.ndarray:
    """Counters as float64 with NaN for null: pandas sums those in compiled code (nullable ints it does not)."""
    if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_bool_dtype(column.dtype):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    return column.to_numpy()


def pod_names(flows: pd.DataFrame, addresses: set[str] | None = None) -> dict[str, str]:
    """Address -> namespace/pod for the ends of `flows` whose pod is known (only `addresses`, if given)."""
    names: dict[str, str] = {}
    for side in ("src", "dst"):
        ips = text_column(flows, f"{side}_ip")
        pods = text_column(flows, f"{side}_pod")
        rows = pods != ""
        if addresses is not None:
            rows &= np.isin(ips, list(addresses))
        if rows.any():
            namespaces = text_column(flows, f"{side}_namespace")
            for ip, namespace, pod in set(zip(ips[rows], namespaces[rows], pods[rows], strict=True)):
                names[ip] = str(side_name(ip, namespace, pod))
    return names


GROUPING_BY_NAME = {
    "flow": Grouping("flow", (), False),
    "pod": Grouping("pod", ("namespace", "pod"), True),
    "workload": Grouping("workload", ("namespace", "workload"), True),
    "namespace": Grouping("namespace", ("namespace",), False),
    "process": Grouping("process", ("comm", "pid"), False),
    "node": Grouping("node", ("node",), False),
}


def key_mask(columns: pd.DataFrame | dict[str, np.ndarray], names: list[str], key: tuple) -> np.ndarray:
    mask = np.ones(len(columns[names[0]]), dtype=bool)
    for name, value in zip(names, key, strict=True):
        mask &= np.asarray(columns[name]) == value
    return mask
