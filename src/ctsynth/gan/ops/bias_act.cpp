// Fused bias + activation + gain + clamp for StyleGAN2 layers (CPU; the CUDA kernels are in
// bias_act_cuda.cu and registered from here when the extension is built with them).
//
//   forward:  y  = clamp(act(x + b) * gain, -clamp, clamp)
//   backward: dx = dy * act'(x + b) * gain * [|y| <= clamp]
//
// The backward only needs y, not x: for linear / relu / lrelu with gain > 0 the sign of y is the
// sign of x + b, and y is saturated exactly where the clamp cut it. So one elementwise pass each
// way instead of the four (add, activation, scale, clamp) that autograd would run and store.
// The derivative is piecewise constant, so the backward is linear in dy and its own derivative
// (double backward, for R1 and path-length) is the same kernel again -- see fused.py.
//
// Layouts: contiguous NCHW-style tensors (bias along dim `dim`) and channels-last 4-D tensors
// (bias along the innermost axis). Anything else is made contiguous first.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

enum Act { kLinear = 0, kRelu = 1, kLrelu = 2 };

// Elements per bias value along the memory order: for an NCHW-contiguous tensor, bias index is
// (i / inner) % channels; for channels-last, inner is 1.
struct BiasLayout {
  int64_t inner;
  int64_t channels;
};

BiasLayout bias_layout(const torch::Tensor& x, int64_t dim, bool channels_last) {
  if (channels_last) return {1, x.size(1)};
  int64_t inner = 1;
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {inner, x.size(dim)};
}

bool is_channels_last(const torch::Tensor& x, int64_t dim) {
  return x.dim() == 4 && dim == 1 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The activation as one branch-free formula so that the loops below vectorise: the slope for
// negative inputs is 1 (linear), 0 (relu) or alpha (lrelu); "no clamp" is an infinite bound.
struct Slopes {
  float negative;
  float gain;
  float clamp;
};

Slopes slopes(int act, float alpha, float gain, float clamp) {
  float negative = act == kLinear ? 1.f : (act == kRelu ? 0.f : alpha);
  return {negative, gain, clamp >= 0.f ? clamp : INFINITY};
}

// min / max only (no data-dependent branch): the signs of activations are random, and a branch
// per element mispredicted so often that the first version of this kernel ran 20x slower than
// PyTorch's own ops (measured).
inline float activate(float v, Slopes s) {
  v = (std::max(v, 0.f) + s.negative * std::min(v, 0.f)) * s.gain;
  return std::min(std::max(v, -s.clamp), s.clamp);
}

// The tensor as [outer][channels][inner] in memory order (inner = 1 for channels-last, where the
// bias varies fastest). No division or modulo per element: each inner loop is a contiguous run
// with one bias value (or, channels-last, one row of the bias vector).
template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* b, scalar_t* y, int64_t n, BiasLayout layout, int act,
                    float alpha, float gain, float clamp) {
  const Slopes s = slopes(act, alpha, gain, clamp);
  if (b == nullptr) {
    at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
      const scalar_t* __restrict xp = x;
      scalar_t* __restrict yp = y;
      for (int64_t i = begin; i < end; ++i) yp[i] = static_cast<scalar_t>(activate(static_cast<float>(xp[i]), s));
    });
    return;
  }
  const int64_t channels = layout.channels;
  if (layout.inner == 1) {
    std::vector<float> bias(channels);
    for (int64_t c = 0; c < channels; ++c) bias[c] = static_cast<float>(b[c]);
    const float* bp = bias.data();
    const int64_t rows = n / channels;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / channels), [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict xr = x + r * channels;
        scalar_t* __restrict yr = y + r * channels;
        for (int64_t c = 0; c < channels; ++c) yr[c] = static_cast<scalar_t>(activate(static_cast<float>(xr[c]) + bp[c], s));
      }
    });
    return;
  }
  const int64_t inner = layout.inner;
  const int64_t runs = n / inner;
  at::parallel_for(0, runs, std::max<int64_t>(1, 16384 / inner), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float bias = static_cast<float>(b[r % channels]);
      const scalar_t* __restrict xr = x + r * inner;
      scalar_t* __restrict yr = y + r * inner;
      for (int64_t i = 0; i < inner; ++i) yr[i] = static_cast<scalar_t>(activate(static_cast<float>(xr[i]) + bias, s));
    }
  });
}

