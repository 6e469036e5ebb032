#!/usr/bin/env bash
# Decode speed of teal against llama.cpp (node-llama-cpp 3.21.1, prebuilt CPU binaries) on the same
# GGUF files, runs alternating (llama.cpp, teal, llama.cpp, teal, ...) so that the noise of a shared
# machine hits both alike. Prints a markdown ratio table; the raw JSON of every run is kept.
#
#   scripts/bench-vs-llamacpp.sh [-n 128] [-p 64] [-r 3] [--rounds 2] [-t 2] [--only LABEL]
#
# Pairs at equal bytes per weight, all from the default model (SmolLM2-135M-Instruct Q4_1):
#   Q4_1 (the file itself)     vs teal --dtype q4  (same file)
#   Q4_0, Q8_0, F16, F32       vs teal --dtype q4, q8, f16, f32 (the same copy)
# MODEL=FILE.gguf benches another file in its place (default: scripts/fetch-assets.sh default).
# The copies are written once with tools/reference/llamacpp/{dequantize,requantize}_gguf.py
# (gguf-py) into $BENCH_DIR (default: bench-gguf/ in scripts/fetch-assets.sh's cache root,
# $TEAL_CACHE_DIR, else $XDG_CACHE_HOME/teal, else ~/.cache/teal), named after the model file
# (NAME.gguf -> NAME-F32.gguf, NAME-Q4_0.gguf, ...). teal runs --sparsity 0,0.5
# with the model's thresholds (calibrated here once, cached) on every copy: the copies
# are the same model in other formats (teal warns that the weights differ from the file's).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
N=128 P=64 R=3 ROUNDS=2 T=2 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N="$2"; shift 2 ;;
    -p) P="$2"; shift 2 ;;
    -r) R="$2"; shift 2 ;;
    -t) T="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

# The same cache root as scripts/fetch-assets.sh.
CACHE="${TEAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/teal}"
BENCH_DIR="${BENCH_DIR:-$CACHE/bench-gguf}"
if [ -z "${MODEL:-}" ]; then
  MODEL="$("$ROOT/scripts/fetch-assets.sh" default)"
fi
REF="$ROOT/tools/reference/llamacpp"
OUT="${OUT:-$ROOT/target/bench-vs-llamacpp}"
mkdir -p "$BENCH_DIR" "$OUT"
[ -f "$MODEL" ] || { echo "no model at $MODEL" >&2; exit 1; }
# The copies are named after the model file, so that another MODEL gets its own.
STEM="$(basename "$MODEL" .gguf)"

TEAL="${TEAL:-}"
if [ -z "$TEAL" ]; then
  (cd "$ROOT" && cargo build --release -p teal-cli >&2)
  TEAL="${CARGO_TARGET_DIR:-$ROOT/target}/release/teal"
fi
if [ ! -d "$REF/node_modules/node-llama-cpp" ]; then
  (cd "$REF" && npm install --no-audit --no-fund >&2)
fi
python3 -c "import gguf" 2>/dev/null || pip install "gguf==0.19.0" numpy >&2

# Each copy is written to NAME.part and renamed when complete, so an interrupted write is redone.
F32="$BENCH_DIR/$STEM-F32.gguf"
if [ ! -f "$F32" ]; then
  python3 "$REF/dequantize_gguf.py" "$MODEL" "$F32.part" >&2 || { rm -f -- "$F32.part"; exit 1; }
  mv -- "$F32.part" "$F32"
fi
for ty in Q4_0 Q8_0 F16; do
  f="$BENCH_DIR/$STEM-$ty.gguf"
  if [ ! -f "$f" ]; then
    (cd "$REF" && python3 requantize_gguf.py "$F32" "$f.part" --type "$ty" >&2) || { rm -f -- "$f.part"; exit 1; }
    mv -- "$f.part" "$f"
  fi
done

# One calibration serves every copy (`teal calibrate` prints the file's path last).
TH=$("$TEAL" calibrate -m "$MODEL" --fisher --no-wina | tail -n 1)

# label | file | teal dtype
PAIRS="Q4_1|$MODEL|q4
Q4_0|$BENCH_DIR/$STEM-Q4_0.gguf|q4
Q8_0|$BENCH_DIR/$STEM-Q8_0.gguf|q8
F16|$BENCH_DIR/$STEM-F16.gguf|f16
F32|$F32|f32"

uptime >&2
RUNS="$OUT/runs.jsonl"
: > "$RUNS"
while IFS='|' read -r label file dtype; do
  [ -n "$ONLY" ] && [ "$ONLY" != "$label" ] && continue
  for round in $(seq 1 "$ROUNDS"); do
    echo "[$label round $round] llama.cpp" >&2
    l=$(cd "$REF" && node bench.mjs --model "$file" -t "$T" -p "$P" -n "$N" -r "$R")
    echo "{\"label\":\"$label\",\"engine\":\"llama.cpp\",\"run\":$l}" >> "$RUNS"
    echo "[$label round $round] teal --dtype $dtype" >&2
    t=$("$TEAL" bench -m "$file" -t "$T" --dtype "$dtype" --sparsity 0,0.5 --thresholds "$TH" -p "$P" -n "$N" -r "$R" --bandwidth-mib 512 --json)
    echo "{\"label\":\"$label\",\"engine\":\"teal\",\"dtype\":\"$dtype\",\"run\":$t}" >> "$RUNS"
  done
done <<< "$PAIRS"

python3 - "$RUNS" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
labels = []
for r in runs:
    if r["label"] not in labels:
        labels.append(r["label"])
print("| llama.cpp type | teal dtype | llama.cpp tok/s | teal dense tok/s | teal 50% tok/s | dense ratio | 50% ratio |")
print("|---|---|---|---|---|---|---|")
for lab in labels:
    ll = [r["run"]["decode_tok_s"]["median"] for r in runs if r["label"] == lab and r["engine"] == "llama.cpp"]
    tr = [r for r in runs if r["label"] == lab and r["engine"] == "teal"]
    td = [next(x["decode_tok_s"] for x in r["run"]["results"] if x["sparsity"] == 0) for r in tr]
    ts = [next(x["decode_tok_s"] for x in r["run"]["results"] if x["sparsity"] == 0.5) for r in tr]
    l, d, s = statistics.median(ll), statistics.median(td), statistics.median(ts)
    print(f"| {lab} | {tr[0]['dtype']} | {l:.1f} | {d:.1f} | {s:.1f} | {d / l:.2f}x | {s / l:.2f}x |")
print(f"\nraw runs: {sys.argv[1]}")
PY
