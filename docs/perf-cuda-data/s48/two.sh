#!/bin/bash
# Session 48, second call: the rewritten non-finite test, then the decode table on this card
# (H100 or H200: the card is named in gpu.txt).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
D=.devcarry/s48
for t in gpu_model new; do gunzip -c $D/$t.gz > /tmp/$t; chmod +x /tmp/$t; done
timeout 100 /tmp/gpu_model non_finite --test-threads 1 > $OUT/gpu_model_nonfinite.txt 2>&1
grep -E "test |test result|panicked" -A2 $OUT/gpu_model_nonfinite.txt | head -8
for dt in bf16 f16; do
  timeout 150 /tmp/new bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $dt --sparsity 0,0.25,0.4,0.5,0.65 -n 64 -r 3 -p 32 --json > $OUT/table_$dt.json 2> $OUT/table_$dt.err
  python3 -c "
import json
r=json.load(open('$OUT/table_$dt.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('$dt', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3))
"
  date +%T
done
exit 0
