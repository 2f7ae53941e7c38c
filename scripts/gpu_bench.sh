#!/usr/bin/env bash
# One call of the GPU host (issue 12): loraforge against Unsloth (and the plain HF stack where asked)
# on the same sequences, the same steps and the same LoRA settings, every row in this one call.
#   PHASE=recipes   GPU kernel checks (tests/model/fused/test_fused_cuda.py), then, on w1 and the 7B
#                   model, each shipped 7B recipe's LoRA: ours with BENCH_RECIPE=<recipe> (its LoRA,
#                   training keys and compute dtype, nothing else added), the peers with the same LoRA
#                   through LORA_* (python -m loraforge.bench lora-env <recipe>)
#   PHASE=workloads the fp16 GPU check; the human-response recipe again with a profile of 3 more steps
#                   (BENCH_PROFILE); w3 (a Llama-3-shaped model, 128k vocabulary, GQA, sequences up to 4k: not in
#                   ../shared/bench; scripts/bench_extra_workload.py) with the sql-mix recipe's LoRA,
#                   then w1 and w2 with the workload's own settings, as in docs/benchmarks.md
# Needs carried: .whl (../shared/device/wheels.sh pydantic==2.13.4 pydantic-core==2.46.4 annotated-types
# typing-inspection), .whl_peers (../shared/bench/peer_wheels.sh), .bench (a copy of ../shared/bench).
#   PHASE=final     GPU checks, then in one call (one device call may be all a session gets): the three
#                   recipes' rows as in PHASE=recipes, then w1 and w2 with the workload's own settings
#   BEFORE_SRC=DIR  (recipes) also runs the human-response row with the loraforge sources in DIR (e.g. the last
#                   commit's: git archive HEAD src), in the same call: a before/after of a change
#   PYPROF=1        (recipes) then the human-response row once more under cProfile (15 steps): the host's Python
#                   time by function, $OUT/pyprof_*.txt (the w1 rows are bound by the host, not the device)
#   PHASE=long      (issue 24) GPU checks while the Llama-3-8B-shaped checkpoint is built, the attention
#                   kernels and device ceilings (scripts/attn_bench.py), then on the 8B shape: one 32k-token
#                   sequence a step (s32k) and long conversations (c8), ours (with a profile) and Unsloth, and
#                   ours at 128k tokens (the longest context, one measured step)
#   PHASE=final24   (issue 24) GPU checks, then in one call: c8 and s32k ours and Unsloth, the 7B
#                   human-response recipe row ours and Unsloth, and what time is left: 64k ours
#   PHASE=hr        (issue 24) the 7B human-response recipe row alone, ours and Unsloth (what final24 left)
#   Every run gets the time left before DEADLINE (s since start, default 570) as its limit.
# Usage on the host (project root): PHASE=recipes bash scripts/gpu_bench.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$OUT/${PHASE}.log; R=$OUT/${PHASE}.jsonl; : > "$R"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$L"; }
D=/tmp/bench; mkdir -p $D
pipq="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
[ -d /tmp/site/bitsandbytes ] || $pipq --target /tmp/site .whl/*.whl >>"$L" 2>&1
[ -d /tmp/peers/unsloth ] || $pipq --target /tmp/peers .whl_peers/*.whl >>"$L" 2>&1
grep -q 'ARCH\["l3"\]' .bench/workload.py || cat scripts/bench_extra_workload.py >> .bench/workload.py
BASE=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$L" 2>&1
el "start $PHASE"

# run RUNNER WORKLOAD ARCH LABEL STEPS [VAR=VALUE ...]: one runner, its RESULT line into $R
run() {
  local runner=$1 w=$2 arch=$3 label=$4 steps=$5; shift 5
  local batch; batch=$(cd .bench && python3 -c "import workload as W; print(W.WORKLOADS['$w'][-1])")
  local data=$D/$w.jsonl; [ "$arch" = 7b ] || data=$D/$w-$arch.jsonl
  local cmd pp=$BASE
  case $runner in
    ours)    cmd=(python3 -m loraforge.bench) ;;
    pyprof)  cmd=(python3 -m cProfile -o $OUT/pyprof.out -m loraforge.bench) ;;
    before)  cmd=(python3 -m loraforge.bench); pp=/tmp/site:$PWD/$BEFORE_SRC ;;
    hf)      cmd=(python3 .bench/hf_baseline.py --workload "$w" --arch "$arch" --dir $D --steps "$steps" --warmup ${WARMUP:-5}) ;;
    unsloth) cmd=(python3 .bench/unsloth_baseline.py --workload "$w" --arch "$arch" --dir $D --steps "$steps" --warmup ${WARMUP:-5})
             pp=/tmp/peers:$BASE ;;
  esac
  local left=$(( ${DEADLINE:-100000} - ($(date +%s) - T0) )); [ "$left" -gt "${RUN_TIMEOUT:-200}" ] && left=${RUN_TIMEOUT:-200}
  if [ "$left" -lt 30 ]; then el "$label $runner: skipped, no time left"; return; fi
  env "$@" WORKLOAD=$w MODEL_DIR=$D/model-$arch DATA_FILE=$data BATCH=$batch MAX_LENGTH=${BENCH_MAX_LENGTH:-1024} \
    STEPS=$steps WARMUP=${WARMUP:-5} PYTHONPATH=$pp timeout "$left" "${cmd[@]}" > /tmp/run.log 2>&1
  cp /tmp/run.log "$OUT/log_${runner}_${w}.txt" 2>/dev/null
  local line; line=$(grep '^RESULT ' /tmp/run.log | tail -1)
  grep -E "fast paths|Unsloth:|Error|error" /tmp/run.log | grep -v "^RESULT" | head -8 >> "$L"
  if [ -n "$line" ]; then
    echo "${line#RESULT }" | python3 -c "import json,sys; d=json.load(sys.stdin); d.update(runner='$runner', row='$label'); print(json.dumps(d))" >> "$R"
    el "$label $runner: $(echo "${line#RESULT }" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['tokens_per_s'], 'tok/s', d['peak_gib'], 'GiB loss', d['mean_loss'], 'tokens', d['tokens'], 'mfu', d.get('mfu'))")"
  else
    el "$label $runner: no RESULT line"; tail -25 /tmp/run.log >> "$L"
  fi
}

lora_of() { PYTHONPATH=$BASE python3 -m loraforge.bench lora-env "$1"; }

w1_w2_rows() {  # the shared workloads with their own settings, ours then Unsloth
  run ours w1 7b "w1 (workload LoRA)" 30
  run unsloth w1 7b "w1 (workload LoRA)" 30
  run ours w2 7b "w2 (workload LoRA)" 20
  run unsloth w2 7b "w2 (workload LoRA)" 20
}

build_8b() {  # the Llama-3-8B-shaped checkpoint and the issue-24 workloads' data, on the host
  (cd .bench && PYTHONPATH=$BASE python3 -c "
import workload as W
W.build_checkpoint('8b', '$D/model-8b')
for w in ('c8', 's32k', 's64k', 's128k'):
    W.write_workload(w, '8b', '$D/' + w + '-8b.jsonl')") >>"$L" 2>&1
}

gpu_checks() {
  PYTHONPATH=$BASE timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/model/fused/test_fused_cuda.py \
    2>&1 | grep -E "GPUCHECK|passed|failed|Error|error|assert" > "$OUT/gpu_checks.txt"
}

long_rows() {  # c8 and s32k, ours then Unsloth; PROFILE=1: ours with 3 profiled steps after the measured ones
  # c8 with the shared rule's 5 warm-up steps (Unsloth recompiles its layers for new lengths in the first steps);
  # s32k's one shape is steady from the second step for both runners (call 1: 4.30 / 5.17 s a step)
  local prof=(BENCH_PROFILE=$OUT/prof_c8.txt)
  export BENCH_MAX_LENGTH=4096
  WARMUP=5 run ours c8 8b "8B conversations (c8)" 20 "${prof[@]}"
  WARMUP=5 run unsloth c8 8b "8B conversations (c8)" 20
  export BENCH_MAX_LENGTH=32768
  prof=()
  [ -n "${PROFILE:-}" ] && prof=(BENCH_PROFILE=$OUT/prof_s32k.txt)
  WARMUP=2 RUN_TIMEOUT=240 run ours s32k 8b "8B one 32k sequence (s32k)" 6 "${prof[@]}"
  WARMUP=2 RUN_TIMEOUT=240 run unsloth s32k 8b "8B one 32k sequence (s32k)" 6
}

if [ "$PHASE" = long ] || [ "$PHASE" = final24 ]; then
  export DEADLINE=${DEADLINE:-570}
  build_8b &
  if [ "$PHASE" = final24 ]; then
    (cd .bench && PYTHONPATH=$BASE python3 workload.py --arch 7b --out $D >/dev/null 2>&1) &
  fi
  gpu_checks; el "gpu checks done"; cat "$OUT/gpu_checks.txt" >> "$L"
  wait; el "checkpoints ready"
  export BENCH_MATMUL_TFLOPS; BENCH_MATMUL_TFLOPS=$(PYTHONPATH=$BASE python3 -m loraforge.bench matmul-rate 2>/dev/null | tail -1)
  el "bf16 matmul rate: $BENCH_MATMUL_TFLOPS TFLOP/s"
  if [ "$PHASE" = long ]; then
    PYTHONPATH=$BASE timeout 120 python3 scripts/attn_bench.py --out $OUT/attn_bench.jsonl > $OUT/attn_bench.txt 2>&1
    tail -14 $OUT/attn_bench.txt | tee -a "$L"
    PROFILE=1 long_rows
    export BENCH_MAX_LENGTH=131072
    WARMUP=1 RUN_TIMEOUT=300 run ours s128k 8b "8B one 128k sequence (s128k)" 1
  else
    long_rows
    export BENCH_MAX_LENGTH=1024
    lora=$(lora_of llama2-7b-human-response)
    run ours w1 7b llama2-7b-human-response 30 BENCH_RECIPE=llama2-7b-human-response $lora
    run unsloth w1 7b llama2-7b-human-response 30 $lora
    export BENCH_MAX_LENGTH=65536
    WARMUP=1 RUN_TIMEOUT=200 run ours s64k 8b "8B one 64k sequence (s64k)" 1
  fi
elif [ "$PHASE" = hr ]; then
  (cd .bench && PYTHONPATH=$BASE python3 -c "
import workload as W
W.build_checkpoint('7b', '$D/model-7b'); W.write_workload('w1', '7b', '$D/w1.jsonl')") >>"$L" 2>&1
  el "7b checkpoint ready"
  lora=$(lora_of llama2-7b-human-response)
  run ours w1 7b llama2-7b-human-response 30 BENCH_RECIPE=llama2-7b-human-response $lora
  run unsloth w1 7b llama2-7b-human-response 30 $lora
elif [ "$PHASE" = recipes ] || [ "$PHASE" = final ]; then
  (cd .bench && PYTHONPATH=$BASE python3 workload.py --arch 7b --out $D >/dev/null 2>&1; echo built > $D/built) &
  PYTHONPATH=$BASE timeout 240 python3 -m pytest -q -s -p no:cacheprovider tests/model/fused/test_fused_cuda.py \
    tests/train/test_optim.py 2>&1 | grep -E "GPUCHECK|passed|failed|Error|error" > "$OUT/gpu_checks.txt"
  el "gpu checks done"; cat "$OUT/gpu_checks.txt" >> "$L"
  wait; el "7b checkpoint ready"
  for recipe in llama2-7b-human-response llama2-7b-guanaco llama2-7b-sql-mix; do
    lora=$(lora_of $recipe); el "$recipe: $lora"
    run ours w1 7b "$recipe" 30 BENCH_RECIPE=$recipe $lora
    run unsloth w1 7b "$recipe" 30 $lora
    if [ -n "${BEFORE_SRC:-}" ] && [ "$recipe" = llama2-7b-human-response ]; then
      run before w1 7b "$recipe" 30 BENCH_RECIPE=$recipe $lora
    fi
  done
  [ "$PHASE" = final ] && w1_w2_rows
  if [ -n "${PYPROF:-}" ]; then
    lora=$(lora_of llama2-7b-human-response)
    run pyprof w1 7b "human-response under cProfile" 15 BENCH_RECIPE=llama2-7b-human-response $lora
    for key in tottime cumtime; do
      python3 -c "import pstats; pstats.Stats('$OUT/pyprof.out').sort_stats('$key').print_stats(70)" > $OUT/pyprof_$key.txt 2>&1
    done
  fi
else
  (cd .bench && PYTHONPATH=$BASE python3 workload.py --arch 7b --out $D >/dev/null 2>&1) &
  (PYTHONPATH=$BASE timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/model/fused/test_fused_cuda.py -k "fp16" \
    2>&1 | grep -E "GPUCHECK|passed|failed|Error|error" > "$OUT/gpu_checks_fp16.txt") &
  lora=$(lora_of llama2-7b-sql-mix)
  (cd .bench && BENCH_MAX_LENGTH=4096 PYTHONPATH=$BASE python3 -c "
import os, workload as W
W.build_checkpoint('l3', '$D/model-l3'); W.write_workload('w3', 'l3', '$D/w3-l3.jsonl')") >>"$L" 2>&1
  wait; el "l3 and 7b checkpoints ready"; cat "$OUT/gpu_checks_fp16.txt" >> "$L"
  export BENCH_MAX_LENGTH=4096
  run ours w3 l3 "w3-l3 (sql-mix LoRA)" 20 BENCH_RECIPE=llama2-7b-sql-mix $lora
  run unsloth w3 l3 "w3-l3 (sql-mix LoRA)" 20 $lora
  export BENCH_MAX_LENGTH=1024
  run ours w1 7b "llama2-7b-human-response (again, + profile)" 30 BENCH_RECIPE=llama2-7b-human-response \
    BENCH_PROFILE=$OUT/prof_human_response.txt $(lora_of llama2-7b-human-response)
  w1_w2_rows
fi

python3 - "$R" <<'PY' | tee "$OUT/${PHASE}_table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| row | runner | tokens/s | peak GiB | x Unsloth | MFU | mean loss | loss - Unsloth's | tokens |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for label in dict.fromkeys(r["row"] for r in rows):
    sel = [r for r in rows if r["row"] == label]
    uns = next((r for r in sel if r["runner"] == "unsloth"), None)
    ours = next((r for r in sel if r.get("model_tflop") and r.get("matmul_tflops")), None)
    for r in sel:
        x = r["tokens_per_s"] / uns["tokens_per_s"] if uns else float("nan")
        dl = r["mean_loss"] - uns["mean_loss"] if uns else float("nan")
        # the same sequences, so the same model FLOPs: any runner's MFU from ours' count and its own seconds
        same = ours and r["tokens"] == ours["tokens"]
        mfu = ours["model_tflop"] / r["seconds"] / ours["matmul_tflops"] if same else float("nan")
        print(f"| {label} | {r['runner']} | {r['tokens_per_s']:.0f} | {r.get('peak_gib') or 0:.2f} | {x:.2f} | "
              f"{100 * mfu:.1f}% | {r['mean_loss']:.4f} | {dl:+.4f} | {r['tokens']} |")
PY
el "done"
