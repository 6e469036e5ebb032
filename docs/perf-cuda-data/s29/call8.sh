#!/bin/bash
# HEAD (c599ba3, 33 parts) first-process start-up against 61a36ac (PTX) and the 9-part binary, fresh HOME and cache each; tests; decode table
cd .devcarry && gunzip -kf teal-head.gz teal-p9.gz gpu_model.gz cuda_parity.gz && chmod +x teal-head teal-p9 gpu_model cuda_parity && cd ..
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt; nproc >> $OUT/gpu.txt
M=$PWD/.devcarry/smol4.gguf
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; local rc=$?; echo "rc $rc ms $(( ($(date +%s%N) - s) / 1000000 )) : $*"; }
for b in p9 head; do
  export HOME=/tmp/home-$b TEAL_CACHE_DIR=/tmp/cache-$b; mkdir -p $HOME
  t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0
  t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0
done 2>&1 | tee $OUT/startup.txt
ls /tmp/cache-head/cuda | wc -l | tee -a $OUT/startup.txt
ls /tmp/cache-p9/cuda | wc -l | tee -a $OUT/startup.txt
export HOME=/tmp/home-head TEAL_CACHE_DIR=/tmp/cache-head
timeout 200 ./.devcarry/cuda_parity --test-threads 1 > $OUT/cuda_parity.txt 2>&1; echo "cuda_parity rc $?" | tee $OUT/summary.txt
grep "test result" $OUT/cuda_parity.txt | tee -a $OUT/summary.txt
timeout 150 ./.devcarry/gpu_model --test-threads 1 --nocapture > $OUT/gpu_model.txt 2>&1; echo "gpu_model rc $?" | tee -a $OUT/summary.txt
grep -E "test result" $OUT/gpu_model.txt | tee -a $OUT/summary.txt
timeout 200 ./.devcarry/teal-head bench --random-weights llama3-8b --device cuda:0 --sparsity 0,0.5 -n 64 -r 3 -p 32 --json > $OUT/bench.json 2> $OUT/bench.err; echo "bench rc $?" | tee -a $OUT/summary.txt
export TEAL_CACHE_DIR=/tmp/cache-head
C="calibrate -m .devcarry/smol4.gguf --samples 2 --seq-len 512 --greedy --data .devcarry/wiki20k.txt --no-wina"
timeout 120 ./.devcarry/teal-head $C --device cuda:0 -o /tmp/gg.json > /tmp/cal_g.txt 2>&1; echo "greedy calibrate on cuda rc $?" | tee -a $OUT/summary.txt; tail -2 /tmp/cal_g.txt | tee -a $OUT/summary.txt
timeout 120 ./.devcarry/teal-head $C -o /tmp/gc.json > /tmp/cal_c.txt 2>&1; echo "greedy calibrate on cpu rc $?" | tee -a $OUT/summary.txt; tail -1 /tmp/cal_c.txt | tee -a $OUT/summary.txt
python3 - <<'PY' | tee -a $OUT/summary.txt
import json
g, c = json.load(open("/tmp/gg.json")), json.load(open("/tmp/gc.json"))
for lg, lc in zip(g["greedy"]["layers"], c["greedy"]["layers"]):
    print("steps", len(lg), len(lc), "equal", lg == lc, "last", lg[-1]["sparsity"], lc[-1]["sparsity"], lg[-1]["error"], lc[-1]["error"])
PY
R="report -m .devcarry/smol4.gguf --thresholds /tmp/gg.json -f .devcarry/wiki20k.txt --sparsities 0.25,0.5 --chunks 2"
timeout 120 ./.devcarry/teal-head $R --device cuda:0 -o /tmp/rg > /tmp/rep_g.txt 2>&1; echo "report on cuda rc $?" | tee -a $OUT/summary.txt; grep -E "^\||on " /tmp/rep_g.txt | tee -a $OUT/summary.txt
timeout 120 ./.devcarry/teal-head $R --dtype bf16 --kv-dtype f32 -o /tmp/rc > /tmp/rep_c.txt 2>&1; echo "report on cpu rc $?" | tee -a $OUT/summary.txt; grep -E "^\||on " /tmp/rep_c.txt | tee -a $OUT/summary.txt
./.devcarry/teal-head $R --mode half --device cuda:0 -o /tmp/rh 2>&1 | tail -1 | tee -a $OUT/summary.txt
