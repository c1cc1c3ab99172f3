// Patch sliced-Wasserstein distance per sample on the CPU (kernels/patch_swd.py has the maths).
//
// Forward, one image b at a time in parallel: the k x k zero-padded patches of x[b] and y[b] are
// projected on every theta[p] straight from the image (no [B*H*W, C*k*k] patch copy; an [N, P]
// buffer per image), each row of N = H*W projections is sorted, and the row's sum of squared
// differences of the sorted values is kept. When a gradient is needed the forward also
// writes dL/dproj [B, P, N] through the row's permutation, so the backward never sorts:
//   csrc_patch_swd_image_grad   dL/dimage: dL/dproj mapped back to pixels (transposed projection)
//   csrc_patch_swd_theta_grad   dL/dtheta for one image: sum over b, n of dL/dproj times the patch
// x, y and theta arrive in one dtype (float32, or float64 for the float64 references of the tests);
// the Python wrapper casts and reshapes, and multiplies the gradients by dL/dloss.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <utility>
#include <vector>

#include "common.h"

namespace lgt_csrc {
namespace {

struct Geometry {
  int64_t B, C, H, W, P, k;
  int64_t N() const { return H * W; }
  int64_t patch() const { return C * k * k; }
};

// For patch offset (i, j) (0 <= i, j < k) the valid output range of rows h and columns w, those
// whose source pixel (h + i - k/2, w + j - k/2) lies inside the image.
struct Window {
  int64_t h0, h1, w0, w1, dh, dw;
  Window(const Geometry& g, int64_t i, int64_t j)
      : dh(i - g.k / 2), dw(j - g.k / 2) {
    h0 = std::max<int64_t>(0, -dh);
    h1 = std::min<int64_t>(g.H, g.H - dh);
    w0 = std::max<int64_t>(0, -dw);
    w1 = std::min<int64_t>(g.W, g.W - dw);
  }
};

// out[n, p] = sum over (c, i, j) of theta_t[c k k + i k + j, p] * image[c, h + i - k/2, w + j - k/2]
// for all P directions at once (theta_t is theta transposed, [C*k*k, P]): the inner loop runs over
// p, contiguous, and vectorises.
template <typename T>
void project_image(const T* image, const T* theta_t, const Geometry& g, T* out) {
  std::fill(out, out + g.N() * g.P, T(0));
  for (int64_t c = 0; c < g.C; ++c) {
    for (int64_t i = 0; i < g.k; ++i) {
      for (int64_t j = 0; j < g.k; ++j) {
        const T* __restrict t = theta_t + ((c * g.k + i) * g.k + j) * g.P;
        const Window win(g, i, j);
        for (int64_t h = win.h0; h < win.h1; ++h) {
          for (int64_t w = win.w0; w < win.w1; ++w) {
            const T v = image[(c * g.H + h + win.dh) * g.W + w + win.dw];
            T* __restrict o = out + (h * g.W + w) * g.P;
_Pragma("omp simd")
            for (int64_t p = 0; p < g.P; ++p) o[p] += v * t[p];
          }
        }
      }
    }
  }
}

// A float as an unsigned key with the same order (negative values flipped), and back. NaNs sort
// after +inf (a NaN with the sign bit set, before -inf); the loss is NaN either way.
inline uint32_t sortable_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

inline float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Buffers of one thread's sorts (reused row after row).
struct SortBuffers {
  std::vector<uint32_t> keys, positions, keys_tmp, positions_tmp;
  explicit SortBuffers(int64_t n) : keys(n), positions(n), keys_tmp(n), positions_tmp(n) {}
};

// Sorts column[i * stride] (i < values.size()) into `values` and writes where each sorted value came
// from into `positions`. An LSD radix sort of the 32-bit keys, 8 bits a pass, skipping a pass whose
// digit all keys share: for rows of 64 to 4096 values it runs ~2x faster than std::sort, whose
// branches mispredict on random data.
void sort_with_positions(const float* column, int64_t stride, std::vector<float>& values,
                         std::vector<int64_t>& positions, SortBuffers& buffers) {
  const int64_t n = static_cast<int64_t>(values.size());
  for (int64_t i = 0; i < n; ++i) {
    buffers.keys[i] = sortable_key(column[i * stride]);
    buffers.positions[i] = static_cast<uint32_t>(i);
  }
  for (int shift = 0; shift < 32; shift += 8) {
    uint32_t offsets[256] = {};
    for (int64_t i = 0; i < n; ++i) ++offsets[(buffers.keys[i] >> shift) & 255u];
    if (offsets[(buffers.keys[0] >> shift) & 255u] == static_cast<uint32_t>(n)) continue;
    uint32_t start = 0;
    for (uint32_t& offset : offsets) {
      const uint32_t count = offset;
      offset = start;
      start += count;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t slot = offsets[(buffers.keys[i] >> shift) & 255u]++;
      buffers.keys_tmp[slot] = buffers.keys[i];
      buffers.positions_tmp[slot] = buffers.positions[i];
    }
    buffers.keys.swap(buffers.keys_tmp);
    buffers.positions.swap(buffers.positions_tmp);
  }
  for (int64_t i = 0; i < n; ++i) {
    values[i] = key_value(buffers.keys[i]);
    positions[i] = buffers.positions[i];
  }
}

// float64 (the tests' references): a comparison sort.
void sort_with_positions(const double* column, int64_t stride, std::vector<double>& values,
                         std::vector<int64_t>& positions, SortBuffers&) {
  for (size_t i = 0; i < values.size(); ++i) values[i] = column[i * stride];
  std::iota(positions.begin(), positions.end(), 0);
  // NaNs last (std::sort with a plain < on NaN is undefined behaviour).
  std::sort(positions.begin(), positions.end(), [&](int64_t a, int64_t b) {
    const double va = values[a], vb = values[b];
    return !std::isnan(va) && (std::isnan(vb) || va < vb);
  });
  std::vector<double> sorted(values.size());
  for (size_t i = 0; i < values.size(); ++i) sorted[i] = values[positions[i]];
  values.swap(sorted);
}

Geometry checked_geometry(const at::Tensor& x, const at::Tensor& y, const at::Tensor& theta, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && theta.device().is_cpu(),
              "lgt::csrc_patch_swd: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && x.numel() > 0 && y.sizes() == x.sizes(),
              "lgt::csrc_patch_swd: x and y must be non-empty [B, C, H, W] of one shape");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == theta.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "lgt::csrc_patch_swd: x, y and theta must share one dtype, float32 or float64");
  TORCH_CHECK(k >= 1 && k % 2 == 1, "lgt::csrc_patch_swd: kernel_size must be odd and >= 1");
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), theta.size(0), k};
  TORCH_CHECK(theta.dim() == 2 && theta.size(1) == g.patch(), "lgt::csrc_patch_swd: theta must be [P, C*k*k]");
  TORCH_CHECK(g.N() < (int64_t(1) << 32), "lgt::csrc_patch_swd: H*W must be < 2^32");
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_swd_fwd(const at::Tensor& x_in, const at::Tensor& y_in,
                                                              const at::Tensor& theta_in, int64_t kernel_size,
                                                              bool grad_x, bool grad_y) {
  const Geometry g = checked_geometry(x_in, y_in, theta_in, kernel_size);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), theta = theta_in.contiguous();
  const auto options = x.options();
  at::Tensor grad_proj_x = grad_x ? at::empty({g.B, g.P, g.N()}, options) : at::empty({0}, options);
  at::Tensor grad_proj_y = grad_y ? at::empty({g.B, g.P, g.N()}, options) : at::empty({0}, options);
  at::Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csrc_patch_swd_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* gx = grad_x ? grad_proj_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = grad_y ? grad_proj_y.data_ptr<scalar_t>() : nullptr;
    const int64_t N = g.N();
    const double count = static_cast<double>(g.B * g.P * N);
    const scalar_t grad_scale = static_cast<scalar_t>(2.0 / count);
    const at::Tensor theta_t_tensor = theta.t().contiguous();
    const scalar_t* tt = theta_t_tensor.data_ptr<scalar_t>();
    std::vector<double> row_sums(g.B * g.P);
    // One image per task: its [N, P] projections of x and y, then one sort per (image, direction).
    at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> proj_x(N * g.P), proj_y(N * g.P), sorted_x(N), sorted_y(N);
      std::vector<int64_t> pos_x(N), pos_y(N);
      SortBuffers buffers(N);
      for (int64_t b = begin; b < end; ++b) {
        project_image(xp + b * g.C * N, tt, g, proj_x.data());
        project_image(yp + b * g.C * N, tt, g, proj_y.data());
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t row = b * g.P + p;
          sort_with_positions(proj_x.data() + p, g.P, sorted_x, pos_x, buffers);
          sort_with_positions(proj_y.data() + p, g.P, sorted_y, pos_y, buffers);
          double sum = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t d = sorted_x[n] - sorted_y[n];
            sum += static_cast<double>(d) * d;
            if (gx) gx[row * N + pos_x[n]] = grad_scale * d;
            if (gy) gy[row * N + pos_y[n]] = -grad_scale * d;
          }
          row_sums[row] = sum;
        }
      }
    });
    loss.fill_(std::accumulate(row_sums.begin(), row_sums.end(), 0.0) / count);
  });
  return {loss, grad_proj_x, grad_proj_y};
}

