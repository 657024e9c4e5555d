// Fused qk-RMSNorm + 3D RoPE for Wan2.1 self-attention: argument checks, CPU kernels, bindings.
//
// Wan computes `rope_apply(heads(norm_q(q(x))))`: an RMSNorm over the FULL dim (C = N * D),
// the head split [B, L, C] -> [B, L, N, D], then a rotation of adjacent (interleaved) pairs by
// per-token angles. Per row (one token of one sample), with P = D / 2 pairs per head:
//
//   r     = 1 / sqrt(mean_c x_c^2 + eps)                  (acc precision, saved as rstd)
//   n_c   = round_x(x_c * r)                              Wan's `.type_as(x)`
//   v_c   = n_c * w_c, rounded to x's dtype when x * w stays in it (bf16 * bf16), as in Wan
//   l < Lr:  out[h, 2j], out[h, 2j+1] = (a c - b s, a s + b c),  a, b = v[hD+2j], v[hD+2j+1],
//            c, s = cos[l, j], sin[l, j]
//   l >= Lr: out = v                                      (tokens past the table: unrotated)
//
// acc precision is fp32 for bf16/fp16/fp32 and fp64 for fp64 inputs; out and rstd are acc
// precision (Wan's rope returns fp32). Backward, with rounding passed straight through (as
// autograd does for casts):
//
//   gv = R^T g   (R = the rotation above, identity past the table)
//   gx_c = r gv_c w_c - x_c r^3 (sum_k gv_k w_k x_k) / C        gw_c = sum_rows gv_c n_c
//
// The CUDA kernels (qk_norm_rope_cuda.cu) are compiled in only with -DWANSPEED_WITH_CUDA.
// Narrow includes instead of <torch/extension.h>: ~17 s to compile here instead of ~60 s.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/util/bit_cast.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace wanspeed {

#ifdef WANSPEED_WITH_CUDA
// Inputs prepared by `prepare` below (contiguous, acc-precision weight and tables, x pairs
// aligned). grad_weight: acc-precision [C] to fill, or undefined when not needed.
void qk_norm_rope_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                               const at::Tensor& sin, at::Tensor& out, at::Tensor& rstd,
                               int64_t head_dim, double eps, bool round_product);
void qk_norm_rope_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& rstd,
                                at::Tensor& grad_x, at::Tensor& grad_weight, int64_t head_dim);
#endif

namespace {

// Everything a kernel needs, checked once.
struct Prepared {
  at::Tensor x;       // [B, L, C] contiguous, x's dtype
  at::Tensor weight;  // [C] contiguous, acc dtype
  at::Tensor cos;     // [Lr, P] contiguous, acc dtype (rows past L dropped)
  at::Tensor sin;
  int64_t batch, tokens, channels, heads, head_dim;
  bool round_product;  // v = round_x(n * w): x * weight stays in x's reduced dtype
  at::ScalarType acc;
};

at::Tensor aligned(at::Tensor t, int64_t bytes) {
  // pair loads on CUDA need 2-element alignment; views into flat buffers may lack it
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % bytes ? t.clone() : t;
}

Prepared prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                 const at::Tensor& sin, int64_t num_heads) {
  TORCH_CHECK(x.dim() == 3, "qk_norm_rope: x must be [B, L, dim], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "qk_norm_rope: x must be floating, got ", x.scalar_type());
  const int64_t channels = x.size(2);
  TORCH_CHECK(num_heads > 0 && channels % num_heads == 0, "qk_norm_rope: dim ", channels,
              " is not divisible by num_heads ", num_heads);
  const int64_t head_dim = channels / num_heads;
  TORCH_CHECK(head_dim % 2 == 0, "qk_norm_rope: head dim must be even (rotary pairs), got ", head_dim);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == channels, "qk_norm_rope: weight must be [", channels,
              "], got ", weight.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == head_dim / 2 && sin.sizes() == cos.sizes(),
              "qk_norm_rope: cos and sin must both be [Lr, ", head_dim / 2, "], got ", cos.sizes(), " and ",
              sin.sizes());
  for (const at::Tensor* t : {&weight, &cos, &sin}) {
    TORCH_CHECK(t->device() == x.device(), "qk_norm_rope: all tensors must be on ", x.device(), ", got ",
                t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "qk_norm_rope: weight/cos/sin must be floating");
  }
  const at::ScalarType xt = x.scalar_type();
  const at::ScalarType promoted = c10::promoteTypes(xt, weight.scalar_type());
  TORCH_CHECK(promoted != at::kDouble || xt == at::kDouble,
              "qk_norm_rope: weight is float64 but x is ", xt, "; cast x to float64 (the Python wrapper does)");
  const at::ScalarType acc = at::toOpMathType(xt);
  const int64_t batch = x.size(0), tokens = x.size(1);
  const int64_t rot = std::min(cos.size(0), tokens);
  const int64_t pair_bytes = 2 * static_cast<int64_t>(c10::elementSize(xt));
  return Prepared{aligned(x.contiguous(), pair_bytes),
                  aligned(weight.to(acc).contiguous(), 2 * c10::elementSize(acc)),
                  cos.narrow(0, 0, rot).to(acc).contiguous(),
                  sin.narrow(0, 0, rot).to(acc).contiguous(),
                  batch, tokens, channels, num_heads, head_dim,
                  at::isReducedFloatingType(xt) && promoted == xt,
                  acc};
}

