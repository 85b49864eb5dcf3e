// pybind11 entry point of kalm_fast._C: the streaming model-soup kernels.
//
// No libtorch: buffers arrive as raw addresses (tensor.data_ptr()), element counts and dtype codes, CUDA streams as
// integers (torch.cuda.current_stream().cuda_stream), so one build works with any torch version. The work runs with
// the GIL released. Python (kalm_fast/soup.py) checks devices, dtypes, sizes and alignment before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "soup.h"
#include "soup_math.h"

namespace py = pybind11;
using kalm_fast::AccumulateEntry;
using kalm_fast::CastEntry;

namespace {

// (acc, comp or 0, src/dst, n, dtype) as Python ints
using EntryTuple = std::tuple<std::uintptr_t, std::uintptr_t, std::uintptr_t, int64_t, int>;

void check_entry(const EntryTuple& t, size_t k) {
  const auto [acc, comp, other, n, dtype] = t;
  (void)comp;
  if (n < 0) throw std::invalid_argument("entry " + std::to_string(k) + ": negative element count");
  if (dtype != kalm_fast::kF32 && dtype != kalm_fast::kF16 && dtype != kalm_fast::kBF16) {
    throw std::invalid_argument("entry " + std::to_string(k) + ": dtype code must be DTYPE_F32, DTYPE_F16 or "
                                "DTYPE_BF16, got " + std::to_string(dtype));
  }
  if (n > 0 && (acc == 0 || other == 0)) throw std::invalid_argument("entry " + std::to_string(k) + ": null pointer");
}

void check_scalar(const char* name, float v) {
  if (!std::isfinite(v)) throw std::invalid_argument(std::string(name) + " must be finite");
}

std::vector<AccumulateEntry> accumulate_entries(const std::vector<EntryTuple>& tuples) {
  std::vector<AccumulateEntry> out;
  out.reserve(tuples.size());
  for (size_t k = 0; k < tuples.size(); ++k) {
    check_entry(tuples[k], k);
    const auto [acc, comp, src, n, dtype] = tuples[k];
    out.push_back({reinterpret_cast<float*>(acc), reinterpret_cast<float*>(comp), reinterpret_cast<const void*>(src),
                   n, dtype});
  }
  return out;
}

std::vector<CastEntry> cast_entries(const std::vector<EntryTuple>& tuples) {
  std::vector<CastEntry> out;
  out.reserve(tuples.size());
  for (size_t k = 0; k < tuples.size(); ++k) {
    check_entry(tuples[k], k);
    const auto [acc, comp, dst, n, dtype] = tuples[k];
    out.push_back({reinterpret_cast<const float*>(acc), reinterpret_cast<const float*>(comp),
                   reinterpret_cast<void*>(dst), n, dtype});
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kalm_fast C++/CUDA extension: streaming model-soup kernels (raw pointers, no libtorch)";
  m.attr("DTYPE_F32") = static_cast<int>(kalm_fast::kF32);
  m.attr("DTYPE_F16") = static_cast<int>(kalm_fast::kF16);
  m.attr("DTYPE_BF16") = static_cast<int>(kalm_fast::kBF16);

  m.def(
      "cpu_accumulate",
      [](const std::vector<EntryTuple>& entries, float weight, bool first, int num_threads) {
        check_scalar("weight", weight);
        auto e = accumulate_entries(entries);
        py::gil_scoped_release release;
        kalm_fast::cpu_accumulate(e, weight, first, num_threads);
      },
      py::arg("entries"), py::arg("weight"), py::arg("first"), py::arg("num_threads") = 0,
      "For each (acc, comp, src, n, dtype): acc = w*src (first) or acc += w*src in fp32; with comp != 0 a "
      "Kahan-Babuska-Neumaier sum whose compensation is kept in comp. acc/comp fp32, src of the dtype code.");
  m.def(
      "cpu_cast",
      [](const std::vector<EntryTuple>& entries, float divisor, int num_threads) {
        check_scalar("divisor", divisor);
        auto e = cast_entries(entries);
        py::gil_scoped_release release;
        kalm_fast::cpu_cast(e, divisor, num_threads);
      },
      py::arg("entries"), py::arg("divisor"), py::arg("num_threads") = 0,
      "For each (acc, comp, dst, n, dtype): dst = (acc (+ comp)) / divisor, rounded to nearest even in dtype.");
  m.def(
      "cpu_soup",
      [](const std::vector<std::tuple<std::uintptr_t, int64_t, int>>& outputs,
         const std::vector<std::tuple<std::uintptr_t, int>>& sources, const std::vector<float>& weights,
         float divisor, bool compensated, int num_threads) {
        check_scalar("divisor", divisor);
        for (float w : weights) check_scalar("weight", w);
        const size_t K = weights.size();
        if (sources.size() != outputs.size() * K) {
          throw std::invalid_argument("cpu_soup: need one source per output and weight (" +
                                      std::to_string(outputs.size() * K) + "), got " + std::to_string(sources.size()));
        }
        std::vector<kalm_fast::SoupEntry> e;
        std::vector<kalm_fast::SoupSource> s;
        e.reserve(outputs.size());
        s.reserve(sources.size());
        for (size_t j = 0; j < outputs.size(); ++j) {
          const auto [dst, n, dtype] = outputs[j];
          for (size_t k = 0; k < K; ++k) {
            const auto [src, sdtype] = sources[j * K + k];
            check_entry(EntryTuple{dst, 0, src, n, sdtype}, j);
            s.push_back({reinterpret_cast<const void*>(src), sdtype});
          }
          check_entry(EntryTuple{dst, 0, dst, n, dtype}, j);
          e.push_back({reinterpret_cast<void*>(dst), n, dtype});
        }
        py::gil_scoped_release release;
        kalm_fast::cpu_soup(e, s, weights, divisor, compensated, num_threads);
      },
      py::arg("outputs"), py::arg("sources"), py::arg("weights"), py::arg("divisor"), py::arg("compensated"),
      py::arg("num_threads") = 0,
      "Fused soup of a chunk: for each output (dst, n, dtype) with sources[j*K:(j+1)*K] = (src, dtype) of the K "
      "inputs, dst = RNE(sum_k weights[k] * src_k / divisor); the same bits as cpu_accumulate over k, then cpu_cast.");

#ifdef KALM_FAST_WITH_CUDA
  m.attr("compiled_with_cuda") = true;
  m.def(
      "cuda_accumulate",
      [](const std::vector<EntryTuple>& entries, float weight, bool first, std::intptr_t stream) {
        check_scalar("weight", weight);
        auto e = accumulate_entries(entries);
        py::gil_scoped_release release;
        kalm_fast::cuda_accumulate(e, weight, first, stream);
      },
      py::arg("entries"), py::arg("weight"), py::arg("first"), py::arg("stream"),
      "cpu_accumulate on device pointers: many tensors per launch on the given cudaStream_t (asynchronous).");
  m.def(
      "cuda_cast",
      [](const std::vector<EntryTuple>& entries, float divisor, std::intptr_t stream) {
        check_scalar("divisor", divisor);
        auto e = cast_entries(entries);
        py::gil_scoped_release release;
        kalm_fast::cuda_cast(e, divisor, stream);
      },
      py::arg("entries"), py::arg("divisor"), py::arg("stream"),
      "cpu_cast on device pointers: many tensors per launch on the given cudaStream_t (asynchronous).");
  m.attr("CUDA_MAX_TENSORS_PER_LAUNCH") = kalm_fast::kCudaMaxTensorsPerLaunch;
#else
  m.attr("compiled_with_cuda") = false;
#endif
}
