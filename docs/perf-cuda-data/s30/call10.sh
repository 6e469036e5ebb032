#!/bin/bash
# first-process time of the 9-part and 33-part binaries, each with a fresh HOME and cache, alternating
cd .devcarry && gunzip -kf teal-head.gz teal-p9.gz && chmod +x teal-head teal-p9 && cd ..
M=$PWD/.devcarry/smol4.gguf
t() { local s=$(date +%s%N); "$@" > /dev/null 2>&1; local rc=$?; echo "rc $rc ms $(( ($(date +%s%N) - s) / 1000000 )) : $*"; }
for r in 1 2; do for b in p9 head; do
  export HOME=/tmp/home-$b-$r TEAL_CACHE_DIR=/tmp/cache-$b-$r; mkdir -p $HOME
  echo "round $r $b"; t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0; t ./.devcarry/teal-$b run -m $M --device cuda:0 -p Hello -n 8 --temp 0
done; done 2>&1 | tee $OUT/startup2.txt
