// Entry points of the fused CPU field MLP (mlp_kernels.cpp): plain pointers to contiguous float32
// arrays. Hidden: not exported from the extension.
//
// The function is NeRFField's network with one hidden layer, on feature-major inputs:
//   feats (D, N), jacs (D, 3, N) = d feats / d u (optional), w1 (H, D), b1 (H,), w2 (4, H), b2 (4,)
//   pre = w1 f + b1, a = relu(pre), out = w2 a + b2                                  -> out (4, N)
//   gf = w1^T (w2[0] * relu'(pre)), grad_u[k] = sum_d jacs[d, k] gf[d]               -> grad_u (3, N)
// grad_u is d out[0] / d u, the density logit's gradient for the normals (without the blob's).
#pragma once

#include <cstdint>

namespace sds3d_mlp {

// Largest widths the kernels take (their scratch is sized by them); wider fields use the torch path.
constexpr int64_t MAX_FEATURES = 64;
constexpr int64_t MAX_HIDDEN = 128;

// out (4, N) and, if jacs is not null, grad_u (3, N).
__attribute__((visibility("hidden"))) void forward(const float* feats, const float* jacs, int64_t N, int64_t D,
                                                   int64_t H, const float* w1, const float* b1, const float* w2,
                                                   const float* b2, float* out, float* grad_u);

// Gradients of a loss from grad_out (4, N) and, with jacs, grad_grad_u (3, N) (null: none):
// grad_feats (D, N), grad_jacs (D, 3, N) (only with jacs and grad_grad_u; may be null), grad_w1 (H, D),
// grad_b1 (H,), grad_w2 (4, H), grad_b2 (4,); all overwritten.
__attribute__((visibility("hidden"))) void backward(const float* feats, const float* jacs, int64_t N, int64_t D,
                                                    int64_t H, const float* w1, const float* b1, const float* w2,
                                                    const float* grad_out, const float* grad_grad_u,
                                                    float* grad_feats, float* grad_jacs, float* grad_w1,
                                                    float* grad_b1, float* grad_w2, float* grad_b2);

}  // namespace sds3d_mlp
