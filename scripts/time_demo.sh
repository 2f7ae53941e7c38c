#!/usr/bin/env bash
# Time the README's `loraforge train` (no arguments) as a new user meets it: a fresh cache (the default
# model's checkpoint is built from the packaged GGUF file inside the timed run), offline, in an empty
# folder. Prints the wall time, the machine's load, and base vs tuned on the held-out rows.
#   scripts/time_demo.sh            # after the README's install; run it on a quiet machine
set -euo pipefail
work=$(mktemp -d "${TMPDIR:-/tmp}/loraforge-demo-XXXXXX")
# A fresh loraforge and Hugging Face cache; HOME itself stays (pyenv and pip live there).
export LORAFORGE_HOME="$work/cache" HF_HOME="$work/hf" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$work"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; folder $work"
start=$(date +%s.%N)
loraforge train --output-dir "$work/run" | tee "$work/train.log"
end=$(date +%s.%N)
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work/run" "$start" "$end" <<'PY'
import json, sys
from pathlib import Path
run, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
summary = json.loads((run / "summary.json").read_text())
print(f"DEMO wall {end - start:.0f} s; {summary['steps']} steps at {summary['tokens_per_s']:.0f} tokens/s")
for name, m in summary["eval"]["metrics"].items():
    print(f"DEMO {name} on {m['rows']} held-out rows: base {100 * m['base']:.1f}, tuned {100 * m['tuned']:.1f} "
          f"({100 * (m['tuned'] - m['base']):+.1f} points)")
loss = summary["eval"]["response_loss"]
print(f"DEMO response-token loss: base {loss['base']:.3f}, tuned {loss['tuned']:.3f}")
PY
