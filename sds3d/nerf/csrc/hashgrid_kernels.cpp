// Kernels of the fused CPU hash grid: see hashgrid.cpp for the layouts and conventions and
// hashgrid_kernels.h for the entry points. Plain C++ and OpenMP, no torch headers: this file
// compiles in a few seconds, in parallel with the bindings.

#include "hashgrid_kernels.h"
#include "clones.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace sds3d_hashgrid {
namespace {  // internal linkage: nothing of this leaks out of the extension

constexpr uint32_t PRIME_Y = 2654435761u;
constexpr uint32_t PRIME_Z = 805459861u;
constexpr int64_t CHUNK = 64;   // points per inner pass (their indices and offsets stay in L1)
constexpr int64_t BLOCK = 512;  // points per forward work item (writes 2 KiB per output plane)


// The kernels work on chunks of CHUNK points in passes that auto-vectorize: offsets and corner
// indices (`locate`), then per feature the interpolation with its 8 loads (emulated gathers) in the
// forward, or the corner gradients followed by a serial scatter in the backward.
struct Chunk {
  uint32_t idx[8][CHUNK];  // table row of corner (cx, cy, cz) at [cx * 4 + cy * 2 + cz]
  float fx[CHUNK], fy[CHUNK], fz[CHUNK];
};

// One level's geometry (tiny-cuda-nn's grid.h): pos = x * scale + 0.5, cell = floor(pos); a dense
// level (dense_res > 0) indexes corner (X, Y, Z) as (X + Y R + Z R^2) mod size, a hashed one as
// (X * 1) ^ (Y * 2654435761) ^ (Z * 805459861) mod T (mask = T - 1, T a power of two).
struct Level {
  float scale;
  uint32_t dense_res;  // R for a dense level, 0 for a hashed one
  uint32_t size;       // rows the level uses: min(next_multiple(R^3, 8), T)
  uint32_t mask;       // T - 1
};

// Offsets and corner indices of points x[0 .. m) (m <= CHUNK) at one level.
// Clamped to [0, 1] as torch.clamp (NaN stays NaN); pos = v * scale + 0.5 >= 0.5, so the cell
// floor(pos) is the truncation; a NaN coordinate gets cell 0 (a row inside the table) and a NaN
// offset, hence NaN outputs, as in the torch encoder. The multiply and the add round separately
// (-ffp-contract=off), as torch's ops do; tiny-cuda-nn fuses them (fmaf): at most one float32
// rounding of pos apart.
SDS3D_INLINE void locate(const float* __restrict x, int64_t m, const Level& lv, Chunk& ck) {
  uint32_t cell[3][CHUNK];
  float* __restrict frac[3] = {ck.fx, ck.fy, ck.fz};
  const float scale = lv.scale;
  for (int a = 0; a < 3; ++a) {
    float* __restrict fa = frac[a];
    uint32_t* __restrict ca = cell[a];
    for (int64_t i = 0; i < m; ++i) {
      float v = x[3 * i + a];
      v = v < 0.f ? 0.f : v;
      v = v > 1.f ? 1.f : v;
      const float s = v * scale + 0.5f;
      const int32_t c = static_cast<int32_t>(s == s ? s : 0.f);
      fa[i] = s - static_cast<float>(c);
      ca[i] = static_cast<uint32_t>(c);
    }
  }
  if (lv.dense_res > 0) {
    // Corner coordinates are at most R (the +0.5 offset reaches one vertex beyond the grid, which
    // wraps as in tiny-cuda-nn), so X + Y R + Z R^2 <= R + R^2 + R^3 < 2 size: one conditional
    // subtraction is the modulo.
    const uint32_t R = lv.dense_res, R2 = R * R, size = lv.size;
    for (int64_t i = 0; i < m; ++i) {
      const uint32_t hx0 = cell[0][i], hy0 = cell[1][i] * R, hz0 = cell[2][i] * R2;
      const uint32_t hx[2] = {hx0, hx0 + 1u};
      const uint32_t hy[2] = {hy0, hy0 + R};
      const uint32_t hz[2] = {hz0, hz0 + R2};
      for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b)
          for (int c = 0; c < 2; ++c) {
            const uint32_t j = hx[a] + hy[b] + hz[c];
            ck.idx[a * 4 + b * 2 + c][i] = j >= size ? j - size : j;
          }
    }
    return;
  }
  const uint32_t mask = lv.mask;
  for (int64_t i = 0; i < m; ++i) {
    // The low bits of the uint32 products are those of the torch encoder's int64 ones.
    const uint32_t hx0 = cell[0][i], hy0 = cell[1][i] * PRIME_Y, hz0 = cell[2][i] * PRIME_Z;
    const uint32_t hx[2] = {hx0 & mask, (hx0 + 1u) & mask};
    const uint32_t hy[2] = {hy0 & mask, (hy0 + PRIME_Y) & mask};
    const uint32_t hz[2] = {hz0 & mask, (hz0 + PRIME_Z) & mask};
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        for (int c = 0; c < 2; ++c) ck.idx[a * 4 + b * 2 + c][i] = hx[a] ^ hy[b] ^ hz[c];
  }
}

