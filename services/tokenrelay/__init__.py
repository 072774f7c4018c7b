"""tokenrelay: decoupled LLM serving in front of Triton Inference Server."""

from tokenrelay._grpc_io import choose_io

__version__ = "0.1.0"

# Before anything imports grpc: its poller costs less per call and per message (see _grpc_io).
choose_io()
