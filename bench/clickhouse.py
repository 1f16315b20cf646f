"""The ClickHouse sink against Debian's real clickhouse-server (18.16, an extra instance on loopback):

1. Insert throughput: FlowBatches of 100k synthetic flows (every column of the schema, identity on both
   sides) written by ClickHouseSink as the agent's sink thread does; rows per second of wall time and per
   CPU-second of the writing process (and of the server), side by side with what a user would do by hand:
   clickhouse-client inserting the same rows from TabSeparated text (its native, compiled path).
2. Lag: from handing an interval to the sink to its rows being queryable, with --clickhouse-batch-age 0
   (every interval inserted at once) and at the default 5 s; and end to end through `flowscope agent`
   itself (real probes on the lab's fsb0a, tcpreplay keeping 10k flows active, its default outputs and
   ClickHouse): from an interval's last packet to its rows queryable, the drain, identity and the
   pipeline's hand-over included.
3. read_clickhouse of 1M rows into the typed DataFrame.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench import lab
from tests.integration.servers import ClickHouse

ROWS = 100_000


def synthetic_batch(rows: int, seed: int, end: pd.Timestamp):
    from flowscope.schema import FLOW_COLUMNS, FlowBatch, conform, empty_frame

    rng = np.random.default_rng(seed)
    pods = np.array([f"pod-{n}" for n in range(2000)], dtype=object)
    namespaces = np.array([f"ns-{n}" for n in range(50)], dtype=object)
    local, remote = rng.integers(0, 2000, rows), rng.integers(0, 2000, rows)
    frame = pd.DataFrame(
        {
            "time_start": end - pd.Timedelta(seconds=1),
            "time_end": end,
            "node": "bench-node",
            "ifname": "eth0",
            "ifindex": 2,
            "direction": np.where(rng.random(rows) < 0.5, "ingress", "egress"),
            "ip_version": 4,
            "protocol": np.where(rng.random(rows) < 0.8, "TCP", "UDP"),
            "src_ip": [f"10.{n >> 8 & 255}.{n & 255}.1" for n in local.tolist()],
            "src_port": rng.integers(1024, 65535, rows),
            "dst_ip": [f"10.{n >> 8 & 255}.{n & 255}.2" for n in remote.tolist()],
            "dst_port": rng.choice([80, 443, 8080, 5432, 53], rows),
            "packets": rng.integers(1, 1000, rows),
            "bytes": rng.integers(60, 1_500_000, rows),
            "tcp_flags": 0x18,
            "drop_packets": 0,
            "drop_bytes": 0,
            "retransmits": rng.integers(0, 3, rows),
            "resets": 0,
            "rtt_us": rng.integers(50, 20000, rows),
            "src_namespace": namespaces[local % 50],
            "src_pod": pods[local],
            "src_workload": pods[local // 4 * 4],
            "dst_namespace": namespaces[remote % 50],
            "dst_pod": pods[remote],
            "dst_workload": pods[remote // 4 * 4],
            "src_identity_source": "cgroup",
            "dst_identity_source": "ip",
        }
    )
    from flowscope.schema import EVENT_COLUMNS

    return FlowBatch(end - pd.Timedelta(seconds=1), end, conform(frame, FLOW_COLUMNS), empty_frame(EVENT_COLUMNS))


def server_cpu(server: ClickHouse) -> float:
    assert server.process is not None
    return lab.cpu_seconds(server.process.pid)


def sink_throughput(server: ClickHouse, batches: list, database: str) -> dict:
    from flowscope.config import ClickHouseConfig
    from flowscope.exporters.clickhouse import ClickHouseSink

    sink = ClickHouseSink(ClickHouseConfig(url=server.url(database=database), batch_age=0, batch_rows=ROWS))
    sink.open()
    cpu, server_before, started = time.process_time(), server_cpu(server), time.monotonic()
    for batch in batches:
        sink.write(batch)
    sink.close()
    wall, cpu, server_spent = time.monotonic() - started, time.process_time() - cpu, server_cpu(server) - server_before
    rows = sum(len(b.flows) for b in batches)
    written, lost = sink.settled()
    assert (written, lost) == (rows, 0), (written, lost)
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall), "client_cpu_s": round(cpu, 2),
            "rows_per_client_cpu_s": round(rows / cpu), "server_cpu_s": round(server_spent, 2)}  # fmt: skip


def client_throughput(server: ClickHouse, batches: list, database: str, scratch: Path) -> dict:
    """clickhouse-client inserting the same rows from TabSeparated text, as a user scripting it would."""
    from flowscope.formats.clickhouse import insert_columns

    text = scratch / "rows.tsv"
    with open(text, "w", encoding="utf-8") as out:
        for number, batch in enumerate(batches):
            names, columns = insert_columns("flows", batch.flows, f"tsv-{number}")
            for row in zip(*columns, strict=True):
                out.write("\t".join(_tsv(value) for value in row) + "\n")
    columns = ", ".join(names)
    started = time.monotonic()
    children = os.times()
    with open(text, "rb") as source:
        subprocess.run(
            ["clickhouse-client", f"--port={server.tcp_port}", "-q",
             f"INSERT INTO {database}.flows ({columns}) FORMAT TabSeparated"],
            stdin=source, check=True,
        )  # fmt: skip
    wall = time.monotonic() - started
    after = os.times()
    cpu = (after.children_user - children.children_user) + (after.children_system - children.children_system)
    rows = sum(len(b.flows) for b in batches)
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall), "client_cpu_s": round(cpu, 2),
            "rows_per_client_cpu_s": round(rows / max(cpu, 1e-9))}  # fmt: skip


def _tsv(value) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bytes):
        return "".join(f"\\x{b:02x}" for b in value)
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def lag(server: ClickHouse, database: str, batch_age: float, intervals: int = 12, rows: int = 10_000) -> dict:
    """Seconds from an interval handed to the sink (at its end, as the agent does every second) to its rows
    being queryable, for 1-s intervals of `rows` rows."""
    from flowscope.config import ClickHouseConfig
    from flowscope.exporters.clickhouse import ClickHouseSink

    sink = ClickHouseSink(ClickHouseConfig(url=server.url(database=database), batch_age=batch_age))
    sink.open()
    handed: list[float] = []
    lags: list[float] = []
    start = time.monotonic()
    for number in range(intervals):
        handed.append(time.monotonic())
        sink.write(synthetic_batch(rows, 100 + number, pd.Timestamp.now(tz="UTC")))
        tick = start + number + 1.0
        while time.monotonic() < tick:  # poll what is queryable until the next interval ends
            stored = int(server.query(f"SELECT count() FROM {database}.flows"))
            while len(lags) < len(handed) and stored >= (len(lags) + 1) * rows:
                lags.append(round(time.monotonic() - handed[len(lags)], 3))
            time.sleep(0.02)
    sink.close()
    return {"batch_age_s": batch_age, "intervals": intervals, "visible": len(lags), "lags_s": lags,
            "median_s": round(float(np.median(lags)), 3) if lags else None}  # fmt: skip


def agent_lag(scratch: Path, seconds: float = 12.0, flows: int = 10_000) -> dict:
    """Seconds from an interval's last packet (the latest time_end stored) to its rows being queryable, through
    `flowscope agent` with --clickhouse-batch-age 0: polled every 20 ms with the native client, one figure per
    interval that appears (the first is left out: it may have appeared before polling began)."""
    from clickhouse_driver import Client
    from clickhouse_driver.errors import Error as ClickHouseError

    with lab.lab(), lab.udp_sink():  # the lab's namespace: the server's loopback is the agent's
        server = ClickHouse(scratch / "agent-lag").start()
        agent = None
        try:
            state = scratch / "agent-state"
            state.mkdir()
            agent = subprocess.Popen(
                [str(Path(sys.executable).with_name("flowscope")), "agent", "-i", lab.VETH_CLIENT,
                 "--clickhouse", server.url(database="bench_agent_lag"), "--clickhouse-batch-age", "0",
                 "--data-dir", str(state / "data"), "--state-dir", str(state), "--grpc-socket",
                 str(state / "api.sock"), "--hubble-socket", str(state / "hubble.sock"), "--status-socket",
                 str(state / "status.sock")],
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            said = []
            for line in agent.stderr or ():  # ClickHouse's set-up may log first
                said.append(line)
                if "agent running" in line:
                    break
            else:
                raise RuntimeError(f"flowscope agent did not start: {''.join(said).strip()}")
            replay = lab.tcpreplay(lab.write_udp_flows_pcap(scratch / "lag.pcap", flows), pps=flows,
                                   loops=int(seconds) + 4)  # fmt: skip
            client = Client(host="127.0.0.1", port=server.tcp_port, database="bench_agent_lag")
            latest, lags = None, []
            deadline = time.monotonic() + seconds
            try:
                while time.monotonic() < deadline:
                    try:
                        value = client.execute("SELECT max(time_end_ns) FROM flows")[0][0]
                    except ClickHouseError:  # the tables are made as the agent starts
                        value = None
                    now = time.time_ns()
                    if value and value != latest:
                        if latest is not None:
                            lags.append(round((now - value) / 1e9, 3))
                        latest = value
                    time.sleep(0.02)
            finally:
                replay.terminate()
                replay.wait()
                client.disconnect()
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(timeout=60)
            server.stop()
    return {"flows": flows, "intervals": len(lags), "lags_s": lags,
            "median_s": round(float(np.median(lags)), 3) if lags else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    lab.require_tools("clickhouse-server", "clickhouse-client")
    scratch = Path(tempfile.mkdtemp(prefix="flowscope-bench-ch-"))
    server = ClickHouse(scratch / "server").start()
    try:
        end = pd.Timestamp.now(tz="UTC").floor("s")
        batches = [synthetic_batch(ROWS, seed, end + pd.Timedelta(seconds=seed)) for seed in range(args.batches)]
        lab.log(f"clickhouse: inserting {args.batches} x {ROWS:,} rows through the sink")
        sink = sink_throughput(server, batches, "bench_sink")
        lab.log(f"clickhouse: sink {sink['rows_per_s']:,} rows/s, {sink['rows_per_client_cpu_s']:,} per client CPU-s")
        server.query("CREATE DATABASE bench_client")
        server.query("CREATE TABLE bench_client.flows AS bench_sink.flows")  # the same table, empty
        by_hand = client_throughput(server, batches, "bench_client", scratch)
        lab.log(f"clickhouse: clickhouse-client {by_hand['rows_per_s']:,} rows/s")
        started = time.monotonic()
        read = read_million(server, "bench_sink")
        lab.log(f"clickhouse: read_clickhouse {read['rows']:,} rows in {read['wall_s']} s")
        lags = [lag(server, f"bench_lag_{n}", age) for n, age in enumerate((0.0, 5.0))]
        lab.log("clickhouse: lag " + ", ".join(f"batch age {x['batch_age_s']:g} s: {x['median_s']} s" for x in lags))
        through_agent = agent_lag(scratch)
        lab.log(f"clickhouse: lag through flowscope agent, last packet to queryable: {through_agent['median_s']} s")
        result = {
            "server": server.query("SELECT version()").strip(),
            "sink": sink,
            "clickhouse_client": by_hand,
            "ratio_sink_to_client": round(sink["rows_per_s"] / by_hand["rows_per_s"], 3),
            "read": read,
            "lag": lags,
            "agent_lag": through_agent,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        lab.save("clickhouse", result)
    finally:
        server.stop()


def read_million(server: ClickHouse, database: str) -> dict:
    from flowscope.analysis.clickhouse import read_clickhouse

    rows = int(server.query(f"SELECT count() FROM {database}.flows"))
    started, cpu = time.monotonic(), time.process_time()
    frame = read_clickhouse(server.url(database=database))
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    assert len(frame) == rows
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall), "cpu_s": round(cpu, 2)}


if __name__ == "__main__":
    main()
