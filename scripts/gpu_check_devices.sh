#!/usr/bin/env bash
# One GPU call after the issue-12/13 merge: (1) issue 13's single-GPU check: `--devices 1` with
# train.distributed=fsdp trains the tiny model and matches the plain run's loss per step; (2) w1 again,
# ours against Unsloth in the same call (issue 12 saw w1 lower than on 12-01).
# Needs carried: .whl, .whl_peers, .bench (as scripts/gpu_bench.sh). Usage: bash scripts/gpu_check_devices.sh
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
pipq="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
[ -d /tmp/site/bitsandbytes ] || $pipq --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site:$PWD/src LORAFORGE_HOME=/tmp/lf
(cd .bench && python3 workload.py --arch 7b --out /tmp/bench >/dev/null 2>&1; echo built > /tmp/bench/built) &
S="--set train.max_steps=30 --set train.fused_layers=off --set samples=0 --set train.logging_steps=5
   --set train.eval_steps=null --set data.eval_fraction=0 --set train.tensorboard=false"
[ -f /tmp/lf/plain/summary.json ] || python3 -m loraforge train tiny $S --output-dir /tmp/lf/plain > "$OUT/plain.log" 2>&1; echo "plain exit $?"
python3 -m loraforge train tiny $S --devices 1 --set train.distributed=fsdp --output-dir /tmp/lf/fsdp \
  > "$OUT/fsdp.log" 2>&1; echo "fsdp exit $?"
python3 - <<'PY' | tee "$OUT/fsdp_check.txt"
import json
def losses(d):
    return [r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if "loss" in r]
a, b = losses("/tmp/lf/plain"), losses("/tmp/lf/fsdp")
print("FSDPCHECK steps", len(a), len(b), "max rel loss diff", max(abs(x - y) / abs(x) for x, y in zip(a, b)))
s = json.load(open("/tmp/lf/fsdp/summary.json"))
print("FSDPCHECK device", s.get("device"), "distributed", s.get("distributed"), "memory", s.get("memory_per_rank"))
PY
tail -3 "$OUT/fsdp.log"
[ "${SKIP_W1:-}" = 1 ] && exit 0
wait
batch=$(cd .bench && python3 -c "import workload as W; print(W.WORKLOADS['w1'][-1])")
for runner in ours unsloth; do
  if [ $runner = ours ]; then cmd=(python3 -m loraforge.bench); pp=$PYTHONPATH
  else
    [ -d /tmp/peers/unsloth ] || $pipq --target /tmp/peers .whl_peers/*.whl >> "$OUT/install.log" 2>&1
    cmd=(python3 .bench/unsloth_baseline.py --workload w1 --arch 7b --dir /tmp/bench --steps 30 --warmup 5)
    pp=/tmp/peers:$PYTHONPATH
  fi
  env WORKLOAD=w1 MODEL_DIR=/tmp/bench/model-7b DATA_FILE=/tmp/bench/w1.jsonl BATCH=$batch MAX_LENGTH=1024 STEPS=30 \
    WARMUP=5 PYTHONPATH=$pp timeout 200 "${cmd[@]}" > "$OUT/w1-$runner.log" 2>&1
  echo "w1 $runner: $(grep '^RESULT ' "$OUT/w1-$runner.log" | tail -1)"
done
