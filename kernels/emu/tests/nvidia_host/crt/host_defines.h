// crt/host_defines.h for compiling NVIDIA's cuda_{bf16,fp16,fp8}.h(pp) as plain host C++ (see
// nv/target beside this). The runtime wheel's device_types.h and vector_types.h include it; it
// ships with nvcc, not the runtime. Host-compiled, the execution-space and builtin markers mean
// nothing, so they expand to nothing, and __align__ to the host compiler's alignment attribute.
#pragma once
#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __align__(n)
#define __device_builtin__
#define __cudart_builtin__
#define CUDARTAPI