// dL/dimage [B, C, H, W] from dL/dproj [B, P, N]: each pixel collects theta[p, c, i, j] * dL/dproj
// at every output position whose patch covers it. Parallel over (b, c) planes (no write conflicts).
at::Tensor patch_swd_image_grad(const at::Tensor& grad_proj_in, const at::Tensor& theta_in, int64_t C, int64_t H,
                                int64_t W, int64_t kernel_size) {
  const at::Tensor grad_proj = grad_proj_in.contiguous(), theta = theta_in.contiguous();
  TORCH_CHECK(grad_proj.dim() == 3 && grad_proj.size(2) == H * W && theta.dim() == 2 &&
                  theta.size(0) == grad_proj.size(1) && theta.size(1) == C * kernel_size * kernel_size &&
                  grad_proj.scalar_type() == theta.scalar_type(),
              "lgt::csrc_patch_swd_image_grad: grad_proj must be [B, P, H*W] and theta [P, C*k*k] of its dtype");
  const Geometry g{grad_proj.size(0), C, H, W, theta.size(0), kernel_size};
  at::Tensor grad_image = at::zeros({g.B, C, H, W}, grad_proj.options());
  AT_DISPATCH_FLOATING_TYPES(grad_proj.scalar_type(), "csrc_patch_swd_image_grad", [&] {
    const scalar_t* gp = grad_proj.data_ptr<scalar_t>();
    const scalar_t* tp = theta.data_ptr<scalar_t>();
    scalar_t* out = grad_image.data_ptr<scalar_t>();
    const int64_t N = g.N(), K = g.patch();
    // Per image: G = dL/dproj^T theta ([N, P] x [P, K], the inner loop over K contiguous), then each
    // G[n, (c, i, j)] goes to the pixel (c, h + i - k/2, w + j - k/2) it came from.
    at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> G(N * K);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(G.begin(), G.end(), scalar_t(0));
        for (int64_t p = 0; p < g.P; ++p) {
          const scalar_t* __restrict t = tp + p * K;
          const scalar_t* grad_row = gp + (b * g.P + p) * N;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t v = grad_row[n];
            scalar_t* __restrict o = G.data() + n * K;
_Pragma("omp simd")
            for (int64_t q = 0; q < K; ++q) o[q] += v * t[q];
          }
        }
        scalar_t* image = out + b * C * N;
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < g.k; ++i) {
            for (int64_t j = 0; j < g.k; ++j) {
              const int64_t q = (c * g.k + i) * g.k + j;
              const Window win(g, i, j);
              for (int64_t h = win.h0; h < win.h1; ++h) {
                scalar_t* dst = image + (c * H + h + win.dh) * W + win.dw;
                for (int64_t w = win.w0; w < win.w1; ++w) dst[w] += G[(h * W + w) * K + q];
              }
            }
          }
        }
      }
    });
  });
  return grad_image;
}

