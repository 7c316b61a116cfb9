// The one interface every rankwise layer follows (Lora, Smora, Mos, Lego), and
// a compile-time check of it, so generic code (a model, a trainer, an engine's
// module table) can hold any of them without a wrapper hierarchy.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "rankwise/core/matrix_view.hpp"
#include "rankwise/core/parameter.hpp"
#include "rankwise/core/tensor_map.hpp"

namespace rankwise {

/// Whether forward keeps what backward needs (and, for routed layers, takes
/// the balance step). Layers with nothing to keep ignore it.
enum class Mode { kInference, kTraining };

/// The layer concept. A layer L = Layer<T, Backend> provides
///
///   using value_type = T; using backend_type = Backend;
///   static constexpr bool kOwnsParameters
///       false where the parameters live in a shared owner (Mos: its ShardPool,
///       which lists, counts and zeroes them once for all its layers)
///   void forward(MatrixView<const T> x, MatrixView<T> y, Mode = kInference)
///       y (n x d_out) += the layer's delta for x (n x d_in)
///   void backward(MatrixView<const T> x, MatrixView<const T> dy,
///                 MatrixView<T> dx = {}, bool accumulate = false)
///       gradients for the last forward on x: the layer's own gradients are
///       overwritten (added to with accumulate; a layer that does not own its
///       parameters always adds into its owner's); dx, when given (non-empty),
///       receives += ∂L/∂x
///   std::vector<ParameterRef<T>> parameters()
///       (value, grad) pairs for an optimiser, in the internal layout; empty
///       when !kOwnsParameters
///   void zero_grad()                       the gradients parameters() lists
///   std::int64_t num_parameters() const    the elements parameters() lists
///   TensorMap state()                      everything that defines the layer's
///                                          output, in PEFT layout (B as d_out x r)
///   void load_state(const TensorMap&)      what state() saved: every key and
///                                          shape is checked before anything is
///                                          written, so a refused load leaves the
///                                          layer as it was
///
/// Layers may offer more (a routing supplied by the caller, a base-weight
/// forward, merge / unmerge); the concept is what every layer shares.
template <class L, class = void>
struct is_layer : std::false_type {};

namespace detail {

template <class L>
using layer_checks = std::void_t<
    typename L::value_type, typename L::backend_type, decltype(L::kOwnsParameters),
    decltype(std::declval<L&>().forward(std::declval<MatrixView<const typename L::value_type>>(),
                                        std::declval<MatrixView<typename L::value_type>>(),
                                        Mode::kTraining)),
    decltype(std::declval<L&>().backward(std::declval<MatrixView<const typename L::value_type>>(),
                                         std::declval<MatrixView<const typename L::value_type>>(),
                                         std::declval<MatrixView<typename L::value_type>>(), true)),
    decltype(std::declval<L&>().parameters()), decltype(std::declval<L&>().zero_grad()),
    decltype(std::declval<const L&>().num_parameters()), decltype(std::declval<L&>().state()),
    decltype(std::declval<L&>().load_state(std::declval<const TensorMap&>()))>;

// The return types, once the expressions are known to be valid.
template <class L>
constexpr bool layer_types_match() {
  using T = typename L::value_type;
  return std::is_same<decltype(std::declval<L&>().parameters()),
                      std::vector<ParameterRef<T>>>::value &&
         std::is_same<decltype(std::declval<const L&>().num_parameters()), std::int64_t>::value &&
         std::is_same<decltype(std::declval<L&>().state()), TensorMap>::value &&
         std::is_same<std::remove_cv_t<decltype(L::kOwnsParameters)>, bool>::value;
}

}  // namespace detail

template <class L>
struct is_layer<L, detail::layer_checks<L>> : std::bool_constant<detail::layer_types_match<L>()> {};

template <class L>
inline constexpr bool is_layer_v = is_layer<L>::value;

}  // namespace rankwise
