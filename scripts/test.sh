#!/usr/bin/env bash
# The whole test suite: fetches the real assets (cached) so the real-model tests run, then runs
# every test with optimized code. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

export TEAL_SMOLLM2_GGUF="$(scripts/fetch-assets.sh default)"
export TEAL_QWEN_GGUF="$(scripts/fetch-assets.sh qwen)"
scripts/fetch-assets.sh calib >/dev/null
# NVRTC from PyPI, so that the CUDA kernels compile in every run (no GPU or toolkit needed; the
# GPU tests themselves skip without a driver).
nvrtc_dir="$(scripts/fetch-assets.sh nvrtc)"
export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TEAL_REQUIRE_NVRTC=1
# Real-model tests fail instead of skipping when an asset is missing.
export TEAL_REQUIRE_ASSETS=1

cargo test --release --workspace "$@"
