"""The build and the package layout (SPEC 2, issue 2): the CUDA path compiled wherever nvcc is, no top-level
``kernels`` package, a light ``import kalm_fast``, and an extension that links neither libtorch nor a CUDA runtime
library nor OpenMP (raw pointers, static cudart, std::thread)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kalm_fast import _C

ROOT = Path(__file__).resolve().parents[1]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc: the CPU-only build is expected")
def test_extension_has_the_cuda_path_when_nvcc_exists():
    """CI builds with nvcc installed, so this proves the CUDA sources compile and link."""
    assert _C.compiled_with_cuda, f"nvcc at {_nvcc()} but kalm_fast._C was built without CUDA: rebuild it"
    assert callable(_C.cuda_accumulate) and callable(_C.cuda_cast)


def test_extension_interface():
    assert (_C.DTYPE_F32, _C.DTYPE_F16, _C.DTYPE_BF16) == (0, 1, 2)
    with pytest.raises(ValueError, match="dtype code"):
        _C.cpu_accumulate([(8, 0, 8, 1, 7)], 1.0, True)
    with pytest.raises(ValueError, match="weight must be finite"):
        _C.cpu_accumulate([], float("nan"), True)


def test_no_top_level_kernels_package(tmp_path):
    """transformers imports `kernels` as the Hugging Face kernel hub (unconditionally since 5.2x); ours is
    kalm_fast.kernels. Installed, nothing of ours is found under that name. Asked in a fresh interpreter away from
    the checkout (-P, cwd elsewhere): `python -m pytest` from the root puts the root on this process's sys.path."""
    code = ("import importlib.util as u, json; "
            "print(json.dumps([(s := u.find_spec(n)) and s.origin for n in ('kernels', 'kalm_fast.kernels')]))")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hub, ours = json.loads(out.stdout)
    assert hub is None or Path(hub).resolve().parent != ROOT / "kernels", hub
    assert ours is not None and Path(ours).name == "__init__.py", ours


def test_repo_root_on_sys_path_does_not_shadow_the_kernel_hub():
    """From a checkout (`python -m bench` puts the repository root first on sys.path) our kernels/ folder is found as
    the top-level `kernels`: it must hand the name to the installed distribution (transformers' Qwen2 imports it), or,
    with none installed (-S: no site-packages), leave an empty namespace-like package, never kalm_fast's kernels as
    the hub. transformers (5.17 to 5.25 at least) checks availability by importing a name it has no metadata for and
    calls one with no __file__ and no __version__ "not installed"; a ModuleNotFoundError raised on import escapes that
    check and breaks `import transformers.modeling_utils` (seen under 5.17 without the hub: Qwen2 and mergekit failed
    in `python -m bench` from a checkout)."""
    code = ("import kernels, os; "
            "assert os.path.dirname(os.path.abspath(kernels.__file__)) != os.path.abspath('kernels'), "
            "kernels.__file__; "
            "import kalm_fast.kernels.attention; print(kernels.__name__)")
    if importlib.util.find_spec("kernels") is not None:
        out = subprocess.run([sys.executable, "-c", code + "; from transformers.activations import ACT2FN"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    absent = ("import importlib, importlib.util, kernels\n"
              "assert importlib.util.find_spec('kernels') is not None  # found again: transformers then imports it\n"
              "assert getattr(kernels, '__file__', None) is None and not hasattr(kernels, '__version__'), kernels\n"
              "assert importlib.import_module('kernels') is kernels and list(kernels.__path__) == []\n"
              "for stmt in ('from kernels import get_kernel', 'import kernels.layer'):\n"
              "    try:\n"
              "        exec(stmt)\n"
              "    except ImportError:\n"
              "        print('ImportError')\n")
    out = subprocess.run([sys.executable, "-S", "-c", absent], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["ImportError"] * 2, out.stderr[-2000:]


def test_import_kalm_fast_does_not_import_torch():
    code = "import sys, kalm_fast, kalm_fast.cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
def test_extension_links_no_libtorch_cudart_or_openmp():
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=True).stdout
    libs = [line.split("[")[1].split("]")[0] for line in needed.splitlines() if "(NEEDED)" in line]
    forbidden = ("libtorch", "libc10", "libcudart", "libgomp", "libomp", "libiomp")
    assert libs and not [lib for lib in libs if lib.startswith(forbidden)], libs
