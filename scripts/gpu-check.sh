#!/usr/bin/env bash
# GPU check, for a machine with one CUDA GPU (under 10 minutes there): bf16 and fp16 training steps with
# channels-last, a 1-GPU torchrun, a CUDA resume after a crash, `crfr bench train` with the paper's iresnet50.
# Prints progress on stderr and ONE JSON line on stdout; exits 0 only if every check passed.
#
#   bash scripts/gpu-check.sh             run it (needs CUDA, and LFW at $CRFR_LFW_ROOT or ../shared/data/lfw)
#   bash scripts/gpu-check.sh --dry-run   no GPU needed: check the plan (every --set is valid params, the
#                                         crash hook's target exists) and print the commands it would run
# Environment: PYTHON (default .venv/bin/python, else python3), CRFR_LFW_ROOT, GPU_CHECK_PARAMS (default
# params.yaml), GPU_CHECK_WORK (a folder to keep the logs in; default a temporary one, removed),
# GPU_CHECK_DEVICE=cpu (rehearse every step without a GPU, tiny bench batches; its numbers mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$arg' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEV=${GPU_CHECK_DEVICE:-cuda}
case "$DEV" in cuda|cpu) ;; *) echo "gpu-check: GPU_CHECK_DEVICE must be cuda or cpu, not '$DEV'" >&2; exit 2 ;; esac
PARAMS=$(realpath "${GPU_CHECK_PARAMS:-params.yaml}")
export CRFR_LFW_ROOT="${CRFR_LFW_ROOT:-$(cd .. && pwd)/shared/data/lfw}"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # cuBLAS needs it for the deterministic resume comparison

if [ -n "${GPU_CHECK_WORK:-}" ]; then W=$GPU_CHECK_WORK; mkdir -p "$W"; else W=$(mktemp -d); trap 'rm -rf "$W"' EXIT; fi
mkdir -p "$W/logs"
RESULTS="$W/results.jsonl"; : >"$RESULTS"

# Every training run: the tiny profile on CUDA, with this run's own stores.
BASE=(--params "$PARAMS" --set profile=tiny --set "runtime.device=$DEV" --set "run_dir=$W/runs"
      --set "tracking.uri=sqlite:///$W/mlflow.db" --set "tracking.artifact_location=$W/mlartifacts"
      --set "storage.cache_dir=$W/cache")
BF16=(--set runtime.amp=bf16 --set runtime.channels_last=true)
FP16=(--set runtime.amp=fp16 --set runtime.channels_last=true)
# Exact comparison of a resumed run with an uninterrupted one: fp32, deterministic kernels, 2 epochs.
EXACT=(--set runtime.amp=none --set runtime.deterministic=true --set teacher.epochs=2 --set runtime.checkpoint_every_steps=2)
PREP="$W/prepared"
BENCH=(--set profile=paper --set "runtime.device=$DEV" --steps 5 --json)
[ "$DEV" = cpu ] && BENCH=(--set profile=paper --set runtime.device=cpu --set teacher.batch_size=2
                           --set student.batch_size=2 --steps 1 --json)

# A crash right after the first checkpoint is written, as kill -9 would leave it (exit code 137).
CRASH_HOOK='
import os, sys
from crfr.train import loop
first = loop.Trainer.save_checkpoint
def crash_after_first_checkpoint(self):
    first(self)
    os._exit(137)
loop.Trainer.save_checkpoint = crash_after_first_checkpoint
from components.train_teacher import main
sys.exit(main(sys.argv[1:]))
'

# name|command: the checks, in order (later ones use earlier outputs).
PLAN=(
  "prepare|$PY -m components.prepare --params $PARAMS --set profile=tiny --out $PREP"
  "bf16_teacher|$PY -m components.train_teacher ${BASE[*]} ${BF16[*]} --prepared $PREP --out $W/teacher"
  "fp16_student|$PY -m components.distill_student ${BASE[*]} ${FP16[*]} --prepared $PREP --teacher $W/teacher --out $W/student"
  "channels_last|$PY - (WaveResNet forward+backward under bf16 autocast, NHWC kept through the network)"
  "torchrun_1gpu|$PY -m torch.distributed.run --standalone --nproc_per_node=1 --max_restarts=0 -m components.train_teacher ${BASE[*]} ${BF16[*]} --prepared $PREP --out $W/teacher-ddp"
  "resume_cuda|uninterrupted run, crash after the first checkpoint, rerun with --resume (${EXACT[*]})"
  "bench_iresnet50|$PY -m crfr.cli bench train ${BENCH[*]}"
)

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Records one check's result: record NAME OK MILLISECONDS [JSON objects of fields...]
record() {
  "$PY" - "$@" >>"$RESULTS" <<'PY'
import json, sys
name, ok, ms, *extra = sys.argv[1:]
out = {}
for item in extra:
    out.update(json.loads(item))
out.update(name=name, ok=ok == "1", s=round(int(ms) / 1000, 1))  # a step's own "name" must not replace it
print(json.dumps(out))
PY
}

