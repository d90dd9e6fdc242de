"""Build moeflux: CMake compiles csrc/ and cuda/ once into the extension
moeflux._C (and, when Catch2 is installed, the C++ tests in the same build
tree). Always build with `pip install --no-build-isolation ...` so the
extension is compiled against the torch that is already installed.

Environment switches:
  MOEFLUX_CUDA=auto|1|0     CUDA kernels: auto (torch is a CUDA build and nvcc exists), force on, force off
  MOEFLUX_CUDA_ARCH=90      CUDA architectures (CMake syntax, e.g. "80;90")
  MOEFLUX_BUILD_DIR=build   where the CMake build tree lives (ctest --test-dir $MOEFLUX_BUILD_DIR)
  MOEFLUX_BUILD_TYPE=Release
  MAX_JOBS=N                parallel compile jobs
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cmake_program(name: str) -> str:
    """The cmake (or ctest) of the `cmake` pip package when present: Debian's may be too old."""
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, name)
    except ImportError:
        return name


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(os.environ.get("MOEFLUX_BUILD_DIR", ROOT / "build")).resolve()
        cuda = os.environ.get("MOEFLUX_CUDA", "auto").strip().lower()
        cuda = {"1": "ON", "on": "ON", "true": "ON", "0": "OFF", "off": "OFF", "false": "OFF"}.get(cuda, "AUTO")
        configure = [
            cmake_program("cmake"), "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('MOEFLUX_BUILD_TYPE', 'Release')}",
            f"-DMOEFLUX_CUDA={cuda}",
        ]
        if "MOEFLUX_CUDA_ARCH" in os.environ:
            configure.append(f"-DMOEFLUX_CUDA_ARCH={os.environ['MOEFLUX_CUDA_ARCH']}")
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake_program("cmake"), "--build", str(build_dir), "--parallel", jobs], check=True)

        built = next((build_dir / "python").glob("_C*.so"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        # A new file renamed over the old one: processes that have the old library loaded keep their mapping
        # (copying into it would change the pages under them).
        staged = target.with_name(target.name + ".new")
        shutil.copy2(built, staged)
        os.replace(staged, target)


setup(
    name="moeflux",
    version="0.1.0",
    description="Drop-in, expert-parallel Mixture-of-Experts layer for PyTorch, on C++/CUDA ops",
    packages=["moeflux"],
    package_dir={"": "python"},
    ext_modules=[CMakeExtension("moeflux._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "scipy"],  # numpy, scipy: moeflux.balance
    extras_require={
        "test": ["pytest", "pytest-timeout", "expecttest", "numpy"],
        "train": ["matplotlib", "tqdm"],
        "hf": ["transformers>=5"],  # moeflux.hf: converting transformers MoE blocks
    },
)
