#!/usr/bin/env bash
# Train BOTH stages at once on one lent GPU machine, within a hard wall-clock limit.
#
#   OUT=/some/folder bash export/gpu_train.sh          (run from anywhere; $OUT is required)
#
# Uses the machine's system python3 (torch, numpy, scipy); nothing is installed. Two training
# processes share the GPU, each with its own pool of data workers, each with a time budget
# (MINUTES). Whatever happens to one stage, the other still finishes and saves. Into "$OUT/":
#   <stage>.pt            final weights (state_dict + architecture + training summary + metrics)
#   <stage>.last.pt       full checkpoint (optimiser, step): resume on CPU with
#                         python -m export.train --stage <stage> --out <folder holding last.pt>
#   <stage>.log           stdout/stderr of the run (JSON lines), <stage>.rc its exit status
#   env.json, preflight.txt, timings of the phantom generator, summary.json
#   models/               ONNX fp32/fp16 + manifest.json, only if onnx, onnxruntime and
#                         onnxconverter_common import there (else export locally from the .pt)
# Knobs (environment): MINUTES (6.5), DEADLINE_S (whole script, 540), LOBES_WORKERS (7),
# OPACITY_WORKERS (7), PYTHON (python3), DEVICE (cuda), LOBES_ARGS / OPACITY_ARGS (extra train flags,
# default '--batch 4 --crops 3' and '--batch 8 --crops 8').
set -u -o pipefail

: "${OUT:?OUT must name the folder whose files come back}"
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
START=$(date +%s)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-6.5}
DEADLINE_S=${DEADLINE_S:-540}
LOBES_WORKERS=${LOBES_WORKERS:-7}
OPACITY_WORKERS=${OPACITY_WORKERS:-7}
# Sized from measured synthesize() times (2-core dev machine, one core each): 128^3 at 3 mm about
# 0.4 s, 176x240x240 at 2x1.5x1.5 mm about 1.1 s; 7 workers then give roughly 15 and 6 sources/s,
# i.e. about 45 samples/s per stage with 3 and 8 augmented crops per source.
LOBES_ARGS=${LOBES_ARGS:---batch 4 --crops 3}
OPACITY_ARGS=${OPACITY_ARGS:---batch 8 --crops 8}
CKPT="$ROOT/out/gpu_checkpoints"
mkdir -p "$OUT" "$CKPT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Workers do numpy/scipy work one core each; BLAS/OpenMP threads would only fight over cores.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "[gpu_train $(elapsed)s] $*" | tee -a "$OUT/gpu_train.txt"; }

# ---- preflight: what this machine has; stop early (cheaply) if training cannot work --------
"$PYTHON" - > "$OUT/env.json" 2> "$OUT/preflight.txt" <<'EOF'
import json, os, platform, importlib.util as u
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(), "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        "onnx": bool(u.find_spec("onnx")), "onnxruntime": bool(u.find_spec("onnxruntime")),
        "onnxconverter_common": bool(u.find_spec("onnxconverter_common")),
        "scipy": bool(u.find_spec("scipy")), "real_npz": sorted(os.listdir("out/real"))
        if os.path.isdir("out/real") else []}
print(json.dumps(info))
EOF
note "env: $(cat "$OUT/env.json")"
if ! "$PYTHON" -c "import appliance.phantom, export.train" 2>> "$OUT/preflight.txt"; then
  note "FATAL: appliance.phantom or export.train does not import with $PYTHON (see preflight.txt)"
  exit 3
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  note "FATAL: no CUDA device visible to torch"
  exit 3
fi
# Phantom generator speed at both stages' settings (sizes the pools; logged for the report).
timeout 60 "$PYTHON" - >> "$OUT/phantom_timing.json" 2>> "$OUT/preflight.txt" <<'EOF' &
import json, time
from appliance.phantom import synthesize
from export.data import STAGES
for name, spec in STAGES.items():
    shape = spec.synth_shape or spec.tile_shape
    t = time.perf_counter(); synthesize(999_999, "severe", spacing=spec.spacing_mm, shape=shape)
    print(json.dumps({"stage": name, "shape": shape, "synthesize_s": round(time.perf_counter() - t, 2)}))
