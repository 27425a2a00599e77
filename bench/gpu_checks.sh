#!/usr/bin/env bash
# The GPU checks of a session lent one GPU machine (no hivemind there), in one call that fits its lease:
#   1. tiny: the sweep's long stage (4x) in bench/fed_sim.py, --jobs runs at once (a tiny run leaves the GPU
#      mostly idle, but 25 processes at once made every run ~10x slower on 2026-12-04: keep it small)
#   2. photon-125m: the sweep's best recipe of each side against centralized at equal tokens (one at a time)
#   3. bench/gpu_throughput.py: bf16 tokens/s and MFU of photon-125m and photon-1.3b, then the FSDP2+AC probe
# Usage (repo root, runs/bench-data prepared):  OUT=/tmp/gpu bash bench/gpu_checks.sh [SECONDS, default 540]
# Each part stops starting work when its share of SECONDS is spent; results land in $OUT as they finish
# (runs.jsonl and sweep.md per part, gpu.json, session.log with the tail of each log: the lease returns 8 files).
# Each part starts from the repo's records (bench/results/...), so runs done in an earlier session are skipped
# and the runs.jsonl that comes back is the whole record: copy it over the repo's.
set -u
OUT=${OUT:-/tmp/gpu-checks}
budget=${1:-540}
jobs=${JOBS:-4}
mkdir -p "$OUT/sim-long" "$OUT/sim-125m"
cp bench/results/sweep-sim/long/runs.jsonl "$OUT/sim-long/" 2>/dev/null
cp bench/results/sim-125m/runs.jsonl "$OUT/sim-125m/" 2>/dev/null
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
left() { echo $((budget - SECONDS)); }
log="$OUT/session.log"
{ date -u; nvidia-smi -L; $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"; } >>"$log" 2>&1

# 1. tiny, in the background: the long-stage runs not yet recorded
(timeout $((budget * 2 / 3)) $py bench/fed_sim.py --plan long --jobs "$jobs" --results "$OUT/sim-long" \
   --runs /tmp/sim-long >/tmp/sim-long.log 2>&1; echo "long exit $?" >>"$log") &

# 2. photon-125m at seq len 512 (the shipped corpus is ~4 M tokens: 256 steps of 4 x 16 x 512 = 2 epochs)
timeout $((budget * 3 / 4)) $py bench/fed_sim.py --preset photon-125m --sides central fed-iid fed-noniid \
  --budget 0.6667 --set model.seq_len=512 --set train.grad_accum=1 --warmup 50 --lrs 6e-4 1.2e-3 \
  --eval-batches 4 --deadline-s $((budget / 2)) --shared-device --results "$OUT/sim-125m" --runs /tmp/sim-125m \
  >/tmp/sim-125m.log 2>&1
echo "125m exit $? at ${SECONDS}s" >>"$log"
wait
echo "tiny done at ${SECONDS}s" >>"$log"

# 3. throughput and the largest preset that trains, with what time is left
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" $py bench/gpu_throughput.py --configs photon-125m photon-1.3b --micro-batch 8 --steps 20 \
    --repeats 2 --set federation.compression=none --set 'network.host_maddrs=[]' --out "$OUT/gpu.json" \
    >>/tmp/gpu.log 2>&1
  echo "gpu_throughput exit $? at ${SECONDS}s" >>"$log"
fi
for f in /tmp/sim-long.log /tmp/sim-125m.log /tmp/gpu.log; do  # 8 files come back: logs go here
  [ -f "$f" ] && { echo "== $f"; grep -v '^|' "$f" | tail -n 40; } >>"$log"
done
cat "$log"