// A fresh CPU output of `sizes` on transparent huge pages where the OS allows it. Every call
// writes a new multi-MB output, and first-touch faults on 4 KiB pages cost more than the kernel
// (measured here: 48 MB of fp32 output, ~35 ms of faults vs ~10 ms of compute). This is what
// torch's own CPU allocator does under THP_MEM_ALLOC_ENABLE=1, for our outputs only.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::size_t kHugePage = std::size_t(2) << 20;
  std::size_t bytes = c10::elementSize(dtype);
  for (const int64_t s : sizes) bytes *= static_cast<std::size_t>(s);
  if (bytes >= 2 * kHugePage) {
    const std::size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, rounded) == 0) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

// ---- CPU kernels -------------------------------------------------------------------------------
// Inner loops are plain counted loops over contiguous memory so that -O3 vectorises them;
// reductions keep kLanes independent partial sums (a vectorisable form without -ffast-math).
constexpr int64_t kLanes = 16;
// Elements per thread below which a parallel region costs more than it saves (torch's own
// at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

template <typename acc_t, typename scalar_t>
acc_t sum_squares(const scalar_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(x[i + k]);
      lanes[k] += v * v;
    }
  }
  acc_t total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  for (; i < n; ++i) total += static_cast<acc_t>(x[i]) * static_cast<acc_t>(x[i]);
  return total;
}

// sum_c a_c * b_c * x_c
template <typename acc_t, typename scalar_t>
acc_t dot3(const acc_t* a, const acc_t* b, const scalar_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += a[i + k] * b[i + k] * static_cast<acc_t>(x[i + k]);
  }
  acc_t total = 0;
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  for (; i < n; ++i) total += a[i] * b[i] * static_cast<acc_t>(x[i]);
  return total;
}

// v rounded to scalar_t and back
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// The same for bf16 in 32-bit lanes (round to nearest even on the bit pattern, as c10 does):
// this form vectorises, c10's 16-bit round trip does not (~1.25x on the bf16 forward here).
template <>
inline float round_to<c10::BFloat16, float>(float v) {
  const uint32_t bits = c10::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return std::isnan(v) ? v : c10::bit_cast<float>(rounded);
}

// n = round_x(x * r): Wan's `.type_as(x)` after the fp32 normalisation
template <typename scalar_t, typename acc_t>
inline acc_t normed(scalar_t x, acc_t r) {
  return round_to<scalar_t>(static_cast<acc_t>(x) * r);
}

template <typename scalar_t, bool kRound, typename acc_t>
inline acc_t weighted(acc_t n, acc_t w) {
  const acc_t v = n * w;
  return kRound ? round_to<scalar_t>(v) : v;
}

