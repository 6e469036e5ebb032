#!/bin/bash
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
gunzip -c .devcarry/s45/gpu_model.gz > /tmp/gm; chmod +x /tmp/gm
for i in 1 2; do /tmp/gm --test-threads 1 2>&1 | tail -40 > $OUT/gpu_model_$i.txt; grep -E "test result|FAILED|panicked" $OUT/gpu_model_$i.txt; done
/tmp/gm per_channel --test-threads 1 --nocapture > $OUT/per_channel.txt 2>&1; grep -E "test result|near tie|max relative" $OUT/per_channel.txt | head -30
grep -q H200 $OUT/gpu.txt && bash .devcarry/s45/call.sh
exit 0
