#!/bin/bash
# Session 47, short (little device time left): on an H200 the bf16 decode at 0 and 50 %, then on
# any card the gpu_model tests that reach the decoder's sampling and non-finite checks.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
D=.devcarry/s47
for t in gpu_model new; do gunzip -c $D/$t.gz > /tmp/$t; chmod +x /tmp/$t; done
if grep -q H200 $OUT/gpu.txt; then
  timeout 150 /tmp/new bench --random-weights llama3-8b --device cuda:0 --gpu-dtype bf16 --sparsity 0,0.5 -n 64 -r 3 -p 32 --json > $OUT/table_bf16.json 2> $OUT/table_bf16.err
  python3 -c "
import json
r=json.load(open('$OUT/table_bf16.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('bf16', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3))
"
fi
timeout 120 /tmp/gpu_model sampl --test-threads 1 > $OUT/gpu_model_sampling.txt 2>&1
grep -E "test |test result|FAILED|panicked" $OUT/gpu_model_sampling.txt
exit 0
