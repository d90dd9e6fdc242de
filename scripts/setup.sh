#!/usr/bin/env bash
# Installs what moeflux needs on a fresh Debian machine and builds it in place
# (pip install -e). Safe to run again: it skips what is already there, and the
# build when no source changed since the last one (a stamp in the build folder).
#
#   PYTHON=/path/to/python         the Python to install into (default python3; a venv's python works)
#   MOEFLUX_TORCH="torch==2.13.0"  the torch to install when none is (default torch==2.14.1)
#   MOEFLUX_CUDA=0                 build without the CUDA kernels (see setup.py for the other switches)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD_DIR=${MOEFLUX_BUILD_DIR:-build}
say() { echo "setup: $*" >&2; }

missing=()
command -v ccache >/dev/null || missing+=(ccache)
[ -f /usr/include/catch2/catch.hpp ] || missing+=(catch2)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    say "please install ${missing[*]} (apt-get install ${missing[*]}); the C++ tests need catch2"
  fi
fi

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  say "installing ${MOEFLUX_TORCH:-torch==2.14.1} into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  "$PYTHON" -m pip install -q "${MOEFLUX_TORCH:-torch==2.14.1}"
fi
# --no-build-isolation builds with what is installed: the build tools must be here too.
# transformers: only for moeflux.hf, its tests and examples/.
packages=("setuptools>=64" wheel "cmake>=3.28" ninja numpy scipy pytest pytest-timeout expecttest tqdm matplotlib
          "transformers>=5")
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('setuptools', 'wheel', \
'cmake', 'ninja', 'numpy', 'scipy', 'pytest', 'pytest_timeout', 'expecttest', 'tqdm', 'matplotlib', 'transformers')))"; then
  say "installing Python packages into $("$PYTHON" -c 'import sys; print(sys.prefix)') (PYTHON=... picks another)"
  "$PYTHON" -m pip install -q "${packages[@]}"
fi

# Everything the build reads, the torch it builds against and the MOEFLUX_* switches: unchanged means no build.
stamp=$("$PYTHON" - <<'EOF'
import hashlib, importlib.metadata, os, pathlib, shutil, sysconfig
h = hashlib.sha256()
for top in ("csrc", "cuda", "cmake", "tests/cpp", "CMakeLists.txt", "setup.py", "pyproject.toml"):
    top = pathlib.Path(top)
    for path in sorted([top] if top.is_file() else top.rglob("*")):
        if path.is_file():
            h.update(str(path).encode() + b"\0" + path.read_bytes())
# and what decides how it builds: the torch, this Python's extension suffix, the compilers found, the switches
env = sorted((k, v) for k, v in os.environ.items()
             if k.startswith("MOEFLUX_") or k in ("CC", "CXX", "CUDA_HOME", "CUDACXX", "TORCH_CUDA_ARCH_LIST"))
h.update(repr((importlib.metadata.version("torch"), sysconfig.get_config_var("EXT_SUFFIX"), shutil.which("nvcc"),
               shutil.which("c++"), env)).encode())
print(h.hexdigest())
EOF
)
if [ "$(cat "$BUILD_DIR/.setup-stamp" 2>/dev/null)" = "$stamp" ] && "$PYTHON" -c "import importlib.util as u, sys; \
sys.exit(not u.find_spec('moeflux') or not __import__('pathlib').Path('python/moeflux/_C' + \
__import__('sysconfig').get_config_var('EXT_SUFFIX')).exists())"; then
  say "moeflux is built and no source changed: build skipped"
else
  cuda_note=""
  if [ "${MOEFLUX_CUDA:-auto}" != 0 ] && command -v nvcc >/dev/null && "$PYTHON" -c "import torch, sys; sys.exit(not torch.version.cuda)"; then
    cuda_note=" and its CUDA kernels (sm_90; MOEFLUX_CUDA=0 skips them$("$PYTHON" -c "import torch; print('' if torch.cuda.is_available() else ': this machine has no GPU')"))"
  fi
  say "building moeflux's C++ ops${cuda_note} into $BUILD_DIR/; the first build takes 4 to 7 min on 2 cores" \
      "(about half of it CUDA), later ones seconds (ccache). Full log: $BUILD_DIR/setup.log"
  mkdir -p "$BUILD_DIR"
  # pip -v streams the build; show ninja's [done/total] lines as progress, keep the rest in the log.
  if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip install -v --no-build-isolation -e . 2>&1 \
      | tee "$BUILD_DIR/setup.log" | awk '/^ *\[[0-9]+\/[0-9]+\]/ { sub(/^ +/, ""); printf "setup:   %s\n", substr($0, 1, 110); fflush() }' >&2; then
    tail -n 40 "$BUILD_DIR/setup.log" >&2
    say "the build failed; the lines above are the end of $BUILD_DIR/setup.log"
    exit 1
  fi
  echo "$stamp" > "$BUILD_DIR/.setup-stamp"
fi
"$PYTHON" -c "import torch, moeflux; print('moeflux', moeflux.__version__, 'on torch', torch.__version__, \
'(CUDA kernels built)' if moeflux.cuda_kernels_built() else '(CPU kernels only)')"
