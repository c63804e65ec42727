// Fused CPU multiresolution hash grid (Instant-NGP) for sds3d: forward, closed-form Jacobian and
// the backward w.r.t. the table, for both. The function is tiny-cuda-nn's HashGrid (grid.h), with
// the same arithmetic, in the same order, as the pure-torch encoder in sds3d/nerf/encoding.py (see
// that file for the conventions):
//
//   level l has a scale s (float32; tcnn's grid_scale) and R = ceil(s) + 1 vertices per axis; a
//   point x in [0, 1]^3 (clamped) is at pos = x * s + 0.5, its cell is floor(pos) and its offset
//   pos - floor(pos); a level whose R^3 vertices fit its table is dense, corner (X, Y, Z) at row
//   (X + Y R + Z R^2) mod size; the others are hashed, (X * 1) ^ (Y * 2654435761) ^ (Z * 805459861)
//   mod T (T a power of two, so the low bits of the uint32 products are those of the int64 ones);
//   features are the trilinear interpolation of the 8 corners, lerped z, then y, then x.
//
// Layouts (all contiguous):
//   x        (N, 3)        float32 points; gradients w.r.t. them are not computed here
//   table    (L, T, F)     float32, the parameter (a level uses its first `size` rows)
//   scales   (L,)          float32 level scales
//   layout   (L, 2)        int64 (R for a dense level, 0 for a hashed one; size, the rows it uses)
//   feats    (L, F, N)     "planar" (feature-major) output, as the torch encoder's
//   jacs     (L, F, 3, N)  d feats / d x (axis-major within a feature), optional
//
// Parallelism (OpenMP; torch's own libgomp is the one loaded, so torch.set_num_threads applies):
//   forward: level after level (the working set is one level's table slice), the points of a
//   level split between the threads in blocks;
//   backward: over levels, each level owning its table slice, so the scatter needs no atomics.
//   (With more threads than levels, the backward leaves the extra threads idle.)
// Compiled without OpenMP the pragmas are ignored and both run on one thread.
//
// This file: argument checks, allocation and the Python bindings. The kernels are in
// hashgrid_kernels.cpp, mlp_kernels.cpp for the field's MLP that follows the grid,
// sampling_kernels.cpp for the renderer's samples that precede it and compositing_kernels.cpp for
// the compositing after it (no torch headers: the files compile in parallel).

// Lighter than <torch/extension.h> (the whole C++ frontend), which would double the build time.
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include "compositing_kernels.h"
#include "hashgrid_kernels.h"
#include "mlp_kernels.h"
#include "sampling_kernels.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace {

void check_levels(const at::Tensor& scales, const at::Tensor& layout, int64_t L, int64_t T) {
  TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 1 &&
                  scales.size(0) == L && scales.is_contiguous(),
              "hashgrid: scales must be a contiguous float32 (L,) on the CPU");
  TORCH_CHECK(layout.device().is_cpu() && layout.scalar_type() == at::kLong && layout.dim() == 2 &&
                  layout.size(0) == L && layout.size(1) == 2 && layout.is_contiguous(),
              "hashgrid: layout must be a contiguous int64 (L, 2) on the CPU");
  const float* s = scales.data_ptr<float>();
  const int64_t* g = layout.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(s[l] >= 0.f && s[l] <= 16777216.f, "hashgrid: scales must lie in [0, 2^24]");
    const int64_t R = g[2 * l], size = g[2 * l + 1];
    if (R == 0) {
      TORCH_CHECK(size == T, "hashgrid: a hashed level uses the whole table");
    } else {  // dense: R^3 rows fit in size <= T; the corner sum R + R^2 + R^3 < 2 size fits a uint32
      TORCH_CHECK(R > 0 && R <= 2048 && R * R * R <= size && size <= T && size <= (int64_t(1) << 31),
                  "hashgrid: bad dense level layout");
    }
  }
}

void check_table_size(int64_t T) {
  TORCH_CHECK(T > 0 && (T & (T - 1)) == 0 && T <= (int64_t(1) << 32),
              "hashgrid: table size must be a power of two <= 2^32");
}