EOF
TIMING_PID=$!

# ---- both stages at once ----------------------------------------------------------------------
LIMIT_S=$("$PYTHON" -c "print(int($MINUTES * 60 + 75))")   # the trainer stops itself at MINUTES

run_stage() {
  local stage=$1 workers=$2 extra=$3
  mkdir -p "$CKPT/$stage"
  # SIGTERM at the limit: the trainer stops after its current step and saves; KILL 30 s later.
  # shellcheck disable=SC2086
  timeout -s TERM -k 30 "$LIMIT_S" "$PYTHON" -m export.train --stage "$stage" --device "$DEVICE" \
    --minutes "$MINUTES" --workers "$workers" --threads 2 --out "$CKPT/$stage" \
    --val-every 150 --val-samples 6 --log-every 25 --checkpoint-minutes 1 $extra \
    > "$OUT/$stage.log" 2>&1
  local rc=$?
  echo "$rc" > "$OUT/$stage.rc"
  cp -f "$CKPT/$stage/$stage.pt" "$OUT/$stage.pt" 2>/dev/null || true
  cp -f "$CKPT/$stage/last.pt" "$OUT/$stage.last.pt" 2>/dev/null || true
  cp -f "$CKPT/$stage/log.jsonl" "$OUT/$stage.jsonl" 2>/dev/null || true
  note "$stage finished rc=$rc ($( [ -f "$OUT/$stage.pt" ] && echo weights saved || echo NO weights))"
}

note "training both stages for $MINUTES min each (limit ${LIMIT_S}s)"
run_stage lobes "$LOBES_WORKERS" "$LOBES_ARGS" &
PID_LOBES=$!
run_stage opacity "$OPACITY_WORKERS" "$OPACITY_ARGS" &
PID_OPACITY=$!
wait "$PID_LOBES" "$PID_OPACITY"
wait "$TIMING_PID" 2>/dev/null

# ---- optional ONNX export (only when the exporters import here and time is left) -------------
LEFT=$(( DEADLINE_S - $(elapsed) ))
if "$PYTHON" -c "import onnx, onnxruntime, onnxconverter_common" 2>/dev/null; then
  if [ "$LEFT" -gt 60 ]; then
    mkdir -p "$OUT/models"
    for stage in lobes opacity; do
      [ -f "$OUT/$stage.pt" ] || continue
      LEFT=$(( DEADLINE_S - $(elapsed) ))
      [ "$LEFT" -gt 30 ] || { note "no time left to export $stage"; continue; }
      timeout -k 5 "$LEFT" "$PYTHON" -m export.onnx --weights "$OUT/$stage.pt" \
        --models-dir "$OUT/models" --tiles 2 --threads 8 >> "$OUT/export.log" 2>&1 \
        && note "exported $stage to models/" || note "export of $stage failed (see export.log)"
    done
  else
    note "skipping ONNX export: ${LEFT}s left"
  fi
else
  note "onnx/onnxruntime/onnxconverter_common not all importable: weights only (export locally)"
fi

"$PYTHON" - > "$OUT/summary.json" <<EOF
import json, pathlib
out = pathlib.Path("$OUT")
summary = {"elapsed_s": $(elapsed)}
for stage in ("lobes", "opacity"):
    rc = out / f"{stage}.rc"
    done = [json.loads(l) for l in (out / f"{stage}.log").read_text().splitlines()
            if l.startswith("{") and '"event": "done"' in l] if (out / f"{stage}.log").exists() else []
    summary[stage] = {"rc": rc.read_text().strip() if rc.exists() else None,
                      "weights": (out / f"{stage}.pt").exists(), "done": done[-1] if done else None}
print(json.dumps(summary, indent=1))
EOF
note "summary: $(tr -d '\n' < "$OUT/summary.json")"
[ -f "$OUT/lobes.pt" ] && [ -f "$OUT/opacity.pt" ]
