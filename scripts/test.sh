#!/usr/bin/env bash
# Sets up and builds moeflux (scripts/setup.sh), then runs every test: the
# Catch2 tests of the C++ kernels (ctest) and the Python tests (pytest).
# CUDA tests run where a GPU is visible and are skipped elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/setup.sh
CTEST=$("$PYTHON" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'ctest'))")
"$CTEST" --test-dir "${MOEFLUX_BUILD_DIR:-build}" --output-on-failure
"$PYTHON" -m pytest -q -rs tests "$@"   # -rs: the reason of every skip (GPU-only tests, ../shared/traces absent)
