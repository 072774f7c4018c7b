#!/bin/bash
# H200: worker counts (edge + orchestrator processes) against added TTFT and /healthz, fast
# source, relay + source + load generator on cores 4-15 (taskset; the processes inherit it).
T0=$(date +%s); R=/tmp/relay-site; O=${OUT:-/tmp/out}; mkdir -p $O
el() { echo $(( $(date +%s) - T0 )); }
if [ ! -d $R/aiohttp ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target $R .gpu/r01/house/*.whl 2>&1 | grep -v "root' user" | tail -3
fi
echo "installed at $(el) s; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg); $(lscpu | grep 'Model name' | sed 's/  */ /g')"
export PYTHONPATH=$R:$PWD/services PYTHONUNBUFFERED=1
python3 -c "import tokenrelay.orchestrator._h2, grpc, aiohttp, uvloop; print('grpc', grpc.__version__)" || exit 1
BUDGET=${BUDGET:-500}
run() {  # label workers args...
  local lab=$1 w=$2; shift 2
  if [ $(el) -gt $BUDGET ]; then echo "SKIP $lab w$w (budget)"; return; fi
  timeout 120 taskset -c 4-15 python3 benchmarks/loadgen.py --out $O/$lab-w$w --source fast --rounds 1 "$@" \
    --config $'\n[orchestrator]\nworkers = '$w$'\n[edge]\nworkers = '$w$'\n' > $O/$lab-w$w.log 2>&1
  grep '^| \(edge\|triton\|orchestrator\)' $O/$lab-w$w.log | sed "s/^/$lab w$w [$(el)s] /"
  grep -m1 -i "error\|Traceback" $O/$lab-w$w.log | head -2
}
for w in 1 4 2 2 4 1; do run sixteen $w --targets triton-grpc,edge --concurrency 16 --requests 256 --max-tokens 16 --token-interval-ms 20; done
for w in 1 4 4 1; do run one $w --targets triton-grpc,edge --concurrency 1 --requests 60 --max-tokens 4 --token-interval-ms 20; done
for w in 1 4; do run u64 $w --targets edge --concurrency 64 --requests 2048 --max-tokens 64; done
for w in 4 1; do run si10s $w --targets edge --concurrency 64 --requests 1024 --max-tokens 64 --token-interval-ms 1 --stream-interval-ms 10; done
echo "done at $(el) s"
