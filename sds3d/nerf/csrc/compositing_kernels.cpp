// Kernels of the fused CPU compositor: see compositing_kernels.h for the function and the layouts.
//
// Why by hand: a training step composites ~40k kept samples over ~8k rays. As torch ops (the
// compact (rays, widest ray) gathers, nerfacc's batched weights, the shading, seven per-ray sums,
// the scatters back to every ray, and autograd's backward of each) that is some sixty small ops
// forward and as many backward, ~15 ms of a ~80 ms step, mostly memory traffic and dispatch.
// nerfacc's fused packed kernels are CUDA-only. Here each ray's samples are composited in one pass
// forward and two backward, with the outputs written once.
//
// The forward computes nerfacc's formula in its order: sigma delta, then T from the exclusive
// running sum of sigma delta, w = T (1 - exp(-sigma delta)). The backward is the closed form of the
// same function: with g_i = dL/dw_i (every output's share), w_i = T_i - T_{i+1} gives
//   dL/dsigma_k = delta_k (g_k T_{k+1} - sum_{i>k} g_i w_i),  T_{k+1} = exp(-sum_{j<=k} sigma_j delta_j).
//
// Determinism: each ray is computed alone by one thread, so the results do not depend on the
// threads. Plain C++ and OpenMP, no torch headers (as the other kernels).

