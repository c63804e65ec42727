// Kernels of the fused CPU field MLP: see mlp_kernels.h for the function and the layouts.
//
// Why by hand: the field's MLP runs on some 40k samples a step with 12 inputs, 64 hidden units and
// 4 outputs. As separate torch ops (the GEMMs, ReLU and its mask, the normals' reverse pass, and
// the backward of all of them) every step streams (64, N) activations through memory some twenty
// times, and that traffic, not the arithmetic, is most of the field's time. tiny-cuda-nn's fully
// fused MLP does the same fusion on CUDA; no CPU library does. Here each pass holds P = 64
// points' activations in L1 and vectorizes over the points (the feature-major layout makes every
// inner loop a contiguous one).
//
// Determinism: each point's outputs and input gradients are computed alone, so they do not depend
// on the threads. The weight gradients are sums over all points: each block of BLOCK points (a
// fixed partition of 0..N) sums its points in 8 lanes (point i in lane i mod 8, its passes in
// order), reduces the lanes in a fixed order, and the blocks' sums are added in block order, so
// the bits are the same at any number of threads and on every clone.
//
// Plain C++ and OpenMP, no torch headers (as hashgrid_kernels.cpp).

#include "mlp_kernels.h"
#include "clones.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace sds3d_mlp {
namespace {

constexpr int64_t P = 64;       // points per pass
constexpr int64_t BLOCK = 512;  // points per work item: a fixed partition, the order of the weight gradients' sums
constexpr int64_t O = 4;        // outputs: the density logit and 3 albedo logits


// 8 floats as one value (GCC's vector extension: an AVX register in the AVX2 and AVX-512 clones,
// two SSE ones in the baseline), lane-wise IEEE arithmetic, so the same bits on every clone.
typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t LANES = 8;

SDS3D_INLINE v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

SDS3D_INLINE void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// The sum of a lane accumulator's 8 lanes, in a fixed order.
SDS3D_INLINE float reduce8(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// acc[k][j] += x[k] * y[j] lane-wise over a pass's P points, for TH rows x (stride P) and TD rows y
// (stride P); acc[k][j] is the 8-lane accumulator at acc + (k * cols + j) * LANES. A register tile
// of a GEMM (TH x TD accumulators, TH + TD loads per TH * TD products): the weight gradients are
// (rows x P) (P x cols) products, and one dot per (row, col) would load two vectors per product.
template <int TH, int TD>
SDS3D_INLINE void tile(const float* __restrict x, const float* __restrict y, float* __restrict acc, int64_t cols) {
  v8 a[TH][TD];
  for (int k = 0; k < TH; ++k)
    for (int j = 0; j < TD; ++j) a[k][j] = load8(acc + (k * cols + j) * LANES);
  for (int64_t i = 0; i < P; i += LANES) {
    v8 xv[TH], yv[TD];
    for (int k = 0; k < TH; ++k) xv[k] = load8(x + k * P + i);
    for (int j = 0; j < TD; ++j) yv[j] = load8(y + j * P + i);
    for (int k = 0; k < TH; ++k)
      for (int j = 0; j < TD; ++j) a[k][j] += xv[k] * yv[j];
  }
  for (int k = 0; k < TH; ++k)
    for (int j = 0; j < TD; ++j) store8(acc + (k * cols + j) * LANES, a[k][j]);
}

// acc (rows, cols, LANES) += x (rows, P) y (cols, P)^T lane-wise, in 4 x 3 tiles and their edges.
SDS3D_INLINE void outer_sum(const float* x, int64_t rows, const float* y, int64_t cols, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    int64_t c = 0;
    for (; c + 3 <= cols; c += 3) tile<4, 3>(x + r * P, y + c * P, acc + (r * cols + c) * LANES, cols);
    for (; c < cols; ++c) tile<4, 1>(x + r * P, y + c * P, acc + (r * cols + c) * LANES, cols);
  }
  for (; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) tile<1, 1>(x + r * P, y + c * P, acc + (r * cols + c) * LANES, cols);
}

// acc (rows, LANES) += the rows x (rows, P) summed over their points lane-wise.
SDS3D_INLINE void row_sum(const float* x, int64_t rows, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    v8 a = load8(acc + r * LANES);
    for (int64_t i = 0; i < P; i += LANES) a += load8(x + r * P + i);
    store8(acc + r * LANES, a);
  }
}

