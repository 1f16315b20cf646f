"""The gRPC flow API: flowscope's own and Hubble's Observer, served from a ring of recent records."""