void check_points(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == 3 &&
                  x.is_contiguous(), "hashgrid: points must be a contiguous float32 (N, 3) on the CPU");
}

// Returns (feats (L, F, N), jacs (L, F, 3, N) or an empty tensor).
std::vector<at::Tensor> hashgrid_forward(const at::Tensor& x, const at::Tensor& table, const at::Tensor& scales,
                                         const at::Tensor& layout, bool with_jacobian) {
  check_points(x);
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.dim() == 3 && table.is_contiguous(),
              "hashgrid: table must be a contiguous float32 (L, T, F) on the CPU");
  check_table_size(table.size(1));
  check_levels(scales, layout, table.size(0), table.size(1));
  const int64_t N = x.size(0), L = table.size(0), F = table.size(2);
  auto opts = table.options();
  at::Tensor feats = at::empty({L, F, N}, opts);
  at::Tensor jacs = with_jacobian ? at::empty({L, F, 3, N}, opts) : at::empty({0}, opts);
  sds3d_hashgrid::forward(x.data_ptr<float>(), N, table.data_ptr<float>(), L, table.size(1), F, scales.data_ptr<float>(),
                          layout.data_ptr<int64_t>(), feats.data_ptr<float>(), with_jacobian ? jacs.data_ptr<float>() : nullptr);
  return {feats, jacs};
}

// Gradient w.r.t. the table (L, T, F) from the gradients of feats (L, F, N) and/or jacs (L, F, 3, N).
at::Tensor hashgrid_backward(const at::Tensor& x, const at::Tensor& scales, const at::Tensor& layout,
                             int64_t table_size, int64_t n_features,
                             const std::optional<at::Tensor>& grad_feats, const std::optional<at::Tensor>& grad_jacs) {
  const int64_t N = x.size(0), L = scales.size(0), T = table_size, F = n_features;
  check_points(x);
  check_table_size(T);
  check_levels(scales, layout, L, T);
  TORCH_CHECK(F > 0, "hashgrid: n_features must be positive");
  const float* gf = nullptr;
  const float* gj = nullptr;
  at::Tensor gfc, gjc;
  if (grad_feats && grad_feats->defined()) {
    gfc = grad_feats->to(at::kFloat).contiguous();
    TORCH_CHECK(gfc.numel() == L * F * N, "hashgrid: grad_feats must be (L, F, N)");
    gf = gfc.data_ptr<float>();
  }
  if (grad_jacs && grad_jacs->defined()) {
    gjc = grad_jacs->to(at::kFloat).contiguous();
    TORCH_CHECK(gjc.numel() == L * F * 3 * N, "hashgrid: grad_jacs must be (L, F, 3, N)");
    gj = gjc.data_ptr<float>();
  }
  at::Tensor grad = at::empty({L, T, F}, x.options());
  sds3d_hashgrid::backward(x.data_ptr<float>(), N, L, T, F, scales.data_ptr<float>(), layout.data_ptr<int64_t>(), gf,
                           gj, grad.data_ptr<float>());
  return grad;
}

void check_float(const at::Tensor& t, int64_t dim0, int64_t dim1, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.size(0) == dim0 &&
                  (dim1 < 0 ? t.dim() == 1 : (t.dim() == 2 && t.size(1) == dim1)),
              "field mlp: ", what, " must be a contiguous float32 tensor on the CPU of the layer's shape");
}

