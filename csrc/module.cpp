// pybind11 entry point of kalm_fast._C.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "kalm_fast C++/CUDA extension (streaming model soup)";
#ifdef KALM_FAST_WITH_CUDA
  m.attr("compiled_with_cuda") = true;
#else
  m.attr("compiled_with_cuda") = false;
#endif
}