template <typename scalar_t, bool kRound>
void forward_cpu(const Prepared& p, at::Tensor& out, at::Tensor& rstd, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const acc_t* w = p.weight.data_ptr<acc_t>();
  const acc_t* cos = p.cos.data_ptr<acc_t>();
  const acc_t* sin = p.sin.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  acc_t* rs = rstd.data_ptr<acc_t>();
  const int64_t rows = p.batch * p.tokens, C = p.channels, D = p.head_dim, P = D / 2;
  const int64_t L = p.tokens, Lr = p.cos.size(0), N = p.heads;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C), eps_acc = static_cast<acc_t>(eps);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * C;
      acc_t* orow = o + row * C;
      const acc_t r = acc_t(1) / std::sqrt(sum_squares<acc_t>(xr, C) * inv_c + eps_acc);
      rs[row] = r;
      for (int64_t c = 0; c < C; ++c) orow[c] = weighted<scalar_t, kRound>(normed(xr[c], r), w[c]);
      const int64_t l = row % L;
      if (l >= Lr) continue;
      const acc_t* cr = cos + l * P;
      const acc_t* sr = sin + l * P;
      for (int64_t h = 0; h < N; ++h) {
        acc_t* v = orow + h * D;
        for (int64_t j = 0; j < P; ++j) {
          const acc_t a = v[2 * j], b = v[2 * j + 1];
          v[2 * j] = a * cr[j] - b * sr[j];
          v[2 * j + 1] = a * sr[j] + b * cr[j];
        }
      }
    }
  });
}

// Row chunks of the backward: one per thread, fewer for small inputs.
int64_t backward_chunks(int64_t rows, int64_t channels) {
  const int64_t by_size = rows * channels / kGrainElements;
  return std::max<int64_t>(1, std::min<int64_t>({by_size, static_cast<int64_t>(at::get_num_threads()), rows}));
}

// grad_weight partials: one [C] row per chunk of rows, summed afterwards (deterministic for a
// given thread count). Rounding passes gradients straight through, so there is no kRound here.
template <typename scalar_t>
void backward_cpu(const at::Tensor& grad_out, const Prepared& p, const at::Tensor& rstd, at::Tensor& grad_x,
                  at::Tensor& gw_partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* g = grad_out.data_ptr<acc_t>();
  const scalar_t* x = p.x.data_ptr<scalar_t>();
  const acc_t* w = p.weight.data_ptr<acc_t>();
  const acc_t* cos = p.cos.data_ptr<acc_t>();
  const acc_t* sin = p.sin.data_ptr<acc_t>();
  const acc_t* rs = rstd.data_ptr<acc_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  acc_t* gwp = gw_partial.defined() ? gw_partial.data_ptr<acc_t>() : nullptr;
  const int64_t rows = p.batch * p.tokens, C = p.channels, D = p.head_dim, P = D / 2;
  const int64_t L = p.tokens, Lr = p.cos.size(0), N = p.heads;
  const int64_t chunks = gw_partial.defined() ? gw_partial.size(0) : backward_chunks(rows, C);
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<acc_t> gv(C);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* gw = gwp ? gwp + chunk * C : nullptr;
      const int64_t row_end = rows * (chunk + 1) / chunks;
      for (int64_t row = rows * chunk / chunks; row < row_end; ++row) {
        const acc_t* gr = g + row * C;
        const scalar_t* xr = x + row * C;
        const int64_t l = row % L;
        if (l < Lr) {
          const acc_t* cr = cos + l * P;
          const acc_t* sr = sin + l * P;
          for (int64_t h = 0; h < N; ++h) {
            const acc_t* gh = gr + h * D;
            acc_t* vh = gv.data() + h * D;
            for (int64_t j = 0; j < P; ++j) {
              const acc_t a = gh[2 * j], b = gh[2 * j + 1];
              vh[2 * j] = a * cr[j] + b * sr[j];
              vh[2 * j + 1] = b * cr[j] - a * sr[j];
            }
          }
        } else {
          std::copy(gr, gr + C, gv.data());
        }
        const acc_t r = rs[row];
        const acc_t coef = r * r * r * dot3(gv.data(), w, xr, C) * inv_c;
        scalar_t* gxr = gx + row * C;
        if (gw) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t xc = static_cast<acc_t>(xr[c]);
            gxr[c] = static_cast<scalar_t>(r * gv[c] * w[c] - xc * coef);
            gw[c] += gv[c] * round_to<scalar_t>(xc * r);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            gxr[c] = static_cast<scalar_t>(r * gv[c] * w[c] - static_cast<acc_t>(xr[c]) * coef);
          }
        }
      }
    }
  });
}

}  // namespace

