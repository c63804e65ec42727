// Kernels of the fused CPU ray sampler: see sampling_kernels.h for the function.
//
// Why by hand: a cpu-fast step renders 2 x 64 x 64 rays with 48 samples each, about 393k samples,
// of which the occupancy grid keeps some 10%. As torch ops the sampler makes a dozen full-size
// passes over them (the box, the intervals, the positions, the cells, the mask look-up, nonzero,
// the gathers), about 11 ms of a 90 ms cpu-fast step on 2 cores. Here the first pass computes each
// sample's cell in registers, vectorized over a ray's samples, and keeps one byte per sample; the
// second computes and writes only the kept samples, each ray's from its offset, so the output's
// order and bits do not depend on the threads.
//
// Plain C++ and OpenMP, no torch headers (as hashgrid_kernels.cpp).

#include "sampling_kernels.h"
#include "clones.h"

#include <algorithm>
#include <cmath>

namespace sds3d_sampling {
namespace {

constexpr int64_t RAYS_PER_TASK = 256;
constexpr int64_t CHUNK = 64;  // samples of a ray computed together (vectorized)

struct Chord {
  float near, span;
  bool hit;
};

// ray_box_intersect of sds3d/geometry/cameras.py for one ray; span = far - near.
SDS3D_INLINE Chord chord(const float* o, const float* d, float radius) {
  float near = -INFINITY, far = INFINITY;
  for (int k = 0; k < 3; ++k) {
    const float dk = std::fabs(d[k]) < 1e-9f ? 1e-9f : d[k];
    const float inv = 1.f / dk;
    const float t0 = (-radius - o[k]) * inv, t1 = (radius - o[k]) * inv;
    near = std::max(near, std::min(t0, t1));
    far = std::min(far, std::max(t0, t1));
  }
  near = std::max(near, 0.f);
  return {near, far - near, far > near};
}

// Sample j of a ray: its interval and t (the torch reference's operations, in its order); both
// passes call it.
SDS3D_INLINE void sample(const Rays& rays, const Chord& c, const float* u, int64_t j, float& start, float& end,
                         float& t) {
  start = c.near + c.span * rays.lin[j];
  end = c.near + c.span * rays.lin[j + 1];
  t = start + (u ? u[j] : 0.5f) * (end - start);
}

// Pass 1 for ray r: keep[j] = 1 where sample j is in an occupied cell; returns their count.
template <bool HAS_U>
SDS3D_INLINE int64_t flag_ray(const Rays& rays, const Grid& g, int64_t r, uint8_t* __restrict keep) {
  const int64_t S = rays.S;
  const float* o = rays.origins + 3 * r;
  const float* d = rays.dirs + 3 * r;
  const float* u = HAS_U ? rays.u + r * S : nullptr;
  const Chord c = chord(o, d, rays.box_radius);
  if (!c.hit) {
    std::fill(keep, keep + S, uint8_t(0));
    return 0;
  }
  const float res = float(g.res);
  const int32_t n = int32_t(g.res);
  int64_t kept = 0;
  int32_t cell[CHUNK];
  for (int64_t j0 = 0; j0 < S; j0 += CHUNK) {
    const int64_t m = std::min(CHUNK, S - j0);
    for (int64_t i = 0; i < m; ++i) {  // no branches: vectorized
      float start, end, t;  // as pass 2 computes them, so that it writes what this pass kept
      sample(rays, c, u, j0 + i, start, end, t);
      const float fx = std::floor((o[0] + d[0] * t + g.radius) / g.cell);
      const float fy = std::floor((o[1] + d[1] * t + g.radius) / g.cell);
      const float fz = std::floor((o[2] + d[2] * t + g.radius) / g.cell);
      const bool inside = fx >= 0.f && fx < res && fy >= 0.f && fy < res && fz >= 0.f && fz < res;
      const int32_t x = int32_t(std::min(std::max(fx, 0.f), res - 1.f));
      const int32_t y = int32_t(std::min(std::max(fy, 0.f), res - 1.f));
      const int32_t z = int32_t(std::min(std::max(fz, 0.f), res - 1.f));
      cell[i] = inside ? (x * n + y) * n + z : -1;
    }
    for (int64_t i = 0; i < m; ++i) {
      const uint8_t k = cell[i] >= 0 && g.mask[cell[i]];
      keep[j0 + i] = k;
      kept += k;
    }
  }
  return kept;
}

}  // namespace

SDS3D_CLONES void count_kept(const Rays& rays, const Grid& grid, uint8_t* keep, int64_t* counts) {
#pragma omp parallel for schedule(static)
  for (int64_t first = 0; first < rays.R; first += RAYS_PER_TASK) {
    const int64_t last = std::min(rays.R, first + RAYS_PER_TASK);
    for (int64_t r = first; r < last; ++r)
      counts[r] = rays.u ? flag_ray<true>(rays, grid, r, keep + r * rays.S)
                         : flag_ray<false>(rays, grid, r, keep + r * rays.S);
  }
}

SDS3D_CLONES void write_kept(const Rays& rays, const uint8_t* keep, const int64_t* offsets, int64_t* index,
                             float* t_starts, float* t_ends, float* t, float* positions) {
  const int64_t S = rays.S;
#pragma omp parallel for schedule(static)
  for (int64_t first = 0; first < rays.R; first += RAYS_PER_TASK) {
    const int64_t last = std::min(rays.R, first + RAYS_PER_TASK);
    for (int64_t r = first; r < last; ++r) {
      if (offsets[r + 1] == offsets[r]) continue;  // nothing kept on this ray
      const float* o = rays.origins + 3 * r;
      const float* d = rays.dirs + 3 * r;
      const Chord c = chord(o, d, rays.box_radius);
      const float* u = rays.u ? rays.u + r * S : nullptr;
      int64_t n = offsets[r];
      for (int64_t j = 0; j < S; ++j) {
        if (!keep[r * S + j]) continue;
        float start, end, tj;
        sample(rays, c, u, j, start, end, tj);
        index[n] = r * S + j;
        t_starts[n] = start;
        t_ends[n] = end;
        t[n] = tj;
        for (int k = 0; k < 3; ++k) positions[3 * n + k] = o[k] + d[k] * tj;
        ++n;
      }
    }
  }
}

}  // namespace sds3d_sampling