// dx = dy * slope(y); slope from the sign of y (act) and whether y hit the clamp.
template <typename scalar_t>
void grad_kernel(const scalar_t* dy, const scalar_t* y, scalar_t* dx, int64_t n, int act, float alpha, float gain,
                 float clamp) {
  const Slopes s = slopes(act, alpha, gain, clamp);
  const float negative_gain = s.negative * s.gain, clamp_at = s.clamp;
  // By value and __restrict: captured by reference, the pointers could alias what they point to
  // and the loop did not vectorise.
  at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
    const scalar_t* __restrict dyp = dy;
    const scalar_t* __restrict yp = y;
    scalar_t* __restrict dxp = dx;
    for (int64_t i = begin; i < end; ++i) {
      const float yv = static_cast<float>(yp[i]);
      float slope = yv > 0.f ? gain : negative_gain;
      slope = std::fabs(yv) < clamp_at ? slope : 0.f;
      dxp[i] = static_cast<scalar_t>(static_cast<float>(dyp[i]) * slope);
    }
  });
}

torch::Tensor bias_act_forward_cpu(torch::Tensor x, const c10::optional<torch::Tensor>& b_opt, int64_t dim,
                                   int64_t act, double alpha, double gain, double clamp) {
  bool channels_last = is_channels_last(x, dim);
  if (!channels_last) x = x.contiguous();
  torch::Tensor b;
  if (b_opt.has_value() && b_opt->defined()) {
    b = b_opt->to(x.scalar_type()).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(dim), "bias_act: bias must be 1-D with x.size(dim) entries");
  }
  auto y = torch::empty_like(x);  // keeps channels-last
  BiasLayout layout = bias_layout(x, dim, channels_last);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bias_act_forward_cpu", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                             y.data_ptr<scalar_t>(), x.numel(), layout, static_cast<int>(act),
                             static_cast<float>(alpha), static_cast<float>(gain), static_cast<float>(clamp));
  });
  return y;
}

torch::Tensor bias_act_grad_cpu(torch::Tensor dy, torch::Tensor y, int64_t act, double alpha, double gain,
                                double clamp) {
  // dy and y must share a layout; channels-last y keeps dy channels-last.
  auto format = (y.dim() == 4 && !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast))
                    ? at::MemoryFormat::ChannelsLast
                    : at::MemoryFormat::Contiguous;
  y = y.contiguous(format);
  dy = dy.to(y.scalar_type()).contiguous(format);
  auto dx = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "bias_act_grad_cpu", [&] {
    grad_kernel<scalar_t>(dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), y.numel(),
                          static_cast<int>(act), static_cast<float>(alpha), static_cast<float>(gain),
                          static_cast<float>(clamp));
  });
  return dx;
}

}  // namespace

#ifdef CTSYNTH_WITH_CUDA
// Defined in bias_act_cuda.cu (external linkage).
torch::Tensor bias_act_forward_cuda(torch::Tensor x, const c10::optional<torch::Tensor>& b_opt, int64_t dim,
                                    int64_t act, double alpha, double gain, double clamp);
torch::Tensor bias_act_grad_cuda(torch::Tensor dy, torch::Tensor y, int64_t act, double alpha, double gain,
                                 double clamp);
#endif

namespace {

torch::Tensor bias_act_forward(torch::Tensor x, const c10::optional<torch::Tensor>& b, int64_t dim, int64_t act,
                               double alpha, double gain, double clamp) {
  if (x.is_cuda()) {
#ifdef CTSYNTH_WITH_CUDA
    return bias_act_forward_cuda(x, b, dim, act, alpha, gain, clamp);
#else
    TORCH_CHECK(false, "bias_act: this build of the extension has no CUDA kernels");
#endif
  }
  return bias_act_forward_cpu(x, b, dim, act, alpha, gain, clamp);
}

torch::Tensor bias_act_grad(torch::Tensor dy, torch::Tensor y, int64_t act, double alpha, double gain,
                            double clamp) {
  if (y.is_cuda()) {
#ifdef CTSYNTH_WITH_CUDA
    return bias_act_grad_cuda(dy, y, act, alpha, gain, clamp);
#else
    TORCH_CHECK(false, "bias_act: this build of the extension has no CUDA kernels");
#endif
  }
  return bias_act_grad_cpu(dy, y, act, alpha, gain, clamp);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &bias_act_forward, "clamp(act(x + b) * gain)");
  m.def("grad", &bias_act_grad, "dy * act'(x + b) * gain * [|y| < clamp], from y");
}