// (D, N) features and (D, 3, N) Jacobians or a 1-d empty tensor (none); checks the weights' shapes against them.
void check_mlp(const at::Tensor& feats, const at::Tensor& jacs, const at::Tensor& w1, const at::Tensor& b1,
               const at::Tensor& w2) {
  TORCH_CHECK(feats.dim() == 2, "field mlp: feats must be (D, N)");
  const int64_t D = feats.size(0), N = feats.size(1), H = w1.size(0);
  TORCH_CHECK(D >= 1 && D <= sds3d_mlp::MAX_FEATURES && H >= 1 && H <= sds3d_mlp::MAX_HIDDEN,
              "field mlp: at most ", sds3d_mlp::MAX_FEATURES, " features and ", sds3d_mlp::MAX_HIDDEN, " hidden units");
  check_float(feats, D, N, "feats");
  check_float(w1, H, D, "w1 (H, D)");
  check_float(b1, H, -1, "b1 (H,)");
  check_float(w2, 4, H, "w2 (4, H)");
  if (jacs.dim() != 1 || jacs.numel() != 0) {  // a 1-d empty tensor: no Jacobians
    TORCH_CHECK(jacs.device().is_cpu() && jacs.scalar_type() == at::kFloat && jacs.is_contiguous() && jacs.dim() == 3 &&
                    jacs.size(0) == D && jacs.size(1) == 3 && jacs.size(2) == N,
                "field mlp: jacs must be a contiguous float32 (D, 3, N) on the CPU");
  }
}

// Returns (out (4, N), grad_u (3, N) or an empty tensor without jacs).
std::vector<at::Tensor> mlp_forward(const at::Tensor& feats, const at::Tensor& jacs, const at::Tensor& w1,
                                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  check_mlp(feats, jacs, w1, b1, w2);
  check_float(b2, 4, -1, "b2 (4,)");
  const int64_t D = feats.size(0), N = feats.size(1), H = w1.size(0);
  const bool normals = jacs.dim() == 3;
  at::Tensor out = at::empty({4, N}, feats.options());
  at::Tensor grad_u = normals ? at::empty({3, N}, feats.options()) : at::empty({0}, feats.options());
  sds3d_mlp::forward(feats.data_ptr<float>(), normals ? jacs.data_ptr<float>() : nullptr, N, D, H, w1.data_ptr<float>(),
                     b1.data_ptr<float>(), w2.data_ptr<float>(), b2.data_ptr<float>(), out.data_ptr<float>(),
                     normals ? grad_u.data_ptr<float>() : nullptr);
  return {out, grad_u};
}

// Returns (grad_feats (D, N), grad_jacs (D, 3, N) or empty, grad_w1, grad_b1, grad_w2, grad_b2).
std::vector<at::Tensor> mlp_backward(const at::Tensor& feats, const at::Tensor& jacs, const at::Tensor& w1,
                                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& grad_out,
                                     const std::optional<at::Tensor>& grad_grad_u) {
  check_mlp(feats, jacs, w1, b1, w2);
  const int64_t D = feats.size(0), N = feats.size(1), H = w1.size(0);
  at::Tensor gout = grad_out.to(at::kFloat).contiguous();
  TORCH_CHECK(gout.dim() == 2 && gout.size(0) == 4 && gout.size(1) == N, "field mlp: grad_out must be (4, N)");
  const bool normals = jacs.dim() == 3 && grad_grad_u && grad_grad_u->defined();
  at::Tensor ggu;
  if (normals) {
    ggu = grad_grad_u->to(at::kFloat).contiguous();
    TORCH_CHECK(ggu.dim() == 2 && ggu.size(0) == 3 && ggu.size(1) == N, "field mlp: grad_grad_u must be (3, N)");
  }
  auto opts = feats.options();
  at::Tensor grad_feats = at::empty({D, N}, opts);
  at::Tensor grad_jacs = normals ? at::empty({D, 3, N}, opts) : at::empty({0}, opts);
  at::Tensor grad_w1 = at::empty({H, D}, opts), grad_b1 = at::empty({H}, opts);
  at::Tensor grad_w2 = at::empty({4, H}, opts), grad_b2 = at::empty({4}, opts);
  sds3d_mlp::backward(feats.data_ptr<float>(), normals ? jacs.data_ptr<float>() : nullptr, N, D, H,
                      w1.data_ptr<float>(), b1.data_ptr<float>(), w2.data_ptr<float>(), gout.data_ptr<float>(),
                      normals ? ggu.data_ptr<float>() : nullptr, grad_feats.data_ptr<float>(),
                      normals ? grad_jacs.data_ptr<float>() : nullptr, grad_w1.data_ptr<float>(),
                      grad_b1.data_ptr<float>(), grad_w2.data_ptr<float>(), grad_b2.data_ptr<float>());
  return {grad_feats, grad_jacs, grad_w1, grad_b1, grad_w2, grad_b2};
}

