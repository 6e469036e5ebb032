#!/bin/bash
# first and second process (fresh HOME and cache) of teal-head (fad3f3d: one heap on the CPU only), and the GPU tests
cd .devcarry && gunzip -kf teal-head.gz gpu_model.gz cuda_parity.gz && chmod +x teal-head gpu_model cuda_parity && cd ..
M=$PWD/.devcarry/smol4.gguf
for r in 1 2; do
  export HOME=/tmp/home13-$r TEAL_CACHE_DIR=/tmp/cache13-$r; mkdir -p $HOME
  for i in 1 2; do /usr/bin/time -f "user %U s sys %S s wall %e s" ./.devcarry/teal-head run -m $M --device cuda:0 -p Hello -n 8 --temp 0 2>&1 >/dev/null | tail -1; done
done 2>&1 | tee $OUT/startup5.txt
timeout 90 ./.devcarry/gpu_model --test-threads 1 > $OUT/gpu_model.txt 2>&1; echo "gpu_model rc $?"; grep "test result" $OUT/gpu_model.txt
