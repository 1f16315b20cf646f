"""A two-shard ClickHouse cluster for real: two clickhouse-server instances and a ZooKeeper, started here.
flowscope creates its tables ON CLUSTER (ReplicatedMergeTree locals, Distributed tables over them); rows
written through the Distributed table land on both shards and read back complete."""

from __future__ import annotations

import pandas as pd
import pytest

from flowscope.analysis.clickhouse import read_clickhouse
from flowscope.config import ClickHouseConfig
from flowscope.exporters.clickhouse import ClickHouseSink
from flowscope.pipeline.sink import records
from flowscope.schema import as_read
from tests.integration.servers import ClickHouse, ServerError, ZooKeeper, free_port
from tests.ui.scenario import shop_batches
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CLUSTER = "fs_cluster"
SHOP = shop_batches()


def include(ports: list[int], zookeeper: int, shard: int) -> str:
    shards = "".join(f"<shard><replica><host>127.0.0.1</host><port>{port}</port></replica></shard>" for port in ports)
    return (
        f"<clickhouse_remote_servers><{CLUSTER}>{shards}</{CLUSTER}></clickhouse_remote_servers>"
        f"<zookeeper-servers><node><host>127.0.0.1</host><port>{zookeeper}</port></node></zookeeper-servers>"
        f"<macros><shard>{shard:02d}</shard><replica>replica-{shard}</replica></macros>"
    )


def zookeeper_answers(server: ClickHouse) -> bool:
    try:
        return server.query("SELECT count() FROM system.zookeeper WHERE path = '/'").strip() != ""
    except ServerError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    zookeeper = ZooKeeper(tmp_path_factory.mktemp("zookeeper")).start()
    ports = [free_port(), free_port()]
    servers = [
        ClickHouse(tmp_path_factory.mktemp(f"shard{n}"), include=include(ports, zookeeper.port, n), tcp_port=port)
        for n, port in enumerate(ports, 1)
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:  # each has its ZooKeeper session before anything runs ON CLUSTER
            wait_for(lambda s=server: zookeeper_answers(s), 60, "the server's ZooKeeper session")
        yield servers
    finally:
        for server in servers:
            server.stop()
        zookeeper.stop()


def test_rows_written_through_the_distributed_table_land_on_both_shards(cluster):
    first, second = cluster
    url = first.url(database="flowscope_cluster")
    sink = ClickHouseSink(ClickHouseConfig(url=url, cluster=CLUSTER, batch_age=0))
    sink.open()
    for batch in SHOP:
        sink.write(batch)
    sink.close()
    assert sink.settled() == (sum(records(b) for b in SHOP), 0)

    on_shards = [int(s.query("SELECT count() FROM flowscope_cluster.flows_local")) for s in cluster]
    assert sum(on_shards) == 22 and min(on_shards) > 0, on_shards
    for server in cluster:  # the Distributed table on either server reads both shards
        assert server.query("SELECT count(), sum(bytes) FROM flowscope_cluster.flows") == "22\t1281388\n"
        assert server.query("SELECT sum(flows), sum(bytes) FROM flowscope_cluster.flows_1m") == "22\t1281388\n"
    stored = read_clickhouse(second.url(database="flowscope_cluster"))
    expected = pd.concat([b.flows for b in SHOP], ignore_index=True)
    keys = ["time_end", "src_ip", "src_port", "dst_ip", "dst_port"]
    pd.testing.assert_frame_equal(
        stored.sort_values(keys, kind="stable").reset_index(drop=True),
        as_read(expected.sort_values(keys, kind="stable"), "flows"),
    )
    assert second.query(
        "SELECT engine FROM system.tables WHERE database = 'flowscope_cluster' AND name = 'flows_local'"
    ) == ("ReplicatedMergeTree\n")


def test_every_server_of_the_cluster_knows_the_schema_versions(cluster):
    """schema_versions is replicated to every server: an agent that starts on the other shard finds version 1
    applied and does not apply it again."""
    first, second = cluster
    database = "flowscope_versions"
    sink = ClickHouseSink(ClickHouseConfig(url=first.url(database=database), cluster=CLUSTER, batch_age=0))
    sink.open()
    sink.close()
    query = f"SELECT version FROM {database}.schema_versions"
    for server in cluster:
        wait_for(lambda s=server: s.query(query) == "1\n", 60, "schema_versions replicated to every server")
    applied = first.query(f"SELECT version, applied FROM {database}.schema_versions")
    again = ClickHouseSink(ClickHouseConfig(url=second.url(database=database), cluster=CLUSTER, batch_age=0))
    again.open()
    again.write(SHOP[0])
    again.close()
    assert again.settled() == (records(SHOP[0]), 0)
    for server in cluster:
        wait_for(lambda s=server: s.query(f"SELECT version, applied FROM {database}.schema_versions") == applied, 60,
                 "one row of version 1, the first start's, on every server")  # fmt: skip
    assert (
        second.query(f"SELECT engine FROM system.tables WHERE database = '{database}' AND name = 'schema_versions'")
        == "ReplicatedMergeTree\n"
    )