# The scalars of the last JSON object a step printed: one line, or a training step's indent=2 summary.
summary_of() {
  "$PY" - "$1" <<'PY'
import json, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
found = {}
for i in reversed(range(len(lines))):
    text = lines[i] if lines[i].startswith("{") and lines[i].endswith("}") else None
    if text is None and lines[i] == "{" and "}" in lines[i:]:
        text = "\n".join(lines[i:lines.index("}", i) + 1])
    try:
        found = json.loads(text) if text else None
    except ValueError:
        found = None
    if isinstance(found, dict):
        break
found = found or {}
keep = {k: v for k, v in found.items() if isinstance(v, (bool, int, float)) or
        (isinstance(v, str) and len(v) <= 80 and k != "mlflow_run_id")}
keep.update({f"final_{k}": v for k, v in (found.get("final") or {}).items() if isinstance(v, (int, float))})
print(json.dumps(keep))
PY
}

# run_check NAME LIMIT_S CMD...: runs it with a time limit, logs to logs/NAME.log, records the summary.
run_check() {
  local name=$1 limit=$2; shift 2
  local log="$W/logs/$name.log" t0 rc extra
  echo "gpu-check: $name ..." >&2
  t0=$(now_ms)
  timeout "$limit" "$@" >"$log" 2>&1; rc=$?
  local dt=$(( $(now_ms) - t0 ))
  extra=$(summary_of "$log")
  if [ $rc -eq 0 ]; then
    record "$name" 1 "$dt" "$extra"
  else
    local why; why=$(grep -v '^\s*$' "$log" | tail -1 | cut -c1-200)
    [ $rc -eq 124 ] && why="timed out after ${limit} s; $why"
    record "$name" 0 "$dt" "$extra" "$("$PY" -c 'import json,sys; print(json.dumps({"rc": int(sys.argv[1]), "error": sys.argv[2]}))' "$rc" "$why")"
  fi
  return $rc
}

finish() {  # prints the one JSON line and exits
  "$PY" - "$RESULTS" "$DRY" "$@" <<'PY'
import json, sys
results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = {"dry_run": sys.argv[2] == "1"}
for item in sys.argv[3:]:
    out.update(json.loads(item))
out["checks"] = {r.pop("name"): r for r in results}
out["ok"] = bool(results) and all(c.get("ok") for c in out["checks"].values()) and out.get("ok", True)
print(json.dumps(out, sort_keys=True))
sys.exit(0 if out["ok"] else 1)
PY
  exit $?
}

# ------------------------------------------------------------------------------------------------ dry run
if [ $DRY -eq 1 ]; then
  for entry in "${PLAN[@]}"; do echo "would run ${entry%%|*}: ${entry#*|}" >&2; done
  # Every --set of the plan must be valid params, and the crash hook must find what it patches.
  "$PY" - "${BASE[@]:0:2}" :: "${BASE[@]:2}" "${BF16[@]}" :: "${BASE[@]:2}" "${FP16[@]}" :: "${BASE[@]:2}" \
    "${EXACT[@]}" >"$W/plan.json" 2>"$W/plan.err" <<'PY'
import json, sys
from crfr.config import load_params
from crfr.train import loop
params_file, groups = sys.argv[2], [[]]
for word in sys.argv[3:]:  # "::" separates the training runs' argument lists
    groups.append([]) if word == "::" else groups[-1].append(word)
for words in filter(None, groups):
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    p = load_params(params_file, sets)
    assert p.profile == "tiny", sets
paper = load_params(params_file, ["profile=paper", "runtime.device=cuda"])
assert paper.model.depth == 50, "the paper profile is no longer iresnet50"
assert callable(getattr(loop.Trainer, "save_checkpoint", None)), "crfr.train.loop.Trainer.save_checkpoint is gone"
print(json.dumps({"params_ok": True, "bench_model": f"iresnet{paper.model.depth}"}))
PY
  rc=$?
  if [ $rc -ne 0 ]; then
    record plan 0 0 "$("$PY" -c 'import json,sys; print(json.dumps({"error": sys.argv[1]}))' "$(tail -1 "$W/plan.err" | cut -c1-200)")"
  else
    record plan 1 0 "$(cat "$W/plan.json")"
  fi
  finish "{\"lfw_found\": $([ -f "$CRFR_LFW_ROOT/pairs.txt" ] && echo true || echo false)}"
fi

# ------------------------------------------------------------------------------------------------ the checks
if ! env_json=$(GPU_CHECK_DEVICE=$DEV "$PY" - 2>"$W/env.err" <<'PY'
import json, os, torch
if os.environ["GPU_CHECK_DEVICE"] == "cpu":
    print(json.dumps({"device": "cpu (rehearsal)", "torch": torch.__version__})); raise SystemExit
if not torch.cuda.is_available():
    raise SystemExit(f"no CUDA device: torch {torch.__version__} reports torch.cuda.is_available() == False")
print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}))
PY
); then
  why=$(tail -1 "$W/env.err" | cut -c1-300)
  echo "gpu-check: $why (bash scripts/gpu-check.sh --dry-run checks the plan without a GPU)" >&2
  "$PY" -c 'import json,sys; print(json.dumps({"ok": False, "dry_run": False, "error": sys.argv[1]}))' "$why"
  exit 2
