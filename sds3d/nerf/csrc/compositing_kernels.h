// Entry points of the fused CPU compositor (compositing_kernels.cpp): plain pointers to contiguous
// float32 arrays. Hidden: not exported from the extension.
//
// The function is sds3d.nerf.render.render_rays' compositing (nerfacc's render_weight_from_density
// and accumulate_along_rays, the shading and the per-ray sums after them), on the kept samples in
// the sampler's order: ray r's samples are offsets[r] .. offsets[r + 1] - 1, in order along the ray.
// Per sample i of a ray (delta = t_end - t_start):
//   w_i = T_i (1 - exp(-sigma_i delta_i)),  T_i = exp(-sum_{j<i} sigma_j delta_j)   (Max 1995, eq. 5)
//   c_i = albedo_i                                         shading ALBEDO
//   c_i = base_i (ambient + (1 - ambient) max(0, n_i . l))  LAMBERTIAN (base = albedo) or TEXTURELESS (1)
// Per ray (sums over its samples; zero for a ray without samples):
//   rgb = sum w c, opacity O = sum w, depth D = sum w t, albedo = sum w a,
//   z_variance = sum w (t - m)^2 with m = D / max(O, 1e-6)  (HiFA's depth variance),
//   normal = sum w n, backfacing = sum w max(0, n . d)^2 (w not differentiated: DreamFusion's
//   orientation penalty moves normals, not opacity).
#pragma once

#include <cstdint>

namespace sds3d_compositing {

enum Shading : int { ALBEDO = 0, LAMBERTIAN = 1, TEXTURELESS = 2 };

struct Samples {
  const int64_t* offsets;  // (R + 1,)
  const float* t_starts;   // (N,)
  const float* t_ends;     // (N,)
  const float* t;          // (N,) the sample's position, the depth it stands for
  const float* density;    // (N,) sigma
  const float* albedo;     // (N, 3)
  const float* normal;     // (N, 3), null without normals (then shading is ALBEDO)
  const float* light;      // (R, 3) unit directions to the light, null unless shading needs it
  const float* dirs;       // (R, 3) ray directions, null without normals
  int64_t R;
  int shading;
  float ambient;
};

struct Outputs {     // all overwritten
  float* rgb;        // (R, 3), without the background
  float* opacity;    // (R,)
  float* depth;      // (R,)
  float* z_variance; // (R,)
  float* albedo;     // (R, 3)
  float* normal;     // (R, 3), null without normals
  float* backfacing; // (R,), null without normals
  float* weights;    // (N,)
};

// Gradients of a loss w.r.t. the outputs; a null one is zero.
struct OutputGrads {
  const float* rgb;         // (R, 3)
  const float* opacity;     // (R,)
  const float* depth;       // (R,)
  const float* z_variance;  // (R,)
  const float* albedo;      // (R, 3)
  const float* normal;      // (R, 3)
  const float* backfacing;  // (R,)
  const float* weights;     // (N,)
};

__attribute__((visibility("hidden"))) void forward(const Samples& s, const Outputs& out);

// The loss's gradients w.r.t. density (N,), albedo (N, 3) and, with normals, normal (N, 3) (null:
// not wanted), from the forward's weights (N,), opacity and depth (R,).
__attribute__((visibility("hidden"))) void backward(const Samples& s, const float* weights, const float* opacity,
                                                    const float* depth, const OutputGrads& g, float* grad_density,
                                                    float* grad_albedo, float* grad_normal);

}  // namespace sds3d_compositing
