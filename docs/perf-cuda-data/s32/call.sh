#!/bin/bash
# thirty-second session: the decode table of the current tree (bf16 and f16) and the GPU model tests
cd .devcarry/s32 && gunzip -kf teal.gz gpu_model.gz && chmod +x teal gpu_model && cd ../..
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
T=./.devcarry/s32/teal
for dt in bf16 f16; do
  /usr/bin/time -f "wall %e s" $T bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $dt --sparsity 0,0.25,0.4,0.5,0.65 -n 64 -r 3 -p 32 --json > $OUT/bench_$dt.json 2> $OUT/bench_$dt.err
  echo "$dt rc $?"; tail -2 $OUT/bench_$dt.err
done
timeout 120 ./.devcarry/s32/gpu_model --test-threads 1 > $OUT/gpu_model.txt 2>&1; echo "gpu_model rc $?"; grep "test result" $OUT/gpu_model.txt
