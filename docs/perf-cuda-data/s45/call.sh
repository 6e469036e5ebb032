#!/bin/bash
# Session 45: the decode table with the landed GPU code, on an H200 only (any other card: nothing run).
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
if ! grep -q H200 $OUT/gpu.txt && [ "${ANY:-0}" = 0 ]; then echo "not an H200: nothing run"; exit 0; fi
D=.devcarry/s45
gunzip -c $D/new.gz > /tmp/new; chmod +x /tmp/new
run() { # binary dtype sparsities tag
  /tmp/$1 bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $2 --sparsity $3 -n 64 -r 3 -p 32 --json > /tmp/$4.json 2> /tmp/$4.err
  { echo "== $4"; cat /tmp/$4.err; } >> $OUT/errs.txt
  printf '{"tag": "%s", "run": %s}\n' $4 "$(cat /tmp/$4.json)" >> $OUT/runs.jsonl
  python3 -c "
import json
r=json.load(open('/tmp/$4.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('$4', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3), x.get('decoder','').split(';')[-1])
"
}
run new bf16 0,0.25,0.4,0.5,0.65 table_new_bf16
run new f16 0,0.25,0.4,0.5,0.65 table_new_f16
