// Entry point of the fused CPU ray sampler (sampling_kernels.cpp): plain pointers to contiguous
// arrays. Hidden: not exported from the extension.
//
// The function is sds3d.nerf.render.occupied_samples' torch reference, step for step, in float32
// with the same operations in the same order (the extension is built with -ffp-contract=off):
//   box:       inv = 1 / (|d| < 1e-9 ? 1e-9 : d), t0 = (-box - o) inv, t1 = (box - o) inv,
//              near = max(max_k min(t0, t1), 0), far = min_k max(t0, t1), hit = far > near
//              (a missed ray: far = near)
//   intervals: edge_j = near + (far - near) lin[j], j = 0..S (lin: torch.linspace(0, 1, S + 1))
//   sample:    t_j = edge_j + u_j (edge_{j+1} - edge_j), x_j = o + d t_j
//   kept:      hit and x_j in an occupied cell: c = floor((x + grid) / cell), 0 <= c < res,
//              mask[(c0 res + c1) res + c2]
// Kept samples come out in row-major (ray, sample) order, as torch's nonzero gives them.
#pragma once

#include <cstdint>

namespace sds3d_sampling {

struct Grid {
  const bool* mask;  // (res, res, res) occupancy
  int64_t res;
  float radius;  // the grid covers [-radius, radius]^3
  float cell;    // its cell side, 2 radius / res (as torch casts the Python float)
};

struct Rays {
  const float* origins;  // (R, 3)
  const float* dirs;     // (R, 3)
  const float* u;        // (R, S) offsets in [0, 1) within the intervals; null: 0.5, the midpoints
  const float* lin;      // (S + 1,) torch.linspace(0, 1, S + 1)
  int64_t R, S;
  float box_radius;      // the rays' samples span their chord through [-box_radius, box_radius]^3
};

// Pass 1: keep (R, S), 1 where a sample is kept, and counts (R,) of each ray's kept samples.
__attribute__((visibility("hidden"))) void count_kept(const Rays& rays, const Grid& grid, uint8_t* keep,
                                                      int64_t* counts);

// Pass 2: the kept samples, ray r's from offsets[r] to offsets[r + 1] (offsets (R + 1,): the
// exclusive prefix sums of the counts, then their total N):
// index (N,) (flat r * S + j), t_starts, t_ends, t (N,) and positions (N, 3).
__attribute__((visibility("hidden"))) void write_kept(const Rays& rays, const uint8_t* keep, const int64_t* offsets,
                                                      int64_t* index, float* t_starts, float* t_ends, float* t,
                                                      float* positions);

}  // namespace sds3d_sampling
