"""The main job (``python examples/train_moe_lm.py``): a byte-level MoE language
model trained on the Python standard library's own source files, an application
that uses moeflux like any user code does."""
