#!/bin/bash
# Session 45: the GPU tests of HEAD on any card, then the decode table where the card is an H200.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
D=.devcarry/s45
for t in cuda_parity gpu_model; do gunzip -c $D/$t.gz > /tmp/$t; chmod +x /tmp/$t; done
{ /tmp/cuda_parity --test-threads 1 2>&1 | tail -30; /tmp/gpu_model --test-threads 1 2>&1 | tail -30; } > $OUT/tests.txt
grep -E "test result|FAILED|panicked" $OUT/tests.txt
grep -q H200 $OUT/gpu.txt && bash $D/call.sh
exit 0