bool is_cpu_float(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

// Returns (index (N,) int64, t_starts, t_ends, t (N,), positions (N, 3)): see sampling_kernels.h.
std::vector<at::Tensor> occupied_samples(const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& u,
                                         const at::Tensor& lin, double box_radius, const at::Tensor& mask,
                                         double grid_radius, double cell_size) {
  TORCH_CHECK(is_cpu_float(origins) && is_cpu_float(dirs) && origins.dim() == 2 && origins.size(1) == 3 &&
                  dirs.sizes() == origins.sizes(),
              "occupied_samples: origins and dirs must be contiguous float32 (R, 3) on the CPU");
  TORCH_CHECK(is_cpu_float(lin) && lin.dim() == 1 && lin.size(0) >= 2,
              "occupied_samples: lin must be a contiguous float32 (S + 1,) with S >= 1");
  const int64_t R = origins.size(0), S = lin.size(0) - 1;
  const bool midpoints = u.dim() == 1 && u.numel() == 0;  // a 1-d empty tensor: the intervals' midpoints
  TORCH_CHECK(midpoints || (is_cpu_float(u) && u.dim() == 2 && u.size(0) == R && u.size(1) == S),
              "occupied_samples: u must be a contiguous float32 (R, S) or empty");
  TORCH_CHECK(mask.device().is_cpu() && mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 3 &&
                  mask.size(0) == mask.size(1) && mask.size(1) == mask.size(2) && mask.size(0) >= 1,
              "occupied_samples: mask must be a contiguous bool (res, res, res) on the CPU");
  TORCH_CHECK(mask.size(0) <= 1290, "occupied_samples: at most 1290 cells a side (int32 cell indices)");
  const sds3d_sampling::Rays rays{origins.data_ptr<float>(), dirs.data_ptr<float>(),
                                  midpoints ? nullptr : u.data_ptr<float>(), lin.data_ptr<float>(), R, S,
                                  float(box_radius)};
  const sds3d_sampling::Grid grid{mask.data_ptr<bool>(), mask.size(0), float(grid_radius), float(cell_size)};
  at::Tensor offsets = at::empty({R + 1}, origins.options().dtype(at::kLong));
  at::Tensor keep = at::empty({R, S}, origins.options().dtype(at::kByte));
  int64_t* off = offsets.data_ptr<int64_t>();
  sds3d_sampling::count_kept(rays, grid, keep.data_ptr<uint8_t>(), off);
  int64_t N = 0;
  for (int64_t r = 0; r < R; ++r) {  // counts -> exclusive prefix sums
    const int64_t count = off[r];
    off[r] = N;
    N += count;
  }
  off[R] = N;
  auto opts = origins.options();
  at::Tensor index = at::empty({N}, opts.dtype(at::kLong));
  at::Tensor t_starts = at::empty({N}, opts), t_ends = at::empty({N}, opts), t = at::empty({N}, opts);
  at::Tensor positions = at::empty({N, 3}, opts);
  sds3d_sampling::write_kept(rays, keep.data_ptr<uint8_t>(), off, index.data_ptr<int64_t>(), t_starts.data_ptr<float>(),
                             t_ends.data_ptr<float>(), t.data_ptr<float>(), positions.data_ptr<float>());
  return {index, t_starts, t_ends, t, positions};
}

// The compositor's inputs, checked, as the kernels' Samples (pointing into the tensors).
struct CompositeInputs {
  at::Tensor offsets;
  sds3d_compositing::Samples samples;
};

void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(is_cpu_float(t) && t.numel() == rows * cols && (t.dim() == 1 || (t.dim() == 2 && t.size(1) == cols)),
              "composite: ", what, " must be contiguous float32 on the CPU, ", rows, " x ", cols);
}

