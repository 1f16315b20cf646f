"""pandas analysis of flowscope's records: top's model (top, grouping), the readers (read_flowlog, read_capture,
read_clickhouse, read_grpc: one typed frame) and the common questions (summaries)."""

from flowscope.analysis.flowlog import read_capture, read_flowlog
from flowscope.analysis.remote import read_grpc
from flowscope.analysis.summaries import drops_by_reason, peers, timeseries, top_talkers

__all__ = ["drops_by_reason", "peers", "read_capture", "read_flowlog", "read_grpc", "timeseries", "top_talkers"]
