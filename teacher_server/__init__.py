"""The teacher service: sessions, scheduling and engines behind the opd.v1 gRPC contract."""

__version__ = "0.1.0"
