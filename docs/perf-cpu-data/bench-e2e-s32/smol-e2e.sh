#!/bin/bash

for r in 1 2; do for d in f32 f16 bf16 q8 q4; do
  /work/main/target/release/teal bench --dtype $d --sparsity 0,0.5 -n 64 -p 32 -r 3 --bandwidth-mib 512 --json > /tmp/smol-e2e-$d-$r.json 2>/dev/null
  python3 -c "
import json; j=json.load(open('/tmp/smol-e2e-$d-$r.json')); a,b=j['results']
print('$r $d dense %.2f sparse %.2f (realized %.3f) speedup %.3f ideal %.3f share %.3f' % (a['decode_tok_s'], b['decode_tok_s'], b['realized_sparsity'], b['speedup'], b['ideal_speedup'], b['speedup']/b['ideal_speedup']))"
done; done
