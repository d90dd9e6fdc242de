"""The pieces of the main job (``python -m moeflux.train``): a byte-level MoE
language model trained on the Python standard library's own source files."""
