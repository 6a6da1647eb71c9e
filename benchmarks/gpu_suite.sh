#!/usr/bin/env bash
# The CUDA paths on one real GPU, in one command (at most 8 minutes on an H200: every step has its own
# timeout); everything it prints
# also goes to $OUT/gpu_suite.log, the runs' summaries to $OUT.
#
#   OUT=gpu-out benchmarks/gpu_suite.sh
#
# 1. environment facts (driver, CUDA, torch, card);
# 2. NVML through the agent's own sampler for 60 s at 1 Hz, in the background, with its cost per sample;
# 3. a 1-card NCCL `hyrun launch` of the small preset, 30 steps, checkpoints every 10, then the same job
#    resumed from that checkpoint directory for 10 more (compare its losses with a CPU run of the job);
# 4. benchmarks/moe_layer.py --device cuda (bf16, grouped vs naive, MFU);
# 5. benchmarks/checkpoint_stall.py --device cuda --state-gb 6;
# 6. the CUDA-only tests (grouped GEMM in bf16).
set -u -o pipefail
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_suite.log") 2>&1
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/hyrun-gpu-XXXX)
PARTS=${PARTS:-env,nvml,launch,moe,stall,tests}  # a rerun may take only some: PARTS=launch,stall
want() { [[ ",$PARTS," == *",$1,"* ]]; }
section() { echo; echo "=== $1 ($(date +%T))"; }

if want env; then
section "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,temperature.gpu,power.draw,clocks.max.sm --format=csv
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), torch.cuda.get_device_name(0))"
fi

NVML=
if want nvml; then
section "NVML (background, 60 s, while the runs below use the card)"
timeout 90 $PY benchmarks/gpu_nvml.py --seconds 60 > "$OUT/nvml.log" 2>&1 &
NVML=$!
fi

if want launch; then
section "1-card NCCL launch: small preset, 30 steps, checkpoint every 10"
cat > "$WORK/job.yaml" <<EOF
name: gpu
cluster:
  nodes:
    - name: gpu-node
      cards: [{type: cpu-sim, count: 1, memory_gb: 139}]
model: {preset: small}
parallelism: {tp: 1, pp: 1, cp: 1, ep: 1}
training: {steps: 30, global_batch: 16, micro_batch: 4, seq_len: 128}
checkpoint: {directory: $WORK/ckpt, interval_steps: 10}
runtime: {heartbeat_interval_s: 0.5, heartbeat_timeout_s: 10.0, run_dir: $WORK/runs}
EOF
timeout 120 $PY -m hyrun.runtime.cli launch "$WORK/job.yaml" --no-progress
cp "$WORK"/runs/gpu-*/summary.json "$OUT/first.json" 2>/dev/null
grep -h "backend\|cuda\|rank 0" "$WORK"/runs/gpu-*/generation-1/*/rank-0.log | head -5
sed -i 's/steps: 30,/steps: 40,/' "$WORK/job.yaml"
section "... resumed from its checkpoints for 10 more steps"
timeout 90 $PY -m hyrun.runtime.cli launch "$WORK/job.yaml" --no-progress
for f in $(ls -t "$WORK"/runs/gpu-*/summary.json | head -1); do cp "$f" "$OUT/resumed.json"; done
grep -h "resumed\|checkpoint\|committed" "$WORK"/runs/gpu-*/generation-1/*/rank-0.log | tail -4
fi

if want moe; then
section "MoE layer: grouped vs naive, bf16"
timeout 100 $PY benchmarks/moe_layer.py --device cuda
fi

if want stall; then
section "checkpoint stall, 6 GB of state"
mkdir -p "$WORK/stall"
timeout 170 $PY benchmarks/checkpoint_stall.py --device cuda --state-gb 6 --saves 1 --dir "$WORK/stall"
fi

if want tests; then
section "CUDA-only tests"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_model_experts.py -k cuda 2>&1 | tail -3
fi

if [ -n "$NVML" ]; then
section "NVML"
wait $NVML
head -3 "$OUT/nvml.log"; grep -v "util 0%" "$OUT/nvml.log" | sed -n '3,8p'; tail -2 "$OUT/nvml.log"
fi
section "done"