struct Shape {
  int64_t N, D, H;
};

// One thread's pass buffers, (rows, P) each; points past the end of the data are zeros.
struct Scratch {
  std::vector<float> f, j, act, mask, gf, dgf, dout, dgu, dpre, row;
  // the backward's weight gradients over a block, lane-wise (LANES floats each):
  // dpre f^T (H, D), mask dgf^T (H, D), dout act^T (O, H), dpre's sum (H), dout's sum (O)
  std::vector<float> lanes;
  Scratch(const Shape& s)
      : f(s.D * P), j(s.D * 3 * P), act(s.H * P), mask(s.H * P), gf(s.D * P), dgf(s.D * P),
        dout(O * P), dgu(3 * P), dpre(s.H * P), row(P), lanes((2 * s.H * s.D + O * s.H + s.H + O) * LANES) {}
};

// rows (R, N) [begin, begin + m) -> dst (R, P), zero-padded.
SDS3D_INLINE void load(const float* src, int64_t rows, int64_t N, int64_t begin, int64_t m, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * P, src + r * N + begin, sizeof(float) * m);
    std::fill(dst + r * P + m, dst + (r + 1) * P, 0.f);
  }
}

// act = relu(pre), mask = relu'(pre) (1 where pre > 0), with pre = w1 f + b1.
SDS3D_INLINE void hidden_layer(const Shape& s, const float* __restrict w1, const float* __restrict b1, Scratch& t) {
  for (int64_t h = 0; h < s.H; ++h) {
    float pre[P];  // in registers across the sum (P floats: 8 AVX2 or 4 AVX-512 registers)
    const float bias = b1[h];
    for (int64_t i = 0; i < P; ++i) pre[i] = bias;
    for (int64_t d = 0; d < s.D; ++d) {
      const float w = w1[h * s.D + d];
      const float* __restrict fd = t.f.data() + d * P;
      for (int64_t i = 0; i < P; ++i) pre[i] += w * fd[i];
    }
    float* __restrict ah = t.act.data() + h * P;
    float* __restrict mh = t.mask.data() + h * P;
    for (int64_t i = 0; i < P; ++i) {
      ah[i] = pre[i] > 0.f ? pre[i] : 0.f;
      mh[i] = pre[i] > 0.f ? 1.f : 0.f;
    }
  }
}

// gf = w1^T (w2[0] * mask): d out[0] / d feats.
SDS3D_INLINE void logit_gradient(const Shape& s, const float* __restrict w1, const float* __restrict w2, Scratch& t) {
  for (int64_t d = 0; d < s.D; ++d) {
    float acc[P] = {};
    for (int64_t h = 0; h < s.H; ++h) {
      const float c = w1[h * s.D + d] * w2[h];
      const float* __restrict mh = t.mask.data() + h * P;
      for (int64_t i = 0; i < P; ++i) acc[i] += c * mh[i];
    }
    std::memcpy(t.gf.data() + d * P, acc, sizeof(acc));
  }
}

SDS3D_CLONES void forward_block(const Shape& s, const float* feats, const float* jacs, const float* w1,
                                const float* b1, const float* w2, const float* b2, float* out, float* grad_u,
                                int64_t begin, int64_t end, Scratch& t) {
  for (int64_t p0 = begin; p0 < end; p0 += P) {
    const int64_t m = std::min(P, end - p0);
    load(feats, s.D, s.N, p0, m, t.f.data());
    hidden_layer(s, w1, b1, t);
    for (int64_t o = 0; o < O; ++o) {
      float acc[P];
      for (int64_t i = 0; i < P; ++i) acc[i] = b2[o];
      for (int64_t h = 0; h < s.H; ++h) {
        const float w = w2[o * s.H + h];
        const float* __restrict ah = t.act.data() + h * P;
        for (int64_t i = 0; i < P; ++i) acc[i] += w * ah[i];
      }
      std::memcpy(out + o * s.N + p0, acc, sizeof(float) * m);
    }
    if (!jacs) continue;
    load(jacs, s.D * 3, s.N, p0, m, t.j.data());
    logit_gradient(s, w1, w2, t);
    for (int64_t k = 0; k < 3; ++k) {
      float acc[P] = {};
      for (int64_t d = 0; d < s.D; ++d) {
        const float* __restrict jd = t.j.data() + (d * 3 + k) * P;
        const float* __restrict g = t.gf.data() + d * P;
        for (int64_t i = 0; i < P; ++i) acc[i] += jd[i] * g[i];
      }
      std::memcpy(grad_u + k * s.N + p0, acc, sizeof(float) * m);
    }
  }
}