// Forward of one level for points [begin, end): feats (F, N) and, if JAC, jacs (F, 3, N) of the
// level. FT > 0: F known at compile time; FT == 0: F = F_rt.
template <int FT, bool JAC>
SDS3D_INLINE void forward_level_impl(const float* __restrict x, const float* __restrict tab, const Level& lv,
                                     int64_t F_rt, int64_t N, int64_t begin, int64_t end,
                                     float* __restrict feats, float* __restrict jacs) {
  const int64_t F = FT > 0 ? FT : F_rt;
  const float res = lv.scale;  // d pos / d x
  Chunk ck;
  for (int64_t n0 = begin; n0 < end; n0 += CHUNK) {
    const int64_t m = std::min(CHUNK, end - n0);
    locate(x + 3 * n0, m, lv, ck);
    for (int64_t f = 0; f < F; ++f) {
      const float* __restrict tf = tab + f;
      float* __restrict out = feats + f * N + n0;
      float* __restrict jx = JAC ? jacs + f * 3 * N + n0 : nullptr;
      for (int64_t i = 0; i < m; ++i) {
        float g[8];
        for (int c = 0; c < 8; ++c) g[c] = tf[static_cast<int64_t>(ck.idx[c][i]) * F];
        // z, then y, then x: the order (and the operations) of encoding.interpolate_corners.
        const float fx = ck.fx[i], fy = ck.fy[i], fz = ck.fz[i];
        const float dz0 = g[1] - g[0], dz1 = g[3] - g[2], dz2 = g[5] - g[4], dz3 = g[7] - g[6];
        const float gz0 = g[0] + fz * dz0, gz1 = g[2] + fz * dz1, gz2 = g[4] + fz * dz2, gz3 = g[6] + fz * dz3;
        const float dy0 = gz1 - gz0, dy1 = gz3 - gz2;
        const float gy0 = gz0 + fy * dy0, gy1 = gz2 + fy * dy1;
        const float dx = gy1 - gy0;
        out[i] = gy0 + fx * dx;
        if (JAC) {
          const float dzy0 = dz0 + fy * (dz1 - dz0);
          const float dzy1 = dz2 + fy * (dz3 - dz2);
          jx[i] = dx * res;
          jx[N + i] = (dy0 + fx * (dy1 - dy0)) * res;
          jx[2 * N + i] = (dzy0 + fx * (dzy1 - dzy0)) * res;
        }
      }
    }
  }
}