// dL/dtheta [P, C*k*k] for one image: sum over b and n of dL/dproj[b, p, n] times the patch of
// image[b] at n. Parallel over directions p.
at::Tensor patch_swd_theta_grad(const at::Tensor& image_in, const at::Tensor& grad_proj_in, int64_t kernel_size) {
  const at::Tensor image = image_in.contiguous(), grad_proj = grad_proj_in.contiguous();
  TORCH_CHECK(image.dim() == 4 && grad_proj.dim() == 3 && grad_proj.size(0) == image.size(0) &&
                  grad_proj.size(2) == image.size(2) * image.size(3) && image.scalar_type() == grad_proj.scalar_type(),
              "lgt::csrc_patch_swd_theta_grad: image [B, C, H, W] and grad_proj [B, P, H*W] of one dtype");
  const Geometry g{image.size(0), image.size(1), image.size(2), image.size(3), grad_proj.size(1), kernel_size};
  at::Tensor grad_theta = at::empty({g.P, g.patch()}, image.options());
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "csrc_patch_swd_theta_grad", [&] {
    const scalar_t* ip = image.data_ptr<scalar_t>();
    const at::Tensor grad_proj_t = grad_proj.transpose(1, 2).contiguous();  // [B, N, P]
    const scalar_t* gp = grad_proj_t.data_ptr<scalar_t>();
    const int64_t N = g.N(), K = g.patch();
    // sum_t[(c, i, j), p] += image[c, h + i - k/2, w + j - k/2] * dL/dproj[b, p, n]: the inner loop
    // over p, contiguous. Images are split between threads, each chunk with its own sum.
    // One sum per chunk of images, added in chunk order afterwards: the result does not depend on
    // which thread finishes first (floating-point addition is not associative).
    std::vector<std::pair<int64_t, std::vector<scalar_t>>> chunks;
    std::mutex merge;
    at::parallel_for(0, g.B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> sum(K * g.P, scalar_t(0));
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t i = 0; i < g.k; ++i) {
            for (int64_t j = 0; j < g.k; ++j) {
              scalar_t* __restrict acc = sum.data() + ((c * g.k + i) * g.k + j) * g.P;
              const Window win(g, i, j);
              for (int64_t h = win.h0; h < win.h1; ++h) {
                for (int64_t w = win.w0; w < win.w1; ++w) {
                  const scalar_t v = ip[((b * g.C + c) * g.H + h + win.dh) * g.W + w + win.dw];
                  const scalar_t* __restrict grad = gp + (b * N + h * g.W + w) * g.P;
_Pragma("omp simd")
                  for (int64_t p = 0; p < g.P; ++p) acc[p] += v * grad[p];
                }
              }
            }
          }
        }
      }
      const std::lock_guard<std::mutex> lock(merge);
      chunks.emplace_back(begin, std::move(sum));
    });
    std::sort(chunks.begin(), chunks.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<scalar_t> total(K * g.P, scalar_t(0));
    for (const auto& chunk : chunks)
      for (size_t q = 0; q < total.size(); ++q) total[q] += chunk.second[q];
    scalar_t* out = grad_theta.data_ptr<scalar_t>();
    for (int64_t p = 0; p < g.P; ++p)
      for (int64_t q = 0; q < K; ++q) out[p * K + q] = total[q * g.P + p];
  });
  return grad_theta;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgt, m) {
  m.def("csrc_patch_swd_fwd(Tensor x, Tensor y, Tensor theta, int kernel_size, bool grad_x, bool grad_y) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("csrc_patch_swd_image_grad(Tensor grad_proj, Tensor theta, int C, int H, int W, int kernel_size) -> Tensor");
  m.def("csrc_patch_swd_theta_grad(Tensor image, Tensor grad_proj, int kernel_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgt, CPU, m) {
  m.impl("csrc_patch_swd_fwd", &patch_swd_fwd);
  m.impl("csrc_patch_swd_image_grad", &patch_swd_image_grad);
  m.impl("csrc_patch_swd_theta_grad", &patch_swd_theta_grad);
}

}  // namespace lgt_csrc
