#!/bin/bash
# Session 51, the short form: on an H200 the bf16 decode table only (the GPU tests ran on an H100 at the same binaries, built at 4fe8eda); elsewhere nothing.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
cat $OUT/gpu.txt
D=.devcarry/s51
for t in new; do gunzip -c $D/$t.gz > /tmp/$t; chmod +x /tmp/$t; done

run() { # dtype sparsities tag
  timeout 130 /tmp/new bench --random-weights llama3-8b --device cuda:0 --gpu-dtype $1 --sparsity $2 -n 64 -r 3 -p 32 --json > /tmp/$3.json 2> /tmp/$3.err
  { echo "== $3"; cat /tmp/$3.err; } >> $OUT/errs.txt
  printf '{"tag": "%s", "run": %s}\n' $3 "$(cat /tmp/$3.json)" >> $OUT/runs.jsonl
  python3 -c "
import json
r=json.load(open('/tmp/$3.json'))['results']
d0=r[0]['decode_tok_s']
for x in r: print('$3', x['sparsity'], round(x['decode_tok_s'],1), round(x['decode_tok_s']/d0,3), round(x.get('floor_ratio',0),3), x.get('decoder','').split(';')[-1])
"
  date +%T
}
if grep -q H200 $OUT/gpu.txt; then
  run bf16 0,0.25,0.4,0.5,0.65 table_bf16
fi
date +%T
exit 0
