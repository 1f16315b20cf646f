"""The live BatchSource: loads the probes (compiled in a process of their own, flowscope.kernel.compile_child),
attaches tc, and yields one FlowBatch per interval."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from flowscope.decode.batch import build_batch
from flowscope.decode.context import AggregationContext
from flowscope.decode.flows import monotonic_to_utc_offset_ns
from flowscope.kernel import tc
from flowscope.kernel.catalog import ProbeStatus
from flowscope.kernel.compile_child import load
from flowscope.kernel.kallsyms import KernelSymbols
from flowscope.kernel.loader import LoadedProbes, LoaderError, LoadOptions, probe_statuses
from flowscope.readers.drain import KernelReader
from flowscope.schema import FlowBatch

log = logging.getLogger(__name__)

POLL_SLICE_MS = 100  # how often an interval looks whether it was asked to stop


class LiveSource:
    def __init__(
        self,
        options: LoadOptions,
        interval: float = 1.0,
        node: str | None = None,
        state_dir: Path = tc.STATE_DIR,
    ) -> None:
        self.options = options
        self.interval = interval
        self.node = node or socket.gethostname()
        self.state_dir = state_dir
        self._attachments = tc.TcAttachments(state_dir)
        self._symbols = KernelSymbols()
        self._reader: KernelReader | None = None
        self.map_fill: dict[str, float] = {}  # per drained map: entries of the last drain / its capacity
        interfaces = options.interfaces if options.interfaces is not None else tc.default_interfaces()
        missing = tc.missing_interfaces(interfaces)
        if missing:
            raise LoaderError(
                f"interface {', '.join(missing)} does not exist in this network namespace; `ip link` lists them."
            )
        self.interfaces = interfaces
        self.loaded: LoadedProbes = load(options)  # first: it says what is missing (bcc, privileges)
        try:
            removed = tc.remove_stale(state_dir)
            if removed:
                log.info("removed %d tc filters left by an earlier flowscope process", removed)
            if self.loaded.is_active("tc_flows"):
                for name in interfaces:
                    self._attachments.attach(
                        name, self.loaded.tc_programs["ingress"], self.loaded.tc_programs["egress"]
                    )
            self._reader = KernelReader(self.loaded)
        except BaseException:  # Ctrl-C during attach too: never leave filters behind
            self.close()
            raise
        self._context = AggregationContext(
            node=self.node,
            offset_ns=monotonic_to_utc_offset_ns(),
            ifnames=tc.interface_names(),
            active=self.loaded.active,
            symbolize=self._symbols.name,  # event_rows asks only for addresses != 0
        )
        self._window_start = pd.Timestamp.now(tz="UTC")

    def probes(self) -> list[ProbeStatus]:
        return probe_statuses(self.loaded.statuses)

    @property
    def events_transport(self) -> str:
        return "perf buffer" if self.loaded.perf_events else "ring buffer"

    def next_batch(self, seconds: float, stop: threading.Event | None = None) -> FlowBatch:
        """Collects events for `seconds` (less once `stop` is set), then drains the interval and returns its
        FlowBatch."""
        assert self._reader is not None
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
            self._reader.wait(max(1, min(int(remaining * 1000), POLL_SLICE_MS)))
        drain = self._reader.flip_and_drain()
        self.map_fill = {
            name: len(drain.maps[name][0]) / capacity for name, capacity in self._reader.capacities().items()
        }
        start, self._window_start = self._window_start, pd.Timestamp.now(tz="UTC")
        flow_keys = drain.maps.get("flows", (None, None))[0]
        if flow_keys is not None and not set(np.unique(flow_keys["ifindex"]).tolist()) <= self._context.ifnames.keys():
            self._context.ifnames = tc.interface_names()  # an interface appeared since the last look
        return build_batch(drain, self._context, (start, self._window_start))

    def batches(self, stop: threading.Event) -> Iterator[FlowBatch]:
        while not stop.is_set():
            yield self.next_batch(self.interval, stop)

    def close(self) -> None:
        try:
            self._attachments.detach()
        finally:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            loaded = getattr(self, "loaded", None)
            if loaded is not None:
                loaded.close()