// Accumulators of one block's weight gradients: w1 (H, D), b1 (H), w2 (O, H), b2 (O), in this order.
int64_t n_weights(const Shape& s) { return s.H * s.D + s.H + O * s.H + O; }

SDS3D_CLONES void backward_block(const Shape& s, const float* feats, const float* jacs, const float* w1,
                                 const float* b1, const float* w2, const float* grad_out, const float* grad_grad_u,
                                 float* grad_feats, float* grad_jacs, float* acc, int64_t begin, int64_t end,
                                 Scratch& t) {
  const bool normals = jacs && grad_grad_u;
  float* gw1 = acc;
  float* gb1 = gw1 + s.H * s.D;
  float* gw2 = gb1 + s.H;
  float* gb2 = gw2 + O * s.H;
  std::fill(t.lanes.begin(), t.lanes.end(), 0.f);
  float* lanes_pf = t.lanes.data();
  float* lanes_m = lanes_pf + s.H * s.D * LANES;
  float* lanes_oa = lanes_m + s.H * s.D * LANES;
  float* lanes_b1 = lanes_oa + O * s.H * LANES;
  float* lanes_b2 = lanes_b1 + s.H * LANES;
  for (int64_t p0 = begin; p0 < end; p0 += P) {
    const int64_t m = std::min(P, end - p0);
    load(feats, s.D, s.N, p0, m, t.f.data());
    load(grad_out, O, s.N, p0, m, t.dout.data());
    hidden_layer(s, w1, b1, t);
    if (normals) {
      load(jacs, s.D * 3, s.N, p0, m, t.j.data());
      load(grad_grad_u, 3, s.N, p0, m, t.dgu.data());
      logit_gradient(s, w1, w2, t);
      // grad_u[k] = sum_d jacs[d, k] gf[d]: d/d jacs[d, k] = gf[d] dgu[k]; d/d gf[d] = sum_k jacs[d, k] dgu[k]
      for (int64_t d = 0; d < s.D; ++d) {
        const float* __restrict g = t.gf.data() + d * P;
        float* __restrict dg = t.dgf.data() + d * P;
        for (int64_t i = 0; i < P; ++i) dg[i] = 0.f;
        for (int64_t k = 0; k < 3; ++k) {
          const float* __restrict jd = t.j.data() + (d * 3 + k) * P;
          const float* __restrict u = t.dgu.data() + k * P;
          for (int64_t i = 0; i < P; ++i) dg[i] += jd[i] * u[i];
          if (grad_jacs) {
            float* __restrict r = t.row.data();
            for (int64_t i = 0; i < P; ++i) r[i] = g[i] * u[i];
            std::memcpy(grad_jacs + (d * 3 + k) * s.N + p0, r, sizeof(float) * m);
          }
        }
      }
    }
    // out = w2 act + b2: d/d act[h] = sum_o w2[o, h] dout[o]; through the ReLU, dpre = mask * that
    for (int64_t h = 0; h < s.H; ++h) {
      float acc[P] = {};
      for (int64_t o = 0; o < O; ++o) {
        const float w = w2[o * s.H + h];
        const float* __restrict dout = t.dout.data() + o * P;
        for (int64_t i = 0; i < P; ++i) acc[i] += w * dout[i];
      }
      float* __restrict dp = t.dpre.data() + h * P;
      const float* __restrict mh = t.mask.data() + h * P;
      for (int64_t i = 0; i < P; ++i) dp[i] = acc[i] * mh[i];
    }
    // pre = w1 f + b1: d/d f[d] = sum_h w1[h, d] dpre[h] (the normals' path has no f-derivative: relu'' = 0)
    for (int64_t d = 0; d < s.D; ++d) {
      float acc[P] = {};
      for (int64_t h = 0; h < s.H; ++h) {
        const float w = w1[h * s.D + d];
        const float* __restrict dp = t.dpre.data() + h * P;
        for (int64_t i = 0; i < P; ++i) acc[i] += w * dp[i];
      }
      std::memcpy(grad_feats + d * s.N + p0, acc, sizeof(float) * m);
    }
    // The weights' gradients, summed lane-wise over the block's points (reduced below). Through
    // gf = w1^T (w2[0] * mask): d/d w1[h, d] = w2[0, h] M[h, d] and d/d w2[0, h] = sum_d w1[h, d] M[h, d],
    // with M[h, d] = sum_i mask[h, i] dgf[d, i].
    outer_sum(t.dpre.data(), s.H, t.f.data(), s.D, lanes_pf);
    if (normals) outer_sum(t.mask.data(), s.H, t.dgf.data(), s.D, lanes_m);
    outer_sum(t.dout.data(), O, t.act.data(), s.H, lanes_oa);
    row_sum(t.dpre.data(), s.H, lanes_b1);
    row_sum(t.dout.data(), O, lanes_b2);
  }
  for (int64_t h = 0; h < s.H; ++h) {
    float via_normals = 0.f;
    for (int64_t d = 0; d < s.D; ++d) {
      float g = reduce8(lanes_pf + (h * s.D + d) * LANES);
      if (normals) {
        const float m_hd = reduce8(lanes_m + (h * s.D + d) * LANES);
        g += w2[h] * m_hd;
        via_normals += w1[h * s.D + d] * m_hd;
      }
      gw1[h * s.D + d] = g;
    }
    gb1[h] = reduce8(lanes_b1 + h * LANES);
    for (int64_t o = 0; o < O; ++o) gw2[o * s.H + h] = reduce8(lanes_oa + (o * s.H + h) * LANES);
    gw2[h] += via_normals;
  }
  for (int64_t o = 0; o < O; ++o) gb2[o] = reduce8(lanes_b2 + o * LANES);
}

}  // namespace

