#!/usr/bin/env bash
# Record of the 2026-12-03 A/B call (run as `bash .exp/exp.sh` with .exp/old_src = the previous commit's src and
# .exp/micro.py = an earlier form of scripts/micro_host.py, same ops); kept for its numbers, not maintained.
# A/B experiment: human-response LoRA on w1, old code (HEAD) vs new, Unsloth; cProfile of new.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
L=$OUT/exp.log; R=$OUT/exp.jsonl; : > "$R"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
D=/tmp/bench; mkdir -p $D
pipq="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
$pipq --target /tmp/site .whl/*.whl >>"$L" 2>&1
el "installed"
(cd .bench && PYTHONPATH=/tmp/site:$PWD/../src python3 workload.py --arch 7b --out $D >/dev/null 2>&1; echo built > $D/built) &
PYTHONPATH=/tmp/site:$PWD/src timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/model/fused/test_fused_cuda.py tests/train/test_optim.py tests/model/fused/test_fused_forward.py 2>&1 \
  | grep -E "GPUCHECK|passed|failed|Error|error" > "$OUT/gpu_checks.txt"
el "gpu checks done"; cat $OUT/gpu_checks.txt >> $L
PYTHONPATH=/tmp/site python3 .exp/micro.py > $OUT/micro_full.txt 2>&1; grep MICRO $OUT/micro_full.txt > $OUT/micro.txt; el "micro done"
wait; el "7b ready"
LORA=$(PYTHONPATH=/tmp/site:$PWD/src python3 -m loraforge.bench lora-env llama2-7b-human-response)
batch=$(cd .bench && python3 -c "import workload as W; print(W.WORKLOADS['w1'][-1])")
run() { # label src|peers steps [VAR=V...]
  local label=$1 which=$2 steps=$3; shift 3
  local cmd pp
  case $which in
    new) cmd=(python3 -m loraforge.bench); pp=/tmp/site:$PWD/src ;;
    old) cmd=(python3 -m loraforge.bench); pp=/tmp/site:$PWD/.exp/old_src ;;
    prof) cmd=(python3 -m cProfile -o $OUT/new.prof -m loraforge.bench); pp=/tmp/site:$PWD/src ;;
    unsloth) cmd=(python3 .bench/unsloth_baseline.py --workload w1 --arch 7b --dir $D --steps "$steps" --warmup 5); pp=/tmp/peers:/tmp/site:$PWD/src ;;
  esac
  env "$@" WORKLOAD=w1 MODEL_DIR=$D/model-7b DATA_FILE=$D/w1.jsonl BATCH=$batch MAX_LENGTH=1024 STEPS=$steps WARMUP=5 \
    PYTHONPATH=$pp timeout 150 "${cmd[@]}" > /tmp/run.log 2>&1
  local line; line=$(grep '^RESULT ' /tmp/run.log | tail -1)
  grep -E "fast paths" /tmp/run.log | head -3 >> "$L"
  if [ -n "$line" ]; then echo "$label ${line#RESULT }" >> "$R"; el "$label: $(echo "${line#RESULT }" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['tokens_per_s'], 'tok/s', d['peak_gib'], 'GiB loss', d['mean_loss'])")"
  else el "$label: no RESULT"; tail -20 /tmp/run.log >> "$L"; fi
}
run hr-new new 30 BENCH_RECIPE=llama2-7b-human-response $LORA
run hr-old old 30 BENCH_RECIPE=llama2-7b-human-response $LORA
run hr-new-prof prof 15 BENCH_RECIPE=llama2-7b-human-response $LORA
python3 -c "
import pstats; s = pstats.Stats('$OUT/new.prof'); s.sort_stats('tottime').print_stats(60)" > $OUT/new_prof_tottime.txt 2>&1
python3 -c "
import pstats; s = pstats.Stats('$OUT/new.prof'); s.sort_stats('cumtime').print_stats(80)" > $OUT/new_prof_cum.txt 2>&1
el done
