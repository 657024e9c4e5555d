// Fused qk-RMSNorm + 3D RoPE: CUDA kernels (the math is in qk_norm_rope.cpp's header comment).
//
// Forward: one block per row (token). Each thread owns whole rotary pairs (2 adjacent channels,
// loaded as one 2-element vector), so the rotation needs no exchange between threads; the sum of
// squares is a block reduction. Backward: a grid of a few blocks per SM walks the rows; per row
// one block reduction gives sum_k gv_k w_k x_k, and grad_weight accumulates per block in shared
// memory (each thread touches only its own pairs, so no atomics), written as [blocks, C]
// partials and summed at the end.
//
// Inputs arrive prepared by qk_norm_rope.cpp: contiguous, weight/cos/sin/grad_out in acc
// precision (fp32; fp64 for fp64 x), x and grad_out aligned to a pair.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace wanspeed {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;
constexpr int kPairsPerThread = 4;     // forward: target pairs per thread (memory-level parallelism)
constexpr int kBackwardBlocksPerSM = 4;

template <typename T>
struct alignas(2 * sizeof(T)) Pair {
  T a, b;
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void load_pair(const scalar_t* p, acc_t& a, acc_t& b) {
  const Pair<scalar_t> v = *reinterpret_cast<const Pair<scalar_t>*>(p);
  a = static_cast<acc_t>(v.a);
  b = static_cast<acc_t>(v.b);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pair(scalar_t* p, acc_t a, acc_t b) {
  *reinterpret_cast<Pair<scalar_t>*>(p) = Pair<scalar_t>{static_cast<scalar_t>(a), static_cast<scalar_t>(b)};
}

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32; safe to call
// repeatedly (the leading barrier keeps a call from overwriting what the last one still reads).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kMaxThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : T(0);
  return warp_sum(v);
}

// n = round_x(x * r): Wan's `.type_as(x)` after the fp32 normalisation
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t normed(acc_t x, acc_t r) {
  return static_cast<acc_t>(static_cast<scalar_t>(x * r));
}

template <typename scalar_t, bool kRound, typename acc_t>
__device__ __forceinline__ acc_t weighted(acc_t n, acc_t w) {
  const acc_t v = n * w;
  return kRound ? static_cast<acc_t>(static_cast<scalar_t>(v)) : v;
}

// x [rows, C] -> out [rows, C] (acc), rstd [rows]; row = b * L + l; cos/sin [Lr, P].
template <typename scalar_t, typename acc_t, bool kRound>
__global__ void __launch_bounds__(kMaxThreads) qk_norm_rope_fwd_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ cos,
    const acc_t* __restrict__ sin, acc_t* __restrict__ out, acc_t* __restrict__ rstd, int64_t tokens,
    int64_t table_rows, int channels, int pairs_per_head, acc_t eps) {
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * channels;
  acc_t* orow = out + row * channels;
  const int pairs = channels / 2;

  acc_t ss = 0;
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    acc_t a, b;
    load_pair<acc_t>(xr + 2 * q, a, b);
    ss += a * a + b * b;
  }
  const acc_t r = inv_sqrt(block_sum(ss) / static_cast<acc_t>(channels) + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  const int64_t l = row % tokens;
  const bool rotate = l < table_rows;
  const acc_t* cr = cos + (rotate ? l : 0) * pairs_per_head;
  const acc_t* sr = sin + (rotate ? l : 0) * pairs_per_head;
  for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
    acc_t a, b;
    load_pair<acc_t>(xr + 2 * q, a, b);
    a = weighted<scalar_t, kRound>(normed<scalar_t>(a, r), weight[2 * q]);
    b = weighted<scalar_t, kRound>(normed<scalar_t>(b, r), weight[2 * q + 1]);
    if (rotate) {
      const int j = q % pairs_per_head;
      const acc_t c = cr[j], s = sr[j];
      store_pair(orow + 2 * q, a * c - b * s, a * s + b * c);
    } else {
      store_pair(orow + 2 * q, a, b);
    }
  }
}

// gv = R^T g for the pair (identity past the table)
template <typename acc_t>
__device__ __forceinline__ void unrotate(acc_t& g0, acc_t& g1, bool rotate, acc_t c, acc_t s) {
  if (rotate) {
    const acc_t a = g0, b = g1;
    g0 = a * c + b * s;
    g1 = b * c - a * s;
  }
}