CompositeInputs composite_inputs(const at::Tensor& offsets, const at::Tensor& t_starts, const at::Tensor& t_ends,
                                 const at::Tensor& t, const at::Tensor& density, const at::Tensor& albedo,
                                 const at::Tensor& normal, const at::Tensor& light, const at::Tensor& dirs,
                                 int64_t shading, double ambient) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.size(0) >= 1 && offsets.is_contiguous(),
              "composite: offsets must be a contiguous int64 (R + 1,) on the CPU");
  const int64_t R = offsets.size(0) - 1, N = density.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)  // the kernels read samples offsets[r] .. offsets[r + 1] - 1 of every ray
    TORCH_CHECK(off[r] <= off[r + 1], "composite: offsets must not decrease (ray_offsets gives them)");
  TORCH_CHECK(off[0] == 0 && off[R] == N, "composite: offsets must run from 0 to the number of samples");
  check_rows(t_starts, N, 1, "t_starts");
  check_rows(t_ends, N, 1, "t_ends");
  check_rows(t, N, 1, "t");
  check_rows(density, N, 1, "density");
  check_rows(albedo, N, 3, "albedo");
  TORCH_CHECK(shading >= sds3d_compositing::ALBEDO && shading <= sds3d_compositing::TEXTURELESS,
              "composite: shading must be 0 (albedo), 1 (lambertian) or 2 (textureless)");
  const bool normals = normal.dim() != 1;  // a 1-d empty tensor: none
  TORCH_CHECK(normals || shading == sds3d_compositing::ALBEDO, "composite: shading needs normals");
  if (normals) {
    check_rows(normal, N, 3, "normal");
    check_rows(dirs, R, 3, "dirs");
  }
  if (shading != sds3d_compositing::ALBEDO) check_rows(light, R, 3, "light");
  const sds3d_compositing::Samples samples{offsets.data_ptr<int64_t>(), t_starts.data_ptr<float>(),
                                           t_ends.data_ptr<float>(), t.data_ptr<float>(), density.data_ptr<float>(),
                                           albedo.data_ptr<float>(), normals ? normal.data_ptr<float>() : nullptr,
                                           shading != sds3d_compositing::ALBEDO ? light.data_ptr<float>() : nullptr,
                                           normals ? dirs.data_ptr<float>() : nullptr, R, int(shading),
                                           float(ambient)};
  return {offsets, samples};
}

// Ray offsets (R + 1,) of kept samples with flat indices `index` (N,) in a dense (R, S) layout:
// ray r's samples are offsets[r] .. offsets[r + 1] - 1. The indices must ascend (the sampler's order).
at::Tensor ray_offsets(const at::Tensor& index, int64_t num_samples, int64_t n_rays) {
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "ray_offsets: index must be a contiguous int64 (N,) on the CPU");
  TORCH_CHECK(num_samples >= 1 && n_rays >= 0, "ray_offsets: num_samples must be >= 1 and n_rays >= 0");
  at::Tensor offsets = at::empty({n_rays + 1}, index.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* idx = index.data_ptr<int64_t>();
  const int64_t N = index.size(0);
  int64_t i = 0;
  for (int64_t r = 0; r <= n_rays; ++r) {
    off[r] = i;
    const int64_t end = (r + 1) * num_samples;  // ray r's flat indices are below this
    while (i < N && idx[i] < end && r < n_rays) {
      TORCH_CHECK(idx[i] >= r * num_samples && (i == 0 || idx[i] > idx[i - 1]),
                  "ray_offsets: index must ascend strictly within [0, n_rays * num_samples)");
      ++i;
    }
  }
  TORCH_CHECK(i == N, "ray_offsets: index must ascend strictly within [0, n_rays * num_samples)");
  return offsets;
}