void forward(const float* feats, const float* jacs, int64_t N, int64_t D, int64_t H, const float* w1, const float* b1,
             const float* w2, const float* b2, float* out, float* grad_u) {
  if (N <= 0) return;
  const Shape s{N, D, H};
  const int64_t n_blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel if (n_blocks > 1)
  {
    Scratch t(s);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk)
      forward_block(s, feats, jacs, w1, b1, w2, b2, out, grad_u, blk * BLOCK, std::min(N, (blk + 1) * BLOCK), t);
  }
}

void backward(const float* feats, const float* jacs, int64_t N, int64_t D, int64_t H, const float* w1,
              const float* b1, const float* w2, const float* grad_out, const float* grad_grad_u, float* grad_feats,
              float* grad_jacs, float* grad_w1, float* grad_b1, float* grad_w2, float* grad_b2) {
  const Shape s{N, D, H};
  const int64_t G = n_weights(s);
  const int64_t n_blocks = N > 0 ? (N + BLOCK - 1) / BLOCK : 0;
  std::vector<float> partial(std::max<int64_t>(n_blocks, 1) * G, 0.f);
#pragma omp parallel if (n_blocks > 1)
  {
    Scratch t(s);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < n_blocks; ++blk)
      backward_block(s, feats, jacs, w1, b1, w2, grad_out, grad_grad_u, grad_feats, grad_jacs, partial.data() + blk * G,
                     blk * BLOCK, std::min(N, (blk + 1) * BLOCK), t);
  }
  // the blocks' sums in block order
  std::vector<float> sum(G, 0.f);
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const float* part = partial.data() + blk * G;
    for (int64_t g = 0; g < G; ++g) sum[g] += part[g];
  }
  const float* src = sum.data();
  std::memcpy(grad_w1, src, sizeof(float) * H * D);
  std::memcpy(grad_b1, src + H * D, sizeof(float) * H);
  std::memcpy(grad_w2, src + H * D + H, sizeof(float) * O * H);
  std::memcpy(grad_b2, src + H * D + H + O * H, sizeof(float) * O);
}

}  // namespace sds3d_mlp
