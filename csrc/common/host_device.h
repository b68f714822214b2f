// Macros for code shared between the host compiler, nvcc and the per-instruction-set CPU builds.
#pragma once

// FUSED_MLP_HD marks code compiled for both the host and the device (nvcc), or the host only (g++).
#if defined(__CUDACC__)
#define FUSED_MLP_HD __host__ __device__ __forceinline__
#else
#define FUSED_MLP_HD inline
#endif

// The CPU kernels are compiled once per instruction set (setup.py), each time with CPU_CAPABILITY
// naming it (DEFAULT, AVX2, AVX512), as ATen compiles its own. Everything such a build defines,
// the inline helpers of the headers it includes among them, goes in a namespace of that name: each
// variant then has its own copy of every function, and the linker can never hand one variant a
// helper compiled with another's instructions. Elsewhere (nvcc, the simulation, the dispatcher)
// the macros are empty.
#if defined(CPU_CAPABILITY) && !defined(__CUDACC__)
#define FUSED_MLP_ISA_BEGIN inline namespace CPU_CAPABILITY {
#define FUSED_MLP_ISA_END }
#else
#define FUSED_MLP_ISA_BEGIN
#define FUSED_MLP_ISA_END
#endif
