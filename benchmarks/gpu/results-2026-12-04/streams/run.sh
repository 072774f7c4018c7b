#!/bin/bash
# H200: h2 vs grpc.aio Triton stream reading, fast source, relay + source + loadgen on cores 8-15.
T0=$(date +%s); R=/tmp/relay-site; O=${OUT:-/tmp/out}; mkdir -p $O
el() { echo $(( $(date +%s) - T0 )); }
if [ ! -d $R/aiohttp ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target $R .gpu/r01/house/*.whl 2>&1 | grep -v "root' user" | tail -3
fi
echo "installed at $(el) s; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
export PYTHONPATH=$R:$PWD/services PYTHONUNBUFFERED=1
python3 -c "import tokenrelay.orchestrator._h2, grpc, aiohttp, uvloop, numpy; print('grpc', grpc.__version__, 'numpy', numpy.__version__)" || exit 1
BUDGET=${BUDGET:-540}
run() {  # label variant args...
  local lab=$1 v=$2; shift 2
  if [ $(el) -gt $BUDGET ]; then echo "SKIP $lab $v (budget)"; return; fi
  timeout 150 taskset -c 8-15 python3 benchmarks/loadgen.py --out $O/$lab-$v --source fast --rounds 1 "$@" \
    --config $'\n[orchestrator]\ntriton_streams = "'$v$'"\n' > $O/$lab-$v.log 2>&1
  grep '^| \(edge\|triton\|orchestrator\)' $O/$lab-$v.log | sed "s/^/$lab $v [$(el)s] /"
  grep -m1 -i "error\|Traceback" $O/$lab-$v.log | head -2
}
for v in ${ORDER:-grpc h2 h2 grpc}; do run u64 $v --targets edge --concurrency 64 --requests 2048 --max-tokens 64; done
for v in h2 grpc; do run p64 $v --targets edge --concurrency 64 --requests 1024 --max-tokens 64 --token-interval-ms 10; done
for v in h2 grpc h2 grpc; do run one $v --targets triton-grpc,orchestrator,edge --concurrency 1 --requests 40 --max-tokens 4 --token-interval-ms 20; done
for v in h2 grpc; do run sixteen $v --targets triton-grpc,edge --concurrency 16 --requests 128 --max-tokens 16 --token-interval-ms 20; done
for v in h2; do run si10 $v --targets edge --concurrency 64 --requests 1024 --max-tokens 256 --token-interval-ms 1 --stream-interval-ms 10; done
for v in h2; do run si10s $v --targets edge --concurrency 64 --requests 1024 --max-tokens 64 --token-interval-ms 1 --stream-interval-ms 10; done
for v in h2 grpc; do run u256 $v --targets edge --concurrency 256 --requests 2048 --max-tokens 64; done
echo "done at $(el) s"
