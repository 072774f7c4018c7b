#!/bin/bash
# The vLLM contract through Triton (issue 14's structured outputs and logprobs among it) on a GPU
# host, on both engines: start the two Triton servers only, run capabilities.py, stop.
#   benchmarks/gpu/verify_capabilities.sh WHEELHOUSE VLLM_BACKEND_SRC [OUT]
# On this workplace's lent H200: stage the pieces (lent_device.sh stage .gpu/d01 … d04), then
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh go .gpu/d05 200   (setup, start, caps, a short bench)
# Seen: staging 8 s a call, setup 30 s, servers ready after 86-99 s, the checks 4-5 s per server.
set -e
R=$(cd "$(dirname "$0")/../.." && pwd); OUT=${3:-benchmarks/out/gpu-caps}
export PYTHONPATH=$R/services:$PYTHONPATH
python3 $R/benchmarks/gpu/suite.py start --work /tmp/trgpu-caps --out $OUT --wheelhouse "$1" \
  --vllm-backend-src "$2" --servers nvidia,tokenrelay --no-ceiling --relay-server none
python3 $R/benchmarks/gpu/suite.py caps --work /tmp/trgpu-caps --out $OUT
python3 $R/benchmarks/gpu/suite.py stop --work /tmp/trgpu-caps --out $OUT
