"""pandas analysis of flowscope's records: top's model (top, grouping) and readers (read_grpc)."""

from flowscope.analysis.remote import read_grpc

__all__ = ["read_grpc"]
