#!/usr/bin/env bash
# The checks that need a GPU, in one prepared run for a lent GPU machine (no network there).
#
#   here:   bash benchmarks/gpu_prepare.sh          # fills .gpu/ (wheels, Whisper tiny.en int8)
#   there:  device run, carry [".gpu"], command: bash benchmarks/gpu.sh   (about 6-8 minutes)
#
# Writes $OUT/report.md (and logs) with: the machine; the CUDA tests; whisper_stt and
# sd_txt2img on cuda (parity against CPU and against transformers/diffusers on the same
# weights, fp32 and fp16, split vs unsplit, timings); the distributed backend on CUDA
# (two ranks sharing the GPU, tensors staged through host memory); mmpipe serve on cuda against
# offline and a hand-written server. Each step has its own
# time limit, and a failed step is reported without stopping the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
REPORT="$OUT/report.md"
export PYTHONUNBUFFERED=1 MMPIPE_CACHE=/tmp/mmpipe-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
# A dry run here: MMPIPE_GPU_DEVICE=cpu PY=.venv/bin/python GPU_SKIP_SETUP=1 SD_IMAGES=2 SD_STEPS=2 bash benchmarks/gpu.sh
DEV=${MMPIPE_GPU_DEVICE:-cuda}
CLIPS="$PWD/tests/assets/speech"
WHISPER="$PWD/.gpu/whisper-tiny-en-int8"
RUNS=/tmp/gpu-runs
mkdir -p "$RUNS"

step() {  # step NAME LIMIT_S COMMAND...: run, keep its output, note pass/fail and time
  local name=$1 limit=$2; shift 2
  local log="$OUT/$(echo "$name" | tr -c 'a-zA-Z0-9._-' '_').log" t0=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  printf '\n### %s: %s (%ss)\n```\n%s\n```\n' "$name" "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")" "$((SECONDS - t0))" \
    "$(tail -n 25 "$log")" >>"$REPORT"
}

echo "# mmpipe GPU report ($(date -u +%F\ %T) UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))" >"$REPORT"

# ---- set-up: carried wheels, mmpipe itself (editable), the machine
if [ -z "${GPU_SKIP_SETUP:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl >"$OUT/setup.log" 2>&1
  export PYTHONPATH=/tmp/site:$PWD
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1
fi
MM="$PY -m mmpipe"
step "machine" 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.is_available() and torch.cuda.get_device_name(0))'"

# ---- the CUDA tests (transfers, a plan across cpu and cuda) and the runtime tests on this machine
step "pytest: CUDA transfer and placement tests" 300 $PY -m pytest -q -p no:cacheprovider tests/unit/runtime/test_transfer.py
step "pytest: distributed synthetic (local sockets and gloo)" 300 $PY -m pytest -q -p no:cacheprovider tests/integration/test_distributed.py -k synthetic

# ---- whisper_stt on cuda: parity (CPU, transformers) and timings
# greedy for the parity runs (generate's num_beams=1); beam 5 without fallback against generate(num_beams=5)
W=(whisper_stt "input=$CLIPS/clip*.wav" "model.path=$WHISPER" overwrite=true -q beam_size=1 temperature=0)
step "whisper cpu (reference)" 300 $MM run "${W[@]}" output_dir=$RUNS/w_cpu
step "whisper cuda fp32" 300 $MM run "${W[@]}" placement=$DEV output_dir=$RUNS/w_cuda
step "whisper cuda fp32, encoder/decoder split 2" 300 $MM run "${W[@]}" placement=$DEV nodes.encoder.split=2 nodes.decoder.split=2 output_dir=$RUNS/w_cuda_split
step "whisper cuda fp32, encoder split 2, its tail in the decode loop's stage (with_previous)" 300 $MM run "${W[@]}" placement=$DEV \
  nodes.encoder.split=2 nodes.decoder.with_previous=true output_dir=$RUNS/w_cuda_join
