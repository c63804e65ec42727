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
// hashgrid_kernels.cpp, mlp_kernels.cpp for the field's MLP that follows the grid, and
// sampling_kernels.cpp for the renderer's samples that precede it (no torch headers: the files
// compile in parallel).

// Lighter than <torch/extension.h> (the whole C++ frontend), which would double the build time.
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

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

// Returns (index (N,) int64, t_starts, t_ends, t (N,), positions (N, 3)): see sampling_kernels.h.
std::vector<at::Tensor> occupied_samples(const at::Tensor& origins, const at::Tensor& dirs, const at::Tensor& u,
                                         const at::Tensor& lin, double box_radius, const at::Tensor& mask,
                                         double grid_radius, double cell_size) {
  auto is_cpu_float = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
  };
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sds3d fused CPU hash grid (forward, Jacobian, table backward), field MLP and ray sampler";
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
  m.attr("mlp_max_features") = sds3d_mlp::MAX_FEATURES;  // supports_mlp's bounds, from the kernels' header
  m.attr("mlp_max_hidden") = sds3d_mlp::MAX_HIDDEN;
  m.def("openmp_threads", &sds3d_hashgrid::openmp_threads,
        "threads an OpenMP region would use (0: built without OpenMP)");
}