// Backward of one level over all N points: the adjoint of the forward (encoding.corner_gradients,
// the same operations), from gfeat (F, N) and/or gjac (F, 3, N), added into the level's (T, F)
// gradient slice, which the calling thread owns.
template <int FT, bool GV, bool GJ>
SDS3D_INLINE void backward_level_impl(const float* __restrict x, const Level& lv, int64_t F_rt,
                                      int64_t N, const float* __restrict gfeat, const float* __restrict gjac,
                                      float* __restrict grad) {
  const int64_t F = FT > 0 ? FT : F_rt;
  const float res = lv.scale;  // d pos / d x
  constexpr int GF = FT > 0 ? FT : 1;  // features scattered together (one visit per row)
  Chunk ck;
  float g[GF][8][CHUNK];
  for (int64_t n0 = 0; n0 < N; n0 += CHUNK) {
    const int64_t m = std::min(CHUNK, N - n0);
    locate(x + 3 * n0, m, lv, ck);
    for (int64_t f0 = 0; f0 < F; f0 += GF) {
      for (int q = 0; q < GF; ++q) {
        const int64_t f = f0 + q;
        const float* __restrict gv = GV ? gfeat + f * N + n0 : nullptr;
        const float* __restrict gj = GJ ? gjac + f * 3 * N + n0 : nullptr;
        float(&gq)[8][CHUNK] = g[q];
        for (int64_t i = 0; i < m; ++i) {
          const float wx0 = 1.f - ck.fx[i], wx1 = ck.fx[i];
          const float wy0 = 1.f - ck.fy[i], wy1 = ck.fy[i];
          const float wz0 = 1.f - ck.fz[i], wz1 = ck.fz[i];
          float a0 = 0.f, a1 = 0.f;
          if (GV) {
            a0 = wx0 * gv[i];
            a1 = wx1 * gv[i];
          }
          if (GJ) {
            const float gx = res * gj[i];
            a0 = a0 + (-gx);
            a1 = a1 + gx;
            const float gjy = gj[N + i];
            const float c0 = res * wx0 * gjy, c1 = res * wx1 * gjy;
            const float b00 = a0 * wy0 - c0, b01 = a0 * wy1 + c0;
            const float b10 = a1 * wy0 - c1, b11 = a1 * wy1 + c1;
            const float gjz = gj[2 * N + i];
            const float d00 = res * (wx0 * wy0) * gjz, d01 = res * (wx0 * wy1) * gjz;
            const float d10 = res * (wx1 * wy0) * gjz, d11 = res * (wx1 * wy1) * gjz;
            gq[0][i] = b00 * wz0 - d00;
            gq[1][i] = b00 * wz1 + d00;
            gq[2][i] = b01 * wz0 - d01;
            gq[3][i] = b01 * wz1 + d01;
            gq[4][i] = b10 * wz0 - d10;
            gq[5][i] = b10 * wz1 + d10;
            gq[6][i] = b11 * wz0 - d11;
            gq[7][i] = b11 * wz1 + d11;
          } else {
            const float b00 = a0 * wy0, b01 = a0 * wy1, b10 = a1 * wy0, b11 = a1 * wy1;
            gq[0][i] = b00 * wz0;
            gq[1][i] = b00 * wz1;
            gq[2][i] = b01 * wz0;
            gq[3][i] = b01 * wz1;
            gq[4][i] = b10 * wz0;
            gq[5][i] = b10 * wz1;
            gq[6][i] = b11 * wz0;
            gq[7][i] = b11 * wz1;
          }
        }
      }
      // Serial: corners of different points (and of one point) can share a row.
      for (int64_t i = 0; i < m; ++i)
        for (int c = 0; c < 8; ++c) {
          float* row = grad + static_cast<int64_t>(ck.idx[c][i]) * F + f0;
          for (int q = 0; q < GF; ++q) row[q] += g[q][c][i];
        }
    }
  }
}

// Out-of-line entry points, one per variant, each cloned per instruction set.
template <int FT, bool JAC>
SDS3D_CLONES void forward_level(const float* x, const float* tab, const Level& lv, int64_t F_rt,
                                int64_t N, int64_t begin, int64_t end, float* feats, float* jacs) {
  forward_level_impl<FT, JAC>(x, tab, lv, F_rt, N, begin, end, feats, jacs);
}