// Returns (rgb (R, 3) without the background, opacity, depth, z_variance (R,), albedo (R, 3),
// normal (R, 3) and backfacing (R,) or empty, weights (N,)): see compositing_kernels.h.
std::vector<at::Tensor> composite_forward(const at::Tensor& offsets, const at::Tensor& t_starts,
                                          const at::Tensor& t_ends, const at::Tensor& t, const at::Tensor& density,
                                          const at::Tensor& albedo, const at::Tensor& normal, const at::Tensor& light,
                                          const at::Tensor& dirs, int64_t shading, double ambient) {
  const CompositeInputs in = composite_inputs(offsets, t_starts, t_ends, t, density, albedo, normal, light, dirs,
                                              shading, ambient);
  const int64_t R = in.samples.R, N = density.numel();
  const bool normals = in.samples.normal != nullptr;
  auto opts = density.options();
  at::Tensor rgb = at::empty({R, 3}, opts), opacity = at::empty({R}, opts), depth = at::empty({R}, opts);
  at::Tensor z_variance = at::empty({R}, opts), albedo_sum = at::empty({R, 3}, opts), weights = at::empty({N}, opts);
  at::Tensor normal_sum = at::empty({normals ? R : 0, 3}, opts), backfacing = at::empty({normals ? R : 0}, opts);
  const sds3d_compositing::Outputs out{rgb.data_ptr<float>(), opacity.data_ptr<float>(), depth.data_ptr<float>(),
                                       z_variance.data_ptr<float>(), albedo_sum.data_ptr<float>(),
                                       normals ? normal_sum.data_ptr<float>() : nullptr,
                                       normals ? backfacing.data_ptr<float>() : nullptr, weights.data_ptr<float>()};
  sds3d_compositing::forward(in.samples, out);
  return {rgb, opacity, depth, z_variance, albedo_sum, normal_sum, backfacing, weights};
}

