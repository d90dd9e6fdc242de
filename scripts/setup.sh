#!/usr/bin/env bash
# Installs what moeflux needs on a fresh Debian machine and builds it in place
# (pip install -e). Safe to run again: it skips what is already there.
#
#   MOEFLUX_TORCH="torch==2.13.0"  the torch to install when none is (default torch==2.14.1)
#   MOEFLUX_CUDA=0                 build without the CUDA kernels (see setup.py for the other switches)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

missing=()
command -v ccache >/dev/null || missing+=(ccache)
[ -f /usr/include/catch2/catch.hpp ] || missing+=(catch2)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install ${missing[*]} (apt-get install ${missing[*]}); the C++ tests need catch2" >&2
  fi
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${MOEFLUX_TORCH:-torch==2.14.1}"
fi
# --no-build-isolation builds with what is installed: the build tools must be here too.
"$PYTHON" -m pip install -q "setuptools>=64" wheel "cmake>=3.28" ninja numpy scipy pytest pytest-timeout expecttest tqdm matplotlib \
  "transformers>=5"  # transformers: only for moeflux.hf, its tests and examples/
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install -q --no-build-isolation -e .
"$PYTHON" -c "import torch, moeflux; print('moeflux', moeflux.__version__, 'on torch', torch.__version__, \
'(CUDA kernels built)' if moeflux.cuda_kernels_built() else '(CPU kernels only)')"