fi
if [ ! -f "$CRFR_LFW_ROOT/pairs.txt" ]; then
  echo "gpu-check: LFW not found at $CRFR_LFW_ROOT (set CRFR_LFW_ROOT)" >&2
  "$PY" -c 'import json,sys; print(json.dumps({"ok": False, "dry_run": False, "error": sys.argv[1]}))' \
    "LFW not found at $CRFR_LFW_ROOT (set CRFR_LFW_ROOT)"
  exit 2
fi
echo "gpu-check: $env_json" >&2

run_check prepare 300 "$PY" -m components.prepare --params "$PARAMS" --set profile=tiny --out "$PREP" \
  || finish "$env_json"
run_check bf16_teacher 180 "$PY" -m components.train_teacher "${BASE[@]}" "${BF16[@]}" --prepared "$PREP" \
  --out "$W/teacher"
run_check fp16_student 180 "$PY" -m components.distill_student "${BASE[@]}" "${FP16[@]}" --prepared "$PREP" \
  --teacher "$W/teacher" --out "$W/student"
GPU_CHECK_DEVICE=$DEV run_check channels_last 120 "$PY" - <<'PY'
import json, os, torch
from crfr.config import ModelCfg
from crfr.models import build_backbone
dev = os.environ["GPU_CHECK_DEVICE"]
net = build_backbone("waveresnet", ModelCfg(depth=18, width=0.5)).to(dev).to(memory_format=torch.channels_last)
x = torch.randn(32, 3, 112, 112, device=dev).contiguous(memory_format=torch.channels_last)
seen = []
for m in net.modules():
    if isinstance(m, torch.nn.Conv2d):
        m.register_forward_hook(lambda mod, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
with torch.autocast(dev, dtype=torch.bfloat16):
    y = net(x)
y.float().square().mean().backward()
grads = [p.grad for p in net.parameters() if p.grad is not None]
assert all(torch.isfinite(g).all() for g in grads), "non-finite gradients"
assert seen and all(seen), f"{seen.count(False)} of {len(seen)} convolutions left channels-last"
print(json.dumps({"convs_nhwc": len(seen), "out_dtype": str(y.dtype)}))
PY
run_check torchrun_1gpu 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 --max_restarts=0 \
  -m components.train_teacher "${BASE[@]}" "${BF16[@]}" --prepared "$PREP" --out "$W/teacher-ddp"

# CUDA resume: A uninterrupted; B crashes after its first checkpoint, then resumes; A and B must agree.
echo "gpu-check: resume_cuda ..." >&2
t0=$(now_ms); ok=1; err=""
RA=(--set "run_dir=$W/runs-a"); RB=(--set "run_dir=$W/runs-b")
timeout 240 "$PY" -m components.train_teacher "${BASE[@]}" "${EXACT[@]}" "${RA[@]}" --prepared "$PREP" \
  --out "$W/resume-a" >"$W/logs/resume_a.log" 2>&1 || { ok=0; err="uninterrupted run failed: $(tail -1 "$W/logs/resume_a.log" | cut -c1-160)"; }
timeout 240 "$PY" -c "$CRASH_HOOK" "${BASE[@]}" "${EXACT[@]}" "${RB[@]}" --prepared "$PREP" --out "$W/resume-b" \
  >"$W/logs/resume_crash.log" 2>&1; crash_rc=$?
[ $crash_rc -eq 137 ] || { ok=0; err="${err:-the crashing run exited $crash_rc, not 137 after its first checkpoint}"; }
timeout 240 "$PY" -m components.train_teacher "${BASE[@]}" "${EXACT[@]}" "${RB[@]}" --prepared "$PREP" \
  --out "$W/resume-b" --resume >"$W/logs/resume_b.log" 2>&1 || { ok=0; err="${err:-the --resume run failed: $(tail -1 "$W/logs/resume_b.log" | cut -c1-160)}"; }
cmp=$("$PY" - "$(summary_of "$W/logs/resume_a.log")" "$(summary_of "$W/logs/resume_b.log")" <<'PY'
import json, sys
a, b = (json.loads(s) for s in sys.argv[1:3])
print(json.dumps({"resumed": b.get("resumed") is True, "weights_equal": bool(a.get("weights_sha256"))
                  and a.get("weights_sha256") == b.get("weights_sha256"), "steps": b.get("steps")}))
PY
)
case "$cmp" in *'"resumed": true'*'"weights_equal": true'*) ;; *) ok=0; err="${err:-resumed run: $cmp}" ;; esac
record resume_cuda "$ok" "$(( $(now_ms) - t0 ))" "$cmp" \
  "$("$PY" -c 'import json,sys; print(json.dumps({"error": sys.argv[1]} if sys.argv[1] else {}))' "$err")"

run_check bench_iresnet50 240 "$PY" -m crfr.cli bench train "${BENCH[@]}"
finish "$env_json"