// grad_out [rows, C] (acc) -> grad_x [rows, C] (x dtype); grad_weight partials [gridDim.x, C].
// Rounding passes gradients straight through, so there is no kRound here.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) qk_norm_rope_bwd_kernel(
    const acc_t* __restrict__ grad_out, const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ cos, const acc_t* __restrict__ sin, const acc_t* __restrict__ rstd,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ gw_partial, int64_t rows, int64_t tokens,
    int64_t table_rows, int channels, int pairs_per_head) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* gw = reinterpret_cast<acc_t*>(smem);  // [C], this block's grad_weight
  const int pairs = channels / 2;
  const bool need_weight_grad = gw_partial != nullptr;
  if (need_weight_grad) {
    for (int q = threadIdx.x; q < pairs; q += blockDim.x) gw[2 * q] = gw[2 * q + 1] = acc_t(0);
  }
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const acc_t* gr = grad_out + row * channels;
    const scalar_t* xr = x + row * channels;
    const int64_t l = row % tokens;
    const bool rotate = l < table_rows;
    const acc_t* cr = cos + (rotate ? l : 0) * pairs_per_head;
    const acc_t* sr = sin + (rotate ? l : 0) * pairs_per_head;
    const acc_t r = rstd[row];

    acc_t dot = 0;  // sum_k gv_k w_k x_k
    for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
      acc_t g0, g1, x0, x1;
      load_pair<acc_t>(gr + 2 * q, g0, g1);
      load_pair<acc_t>(xr + 2 * q, x0, x1);
      const int j = q % pairs_per_head;
      unrotate(g0, g1, rotate, rotate ? cr[j] : acc_t(1), rotate ? sr[j] : acc_t(0));
      dot += g0 * weight[2 * q] * x0 + g1 * weight[2 * q + 1] * x1;
    }
    const acc_t coef = r * r * r * block_sum(dot) * inv_c;

    for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
      acc_t g0, g1, x0, x1;
      load_pair<acc_t>(gr + 2 * q, g0, g1);
      load_pair<acc_t>(xr + 2 * q, x0, x1);
      const int j = q % pairs_per_head;
      unrotate(g0, g1, rotate, rotate ? cr[j] : acc_t(1), rotate ? sr[j] : acc_t(0));
      const acc_t w0 = weight[2 * q], w1 = weight[2 * q + 1];
      store_pair(grad_x + row * channels + 2 * q, r * g0 * w0 - x0 * coef, r * g1 * w1 - x1 * coef);
      if (need_weight_grad) {
        gw[2 * q] += g0 * normed<scalar_t>(x0, r);
        gw[2 * q + 1] += g1 * normed<scalar_t>(x1, r);
      }
    }
  }
  if (need_weight_grad) {
    acc_t* dst = gw_partial + static_cast<int64_t>(blockIdx.x) * channels;
    for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
      dst[2 * q] = gw[2 * q];
      dst[2 * q + 1] = gw[2 * q + 1];
    }
  }
}

// A power of two in [32, 512] giving each thread about kPairsPerThread pairs.
int threads_for(int pairs) {
  int threads = kWarp;
  while (threads < kMaxThreads && threads * kPairsPerThread < pairs) threads *= 2;
  return threads;
}

template <typename scalar_t, bool kRound>
void launch_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                    at::Tensor& out, at::Tensor& rstd, int64_t head_dim, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0) * x.size(1);
  const int channels = static_cast<int>(x.size(2));
  if (rows == 0) return;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "qk_norm_rope: too many tokens (", rows, ")");
  qk_norm_rope_fwd_kernel<scalar_t, acc_t, kRound>
      <<<static_cast<unsigned>(rows), threads_for(channels / 2), 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), cos.data_ptr<acc_t>(), sin.data_ptr<acc_t>(),
          out.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), x.size(1), cos.size(0), channels,
          static_cast<int>(head_dim / 2), static_cast<acc_t>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& rstd, at::Tensor& grad_x,
                     at::Tensor& grad_weight, int64_t head_dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0) * x.size(1);
  const int channels = static_cast<int>(x.size(2));
  const bool need_weight_grad = grad_weight.defined();
  if (rows == 0) {
    if (need_weight_grad) grad_weight.zero_();
    return;
  }
  const int threads = threads_for(channels / 2);
  const int device = x.get_device();
  int sm_count = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t blocks = std::min<int64_t>(rows, static_cast<int64_t>(sm_count) * kBackwardBlocksPerSM);
  const size_t smem = need_weight_grad ? static_cast<size_t>(channels) * sizeof(acc_t) : 0;
  auto kernel = qk_norm_rope_bwd_kernel<scalar_t, acc_t>;
  if (smem > 48 * 1024) {
    TORCH_CHECK(smem <= static_cast<size_t>(smem_optin), "qk_norm_rope: dim ", channels,
                " needs more shared memory for grad_weight than this GPU offers");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  at::Tensor partial;
  if (need_weight_grad) partial = at::empty({blocks, channels}, weight.options());
  kernel<<<static_cast<unsigned>(blocks), threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      grad_out.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<acc_t>(), cos.data_ptr<acc_t>(),
      sin.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
      need_weight_grad ? partial.data_ptr<acc_t>() : nullptr, rows, x.size(1), cos.size(0), channels,
      static_cast<int>(head_dim / 2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (need_weight_grad) at::sum_out(grad_weight, partial, at::IntArrayRef{0});
}

}  // namespace

void qk_norm_rope_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                               const at::Tensor& sin, at::Tensor& out, at::Tensor& rstd, int64_t head_dim,
                               double eps, bool round_product) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_forward_cuda", [&] {
    if (round_product) {
      launch_forward<scalar_t, true>(x, weight, cos, sin, out, rstd, head_dim, eps);
    } else {
      launch_forward<scalar_t, false>(x, weight, cos, sin, out, rstd, head_dim, eps);
    }
  });
}

void qk_norm_rope_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& rstd,
                                at::Tensor& grad_x, at::Tensor& grad_weight, int64_t head_dim) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "qk_norm_rope_backward_cuda", [&] {
    launch_backward<scalar_t>(grad_out, x, weight, cos, sin, rstd, grad_x, grad_weight, head_dim);
  });
}

}  // namespace wanspeed
