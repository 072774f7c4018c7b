"""``tokenrelay-stack``: run Triton (CPU models, or with ``--gpu`` vLLM on the GPU), the
orchestrator and the edge on this machine."""

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
from tokenrelay.stack._stack import Stack, StackError, StackPorts
from tokenrelay.stack._triton import TritonPorts
from tokenrelay.stack._wheelhouse import GpuSetupError

_EXAMPLE = """\
tokenrelay is ready.

  OpenAI API   {url}/v1   (models: {models})
  gRPC API     {grpc}     (tokenrelay.v1.GenerationService; reflection on)
  Triton       http://127.0.0.1:{triton_http}  grpc :{triton_grpc}  metrics :{triton_metrics}
  Logs         {logs}

Try:
  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "smollm2-135m-instruct", "stream": true,
         "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

Press Ctrl-C to stop.
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="tokenrelay-stack", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=Path("triton_models"))
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file")
    parser.add_argument("--edge-port", type=int, default=8080)
    parser.add_argument("--orchestrator-port", type=int, default=50051)
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
    add_gpu_arguments(parser)
    args = parser.parse_args()
    if not args.model_repository.is_dir():
        sys.exit(f"tokenrelay-stack: no model repository at {args.model_repository}")
    ports = StackPorts(args.edge_port, args.orchestrator_port, TritonPorts(*args.triton_ports))
    try:
        factory = gpu_node_factory(args)  # None without --gpu
    except GpuSetupError as exc:
        sys.exit(f"tokenrelay-stack: {exc}")
    stack = Stack(
        args.model_repository, ports, config=args.config, workdir=args.workdir, node_factory=factory
    )
    stopped = threading.Event()

    def on_signal(*_: object) -> None:
        if stopped.is_set():  # a second Ctrl-C: at once (the components die with the launcher)
            os._exit(130)
        stopped.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print("starting tritonserver, orchestrator and edge …", flush=True)
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
            triton_http=ports.triton.http,
            triton_grpc=ports.triton.grpc,
            triton_metrics=ports.triton.metrics,
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


if __name__ == "__main__":
    main()
