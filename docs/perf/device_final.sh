#!/usr/bin/env bash
# One call of the GPU host: the peers and loraforge on w1, then on w2 (ours first there, so that a call
# cut short still has the pair that matters most), every runner on the same sequences in the same order
# (loraforge's bench trains the peers' sampler order: BENCH_ORDER=peers, the default).
# Needs .whl, .whl_peers and .bench (a copy of ../shared/bench) carried.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
L=$OUT/main.log; T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$L" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$L" 2>&1
PYTHONPATH=/tmp/site:$PWD/src python3 -c "import torch,transformers,peft,accelerate,bitsandbytes,triton,importlib.metadata as m; print('torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'accelerate',accelerate.__version__,'bnb',bitsandbytes.__version__,'liger',m.version('liger-kernel'),'triton',triton.__version__)" >>"$L" 2>&1
# GPU kernel checks of the fused path, beside the 7B checkpoint build (compare.sh builds it, or finds it built)
(PYTHONPATH=/tmp/site:$PWD/src timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/train/test_fast_paths.py -k cuda 2>&1 \
  | grep -E "GPUCHECK|passed|failed|Error" > "$OUT/gpu_checks.txt") &
el start
for spec in "w1:hf unsloth ours" "w2:ours unsloth hf"; do
  W=${spec%%:*}
  OURS_CMD="python3 -m loraforge.bench 2>&1 | tee $OUT/ours_$W.log" RUNNERS="${spec#*:}" WORKLOADS=$W \
    bash .bench/compare.sh 2>&1 | tee "$OUT/compare_$W.txt"
  [ $W = w1 ] && mv "$OUT/bench.jsonl" "$OUT/bench_w1.jsonl"   # w2 stays bench.jsonl (at most 8 files come back)
  el "done $W"
done
wait
cat "$OUT/gpu_checks.txt"; cat "$OUT"/compare_w*.txt
