#!/bin/bash
# the first process (fresh HOME and cache) of head (4e2ab4c), A (+ reusing_heap around Gpu::new), B (A without single_heap)
cd .devcarry && gunzip -kf teal-head.gz teal-A.gz teal-B.gz && chmod +x teal-head teal-A teal-B && cd ..
M=$PWD/.devcarry/smol4.gguf
for b in A B head; do
  export HOME=/tmp/home12-$b TEAL_CACHE_DIR=/tmp/cache12-$b; mkdir -p $HOME
  echo "$b"; /usr/bin/time -f "user %U s sys %S s wall %e s" ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0 2>&1 >/dev/null | tail -1
done 2>&1 | tee $OUT/startup4.txt
