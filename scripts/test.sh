#!/usr/bin/env bash
# The whole test suite: fetches the real assets (cached: the models, the C4 calibration sample and
# NVRTC) so the real-model tests run, checks that WikiText-2 is at ../shared/data, then runs every
# test with optimized code. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# WikiText-2 (test split) is provided by the environment next to the repository, never copied into
# it; the real-model tests read it from there (crates/teal/tests/real_models.rs).
wikitext="$(dirname "$(pwd -P)")/shared/data/wikitext-2-raw-test.raw"
if [ ! -f "$wikitext" ]; then
  echo "test.sh: error: WikiText-2 test text not found at $wikitext (the real-model tests need it)" >&2
  exit 1
fi
# Assigned before export, so that a failed fetch stops the suite (set -e) with its own error.
TEAL_SMOLLM2_GGUF="$(scripts/fetch-assets.sh default)"
TEAL_QWEN_GGUF="$(scripts/fetch-assets.sh qwen)"
export TEAL_SMOLLM2_GGUF TEAL_QWEN_GGUF
scripts/fetch-assets.sh calib >/dev/null
# NVRTC from PyPI, so that the CUDA kernels compile in every run (no GPU or toolkit needed; the
# GPU tests themselves skip without a driver).
nvrtc_dir="$(scripts/fetch-assets.sh nvrtc)"
export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TEAL_REQUIRE_NVRTC=1
# Real-model tests fail instead of skipping when an asset is missing.
export TEAL_REQUIRE_ASSETS=1

cargo test --release --workspace "$@"
