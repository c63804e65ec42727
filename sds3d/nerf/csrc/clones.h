// Attributes shared by the CPU kernels (hashgrid_kernels.cpp, mlp_kernels.cpp, sampling_kernels.cpp).
#pragma once

// Wider vector units where the CPU has them, picked when the library is loaded (GCC's
// target_clones, an ifunc), so that one build runs on any x86-64: no -march=native needed (it
// would add ~5-10% to the hash grid; set SDS3D_EXT_CFLAGS=-march=native to try it on a machine of
// one's own).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SDS3D_NO_CLONES)
#define SDS3D_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define SDS3D_CLONES
#endif
#define SDS3D_INLINE inline __attribute__((always_inline))
