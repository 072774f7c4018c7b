#!/bin/bash
# After lent_device.sh stack: TTFT and tok/s against the running stack (vLLM through Triton, h2 reader).
R=/tmp/relay-site; W=/tmp/trgpu; T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$R:$PWD/services PYTHONUNBUFFERED=1
python3 benchmarks/gpu/suite.py attach --work $W/suite || exit 1
grep -h '"listening"\|triton_streams\|frames' $W/logs/orchestrator*.log 2>/dev/null | head -3 | cut -c1-400
timeout 150 python3 benchmarks/gpu/suite.py ttft --work $W/suite --out $OUT --rounds 2 --ttft-requests 10 \
  --max-tokens 16 --targets triton:tokenrelay,orchestrator,edge --ready-timeout 30 2>&1 | grep -v "^INFO" | tail -12
echo "TTFT DONE at $(el) s"
B=$(( ${BUDGET:-420} - $(el) )); echo "bench budget $B s"
python3 benchmarks/gpu/suite.py bench --work $W/suite --out $OUT --budget-s $B --rounds 1 --streams ${STREAMS:-64,256,1} \
  --targets triton:tokenrelay,orchestrator,edge --health-url http://127.0.0.1:8081 2>&1 | grep -v "^INFO" | tail -25
echo "BENCH DONE at $(el) s"
for f in $W/logs/*.log; do echo "=== $f"; tail -n 60 $f; done > $OUT/server-logs.txt 2>&1
python3 benchmarks/gpu/suite.py stop --work $W/suite --out $OUT > /dev/null 2>&1; nvidia-smi --query-compute-apps=pid --format=csv,noheader | head -3
