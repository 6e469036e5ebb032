#!/bin/bash
# does the 33-part compile use the cores? the first process on 1, 4 and 16 cores, fresh HOME and cache each
cd .devcarry && gunzip -kf teal-head.gz && chmod +x teal-head && cd ..
M=$PWD/.devcarry/smol4.gguf
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; local rc=$?; echo "rc $rc ms $(( ($(date +%s%N) - s) / 1000000 )) : $*"; }
for cpus in 0 0-3 0-15; do
  export HOME=/tmp/home-c$cpus TEAL_CACHE_DIR=/tmp/cache-c$cpus; mkdir -p $HOME
  echo "cpus $cpus"; /usr/bin/time -f "user %U s sys %S s wall %e s" taskset -c $cpus ./.devcarry/teal-head run -m $M --device cuda:0 -p Hello -n 8 --temp 0 2>&1 >/dev/null | tail -1
done 2>&1 | tee $OUT/startup3.txt
