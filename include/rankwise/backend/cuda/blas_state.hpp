// Scoped state of a BLAS handle: what a rankwise call needs set on a borrowed
// handle, restored on exit. Written over an interface (no CUDA here) so the
// save/set/restore logic is tested on any machine.
#pragma once

namespace rankwise {
namespace detail {

/// The settings of a handle that change what a call computes or where it runs.
template <class Stream, class PointerMode, class MathMode, class AtomicsMode>
struct BlasSettings {
  Stream stream;
  PointerMode pointer_mode;
  MathMode math_mode;
  AtomicsMode atomics_mode;
};

/// On construction reads the handle's settings through Api and changes only
/// those that differ from `need`; on destruction changes them back. Api has
/// a Handle and a Settings type and static get(handle) -> Settings,
/// set_stream, set_pointer_mode, set_math_mode, set_atomics_mode(handle,
/// value), each throwing on failure. A failure part-way through construction
/// restores what was already changed, then rethrows. Not thread-safe, as the
/// handle itself is not.
template <class Api>
class ScopedBlasSettings {
 public:
  using Handle = typename Api::Handle;
  using Settings = typename Api::Settings;

  ScopedBlasSettings(Handle handle, const Settings& need)
      : handle_(handle), saved_(Api::get(handle)), now_(saved_) {
    try {
      change_to(need);
    } catch (...) {
      restore();
      throw;
    }
  }
  ScopedBlasSettings(const ScopedBlasSettings&) = delete;
  ScopedBlasSettings& operator=(const ScopedBlasSettings&) = delete;
  ~ScopedBlasSettings() { restore(); }

  /// The handle's settings when the scope began (what is restored).
  const Settings& saved() const { return saved_; }

 private:
  void change_to(const Settings& s) {
    set_stream(s.stream);
    set_pointer_mode(s.pointer_mode);
    set_math_mode(s.math_mode);
    set_atomics_mode(s.atomics_mode);
  }
  void set_stream(const decltype(Settings::stream)& v) {
    if (now_.stream == v) return;
    Api::set_stream(handle_, v);
    now_.stream = v;
  }
  void set_pointer_mode(const decltype(Settings::pointer_mode)& v) {
    if (now_.pointer_mode == v) return;
    Api::set_pointer_mode(handle_, v);
    now_.pointer_mode = v;
  }
  void set_math_mode(const decltype(Settings::math_mode)& v) {
    if (now_.math_mode == v) return;
    Api::set_math_mode(handle_, v);
    now_.math_mode = v;
  }
  void set_atomics_mode(const decltype(Settings::atomics_mode)& v) {
    if (now_.atomics_mode == v) return;
    Api::set_atomics_mode(handle_, v);
    now_.atomics_mode = v;
  }

  // Each setting on its own, best effort and non-throwing: this runs in a
  // destructor, and a handle that refuses its own earlier settings has
  // already failed the call the scope surrounds.
  template <class F>
  static void attempt(F&& f) noexcept {
    try {
      f();
    } catch (...) {
    }
  }
  void restore() noexcept {
    attempt([&] { set_stream(saved_.stream); });
    attempt([&] { set_pointer_mode(saved_.pointer_mode); });
    attempt([&] { set_math_mode(saved_.math_mode); });
    attempt([&] { set_atomics_mode(saved_.atomics_mode); });
  }

  Handle handle_;
  Settings saved_;
  Settings now_;
};

}  // namespace detail
}  // namespace rankwise
