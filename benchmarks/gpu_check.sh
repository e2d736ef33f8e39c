#!/usr/bin/env bash
# GPU readiness check for one H100/H200: one table, in under 8 minutes (every section has a time
# limit: 430 s for the sections plus 30 s for a timm install, 7.7 minutes in all; a healthy run
# takes less, most of it torch.compile).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU, from the repo root
#   bash benchmarks/gpu_check.sh --tiny     # CPU smoke run of the same script (tiny models, 32 px)
#
# Sections (each in its own process under `timeout`, so one failure or hang never loses the table):
#   nccl        1-process NCCL torchrun of `convscale train` (the collective path: DDP, all-reduces,
#               broadcast, procedural data rendered on the GPU, uint8 feed, held-out + EMA pass)
#   peak        measured bf16 matmul peak (MFU is against it)
#   sync        procedural batches on the GPU under torch.cuda.set_sync_debug_mode("error")
#   f0 / vit    NFNet-F0 (both memory formats) and ViT-B/16, bf16 at 224 px, ours vs timm's
#               dm_nfnet_f0 / vit_base_patch16_224, eager, then torch.compile (NFNets in the
#               format that was faster eager), images/s, MFU, peak memory
#   f7+         NFNet-F7+ at its largest micro-batch with activation checkpointing (SGD + AGC)
# Goals (printed under the table): F0 >= 1.3x timm at >= 40 % MFU; ViT-B/16 >= 1.0x timm at >= 50 % MFU.
# Logs of every section: $GPU_CHECK_DIR (default /tmp/convscale-gpu-check-<time>).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
TINY=""
[ "${1:-}" = "--tiny" ] && TINY="--tiny"
DIR=${GPU_CHECK_DIR:-/tmp/convscale-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DIR"
ROWS="$DIR/rows.jsonl"
: > "$ROWS"
T0=$(date +%s)

say() { echo "[$(( $(date +%s) - T0 ))s] $*" >&2; }

# section NAME LIMIT_S COMMAND...: run it with a time limit, log to $DIR/NAME.log, never abort the script
section() {
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    say "$name: exit code $rc (124: time limit); last lines of $DIR/$name.log:"
    tail -n 5 "$DIR/$name.log" >&2
  fi
  return 0
}

error_row() {  # error_row SECTION MESSAGE: a row for a section that could not even start
  "$PY" -c 'import json, sys; print(json.dumps({"section": sys.argv[1], "status": sys.argv[2]}))' "$1" "$2" >> "$ROWS"
}

if [ -z "$TINY" ]; then
  if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1)); run this on a GPU machine, or pass --tiny for the CPU smoke run" >&2
    exit 2
  fi
  "$PY" -c 'import torch; print("#", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null | sed 's/^/# /'
fi

# timm is the reference, never a dependency: install it without deps if missing (torchvision is
# not needed: benchmarks/timm_shim.py stands in for it). Offline machines: TIMM_WHEELS=dir of wheels.
if ! "$PY" -c 'import timm' 2>/dev/null && ! "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import timm_shim, io, contextlib; f = io.StringIO()
with contextlib.redirect_stdout(f): m = timm_shim.import_timm()
sys.exit(0 if m else 1)' 2>/dev/null; then
  say "installing timm==1.0.31 (no deps)"
  if [ -n "${TIMM_WHEELS:-}" ]; then
    timeout 30 "$PY" -m pip install -q --no-deps --no-index --find-links "$TIMM_WHEELS" timm huggingface_hub pyyaml >&2 || true
  else
    timeout 30 "$PY" -m pip install -q --no-deps timm==1.0.31 huggingface_hub pyyaml >&2 || true
  fi
fi

# 1. the collective path: a 1-process NCCL torchrun of a real (small) training run
NCCL_RUN="$DIR/nccl-run"
if [ -n "$TINY" ]; then NCCL_DATA="--set data.device=cpu"; else NCCL_DATA="--set data.device=cuda"; fi
section nccl 55 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m convscale train \
  --run-dir "$NCCL_RUN" --model nfnet-w0.125-d1.1.1 --data procedural --resolution 32 --num-classes 100 \
  --batch-size 64 --steps 30 --lr 0.4 --agc-exempt-scalar-gains --quiet $NCCL_DATA \
  --set grad_accum_steps=2 --set ema_decay=0.99 --set log_every_steps=5 --set eval_every_steps=15 \
  --set data.heldout_images=512 --set checkpoint_every_steps=10 --set checkpoint_every_seconds=0
"$PY" - "$NCCL_RUN" "$ROWS" <<'EOF'
import json, sys
from pathlib import Path
run, rows = Path(sys.argv[1]), sys.argv[2]
res = run / "result.json"
row = {"section": "nccl", "model": "nfnet-w0.125-d1.1.1", "impl": "ours", "batch": 64}
if res.is_file():
    r = json.loads(res.read_text())
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    ips = [x["images_per_second"] for x in m if x.get("kind") == "train"]
    row.update(status="ok" if r["status"] == "done" and r["processes"] == 1 else f"error: {r['status']}",
               images_per_second=ips[-1] if ips else None, peak_memory_gib=r["peak_memory_bytes"] / 2**30,
               heldout_loss=r["heldout_loss"], ema_heldout_loss=r.get("ema_heldout_loss"), device=r["device"])
else:
    row["status"] = "error: no result.json (see nccl.log)"
open(rows, "a").write(json.dumps(row) + "\n")
EOF

# 2. the device's measured bf16 peak (MFU denominators)
section peak 20 "$PY" benchmarks/gpu_check.py peak --out "$ROWS" $TINY

# 3. procedural data on the GPU without host syncs
section sync 25 "$PY" benchmarks/gpu_check.py procedural-sync --out "$ROWS" $TINY

# 4. throughput vs timm, eager
section f0-eager 80 "$PY" benchmarks/gpu_check.py throughput --family nfnet --out "$ROWS" $TINY
section vit-eager 35 "$PY" benchmarks/gpu_check.py throughput --family vit --out "$ROWS" $TINY

# 5. torch.compile: NFNets in the format ours ran faster in eager
FMT=$("$PY" - "$ROWS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ours = [r for r in rows if r.get("section") == "throughput" and r.get("family") == "nfnet" and r.get("impl") == "ours"
        and r.get("status") == "ok" and not r.get("compile")]
print(max(ours, key=lambda r: r["images_per_second"])["memory_format"] if ours else "contiguous")
EOF
)
section f0-compile 95 "$PY" benchmarks/gpu_check.py throughput --family nfnet --compile --formats "$FMT" --out "$ROWS" $TINY
section vit-compile 60 "$PY" benchmarks/gpu_check.py throughput --family vit --compile --out "$ROWS" $TINY

# 6. F7+ at its largest micro-batch with activation checkpointing
section f7plus 60 "$PY" benchmarks/gpu_check.py largest-batch --out "$ROWS" $TINY

say "done; rows in $ROWS"
"$PY" benchmarks/gpu_check.py table "$ROWS" --expect nccl peak procedural-sync throughput largest-batch
