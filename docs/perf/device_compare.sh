#!/usr/bin/env bash
# Final comparison for one workload (W=w1|w2): GPU kernel checks, then compare.sh (hf, unsloth, ours) in one go,
# then one profiled run of ours ("after" breakdown).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${W:-w1}; L=$OUT/main_$W.log
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $L; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>$L 2>&1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>$L 2>&1
python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,liger_kernel,triton,importlib.metadata as m; print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'accelerate',accelerate.__version__,'bnb',bitsandbytes.__version__,'liger',m.version('liger-kernel'),'triton',triton.__version__)" >>$L 2>&1
python3 .bench/workload.py --arch 7b --out /tmp/bench >>$L 2>&1 &
BUILD=$!
python3 -m pytest -q -s -p no:cacheprovider tests/train/test_fast_paths.py -k cuda 2>&1 | grep -E "GPUCHECK|passed|failed|Error" >>$L; el "gpu checks"
wait $BUILD; el "built"
unset PYTHONPATH
OURS_CMD="python3 -m loraforge.bench 2>&1 | tee -a $OUT/ours_$W.log" RUNNERS="hf unsloth ours" WORKLOADS=$W \
  bash .bench/compare.sh 2>&1 | tee $OUT/compare_$W.txt
cp $OUT/bench.jsonl $OUT/bench_$W.jsonl 2>/dev/null; rm -f $OUT/bench.jsonl
el "compare done"
export PYTHONPATH=/tmp/site:$PWD/src
B=4; [ $W = w2 ] && B=16
WORKLOAD=$W MODEL_DIR=/tmp/bench/model-7b DATA_FILE=/tmp/bench/$W.jsonl BATCH=$B MAX_LENGTH=1024 STEPS=10 WARMUP=3 \
  BENCH_PROFILE=$OUT/prof_after_$W.txt timeout 120 python3 -m loraforge.bench > /tmp/prof_run.log 2>&1
grep RESULT /tmp/prof_run.log >> $L; el "profile done"
cat $OUT/compare_$W.txt | tail -6
