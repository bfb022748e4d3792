// nvrtc_wrap.h: the code the stand-in NVRTC compiles after a kernel family, turning it into a
// module of the emulated GPU (emu/abi.h). It is given, before this header, one line
//   EMU_KERNEL(name, max_threads)
// per `__global__` function of the source, inside EMU_KERNELS(...) (see nvrtc.cpp).
#pragma once
#include <type_traits>
#include <utility>

// cuLaunchKernel's parameter array holds one pointer per kernel parameter, to its value; the
// kernel's own signature says how to read each.
template <class... A, size_t... I>
static void __emu_call(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(p[I])...);
}
template <class... A>
static void __emu_invoke(void (*f)(A...), void** p) {
    __emu_call(f, p, std::index_sequence_for<A...>{});
}

// The parameter sizes of a kernel's signature, for the module's kernel table (a trailing 0 so a
// kernel without parameters still has an array).
template <class... A>
struct __emu_params {
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
};
template <class... A>
static constexpr int __emu_param_count(void (*)(A...)) {
    return (int)sizeof...(A);
}
template <class... A>
static constexpr const size_t* __emu_param_sizes(void (*)(A...)) {
    return __emu_params<A...>::sizes;
}

static thread_local char __emu_tls_anchor;

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
EMU_EXPORT void __emu_bind(const EmuRuntime* rt) { __emu_rt = rt; }
EMU_EXPORT void* __emu_tls_touch() { return &__emu_tls_anchor; }
