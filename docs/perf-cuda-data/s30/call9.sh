#!/bin/bash
# minimal: the 33-part first process (fresh HOME and cache), tests, greedy calibrate and report on the GPU
cd .devcarry && gunzip -kf teal-head.gz gpu_model.gz cuda_parity.gz && chmod +x teal-head gpu_model cuda_parity && cd ..
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt; nproc >> $OUT/gpu.txt
M=$PWD/.devcarry/smol4.gguf
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; local rc=$?; echo "rc $rc ms $(( ($(date +%s%N) - s) / 1000000 )) : $*"; }
export HOME=/tmp/home-head TEAL_CACHE_DIR=/tmp/cache-head; mkdir -p $HOME
{ t ./.devcarry/teal-head run -m $M --device cuda:0 -p Hello -n 8 --temp 0; t ./.devcarry/teal-head run -m $M --device cuda:0 -p Hello -n 8 --temp 0; ls /tmp/cache-head/cuda | wc -l; } 2>&1 | tee $OUT/startup.txt
timeout 60 ./.devcarry/cuda_parity --test-threads 1 > $OUT/cuda_parity.txt 2>&1; echo "cuda_parity rc $?" | tee $OUT/summary.txt
grep "test result" $OUT/cuda_parity.txt | tee -a $OUT/summary.txt
timeout 90 ./.devcarry/gpu_model --test-threads 1 --nocapture > $OUT/gpu_model.txt 2>&1; echo "gpu_model rc $?" | tee -a $OUT/summary.txt
grep -E "test result|greedy tables" $OUT/gpu_model.txt | tee -a $OUT/summary.txt
C="calibrate -m .devcarry/smol4.gguf --samples 2 --seq-len 512 --greedy --data .devcarry/wiki20k.txt --no-wina"
timeout 60 ./.devcarry/teal-head $C --device cuda:0 -o /tmp/gg.json > /tmp/cal_g.txt 2>&1; echo "greedy calibrate on cuda rc $?" | tee -a $OUT/summary.txt; tail -2 /tmp/cal_g.txt | tee -a $OUT/summary.txt
R="report -m .devcarry/smol4.gguf --thresholds /tmp/gg.json -f .devcarry/wiki20k.txt --sparsities 0.25,0.5 --chunks 2"
timeout 60 ./.devcarry/teal-head $R --device cuda:0 -o /tmp/rg > /tmp/rep_g.txt 2>&1; echo "report on cuda rc $?" | tee -a $OUT/summary.txt; grep -E "^\||on " /tmp/rep_g.txt | tee -a $OUT/summary.txt
./.devcarry/teal-head $R --mode half --device cuda:0 -o /tmp/rh 2>&1 | tail -1 | tee -a $OUT/summary.txt
