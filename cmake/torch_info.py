"""Prints what CMake needs to know about the installed torch, '|'-separated:
include dirs (','-separated), library dir, C++11 ABI flag, version, CUDA version."""
import os

import torch
from torch.utils.cpp_extension import include_paths

print(
    ",".join(include_paths()),
    os.path.join(os.path.dirname(torch.__file__), "lib"),
    int(torch._C._GLIBCXX_USE_CXX11_ABI),
    torch.__version__.split("+")[0],
    torch.version.cuda or "",
    sep="|",
)