// x [B, L, dim], weight [dim], cos/sin [Lr, D/2] -> (out [B, L, N, D], rstd [B, L]), both in acc
// precision (fp32; fp64 for fp64 x).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_forward(const at::Tensor& x, const at::Tensor& weight,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        int64_t num_heads, double eps) {
  const Prepared p = prepare(x, weight, cos, sin, num_heads);
  auto opts = x.options().dtype(p.acc);
  at::Tensor rstd = at::empty({p.batch, p.tokens}, opts);
  if (x.is_cuda()) {
    at::Tensor out = at::empty({p.batch, p.tokens, p.heads, p.head_dim}, opts);
#ifdef WANSPEED_WITH_CUDA
    qk_norm_rope_forward_cuda(p.x, p.weight, p.cos, p.sin, out, rstd, p.head_dim, eps, p.round_product);
#else
    TORCH_CHECK(false, "qk_norm_rope: this build of the extension has no CUDA kernels");
#endif
    return {out, rstd};
  }
  TORCH_CHECK(x.device().is_cpu(), "qk_norm_rope: unsupported device ", x.device());
  at::Tensor out = empty_cpu_output({p.batch, p.tokens, p.heads, p.head_dim}, p.acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_forward", [&] {
    if (p.round_product) {
      forward_cpu<scalar_t, true>(p, out, rstd, eps);
    } else {
      forward_cpu<scalar_t, false>(p, out, rstd, eps);
    }
  });
  return {out, rstd};
}

// -> (grad_x [B, L, dim] in x's dtype, grad_weight [dim] in weight's dtype, or None when
// need_weight_grad is false).
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& cos,
                                                         const at::Tensor& sin, const at::Tensor& rstd,
                                                         int64_t num_heads, bool need_weight_grad) {
  const Prepared p = prepare(x, weight, cos, sin, num_heads);
  TORCH_CHECK(grad_out.numel() == x.numel() && grad_out.device() == x.device(),
              "qk_norm_rope: grad_out must match out [B, L, N, D] on ", x.device(), ", got ", grad_out.sizes());
  TORCH_CHECK(rstd.numel() == p.batch * p.tokens && rstd.scalar_type() == p.acc && rstd.device() == x.device(),
              "qk_norm_rope: rstd must be the forward's [B, L] ", p.acc, " tensor");
  const int64_t pair_bytes = 2 * static_cast<int64_t>(c10::elementSize(p.acc));
  const at::Tensor g = aligned(grad_out.to(p.acc).contiguous(), pair_bytes);
  const at::Tensor rs = rstd.contiguous();
  at::Tensor grad_x;
  at::Tensor grad_weight;
  if (x.is_cuda()) {
#ifdef WANSPEED_WITH_CUDA
    grad_x = at::empty({p.batch, p.tokens, p.channels}, p.x.options());
    if (need_weight_grad) grad_weight = at::empty({p.channels}, p.weight.options());
    qk_norm_rope_backward_cuda(g, p.x, p.weight, p.cos, p.sin, rs, grad_x, grad_weight, p.head_dim);
#else
    TORCH_CHECK(false, "qk_norm_rope: this build of the extension has no CUDA kernels");
#endif
  } else {
    grad_x = empty_cpu_output({p.batch, p.tokens, p.channels}, x.scalar_type());
    const int64_t rows = p.batch * p.tokens;
    at::Tensor partial;
    if (need_weight_grad) {
      partial = at::zeros({backward_chunks(rows, p.channels), p.channels}, p.weight.options());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_backward",
                                    [&] { backward_cpu<scalar_t>(g, p, rs, grad_x, partial); });
    if (need_weight_grad) grad_weight = partial.sum(0);
  }
  if (grad_weight.defined()) grad_weight = grad_weight.to(weight.scalar_type());
  return {grad_x, grad_weight};
}

}  // namespace wanspeed

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wanspeed fused qk-RMSNorm + 3D RoPE (Wan2.1 self-attention)";
  m.def("qk_norm_rope_forward", &wanspeed::qk_norm_rope_forward,
        "x [B, L, dim], weight [dim], cos/sin [Lr, D/2] -> (out [B, L, N, D], rstd [B, L])",
        py::arg("x"), py::arg("weight"), py::arg("cos"), py::arg("sin"), py::arg("num_heads"), py::arg("eps"));
  m.def("qk_norm_rope_backward", &wanspeed::qk_norm_rope_backward,
        "-> (grad_x [B, L, dim], grad_weight [dim] or None)", py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("cos"), py::arg("sin"), py::arg("rstd"), py::arg("num_heads"),
        py::arg("need_weight_grad") = true);
#ifdef WANSPEED_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
