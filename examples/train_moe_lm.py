"""The main job: train a byte-level Mixture-of-Experts language model on the
Python standard library, expert-parallel, with moeflux (the code is in moe_lm/).

    python examples/train_moe_lm.py                          # 2 ranks on this machine
    torchrun --nproc-per-node 8 examples/train_moe_lm.py     # one rank per GPU
    python examples/train_moe_lm.py --help
"""

import sys

from moe_lm.train import main  # this script's folder is on sys.path: no PYTHONPATH needed

if __name__ == "__main__":  # spawned ranks import this file again: they must not start a run
    main(sys.argv[1:])
