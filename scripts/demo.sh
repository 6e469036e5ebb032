#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M-Instruct (cached), calibrate TEAL once
# (cached; with the loss gradients, so that `--sparsity` takes the loss-aware allocation: on this
# model x1.40 against uniform TEAL's x1.70 at 50%, 43% less PPL increase, docs/QUALITY.md),
# generate dense and with 50% activation sparsity, and print the decode speed of both (each
# run's, then a benchmark that alternates them) and the quality change on 4 windows of text: the
# WikiText-2 test split (../shared/data/wikitext-2-raw-test.raw) where the environment provides
# it, else the wiki sample of the calibration package (exllamav2's wiki.utf8, from
# scripts/fetch-assets.sh calib).
set -euo pipefail
cd "$(dirname "$0")/.."

model="$(scripts/fetch-assets.sh default)"
scripts/fetch-assets.sh calib >/dev/null
cargo build --release --quiet --bin teal
# Where cargo put it (CARGO_TARGET_DIR, as scripts/bench-vs-llamacpp.sh reads it).
teal="${CARGO_TARGET_DIR:-target}/release/teal"

"$teal" calibrate -m "$model" --fisher --no-wina >/dev/null

prompt="${1:-The history of the city of Paris begins}"
echo "== dense =="
"$teal" run -m "$model" -p "$prompt" -n 64 --temp 0
echo
echo "== TEAL, 50% activation sparsity =="
"$teal" run -m "$model" -p "$prompt" -n 64 --temp 0 --sparsity 0.5
echo
# One short run of each is noisy on a shared machine; the bench alternates them round by round.
echo "== decode speed, dense and 50% in alternating rounds (median of 3) =="
# Its progress on stderr is kept out of the way, and shown if it fails.
bench_err="$(mktemp)"
trap 'rm -f -- "$bench_err"' EXIT
if ! "$teal" bench -m "$model" --sparsity 0,0.5 --allocation auto -n 64 -p 16 -r 3 --bandwidth-mib 256 2>"$bench_err"; then
  cat "$bench_err" >&2
  echo "demo.sh: error: teal bench failed" >&2
  exit 1
fi
echo
text=../shared/data/wikitext-2-raw-test.raw
[ -f "$text" ] || text="$(scripts/fetch-assets.sh calib | tail -n1)"
echo "== quality at 50% sparsity vs dense, same tokens ($(basename "$text"), 4 windows of 512) =="
"$teal" ppl -m "$model" -f "$text" --chunks 4 --sparsity 0.5
