#!/usr/bin/env bash
# GPU check for the gpt2-small path (bf16, torch.compile, NCCL), under 8 minutes on one H200.
#
#   scripts/gpu_check.sh [--out FILE] [--python PY] [--parts a,b,c,d,e] [--batch N] [--no-install]
#
# (a) tokens/s and MFU of gpt2-small: lipformer + Muon + hard cap vs HF GPT2LMHeadModel + AdamW,
#     same shape, bf16 autocast + torch.compile, batch N × 1024 on synthetic llm.c shards;
# (b) the projection step's share of the lipformer step (printed with (a));
# (c) cached vs uncached greedy generation on CUDA, with a model trained to copy (context matters);
# (d) certify of a 1024-token sequence on CUDA: time, and radii against the CPU float64 result;
# (e) a 2-step FSDP2 run of the gpt2-small preset if more than one GPU is visible.
# Each part runs under its own time limit (30+180+60+120+90 s = 8 min at most) and records PASS/FAIL/SKIP with its seconds; one
# failing part does not stop the others. Results: RESULT lines collected in --out. Without a
# CUDA GPU it parses its options, says so and exits 0 (nothing is installed or run).
set -euo pipefail

OUT="gpu_check_results.txt"
PY="${PYTHON:-python}"
PARTS="a,b,c,d,e"
BATCH=8
INSTALL=1
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="${2:?--out needs a file}"; shift 2 ;;
    --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
    --parts) PARTS="${2:?--parts needs a list like a,c}"; shift 2 ;;
    --batch) BATCH="${2:?--batch needs a number}"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$BATCH" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --batch must be a positive integer, got '$BATCH'" >&2; exit 2; }
[[ "$PARTS" =~ ^[a-e](,[a-e])*$ ]] || { echo "gpu_check.sh: --parts must be letters a-e separated by commas, got '$PARTS'" >&2; exit 2; }
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check.sh: python interpreter '$PY' not found (use --python)" >&2; exit 2; }

cd "$(dirname "$0")/.."
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [[ "$GPUS" == "0" ]]; then
  echo "gpu_check.sh: no CUDA GPU visible (torch.cuda.is_available() is false): skipping all parts ($PARTS); nothing run."
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$OUT"
log() { echo "$*" | tee -a "$OUT"; }
log "# gpu_check $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) x $GPUS; torch $("$PY" -c 'import torch; print(torch.__version__)')"

if [[ "$INSTALL" == 1 ]]; then  # what the parts import; offline machines keep whatever is there
  if ! "$PY" -c 'import transformers, safetensors, numpy' 2>/dev/null; then
    "$PY" -m pip install -q -e . || log "install: pip install -e . failed (offline?); continuing with what is installed"
  fi
fi

# run_part NAME LIMIT_S CMD...: time-limited, output appended, status recorded; never aborts the script
run_part() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1 || rc=$?
  grep '^RESULT' "$WORK/$name.log" >> "$OUT" || true
  local status=PASS
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status="FAIL (timed out after ${limit}s)";
  elif [[ $rc -ne 0 ]]; then status="FAIL (exit $rc): $(tail -n 3 "$WORK/$name.log" | tr '\n' ' ')"; fi
  log "part $name: $status in $((SECONDS - t0))s"
}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

run_part shards 30 "$PY" scripts/gpu_check.py shards "$WORK/shards"
if want a || want b; then
  run_part a+b 180 "$PY" scripts/gpu_check.py throughput "$WORK/shards" --batch "$BATCH"
fi
want c && run_part c 60 "$PY" scripts/gpu_check.py generation
want d && run_part d 120 "$PY" scripts/gpu_check.py certify
if want e; then
  if [[ "$GPUS" -gt 1 ]]; then
    # the trainer saves the GPT-2 tokenizer with the model: its ranks must be in the data cache
    run_part e 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m lipformer.cli train \
      --preset gpt2-small --out "$WORK/fsdp" data.path="$WORK/shards/synth_train_*.bin" train.parallel=fsdp \
      train.max_steps=2 train.batch_size=2 train.grad_accum=1 train.eval_every=2 train.eval_batches=1 \
      train.checkpoint_every=0 train.warmup_steps=0
  else
    log "part e: SKIP (one GPU visible; FSDP2 needs two)"
  fi
fi
log "# done in ${SECONDS}s; results in $OUT"
