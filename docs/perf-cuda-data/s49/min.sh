#!/bin/bash
# Session 49, minimal: the GPU tests the session's device changes touch (the sampler's tie order;
# set_masks / new_thresholds), on any card.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
gunzip -c .devcarry/s49/gpu_model.gz > /tmp/gpu_model; chmod +x /tmp/gpu_model
timeout 150 /tmp/gpu_model --test-threads 1 gpu_sampler gpu_decode_sample gpu_observed_sites_and_set_masks gpu_per_channel gpu_constant_channel gpu_non_finite --nocapture > $OUT/gpu_model_min.txt 2>&1
grep -hE "test result|FAILED|panicked|device sampler" $OUT/gpu_model_min.txt
exit 0
