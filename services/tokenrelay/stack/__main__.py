"""``tokenrelay-stack``: run Triton (CPU models, or with ``--gpu`` vLLM on the GPU), the
orchestrator and the edge on this machine; ``--nodes 2`` runs two Triton nodes serving the same
models, to watch failover on one machine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import urllib.request
from pathlib import Path

from tokenrelay.stack._gpu import add_gpu_arguments, gpu_node_factory
from tokenrelay.stack._stack import Stack, StackError, StackPorts, TritonProcess
from tokenrelay.stack._triton import TritonPorts
from tokenrelay.stack._wheelhouse import GpuSetupError

_EXAMPLE = """\
tokenrelay is ready.

  OpenAI API   {url}/v1   (models: {models})
  gRPC API     {grpc}     (tokenrelay.v1.GenerationService; reflection on)
{tritons}
  Logs         {logs}

Try:
  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "smollm2-135m-instruct", "stream": true,
         "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

{failover}Press Ctrl-C to stop.
"""

_FAILOVER = """\
Watch failover: pause a node (kill -STOP <pid>; kill -CONT <pid> resumes it) or kill it while an
answer streams: its waiting requests move to the other node, and streaming answers are continued
there without a gap.

"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay-stack", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("triton_models"))
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument("--edge-port", type=int, default=8080)
    parser.add_argument("--orchestrator-port", type=int, default=50051)
    parser.add_argument("--orchestrator-metrics-port", type=int, default=9464)
    parser.add_argument(
        "--orchestrator-frames-port",
        type=int,
        default=50052,
        help="the edge's generations reach the orchestrator as frames on this port (0: gRPC)",
    )
    parser.add_argument(
        "--triton-ports",
        type=int,
        nargs=3,
        default=(8000, 8001, 8002),
        metavar=("HTTP", "GRPC", "METRICS"),
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(".run"), help="backend links and logs (default: .run)"
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="Triton nodes serving the same models (the first on --triton-ports, the others on"
        " free ports); 2 shows failover on one machine",
    )
    parser.add_argument(
        "--triton-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="one more tritonserver option, e.g. --triton-arg=--trace-config=triton,file=FILE",
    )
    add_gpu_arguments(parser)
    args = parser.parse_args()
    if not args.model_repository.is_dir():
        sys.exit(f"tokenrelay-stack: no model repository at {args.model_repository}")
    if args.nodes < 1:
        sys.exit("tokenrelay-stack: --nodes must be at least 1")
    if args.nodes > 1 and args.gpu:
        sys.exit("tokenrelay-stack: --nodes > 1 runs CPU models only (one vLLM engine per GPU)")
    ports = StackPorts(
        args.edge_port,
        args.orchestrator_port,
        TritonPorts(*args.triton_ports),
        args.orchestrator_metrics_port,
        args.orchestrator_frames_port,
    )
    try:
        factory = gpu_node_factory(args)  # None without --gpu
    except GpuSetupError as exc:
        sys.exit(f"tokenrelay-stack: {exc}")
    stack = Stack(
        args.model_repository,
        ports,
        config=args.config,
        workdir=args.workdir,
        nodes=args.nodes,
        node_factory=factory,
        triton_args=args.triton_arg,
    )
    stopped = threading.Event()

    def on_signal(*_: object) -> None:
        if stopped.is_set():  # a second Ctrl-C: at once (the components die with the launcher)
            os._exit(130)
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    tritons = "tritonserver" if args.nodes == 1 else f"{args.nodes} tritonservers"
    print(f"starting {tritons}, orchestrator and edge …", flush=True)
    try:
        stack.start(timeout_s=900 if factory else 180)
    except StackError as exc:
        sys.exit(f"tokenrelay-stack: {exc}")
    with urllib.request.urlopen(f"{stack.edge_url}/v1/models", timeout=5) as response:
        models = ", ".join(m["id"] for m in json.load(response)["data"])
    print(
        _EXAMPLE.format(
            url=stack.edge_url,
            grpc=stack.orchestrator_address,
            models=models,
            tritons="\n".join(_triton_line(node) for node in stack.nodes),
            failover=_FAILOVER if args.nodes > 1 else "",
            logs=stack.logs,
        ),
        flush=True,
    )
    try:
        stopped.wait()
    finally:
        print("stopping …", flush=True)
        stack.stop()
        print("stopped.", flush=True)


def _triton_line(node: TritonProcess) -> str:
    ports = node.ports
    pid = f"  pid {node.process.pid}" if node.process is not None else ""
    return (
        f"  Triton       http://127.0.0.1:{ports.http}  grpc :{ports.grpc}"
        f"  metrics :{ports.metrics}{pid}"
    )


if __name__ == "__main__":
    main()
