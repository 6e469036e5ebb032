#!/bin/bash
# Session 48, third call: the decode table on an H200 only (on another card: nothing).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
grep -q H200 $OUT/gpu.txt || exit 0
gunzip -c .devcarry/s48/new.gz > /tmp/new; chmod +x /tmp/new
for dt in bf16 f16; do
  timeout 150 /tmp/new bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $dt --sparsity 0,0.25,0.4,0.5,0.65 -n 64 -r 3 -p 32 --json > $OUT/h200_table_$dt.json 2> $OUT/h200_table_$dt.err
  python3 -c "
import json
r=json.load(open('$OUT/h200_table_$dt.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('$dt', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3))
"
done
exit 0