step "whisper cuda fp16" 300 $MM run "${W[@]}" placement=$DEV runtime.dtype=float16 output_dir=$RUNS/w_cuda_fp16
step "whisper distributed, 2 ranks on cuda:0 (staged through host memory, local socket)" 300 $MM run "${W[@]}" placement=$DEV runtime=distributed runtime.nproc=2 \
  nodes.encoder.split=2 nodes.decoder.split=2 output_dir=$RUNS/w_dist
step "whisper cuda fp32, beam 5 (no fallback)" 300 $MM run "${W[@]}" placement=$DEV beam_size=5 output_dir=$RUNS/w_cuda_beam5
step "whisper cuda fp32, the recipe's defaults (beam 5 + temperature fallback)" 300 $MM run "${W[@]}" placement=$DEV beam_size=5 \
  "temperature=[0.0,0.2,0.4,0.6,0.8,1.0]" output_dir=$RUNS/w_cuda_defaults
step "whisper parity vs transformers generate on cuda" 300 $PY benchmarks/gpu_check.py whisper "$RUNS" "$CLIPS"

# ---- profile on cuda, balance on it, predict: time/memory per part (max_memory_allocated), split: auto over
# 3 stages on the GPU (predicted vs measured per stage in the run's table), and a simulation of 8 GPUs.
# (matplotlib is not carried, .gpu/ would pass 64 MiB: without it the chart and timeline are a note.)
DEVS="[cuda:0,cuda:1,cuda:2,cuda:3,cuda:4,cuda:5,cuda:6,cuda:7]"
[ "$DEV" = cpu ] && DEVS="[cpu]"
step "whisper profile on cuda" 300 $MM profile "${W[@]}" placement=$DEV output_dir=$RUNS/w_profile --chart
step "whisper cuda, split: auto over 3 stages (balanced on the cuda profile)" 300 $MM run "${W[@]}" placement=$DEV \
  profile=$RUNS/w_profile/profile.json nodes.encoder.split=auto nodes.decoder.split=auto balance.stages=3 \
  output_dir=$RUNS/w_auto trace=$RUNS/w_auto/trace.json
step "whisper placement=auto over 8 GPUs, simulated from the cuda profile" 120 $MM plan "${W[@]}" placement=auto \
  "balance.devices=$DEVS" profile=$RUNS/w_profile/profile.json --simulate

# ---- sd_txt2img on cuda: parity (diffusers on the same components) and timings
# (SD_IMAGES=2 SD_STEPS=2 for a dry run on a CPU, where fp16 convolutions crawl)
S=(sd_txt2img model=tiny_random_large num_images_per_prompt=${SD_IMAGES:-8} num_inference_steps=${SD_STEPS:-20} overwrite=true -q)
step "sd cuda fp32" 300 $MM run "${S[@]}" placement=$DEV output_dir=$RUNS/s_cuda
step "sd cuda fp32, UNet split 3" 300 $MM run "${S[@]}" placement=$DEV nodes.denoise.split=3 output_dir=$RUNS/s_cuda_split
step "sd cuda fp16" 300 $MM run "${S[@]}" placement=$DEV runtime.dtype=float16 output_dir=$RUNS/s_cuda_fp16
step "sd distributed, 2 ranks on cuda:0 (staged through host memory, local socket)" 300 $MM run "${S[@]}" placement=$DEV runtime=distributed runtime.nproc=2 \
  nodes.denoise.split=2 output_dir=$RUNS/s_dist
step "sd parity vs diffusers on cuda, timings" 300 $PY benchmarks/gpu_check.py sd "$RUNS"

step "summary of all runs" 60 $PY benchmarks/gpu_check.py summary "$RUNS"

# ---- serving on cuda (after the summary: the report above stands if time runs out here): mmpipe serve
# against mmpipe run offline and a hand-written FastAPI server with the model on the same device
step "serve whisper on cuda: 1 and 16 clients" 240 $PY benchmarks/serve.py --quick --only whisper --set placement=$DEV \
  --set "model.path=$WHISPER" --whisper-model "$WHISPER" --device $DEV
step "serve sd on cuda: 8 clients" 180 $PY benchmarks/serve.py --quick --only sd --set placement=$DEV --device $DEV
echo "report: $REPORT"
