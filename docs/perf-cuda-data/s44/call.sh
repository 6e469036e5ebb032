#!/bin/bash
# Session 42: the H200 decode table with the whole-wave splits (new = landed GPU code), old = 659d849 for the A/B.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
D=.devcarry/s40
for b in new old; do gunzip -c $D/$b.gz > /tmp/$b; chmod +x /tmp/$b; done
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
H200=1
if [ $H200 = 0 ]; then echo "not an H200: nothing run"; exit 0; fi
run old bf16 0,0.5 ab_old_1
run new bf16 0,0.25,0.4,0.5,0.65 table_new_bf16

run new f16 0,0.25,0.4,0.5,0.65 table_new_f16