template <int FT, bool GV, bool GJ>
SDS3D_CLONES void backward_level(const float* x, const Level& lv, int64_t F_rt, int64_t N,
                                 const float* gfeat, const float* gjac, float* grad) {
  backward_level_impl<FT, GV, GJ>(x, lv, F_rt, N, gfeat, gjac, grad);
}

Level level_of(int64_t l, int64_t T, const float* scales, const int64_t* layout) {
  return Level{scales[l], static_cast<uint32_t>(layout[2 * l]), static_cast<uint32_t>(layout[2 * l + 1]),
               static_cast<uint32_t>(T - 1)};
}

template <int FT>
void forward_impl(const float* xp, int64_t N, const float* tp, int64_t L, int64_t T, int64_t F, const float* sp,
                  const int64_t* lp, float* fp, float* jp) {
  const int64_t n_blocks = (N + BLOCK - 1) / BLOCK;
  // Level by level (all threads on one level's table at a time: a working set of one level's
  // slice instead of the whole table), points split between the threads, the same block of
  // points to the same thread on every level (its points stay in its cache).
#pragma omp parallel if (n_blocks > 1)
  for (int64_t l = 0; l < L; ++l) {
    const Level lv = level_of(l, T, sp, lp);
    const float* tab = tp + l * T * F;
    float* fl = fp + l * F * N;
    float* jl = jp ? jp + l * F * 3 * N : nullptr;
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      const int64_t begin = blk * BLOCK, end = std::min(N, begin + BLOCK);
      if (jl)
        forward_level<FT, true>(xp, tab, lv, F, N, begin, end, fl, jl);
      else
        forward_level<FT, false>(xp, tab, lv, F, N, begin, end, fl, nullptr);
    }
  }
}

template <int FT>
void backward_impl(const float* xp, int64_t N, int64_t L, int64_t T, int64_t F, const float* sp, const int64_t* lp,
                   const float* gf, const float* gj, float* gp) {
  // Dynamic: fine levels (cache misses) cost more than coarse ones. The zeroing happens here too,
  // by the thread that then scatters into the slice.
#pragma omp parallel for schedule(dynamic, 1) if (L > 1)
  for (int64_t l = 0; l < L; ++l) {
    const Level lv = level_of(l, T, sp, lp);
    float* g = gp + l * T * F;
    std::memset(g, 0, sizeof(float) * T * F);
    const float* gfl = gf ? gf + l * F * N : nullptr;
    const float* gjl = gj ? gj + l * F * 3 * N : nullptr;
    if (gfl && gjl)
      backward_level<FT, true, true>(xp, lv, F, N, gfl, gjl, g);
    else if (gfl)
      backward_level<FT, true, false>(xp, lv, F, N, gfl, nullptr, g);
    else if (gjl)
      backward_level<FT, false, true>(xp, lv, F, N, nullptr, gjl, g);
  }
}

}  // namespace

void forward(const float* x, int64_t N, const float* table, int64_t L, int64_t T, int64_t F, const float* scales,
             const int64_t* layout, float* feats, float* jacs) {
  if (N <= 0 || L <= 0 || F <= 0) return;
  if (F == 2)
    forward_impl<2>(x, N, table, L, T, F, scales, layout, feats, jacs);
  else
    forward_impl<0>(x, N, table, L, T, F, scales, layout, feats, jacs);
}

void backward(const float* x, int64_t N, int64_t L, int64_t T, int64_t F, const float* scales, const int64_t* layout,
              const float* grad_feats, const float* grad_jacs, float* grad_table) {
  if (L <= 0 || F <= 0) return;
  if (!grad_feats && !grad_jacs) {
    std::memset(grad_table, 0, sizeof(float) * L * T * F);
    return;
  }
  if (F == 2)
    backward_impl<2>(x, N, L, T, F, scales, layout, grad_feats, grad_jacs, grad_table);
  else
    backward_impl<0>(x, N, L, T, F, scales, layout, grad_feats, grad_jacs, grad_table);
}

int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

}  // namespace sds3d_hashgrid
