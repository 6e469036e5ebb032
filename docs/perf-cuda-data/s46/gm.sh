#!/bin/bash
# Session 46, short: the GPU tests that reach the decoder's sampling (gpu_model, rebuilt at 039cf82).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
gunzip -c .devcarry/s46/gpu_model.gz > /tmp/gm; chmod +x /tmp/gm
timeout 200 /tmp/gm sampl --test-threads 1 --nocapture > $OUT/gpu_model_sampling.txt 2>&1
grep -E "test |test result|FAILED|panicked|differ" $OUT/gpu_model_sampling.txt
exit 0