#include "compositing_kernels.h"
#include "clones.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sds3d_compositing {
namespace {

constexpr float MIN_OPACITY = 1e-6f;  // depth_variance's clamp of the opacity in m = D / O

SDS3D_INLINE float dot3(const float* a, const float* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

// The shading factor (ambient + (1 - ambient) max(0, n . l)) and whether n . l >= 0 (where torch's
// clamp_min passes its gradient).
SDS3D_INLINE float lambert(const float* n, const float* l, float ambient, bool* lit) {
  const float nl = dot3(n, l);
  *lit = nl >= 0.f;
  return ambient + (1.f - ambient) * (nl > 0.f ? nl : 0.f);
}

// c_i of sample i (3 floats) for the ray's light l; unless the shading is ALBEDO, also its shading
// factor f and whether n . l >= 0 (`lambert`), which the backward reuses.
SDS3D_INLINE void shade(const Samples& s, int64_t i, const float* l, float* c, float* f_out, bool* lit) {
  const float* a = s.albedo + 3 * i;
  if (s.shading == ALBEDO) {
    c[0] = a[0], c[1] = a[1], c[2] = a[2];
    return;
  }
  const float f = lambert(s.normal + 3 * i, l, s.ambient, lit);
  *f_out = f;
  if (s.shading == LAMBERTIAN) {
    c[0] = a[0] * f, c[1] = a[1] * f, c[2] = a[2] * f;
  } else {
    c[0] = c[1] = c[2] = f;
  }
}

SDS3D_CLONES void forward_rays(const Samples& s, const Outputs& out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = s.offsets[r], end = s.offsets[r + 1];
    const float* l = s.light ? s.light + 3 * r : nullptr;
    const float* d = s.dirs ? s.dirs + 3 * r : nullptr;
    float rgb[3] = {0.f, 0.f, 0.f}, alb[3] = {0.f, 0.f, 0.f}, nrm[3] = {0.f, 0.f, 0.f};
    float opacity = 0.f, depth = 0.f, back = 0.f, optical = 0.f;
    for (int64_t i = begin; i < end; ++i) {
      const float sd = s.density[i] * (s.t_ends[i] - s.t_starts[i]);
      const float w = std::exp(-optical) * (1.f - std::exp(-sd));
      optical += sd;
      out.weights[i] = w;
      float c[3], f;
      bool lit;
      shade(s, i, l, c, &f, &lit);
      const float* a = s.albedo + 3 * i;
      for (int k = 0; k < 3; ++k) rgb[k] += w * c[k], alb[k] += w * a[k];
      opacity += w;
      depth += w * s.t[i];
      if (s.normal) {
        const float* n = s.normal + 3 * i;
        for (int k = 0; k < 3; ++k) nrm[k] += w * n[k];
        const float nd = dot3(n, d);
        back += w * (nd > 0.f ? nd * nd : 0.f);
      }
    }
    const float m = depth / std::max(opacity, MIN_OPACITY);
    float zvar = 0.f;
    for (int64_t i = begin; i < end; ++i) {
      const float dt = s.t[i] - m;
      zvar += out.weights[i] * (dt * dt);
    }
    for (int k = 0; k < 3; ++k) out.rgb[3 * r + k] = rgb[k], out.albedo[3 * r + k] = alb[k];
    out.opacity[r] = opacity;
    out.depth[r] = depth;
    out.z_variance[r] = zvar;
    if (out.normal) {
      for (int k = 0; k < 3; ++k) out.normal[3 * r + k] = nrm[k];
      out.backfacing[r] = back;
    }
  }
}

// The three components of a per-ray gradient, or zeros.
SDS3D_INLINE void load3(const float* g, int64_t r, float* v) {
  if (g) {
    v[0] = g[3 * r], v[1] = g[3 * r + 1], v[2] = g[3 * r + 2];
  } else {
    v[0] = v[1] = v[2] = 0.f;
  }
}

SDS3D_CLONES void backward_rays(const Samples& s, const float* weights, const float* opacity, const float* depth,
                                const OutputGrads& g, float* grad_density, float* grad_albedo, float* grad_normal,
                                int64_t r0, int64_t r1, std::vector<float>& t_next) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t begin = s.offsets[r], end = s.offsets[r + 1];
    if (begin == end) continue;
    const float* l = s.light ? s.light + 3 * r : nullptr;
    const float* d = s.dirs ? s.dirs + 3 * r : nullptr;
    float g_rgb[3], g_alb[3], g_nrm[3];
    load3(g.rgb, r, g_rgb);
    load3(g.albedo, r, g_alb);
    load3(g.normal, r, g_nrm);
    float g_opacity = g.opacity ? g.opacity[r] : 0.f;
    float g_depth = g.depth ? g.depth[r] : 0.f;
    const float g_zvar = g.z_variance ? g.z_variance[r] : 0.f;
    const float g_back = g.backfacing ? g.backfacing[r] : 0.f;
    // z_variance = sum w (t - m)^2 with m = D / max(O, eps): dz/dw_i = (t_i - m)^2 + dz/dm dm/dw_i,
    // dz/dm = -2 (D - m O), dm/dD = 1 / max(O, eps), dm/dO = -D / O^2 where O > eps (else 0).
    const float O = opacity[r], D = depth[r];
    const float m = D / std::max(O, MIN_OPACITY);
    if (g_zvar != 0.f) {
      const float g_m = g_zvar * (-2.f * (D - m * O));
      g_depth += g_m / std::max(O, MIN_OPACITY);
      if (O > MIN_OPACITY) g_opacity -= g_m * D / (O * O);
    }
    // T_{k+1} = exp(-sum_{j<=k} sigma_j delta_j), in order along the ray
    t_next.resize(static_cast<size_t>(end - begin));
    float optical = 0.f;
    for (int64_t i = begin; i < end; ++i) {
      optical += s.density[i] * (s.t_ends[i] - s.t_starts[i]);
      t_next[i - begin] = std::exp(-optical);
    }
    float behind = 0.f;  // sum_{i>k} g_i w_i
    for (int64_t i = end - 1; i >= begin; --i) {
      const float w = weights[i];
      const float* a = s.albedo + 3 * i;
      float c[3], f = 0.f;
      bool lit = false;
      shade(s, i, l, c, &f, &lit);
      float gw = dot3(g_rgb, c) + g_opacity + g_depth * s.t[i] + dot3(g_alb, a);
      if (g_zvar != 0.f) {
        const float dt = s.t[i] - m;
        gw += g_zvar * (dt * dt);
      }
      if (g.weights) gw += g.weights[i];
      // the colour's and the albedo sum's gradients
      const float dc[3] = {w * g_rgb[0], w * g_rgb[1], w * g_rgb[2]};
      float da[3] = {w * g_alb[0], w * g_alb[1], w * g_alb[2]};
      float dn[3] = {0.f, 0.f, 0.f};
      if (s.shading == ALBEDO) {
        for (int k = 0; k < 3; ++k) da[k] += dc[k];
      } else {
        float dnl;  // d/d (n . l)
        if (s.shading == LAMBERTIAN) {
          for (int k = 0; k < 3; ++k) da[k] += dc[k] * f;
          dnl = dot3(dc, a);
        } else {
          dnl = dc[0] + dc[1] + dc[2];
        }
        dnl = lit ? dnl * (1.f - s.ambient) : 0.f;
        for (int k = 0; k < 3; ++k) dn[k] += dnl * l[k];
      }
      if (s.normal) {
        const float* n = s.normal + 3 * i;
        gw += dot3(g_nrm, n);
        const float nd = dot3(n, d);
        const float db = nd > 0.f ? g_back * w * 2.f * nd : 0.f;
        for (int k = 0; k < 3; ++k) dn[k] += w * g_nrm[k] + db * d[k];
      }
      const float delta = s.t_ends[i] - s.t_starts[i];
      grad_density[i] = delta * (gw * t_next[i - begin] - behind);
      behind += gw * w;
      if (grad_albedo)
        for (int k = 0; k < 3; ++k) grad_albedo[3 * i + k] = da[k];
      if (grad_normal)
        for (int k = 0; k < 3; ++k) grad_normal[3 * i + k] = dn[k];
    }
  }
}

constexpr int64_t RAYS_PER_ITEM = 256;  // a work item: a fixed range of rays

}  // namespace

void forward(const Samples& s, const Outputs& out) {
  const int64_t items = (s.R + RAYS_PER_ITEM - 1) / RAYS_PER_ITEM;
#pragma omp parallel for schedule(static) if (items > 1)
  for (int64_t it = 0; it < items; ++it)
    forward_rays(s, out, it * RAYS_PER_ITEM, std::min(s.R, (it + 1) * RAYS_PER_ITEM));
}

void backward(const Samples& s, const float* weights, const float* opacity, const float* depth, const OutputGrads& g,
              float* grad_density, float* grad_albedo, float* grad_normal) {
  const int64_t items = (s.R + RAYS_PER_ITEM - 1) / RAYS_PER_ITEM;
#pragma omp parallel if (items > 1)
  {
    std::vector<float> t_next;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it)
      backward_rays(s, weights, opacity, depth, g, grad_density, grad_albedo, grad_normal, it * RAYS_PER_ITEM,
                    std::min(s.R, (it + 1) * RAYS_PER_ITEM), t_next);
  }
}

}  // namespace sds3d_compositing