// Returns (grad_density (N,), grad_albedo (N, 3), grad_normal (N, 3) or empty) from the outputs'
// gradients (each optional) and the forward's weights, opacity and depth.
std::vector<at::Tensor> composite_backward(
    const at::Tensor& offsets, const at::Tensor& t_starts, const at::Tensor& t_ends, const at::Tensor& t,
    const at::Tensor& density, const at::Tensor& albedo, const at::Tensor& normal, const at::Tensor& light,
    const at::Tensor& dirs, int64_t shading, double ambient, const at::Tensor& weights, const at::Tensor& opacity,
    const at::Tensor& depth, const std::optional<at::Tensor>& grad_rgb, const std::optional<at::Tensor>& grad_opacity,
    const std::optional<at::Tensor>& grad_depth, const std::optional<at::Tensor>& grad_z_variance,
    const std::optional<at::Tensor>& grad_albedo, const std::optional<at::Tensor>& grad_normal,
    const std::optional<at::Tensor>& grad_backfacing, const std::optional<at::Tensor>& grad_weights) {
  const CompositeInputs in = composite_inputs(offsets, t_starts, t_ends, t, density, albedo, normal, light, dirs,
                                              shading, ambient);
  const int64_t R = in.samples.R, N = density.numel();
  const bool normals = in.samples.normal != nullptr;
  check_rows(weights, N, 1, "weights");
  check_rows(opacity, R, 1, "opacity");
  check_rows(depth, R, 1, "depth");
  std::vector<at::Tensor> keep;  // the contiguous float32 copies the pointers below point into
  auto grad = [&](const std::optional<at::Tensor>& g, int64_t rows, int64_t cols, const char* what) -> const float* {
    if (!g || !g->defined()) return nullptr;
    keep.push_back(g->to(at::kFloat).contiguous());
    check_rows(keep.back(), rows, cols, what);
    return keep.back().data_ptr<float>();
  };
  const sds3d_compositing::OutputGrads g{grad(grad_rgb, R, 3, "grad_rgb"),
                                         grad(grad_opacity, R, 1, "grad_opacity"),
                                         grad(grad_depth, R, 1, "grad_depth"),
                                         grad(grad_z_variance, R, 1, "grad_z_variance"),
                                         grad(grad_albedo, R, 3, "grad_albedo"),
                                         normals ? grad(grad_normal, R, 3, "grad_normal") : nullptr,
                                         normals ? grad(grad_backfacing, R, 1, "grad_backfacing") : nullptr,
                                         grad(grad_weights, N, 1, "grad_weights")};
  auto opts = density.options();
  at::Tensor grad_density = at::empty({N}, opts), grad_albedo_out = at::empty({N, 3}, opts);
  at::Tensor grad_normal_out = at::empty({normals ? N : 0, 3}, opts);
  sds3d_compositing::backward(in.samples, weights.data_ptr<float>(), opacity.data_ptr<float>(),
                              depth.data_ptr<float>(), g, grad_density.data_ptr<float>(),
                              grad_albedo_out.data_ptr<float>(), normals ? grad_normal_out.data_ptr<float>() : nullptr);
  return {grad_density, grad_albedo_out, grad_normal_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sds3d fused CPU hash grid (forward, Jacobian, table backward), field MLP, ray sampler and compositor";
  m.def("forward", &hashgrid_forward, "features (L, F, N) and Jacobian (L, F, 3, N)", py::arg("x"), py::arg("table"),
        py::arg("scales"), py::arg("layout"), py::arg("with_jacobian"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &hashgrid_backward, "table gradient (L, T, F)", py::arg("x"), py::arg("scales"),
        py::arg("layout"), py::arg("table_size"), py::arg("n_features"), py::arg("grad_feats"), py::arg("grad_jacs"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp_forward", &mlp_forward, "the field MLP's logits (4, N) and density-logit gradient (3, N)",
        py::arg("feats"), py::arg("jacs"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp_backward", &mlp_backward, "the field MLP's input and weight gradients", py::arg("feats"),
        py::arg("jacs"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("grad_out"), py::arg("grad_grad_u"),
        py::call_guard<py::gil_scoped_release>());
  m.def("occupied_samples", &occupied_samples, "stratified samples of rays kept by an occupancy grid",
        py::arg("origins"), py::arg("dirs"), py::arg("u"), py::arg("lin"), py::arg("box_radius"), py::arg("mask"),
        py::arg("grid_radius"), py::arg("cell_size"), py::call_guard<py::gil_scoped_release>());
  m.def("ray_offsets", &ray_offsets, "ray offsets (R + 1,) of kept samples' ascending flat indices", py::arg("index"),
        py::arg("num_samples"), py::arg("n_rays"), py::call_guard<py::gil_scoped_release>());
  m.def("composite_forward", &composite_forward, "per-ray composites of kept samples", py::arg("offsets"),
        py::arg("t_starts"), py::arg("t_ends"), py::arg("t"), py::arg("density"), py::arg("albedo"),
        py::arg("normal"), py::arg("light"), py::arg("dirs"), py::arg("shading"), py::arg("ambient"),
        py::call_guard<py::gil_scoped_release>());
  m.def("composite_backward", &composite_backward, "the composites' gradients w.r.t. density, albedo and normals",
        py::arg("offsets"), py::arg("t_starts"), py::arg("t_ends"), py::arg("t"), py::arg("density"),
        py::arg("albedo"), py::arg("normal"), py::arg("light"), py::arg("dirs"), py::arg("shading"),
        py::arg("ambient"), py::arg("weights"), py::arg("opacity"), py::arg("depth"), py::arg("grad_rgb"),
        py::arg("grad_opacity"), py::arg("grad_depth"), py::arg("grad_z_variance"), py::arg("grad_albedo"),
        py::arg("grad_normal"), py::arg("grad_backfacing"), py::arg("grad_weights"),
        py::call_guard<py::gil_scoped_release>());
  m.attr("mlp_max_features") = sds3d_mlp::MAX_FEATURES;  // supports_mlp's bounds, from the kernels' header
  m.attr("mlp_max_hidden") = sds3d_mlp::MAX_HIDDEN;
  m.def("openmp_threads", &sds3d_hashgrid::openmp_threads,
        "threads an OpenMP region would use (0: built without OpenMP)");
}
