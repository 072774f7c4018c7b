"""gRPC's socket I/O for tokenrelay's processes, chosen before ``grpc`` is first imported.

grpcio reads and writes sockets through its EventEngine by default; its older poller (iomgr) is
still built in and selected by the ``GRPC_EXPERIMENTS`` environment variable, which grpcio reads
once, when it is imported. Measured on loopback with grpc.aio and uvloop (grpcio 1.85, a 2-vCPU
VM, alternating runs), the poller costs less on both sides of a call:

| what                                        | EventEngine | poller      |
|---------------------------------------------|-------------|-------------|
| unary-stream call → first message, idle     | 660-980 µs  | 430-590 µs  |
| streamed message read (client CPU)          | 20-22 µs    | 11 µs       |
| streamed message written (server CPU)       | 15-17 µs    | 12-13 µs    |
| messages/s, one process each side, 16 calls | 50-52k      | 77-80k      |

A relayed token is one message read from Triton and one written to the edge in the orchestrator,
and one read in the edge, so both hops gain. Importing ``tokenrelay`` selects the poller unless
``GRPC_EXPERIMENTS`` is already set (set it, even to an empty string, to keep grpcio's default) or
``grpc`` was imported first, when it is too late and nothing changes. grpcio ignores an
experiment it does not know (it logs one line), so a grpcio without the poller runs as before.
The choice is the relay's own: the stack's tritonserver, a gRPC server in C++ that reads the same
variable, is started without it (``without_our_choice``), unless the operator set it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

__all__ = ["POLLER", "VARIABLE", "choose_io", "io_in_force", "without_our_choice"]

VARIABLE = "GRPC_EXPERIMENTS"
POLLER = "-event_engine_client,-event_engine_listener"


def choose_io(
    environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, object] = sys.modules
) -> bool:
    """Selects the poller for this process unless ``GRPC_EXPERIMENTS`` is set or grpc is already
    imported; True when it did."""
    global _chosen
    if "grpc" in modules or VARIABLE in environ:
        return False
    environ[VARIABLE] = POLLER
    _chosen = _chosen or environ is os.environ
    return True


_chosen = False  # whether choose_io set the variable in this process's environment


def without_our_choice(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for another program (tritonserver): without the variable where choose_io set it."""
    out = dict(env)
    if _chosen and out.get(VARIABLE) == POLLER:
        del out[VARIABLE]
    return out


def io_in_force(environ: Mapping[str, str] = os.environ) -> str:
    """``poller`` or ``event-engine``, as the process's services log it at start."""
    experiments = {e.strip() for e in environ.get(VARIABLE, "").split(",")}
    return "poller" if set(POLLER.split(",")) <= experiments else "event-engine"
