#!/bin/bash
# first-process start-up: 61a36ac (PTX), 9 parts, 33 parts, each with a fresh HOME and cache; tests; bench
cd .devcarry && gunzip -kf teal-head.gz teal-old.gz teal-p9.gz gpu_model.gz cuda_parity.gz && chmod +x teal-head teal-old teal-p9 gpu_model cuda_parity && cd ..
M=$PWD/.devcarry/smol4.gguf
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; local rc=$?; echo "rc $rc ms $(( ($(date +%s%N) - s) / 1000000 )) : $*"; }
for b in old p9 head; do
  export HOME=/tmp/home-$b TEAL_CACHE_DIR=/tmp/cache-$b; mkdir -p $HOME
  t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0
  t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0
done 2>&1 | tee $OUT/startup.txt
ls /tmp/cache-head/cuda | wc -l | tee -a $OUT/startup.txt
export HOME=/tmp/home-head TEAL_CACHE_DIR=/tmp/cache-head
timeout 200 ./.devcarry/cuda_parity --test-threads 1 > $OUT/cuda_parity.txt 2>&1; echo "cuda_parity rc $?" | tee $OUT/summary.txt
grep "test result" $OUT/cuda_parity.txt | tee -a $OUT/summary.txt
timeout 300 ./.devcarry/gpu_model --test-threads 1 --nocapture > $OUT/gpu_model.txt 2>&1; echo "gpu_model rc $?" | tee -a $OUT/summary.txt
grep -E "test result" $OUT/gpu_model.txt | tee -a $OUT/summary.txt
timeout 150 ./.devcarry/teal-head bench --random-weights llama3-8b --device cuda:0 --sparsity 0,0.5 -n 64 -r 3 -p 32 --json > $OUT/bench_head.json 2> $OUT/bench_head.err; echo "bench rc $?" | tee -a $OUT/summary.txt
