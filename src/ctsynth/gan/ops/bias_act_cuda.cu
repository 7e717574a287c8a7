// CUDA kernels for the fused bias + activation op (semantics: bias_act.cpp's header comment).
// One thread per element, grid-stride loop; arithmetic in float whatever the storage type.

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                               scalar_t* __restrict__ y, int64_t n, int64_t inner, int64_t channels, int act,
                               float alpha, float gain, float clamp) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)blockDim.x * gridDim.x) {
    float v = static_cast<float>(x[i]);
    if (b != nullptr) v += static_cast<float>(b[(i / inner) % channels]);
    if (act == 1) v = v > 0.f ? v : 0.f;
    else if (act == 2) v = v > 0.f ? v : v * alpha;
    v *= gain;
    if (clamp >= 0.f) v = fminf(fmaxf(v, -clamp), clamp);
    y[i] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
__global__ void grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                            scalar_t* __restrict__ dx, int64_t n, int act, float alpha, float gain, float clamp) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)blockDim.x * gridDim.x) {
    float yv = static_cast<float>(y[i]);
    float s = gain;
    if (act == 1) s = yv > 0.f ? gain : 0.f;
    else if (act == 2) s = yv > 0.f ? gain : gain * alpha;
    if (clamp >= 0.f && fabsf(yv) >= clamp) s = 0.f;
    dx[i] = static_cast<scalar_t>(static_cast<float>(dy[i]) * s);
  }
}

int blocks_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

}  // namespace

torch::Tensor bias_act_forward_cuda(torch::Tensor x, const c10::optional<torch::Tensor>& b_opt, int64_t dim,
                                    int64_t act, double alpha, double gain, double clamp) {
  const c10::cuda::CUDAGuard guard(x.device());
  bool channels_last = x.dim() == 4 && dim == 1 && !x.is_contiguous() &&
                       x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!channels_last) x = x.contiguous();
  torch::Tensor b;
  if (b_opt.has_value() && b_opt->defined()) {
    b = b_opt->to(x.scalar_type()).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(dim), "bias_act: bias must be 1-D with x.size(dim) entries");
  }
  int64_t inner = 1;
  if (!channels_last)
    for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  int64_t channels = x.size(dim);
  auto y = torch::empty_like(x);
  int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_act_forward_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), n, inner,
        channels, static_cast<int>(act), static_cast<float>(alpha), static_cast<float>(gain),
        static_cast<float>(clamp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

torch::Tensor bias_act_grad_cuda(torch::Tensor dy, torch::Tensor y, int64_t act, double alpha, double gain,
                                 double clamp) {
  const c10::cuda::CUDAGuard guard(y.device());
  auto format = (y.dim() == 4 && !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast))
                    ? at::MemoryFormat::ChannelsLast
                    : at::MemoryFormat::Contiguous;
  y = y.contiguous(format);
  dy = dy.to(y.scalar_type()).contiguous(format);
  auto dx = torch::empty_like(y);
  int64_t n = y.numel();
  if (n == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bias_act_grad_cuda", [&] {
    grad_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), n, static_cast<int>(act),
        static_cast<float>(alpha), static_cast<float>(gain), static_cast<float>(clamp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}
