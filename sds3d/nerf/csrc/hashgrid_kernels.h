// Entry points of the fused CPU hash grid kernels (hashgrid_kernels.cpp): plain pointers to
// contiguous float32 arrays, layouts as in hashgrid.cpp. Hidden: not exported from the extension.
#pragma once

#include <cstdint>

namespace sds3d_hashgrid {

// feats (L, F, N) and, if jacs is not null, jacs (L, F, 3, N) of points x (N, 3) in a table (L, T, F)
// with level scales (L,) and layouts (L, 2): (R for a dense level or 0 for a hashed one, rows used).
// T must be a power of two.
__attribute__((visibility("hidden"))) void forward(const float* x, int64_t N, const float* table, int64_t L,
                                                   int64_t T, int64_t F, const float* scales, const int64_t* layout,
                                                   float* feats, float* jacs);

// grad_table (L, T, F), overwritten, from grad_feats (L, F, N) and/or grad_jacs (L, F, 3, N) (either
// may be null: no gradient through that output).
__attribute__((visibility("hidden"))) void backward(const float* x, int64_t N, int64_t L, int64_t T, int64_t F,
                                                    const float* scales, const int64_t* layout,
                                                    const float* grad_feats, const float* grad_jacs,
                                                    float* grad_table);

// Threads an OpenMP region would use now (0: built without OpenMP).
__attribute__((visibility("hidden"))) int openmp_threads();

}  // namespace sds3d_hashgrid
