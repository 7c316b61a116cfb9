// Backend conformance, at compile time: Memory<Backend> provides the untyped
// moves (rankwise/backend/memory_decl.hpp) and Kernels<Backend, T> every
// primitive of the contract (rankwise/backend/kernels_decl.hpp) with the
// argument types the layers pass, one static_assert per primitive so a
// missing or changed one is named. Checked for the CPU (test_contracts.cpp:
// float, double) and CUDA (test_lora_cuda.cu: float, __half, __nv_bfloat16).
// What each primitive computes is unit_kernel_cases.hpp's and kernel_cases.hpp's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "rankwise/backend/kernels_decl.hpp"
#include "rankwise/backend/memory_decl.hpp"
#include "rankwise/core/adam_rule.hpp"
#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/routing.hpp"
#include "rankwise/core/segment_table.hpp"

namespace rwtest {
namespace conformance {

using rankwise::MatrixView;
using rankwise::Op;
using I32 = std::int32_t;

template <class V>
V arg() {
  return std::declval<V>();
}

// has_<name><K, T, Acc, Ctx>: the call below is well-formed.
#define RWTEST_PRIMITIVE(name, ...)                               \
  template <class K, class T, class Acc, class Ctx, class = void> \
  struct has_##name : std::false_type {};                         \
  template <class K, class T, class Acc, class Ctx>               \
  struct has_##name<K, T, Acc, Ctx, std::void_t<decltype(__VA_ARGS__)>> : std::true_type {};

// Memory.
RWTEST_PRIMITIVE(fill, K::fill(arg<Ctx&>(), arg<MatrixView<T>>(), 0.0))
RWTEST_PRIMITIVE(fill_uniform,
                 K::fill_uniform(arg<Ctx&>(), arg<MatrixView<T>>(), 0.0, 1.0, std::uint64_t{1}))
RWTEST_PRIMITIVE(copy, K::copy(arg<Ctx&>(), arg<MatrixView<const T>>(), Op::kNoTrans,
                               arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(upload, K::upload(arg<Ctx&>(), arg<const T*>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(download, K::download(arg<Ctx&>(), arg<MatrixView<const T>>(), arg<T*>()))
RWTEST_PRIMITIVE(upload_doubles,
                 K::upload_doubles(arg<Ctx&>(), arg<const double*>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(download_doubles,
                 K::download_doubles(arg<Ctx&>(), arg<MatrixView<const T>>(), arg<double*>()))
RWTEST_PRIMITIVE(upload_indices,
                 K::upload_indices(arg<Ctx&>(), arg<const I32*>(), arg<MatrixView<I32>>()))
RWTEST_PRIMITIVE(synchronize, K::synchronize(arg<Ctx&>()))
// BLAS.
RWTEST_PRIMITIVE(gemm,
                 K::gemm(arg<Ctx&>(), Acc(1), arg<MatrixView<const T>>(), Op::kNoTrans,
                         arg<MatrixView<const T>>(), Op::kTrans, Acc(0), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(gemm_acc, K::gemm_acc(arg<Ctx&>(), Acc(1), arg<MatrixView<const T>>(),
                                       Op::kNoTrans, arg<MatrixView<const T>>(), Op::kTrans, Acc(0),
                                       arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(gemm_mixed, K::gemm_mixed(arg<Ctx&>(), Acc(1), arg<MatrixView<const Acc>>(),
                                           Op::kNoTrans, arg<MatrixView<const T>>(), Op::kTrans,
                                           Acc(0), arg<MatrixView<T>>(), arg<MatrixView<Acc>>()))
// Rank-unit primitives.
RWTEST_PRIMITIVE(gather_dot, K::gather_dot(arg<Ctx&>(), Acc(1), arg<MatrixView<const T>>(),
                                           arg<MatrixView<const T>>(), arg<MatrixView<const I32>>(),
                                           arg<MatrixView<Acc>>(), Acc(0)))
RWTEST_PRIMITIVE(gather_axpy, K::gather_axpy(arg<Ctx&>(), Acc(1), arg<MatrixView<const Acc>>(),
                                             arg<MatrixView<const T>>(),
                                             arg<MatrixView<const I32>>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(scatter_axpy,
                 K::scatter_axpy(arg<Ctx&>(), Acc(1), arg<MatrixView<const Acc>>(),
                                 arg<MatrixView<const T>>(), arg<MatrixView<const I32>>(), Acc(0),
                                 arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(hadamard, K::hadamard(arg<Ctx&>(), arg<MatrixView<const Acc>>(),
                                       arg<MatrixView<const Acc>>(), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(densify, K::densify(arg<Ctx&>(), arg<MatrixView<const I32>>(),
                                     arg<MatrixView<const Acc>>(), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(gather_cols, K::gather_cols(arg<Ctx&>(), arg<MatrixView<const T>>(),
                                             arg<MatrixView<const I32>>(), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(take_rows, K::take_rows(arg<Ctx&>(), arg<MatrixView<const T>>(),
                                         arg<MatrixView<const I32>>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(add_rows, K::add_rows(arg<Ctx&>(), arg<MatrixView<const T>>(),
                                       arg<MatrixView<const I32>>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(remap_units, K::remap_units(arg<Ctx&>(), arg<MatrixView<const I32>>(),
                                             arg<MatrixView<const I32>>(), arg<MatrixView<I32>>()))
RWTEST_PRIMITIVE(scale_by,
                 K::scale_by(arg<Ctx&>(), arg<MatrixView<const Acc>>(), arg<MatrixView<T>>()))
RWTEST_PRIMITIVE(check_units, K::check_units(arg<Ctx&>(), arg<MatrixView<const I32>>(),
                                             std::int64_t{1}, arg<MatrixView<I32>>()))
// The router's per-token pieces (the rule itself is core/routing.hpp's).
RWTEST_PRIMITIVE(route,
                 K::route(arg<Ctx&>(), arg<const rankwise::RoutingRule&>(),
                          arg<MatrixView<const Acc>>(), arg<MatrixView<const Acc>>(),
                          arg<MatrixView<Acc>>(), arg<MatrixView<I32>>(), arg<MatrixView<I32>>(),
                          arg<MatrixView<Acc>>(), arg<MatrixView<I32>>()))
RWTEST_PRIMITIVE(route_backward,
                 K::route_backward(arg<Ctx&>(), arg<const rankwise::RoutingRule&>(),
                                   arg<MatrixView<const Acc>>(), arg<MatrixView<const Acc>>(),
                                   arg<MatrixView<const I32>>(), arg<MatrixView<const Acc>>(),
                                   arg<MatrixView<const Acc>>(),
                                   arg<MatrixView<const std::uint8_t>>(), arg<MatrixView<Acc>>(),
                                   arg<MatrixView<T>>(), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(sum_rows, K::sum_rows(arg<Ctx&>(), arg<MatrixView<const Acc>>(), Acc(0),
                                       arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(count_experts,
                 K::count_experts(arg<Ctx&>(), arg<MatrixView<const I32>>(),
                                  arg<MatrixView<const std::uint8_t>>(), arg<MatrixView<I32>>()))
RWTEST_PRIMITIVE(update_bias, K::update_bias(arg<Ctx&>(), arg<MatrixView<const I32>>(), 0.5f,
                                             arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(aux_loss_grad, K::aux_loss_grad(arg<Ctx&>(), arg<MatrixView<const I32>>(), 1,
                                                 Acc(1), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(read_int, K::read_int(arg<Ctx&>(), arg<MatrixView<const I32>>()))
// Optimiser.
RWTEST_PRIMITIVE(sum_squares,
                 K::sum_squares(arg<Ctx&>(), arg<MatrixView<const T>>(), arg<MatrixView<Acc>>()))
RWTEST_PRIMITIVE(adam, K::adam(arg<Ctx&>(), arg<const rankwise::AdamStep&>(), arg<MatrixView<T>>(),
                               arg<MatrixView<const T>>(), arg<MatrixView<Acc>>(),
                               arg<MatrixView<Acc>>(), arg<MatrixView<const Acc>>()))
// Multi-adapter batches, where a backend has them (kSegmentedLora).
RWTEST_PRIMITIVE(segment_lora_forward,
                 K::segment_lora_forward(arg<Ctx&>(), arg<const rankwise::SegmentTable&>(),
                                         arg<MatrixView<const T>>(), arg<MatrixView<const T>>(),
                                         arg<MatrixView<const T>>(), arg<MatrixView<T>>(),
                                         arg<Acc*>()))

// Untyped memory (K = Memory<Backend> here).
RWTEST_PRIMITIVE(memory_copy,
                 K::copy(arg<Ctx&>(), arg<void*>(), arg<const void*>(), std::size_t{1}))
RWTEST_PRIMITIVE(memory_fill,
                 K::fill(arg<Ctx&>(), arg<void*>(), static_cast<unsigned char>(0), std::size_t{1}))
RWTEST_PRIMITIVE(memory_upload,
                 K::upload(arg<Ctx&>(), arg<void*>(), arg<const void*>(), std::size_t{1}))
RWTEST_PRIMITIVE(memory_download,
                 K::download(arg<Ctx&>(), arg<void*>(), arg<const void*>(), std::size_t{1}))

#undef RWTEST_PRIMITIVE

#define RWTEST_REQUIRE_PRIMITIVE(name)             \
  static_assert(has_##name<K, T, Acc, Ctx>::value, \
                "the backend's " #name " is missing or takes other arguments")

/// True once every static_assert inside has passed; a failure names the primitive.
template <class Backend>
constexpr bool provides_memory() {
  using K = rankwise::Memory<Backend>;
  using T = void;
  using Acc = void;
  using Ctx = rankwise::Context<Backend>;
  RWTEST_REQUIRE_PRIMITIVE(memory_copy);
  RWTEST_REQUIRE_PRIMITIVE(memory_fill);
  RWTEST_REQUIRE_PRIMITIVE(memory_upload);
  RWTEST_REQUIRE_PRIMITIVE(memory_download);
  return true;
}

template <class Backend, class T>
constexpr bool provides_every_primitive() {
  static_assert(provides_memory<Backend>());
  using K = rankwise::Kernels<Backend, T>;
  using Acc = rankwise::accumulator_t<T>;
  using Ctx = rankwise::Context<Backend>;
  RWTEST_REQUIRE_PRIMITIVE(fill);
  RWTEST_REQUIRE_PRIMITIVE(fill_uniform);
  RWTEST_REQUIRE_PRIMITIVE(copy);
  RWTEST_REQUIRE_PRIMITIVE(upload);
  RWTEST_REQUIRE_PRIMITIVE(download);
  RWTEST_REQUIRE_PRIMITIVE(upload_doubles);
  RWTEST_REQUIRE_PRIMITIVE(download_doubles);
  RWTEST_REQUIRE_PRIMITIVE(upload_indices);
  RWTEST_REQUIRE_PRIMITIVE(synchronize);
  RWTEST_REQUIRE_PRIMITIVE(gemm);
  RWTEST_REQUIRE_PRIMITIVE(gemm_acc);
  RWTEST_REQUIRE_PRIMITIVE(gemm_mixed);
  RWTEST_REQUIRE_PRIMITIVE(gather_dot);
  RWTEST_REQUIRE_PRIMITIVE(gather_axpy);
  RWTEST_REQUIRE_PRIMITIVE(scatter_axpy);
  RWTEST_REQUIRE_PRIMITIVE(hadamard);
  RWTEST_REQUIRE_PRIMITIVE(densify);
  RWTEST_REQUIRE_PRIMITIVE(gather_cols);
  RWTEST_REQUIRE_PRIMITIVE(take_rows);
  RWTEST_REQUIRE_PRIMITIVE(add_rows);
  RWTEST_REQUIRE_PRIMITIVE(remap_units);
  RWTEST_REQUIRE_PRIMITIVE(scale_by);
  RWTEST_REQUIRE_PRIMITIVE(check_units);
  RWTEST_REQUIRE_PRIMITIVE(route);
  RWTEST_REQUIRE_PRIMITIVE(route_backward);
  RWTEST_REQUIRE_PRIMITIVE(sum_rows);
  RWTEST_REQUIRE_PRIMITIVE(count_experts);
  RWTEST_REQUIRE_PRIMITIVE(update_bias);
  RWTEST_REQUIRE_PRIMITIVE(aux_loss_grad);
  RWTEST_REQUIRE_PRIMITIVE(read_int);
  RWTEST_REQUIRE_PRIMITIVE(sum_squares);
  RWTEST_REQUIRE_PRIMITIVE(adam);
  static_assert(std::is_same<decltype(K::read_int(arg<Ctx&>(), arg<MatrixView<const I32>>())),
                             std::int32_t>::value,
                "Kernels<Backend, T>::read_int returns the int32 on the host");
  static_assert(std::is_same<std::remove_cv_t<decltype(K::kSegmentedLora)>, bool>::value,
                "Kernels<Backend, T>::kSegmentedLora says whether segment_lora_forward exists");
  if constexpr (K::kSegmentedLora) RWTEST_REQUIRE_PRIMITIVE(segment_lora_forward);
  // The crossovers are not part of the contract (backend/tuning.hpp).
  return true;
}

#undef RWTEST_REQUIRE_PRIMITIVE

}  // namespace conformance
}  // namespace rwtest
