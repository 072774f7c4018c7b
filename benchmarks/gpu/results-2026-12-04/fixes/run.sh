#!/bin/bash
# H200: this session's fixes (new = this tree, old = ce31d08 in .gpu/old: frames flow control, h2, workers, race, edge), fast source, cores 8-15.
T0=$(date +%s); R=/tmp/relay-site; O=${OUT:-/tmp/out}; mkdir -p $O
el() { echo $(( $(date +%s) - T0 )); }
[ -d $R/aiohttp ] || python3 -m pip install -q --no-index --no-deps --no-compile --target $R .gpu/r01/house/*.whl 2>&1 | grep -v "root' user" | tail -3
echo "installed at $(el) s; load $(cut -d' ' -f1-3 /proc/loadavg)"
BUDGET=${BUDGET:-500}
run() {  # label variant args...
  local lab=$1 v=$2; shift 2; local d=$PWD; [ $v = old ] && d=$PWD/.gpu/old
  if [ $(el) -gt $BUDGET ]; then echo "SKIP $lab $v (budget)"; return; fi
  PYTHONPATH=$R PYTHONUNBUFFERED=1 timeout 150 taskset -c 8-15 python3 $d/benchmarks/loadgen.py --out $O/$lab-$v --source fast --rounds 1 "$@" > $O/$lab-$v.log 2>&1
  grep '^| \(edge\|triton\|orchestrator\)' $O/$lab-$v.log | cut -d'|' -f2-4,7-9,11-13,15 | sed "s/^/$lab $v [$(el)s] /"
  python3 -c "
import json
d=json.load(open('$O/$lab-$v/results.json'))
for x in d['runs']:
    t=sorted(s['ttft_s'] for s in x['samples']); print('   ', x['target'], 'ttft max %.2f s, over 2 s: %d of %d' % (t[-1], sum(v>2 for v in t), len(t)))
" 2>/dev/null
  rm -f $O/$lab-$v/*.png
}
for v in new old old new; do run u64 $v --targets edge --concurrency 64 --requests 2048 --max-tokens 64; done
for v in new old; do run u256 $v --targets edge --concurrency 256 --requests 2048 --max-tokens 64; done
for v in old new; do run one $v --targets triton-grpc,edge --concurrency 1 --requests 40 --max-tokens 4 --token-interval-ms 20; done
for v in new old; do run sixteen $v --targets triton-grpc,edge --concurrency 16 --requests 256 --max-tokens 16 --token-interval-ms 20; done
echo "done at $(el) s"
