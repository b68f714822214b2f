// FUSED_MLP_HD marks code compiled for both the host and the device (nvcc), or the host only (g++).
#pragma once

#if defined(__CUDACC__)
#define FUSED_MLP_HD __host__ __device__ __forceinline__
#else
#define FUSED_MLP_HD inline
#endif
