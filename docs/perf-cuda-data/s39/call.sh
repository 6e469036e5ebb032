#!/bin/bash
# Session 35: the decode table of 8d92bfb (GPU code as c4cd892) on whatever card comes.
set -x
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
T=/tmp/teal; gunzip -c .devcarry/s35/teal.gz > $T; chmod +x $T
for d in bf16 f16; do
  $T bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $d --sparsity 0,0.25,0.4,0.5,0.65 -n 64 -r 3 -p 32 --json > $OUT/bench_$d.json 2> $OUT/bench_$d.err
  tail -3 $OUT/bench_$d.err
  python3 -c "
import json,sys
r=json.load(open('$OUT/bench_$d.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('$d', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3))
"
done
