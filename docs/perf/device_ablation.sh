#!/usr/bin/env bash
# Device call 1: versions, GPU kernel checks, 7B checkpoint, profiled bench runs (fused vs plain).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
L=$OUT/main.log; R=$OUT/results.jsonl; : > $R
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $L; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>$L 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv >>$L 2>&1
python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,liger_kernel,triton,importlib.metadata as m; print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'accelerate',accelerate.__version__,'bnb',bitsandbytes.__version__,'liger',m.version('liger-kernel'),'triton',triton.__version__)" >>$L 2>&1
el "build 7b"
python3 .bench/workload.py --arch 7b --out /tmp/bench >>$L 2>&1 &
BUILD=$!
python3 -m pytest -q -s -p no:cacheprovider tests/train/test_fast_paths.py -k cuda >>$L 2>&1; el "gpu checks rc=$?"
wait $BUILD; el "built"
run() { # name workload steps warmup [env...]
  local name=$1 w=$2 st=$3 wu=$4; shift 4
  local B=4; [ $w = w2 ] && B=16
  el "run $name"
  env "$@" WORKLOAD=$w MODEL_DIR=/tmp/bench/model-7b DATA_FILE=/tmp/bench/$w.jsonl BATCH=$B MAX_LENGTH=1024 STEPS=$st WARMUP=$wu \
    timeout 150 python3 -m loraforge.bench > /tmp/$name.log 2>&1
  local rc=$?
  grep -E "fast paths|^step |Error|error|Traceback" /tmp/$name.log | head -12 >> $L
  tail -4 /tmp/$name.log >> $L
  grep '^RESULT ' /tmp/$name.log | tail -1 | sed "s/^RESULT /{\"name\":\"$name\",\"rc\":$rc,\"r\":/; s/\$/}/" >> $R
  el "done $name rc=$rc"
}
run fused_w1 w1 20 5 BENCH_PROFILE=$OUT/prof_fused_w1.txt
run fused_w2_nocap w2 12 4 BENCH_PROFILE=$OUT/prof_fused_w2_nocap.txt "BENCH_SET=train.max_tokens_per_micro_batch=null"
run plain_w1 w1 20 5 "BENCH_SET=train.fused_layers=off train.offload_activations=false"
run fused_w2_cap w2 12 4
el "all done"
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/results.jsonl"):
    d = json.loads(l); r = d["r"]
    print(f"{d['name']:<16} rc={d['rc']} tok/s {r['tokens_per_s']:>8} peak {r['peak_gib']} loss {r['mean_loss']}")
PY
