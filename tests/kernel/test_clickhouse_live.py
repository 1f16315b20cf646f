"""The agent with real probes writes to a real ClickHouse: every flow of the lab's traffic arrives with its
exact packet and byte counts, and every row, identity included, as the agent's flow log holds it. The server
runs inside the lab namespace beside the agent (its loopback is the agent's), so no traffic leaves the
namespaces the test made."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.integration.servers import ClickHouse
from tests.kernel.agent_runs import FLOWSCOPE, agent_with_udp_traffic
from tests.kernel.lab import Lab
from tests.kernel.tc_flows import start_sink, two_hosts, udp_frame

FLOWS, COUNT, PAYLOAD = 12, 40, 200

pytestmark = pytest.mark.timeout(300)


def test_the_agent_writes_the_lab_traffic_to_clickhouse_exactly(tc_lab: Lab, tmp_path: Path) -> None:
    hosts = two_hosts(tc_lab)
    a4, b4 = hosts.port_a.ip4, hosts.port_b.ip4
    server = ClickHouse(tmp_path / "clickhouse", prefix=hosts.a.command()).start()
    try:
        start_sink(hosts.b, "udp-sink", b4, "7001")
        report, errors = agent_with_udp_traffic(
            hosts, tmp_path, FLOWS, COUNT, PAYLOAD, "--clickhouse", server.url(database="lab"),
            "--clickhouse-batch-age", "0", "--data-dir", str(tmp_path / "log"), env=dict(os.environ),
        )  # fmt: skip
        totals = server.query(
            "SELECT src_port, sum(packets), sum(bytes) FROM lab.flows WHERE ifname = 'fstcA' AND direction = 'egress' "
            f"AND src_ip = '{a4}' AND dst_ip = '{b4}' AND dst_port = 7001 GROUP BY src_port ORDER BY src_port"
        )
        assert report["per_flow"] == COUNT
        frame = udp_frame(4, PAYLOAD)
        assert totals == "".join(f"{21000 + n}\t{COUNT}\t{COUNT * frame}\n" for n in range(FLOWS))
        assert "lost nothing" in errors.splitlines()[-1], errors
        # both outputs of one pipeline: the same rows, every column (time, counters, identity), from either store
        for question in ("flows", "drops"):
            stored = query(hosts, question, "--clickhouse", server.url(database="lab"))
            logged = query(hosts, question, "--data-dir", str(tmp_path / "log"))
            assert stored == logged, question
        flows = query(hosts, "flows", "--data-dir", str(tmp_path / "log"))
        assert len(flows) >= FLOWS
        # the agent's own connection to the server is named by process at both ends, in both stores alike
        named = {(row["src_comm"], row["dst_comm"]) for row in flows if row["dst_port"] == server.tcp_port}
        assert ("flowscope", "clickhouse-serv") in named, named
    finally:
        server.stop()


def query(hosts, question: str, *store: str) -> list[dict]:
    """`flowscope query QUESTION -o json` in namespace a (where the server's loopback is), its rows in order."""
    output = hosts.a.run(FLOWSCOPE, "query", question, *store, "-o", "json").stdout
    return sorted((json.loads(line) for line in output.splitlines()), key=lambda row: json.dumps(row, sort_keys=True))
