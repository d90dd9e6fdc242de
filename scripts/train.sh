#!/usr/bin/env bash
# Sets up and builds moeflux (scripts/setup.sh), then trains a small byte-level
# MoE language model on the Python standard library into runs/moe-lm/ (--out;
# a folder that holds another run needs --overwrite; --resume goes on in the
# checkpoint's folder). All options: scripts/train.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" examples/train_moe_lm.py "$@"
