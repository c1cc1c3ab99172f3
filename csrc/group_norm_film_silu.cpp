// GroupNorm -> FiLM -> SiLU on the CPU: y = silu((groupnorm(x) * weight + bias) * (1 + scale) + shift).
//
// The maths and the op contract are kernels/group_norm_film_silu.py's (same schema as its
// lgt::group_norm_film_silu_fwd / _bwd ops). Forward: one pass over x for per-channel statistics
// (shifted sums, merged into the group's mean and M2 in double), one pass writing y. Backward: one
// pass recomputing u from x, mean and rstd for the per-(b, c) sums of du and du * xhat, one pass
// writing dx; nothing but x and the [B, G] statistics is kept between forward and backward.
//
// Per batch row b, channel c in group g:   u = x * A[b, c] + Bc[b, c]   with
//   A = a * rstd,  Bc = offset - mean * A,   a = weight * (1 + scale),  offset = bias * (1 + scale) + shift
// so both passes of each direction are one multiply-add per element plus the activation.
//
// Layouts: contiguous NCHW (a channel is a contiguous row of H*W) and channels_last (a position is a
// contiguous row of C); parallel over rows (NCHW) or batch rows / positions (channels_last) with
// at::parallel_for. Accumulation in float for float/half/bfloat16 (partial sums in float,
// flushed to double every block) and double for double; statistics and sums come back as the
// Python op documents: mean [B, G] float64, rstd [B, G] and the sums [B, C] in float32 (float64 for
// float64 x).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lgt_csrc {
namespace {

constexpr int64_t kFlushEvery = 4096;  // elements summed in acc_t before the partial sum goes to double

// Rows a parallel task takes at least, for rows of `row_length` elements: a task of under ~16k
// elements costs less than waking another thread (small tensors then run on the calling thread).
inline int64_t grain_for(int64_t row_length) { return std::max<int64_t>(1, 16384 / row_length); }

struct Shape {
  int64_t B, C, G, HW;
  int64_t channels_per_group() const { return C / G; }
};

// a = weight * (1 + scale) and offset = bias * (1 + scale) + shift for every (b, c), in acc_t.
template <typename acc_t>
void film_coefficients(const Shape& s, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& scale,
                       const at::Tensor& shift, std::vector<acc_t>& a, std::vector<acc_t>& offset) {
  a.assign(s.B * s.C, acc_t(1));
  offset.assign(s.B * s.C, acc_t(0));
  const acc_t* w = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  const acc_t* bi = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  const acc_t* sc = scale.defined() ? scale.data_ptr<acc_t>() : nullptr;
  const acc_t* sh = shift.defined() ? shift.data_ptr<acc_t>() : nullptr;
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t c = 0; c < s.C; ++c) {
      const int64_t bc = b * s.C + c;
      const acc_t one_plus_scale = sc ? acc_t(1) + sc[bc] : acc_t(1);
      a[bc] = (w ? w[c] : acc_t(1)) * one_plus_scale;
      offset[bc] = (bi ? bi[c] * one_plus_scale : acc_t(0)) + (sh ? sh[bc] : acc_t(0));
    }
  }
}

// (sum of a, sum of b) over i in [0, n) where f(i, a, b) sets a and b: acc_t partial sums over
// kFlushEvery elements (an omp simd reduction: vectorised, the partial sums reassociated), added in
// double.
template <typename acc_t, typename F>
LGT_ALWAYS_INLINE std::array<double, 2> pair_sums(int64_t n, const F& f) {
  std::array<double, 2> total{};
  for (int64_t start = 0; start < n; start += kFlushEvery) {
    const int64_t end = std::min(n, start + kFlushEvery);
    acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = start; i < end; ++i) {
      acc_t a, b;
      f(i, a, b);
      s1 += a;
      s2 += b;
    }
    total[0] += s1;
    total[1] += s2;
  }
  return total;
}

// One channels_last position: s1[c] += x[c] - shift[c], s2[c] += (x[c] - shift[c])^2. The __restrict
// pointers (and omp simd) let it vectorise: through std::vector the accumulators may alias x.
template <typename scalar_t, typename acc_t>
LGT_ALWAYS_INLINE void accumulate_moments(const scalar_t* __restrict x, const acc_t* __restrict shift,
                                          acc_t* __restrict s1, acc_t* __restrict s2, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t d = static_cast<acc_t>(x[c]) - shift[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// Mean and M2 (sum of squared deviations from that mean) of one contiguous row of n values, shifted
// by its first value so a large common offset does not cancel.
template <typename scalar_t, typename acc_t>
void row_statistics(const scalar_t* p, int64_t n, double& mean, double& m2) {
  const acc_t shift = static_cast<acc_t>(p[0]);
  const auto sums = pair_sums<acc_t>(n, [&](int64_t i, acc_t& a, acc_t& b) {
    a = static_cast<acc_t>(p[i]) - shift;
    b = a * a;
  });
  mean = shift + sums[0] / static_cast<double>(n);
  m2 = sums[1] - sums[0] * sums[0] / static_cast<double>(n);
}

// Per-channel sums over the HW positions of one channels_last batch row: add(i, s1, s2) adds
// position i's C values into the acc_t partial sums s1 and s2, which go to the double totals t1 and
// t2 every kFlushEvery positions. (The C-long buffers are the caller's, reused row after row.)
template <typename acc_t, typename F>
void position_sums(int64_t HW, const F& add, std::vector<acc_t>& s1, std::vector<acc_t>& s2,
                   std::vector<double>& t1, std::vector<double>& t2) {
  std::fill(t1.begin(), t1.end(), 0.0);
  std::fill(t2.begin(), t2.end(), 0.0);
  for (int64_t start = 0; start < HW; start += kFlushEvery) {
    std::fill(s1.begin(), s1.end(), acc_t(0));
    std::fill(s2.begin(), s2.end(), acc_t(0));
    for (int64_t i = start; i < std::min(HW, start + kFlushEvery); ++i) add(i, s1.data(), s2.data());
    for (size_t c = 0; c < s1.size(); ++c) {
      t1[c] += s1[c];
      t2[c] += s2[c];
    }
  }
}

// Per-channel mean and M2 of a channels_last x, every (b, c), each channel shifted by its value at
// the first position.
template <typename scalar_t, typename acc_t>
void channels_last_statistics(const scalar_t* x, const Shape& s, std::vector<double>& mean, std::vector<double>& m2) {
  mean.resize(s.B * s.C);
  m2.resize(s.B * s.C);
  const double n = static_cast<double>(s.HW);
  at::parallel_for(0, s.B, grain_for(s.HW * s.C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(s.C), s1(s.C), s2(s.C);
    std::vector<double> t1(s.C), t2(s.C);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* base = x + b * s.HW * s.C;
      for (int64_t c = 0; c < s.C; ++c) shift[c] = static_cast<acc_t>(base[c]);
      position_sums(s.HW, [&](int64_t i, acc_t* a, acc_t* b) {
        accumulate_moments(base + i * s.C, shift.data(), a, b, s.C);
      }, s1, s2, t1, t2);
      for (int64_t c = 0; c < s.C; ++c) {
        mean[b * s.C + c] = shift[c] + t1[c] / n;
        m2[b * s.C + c] = t2[c] - t1[c] * t1[c] / n;
      }
    }
  });
}

// Calls op.row<true>(first element, C, first (b, c)) for every position of a channels_last x (a
// contiguous row of C channels, one (b, c) each). Parallel over positions. (NCHW rows, one (b, c)
// each, go through op.row<false> group by group in forward_impl and backward_impl.)
template <typename Op>
void for_each_position(const Shape& s, const Op& op) {
  at::parallel_for(0, s.B * s.HW, grain_for(s.C), [&](int64_t begin, int64_t end) {
    FlushDenormals guard;
    for (int64_t position = begin; position < end; ++position) {
      op.template row<true>(position * s.C, s.C, (position / s.HW) * s.C);
    }
  });
}

// The row functors read raw __restrict pointers: through std::vector the compiler must assume the
// output may alias the coefficients, reloads them every element and does not vectorise.
template <typename scalar_t, typename acc_t>
struct ForwardRows {
  const scalar_t* x;
  scalar_t* y;
  const acc_t* A;
  const acc_t* Bc;
  bool act;

  template <bool kPerChannel>
  void row(int64_t first, int64_t n, int64_t bc0) const {
    const scalar_t* __restrict xr = x + first;
    scalar_t* __restrict yr = y + first;
    const acc_t* __restrict a = A + bc0;
    const acc_t* __restrict b = Bc + bc0;
    if (act) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t u = static_cast<acc_t>(xr[i]) * a[kPerChannel ? i : 0] + b[kPerChannel ? i : 0];
        yr[i] = static_cast<scalar_t>(u * sigmoid(u));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        yr[i] = static_cast<scalar_t>(static_cast<acc_t>(xr[i]) * a[kPerChannel ? i : 0] + b[kPerChannel ? i : 0]);
      }
    }
  }
};

// du from dy and u; kAct is a template argument so that no branch is left in the loops.
template <bool kAct, typename acc_t>
LGT_ALWAYS_INLINE acc_t activation_grad(acc_t dy, acc_t u) {
  if (!kAct) return dy;
  const acc_t sg = sigmoid(u);
  return dy * sg * (acc_t(1) + u * (acc_t(1) - sg));
}

// One channels_last position: s1[c] += du, s2[c] += du * xhat, with u = x A + Bc, xhat = x R + M.
template <bool kAct, typename scalar_t, typename acc_t>
LGT_ALWAYS_INLINE void accumulate_gradient_sums(const scalar_t* __restrict x, const scalar_t* __restrict dy,
                                                const acc_t* __restrict A, const acc_t* __restrict Bc,
                                                const acc_t* __restrict R, const acc_t* __restrict M,
                                                acc_t* __restrict s1, acc_t* __restrict s2, int64_t C) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t du = activation_grad<kAct>(static_cast<acc_t>(dy[c]), xv * A[c] + Bc[c]);
    s1[c] += du;
    s2[c] += du * (xv * R[c] + M[c]);
  }
}

// dx = K1 * du + K2 * x + K3, du recomputed from x and dy.
template <typename scalar_t, typename acc_t, bool kAct>
struct InputGradRows {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  const acc_t *A, *Bc, *K1, *K2, *K3;

  template <bool kPerChannel>
  void row(int64_t first, int64_t n, int64_t bc0) const {
    const scalar_t* __restrict xr = x + first;
    const scalar_t* __restrict dyr = dy + first;
    scalar_t* __restrict dxr = dx + first;
    const acc_t* __restrict a = A + bc0;
    const acc_t* __restrict b = Bc + bc0;
    const acc_t* __restrict k1 = K1 + bc0;
    const acc_t* __restrict k2 = K2 + bc0;
    const acc_t* __restrict k3 = K3 + bc0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = kPerChannel ? i : 0;
      const acc_t xv = static_cast<acc_t>(xr[i]);
      const acc_t du = activation_grad<kAct>(static_cast<acc_t>(dyr[i]), xv * a[j] + b[j]);
      dxr[i] = static_cast<scalar_t>(k1[j] * du + k2[j] * xv + k3[j]);
    }
  }
};

// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = a * du and the means
// over group bg: dx = K1 * du + K2 * x + K3 for each of its channels, from the sums of du and du * xhat.
template <typename acc_t>
void input_grad_coefficients(int64_t bg, const Shape& s, const acc_t* a, const acc_t* sum_du,
                             const acc_t* sum_du_xhat, const double* mean, const acc_t* rstd, acc_t* K1, acc_t* K2,
                             acc_t* K3) {
  const int64_t Cg = s.channels_per_group();
  const int64_t first = (bg / s.G) * s.C + (bg % s.G) * Cg;
  double m1 = 0, m2 = 0;
  for (int64_t bc = first; bc < first + Cg; ++bc) {
    m1 += static_cast<double>(a[bc]) * sum_du[bc];
    m2 += static_cast<double>(a[bc]) * sum_du_xhat[bc];
  }
  m1 /= static_cast<double>(Cg * s.HW);
  m2 /= static_cast<double>(Cg * s.HW);
  const double r = rstd[bg];
  for (int64_t bc = first; bc < first + Cg; ++bc) {
    K1[bc] = static_cast<acc_t>(r * a[bc]);
    K2[bc] = static_cast<acc_t>(-r * r * m2);
    K3[bc] = static_cast<acc_t>(-r * m1 + r * r * m2 * mean[bg]);
  }
}

// Group bg's mean and rstd from its channels' means and M2 (Chan et al.: M2 = sum M2_c +
// n sum (mean_c - mean)^2), then A and Bc of its channels.
template <typename acc_t>
void finish_group(int64_t bg, const Shape& s, const double* channel_mean, const double* channel_m2, double eps,
                  const acc_t* a, const acc_t* offset, double* mean, acc_t* rstd, acc_t* A, acc_t* Bc) {
  const int64_t Cg = s.channels_per_group();
  const int64_t first = (bg / s.G) * s.C + (bg % s.G) * Cg;
  double m = 0;
  for (int64_t c = first; c < first + Cg; ++c) m += channel_mean[c];
  m /= static_cast<double>(Cg);
  double m2 = 0;
  for (int64_t c = first; c < first + Cg; ++c) {
    const double d = channel_mean[c] - m;
    m2 += channel_m2[c] + static_cast<double>(s.HW) * d * d;
  }
  const double v = m2 / static_cast<double>(Cg * s.HW);
  const double var = std::isnan(v) ? v : std::max(0.0, v);  // max(0, NaN) would hide a NaN
  mean[bg] = m;
  rstd[bg] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
  for (int64_t bc = first; bc < first + Cg; ++bc) {
    A[bc] = a[bc] * rstd[bg];
    Bc[bc] = offset[bc] - static_cast<acc_t>(m) * A[bc];
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const at::Tensor& x, const Shape& s, bool channels_last, const at::Tensor& weight,
                  const at::Tensor& bias, const at::Tensor& scale, const at::Tensor& shift, double eps, bool act,
                  at::Tensor& y, at::Tensor& mean_out, at::Tensor& rstd_out) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  double* mean = mean_out.data_ptr<double>();
  acc_t* rstd = rstd_out.data_ptr<acc_t>();
  std::vector<acc_t> a, offset;
  film_coefficients<acc_t>(s, weight, bias, scale, shift, a, offset);
  std::vector<acc_t> A(s.B * s.C), Bc(s.B * s.C);
  std::vector<double> channel_mean(s.B * s.C), channel_m2(s.B * s.C);
  const ForwardRows<scalar_t, acc_t> output{xp, y.data_ptr<scalar_t>(), A.data(), Bc.data(), act};
  if (!channels_last) {
    // One group at a time, while its rows are in cache: its statistics, then its output.
    const int64_t Cg = s.channels_per_group();
    at::parallel_for(0, s.B * s.G, grain_for(Cg * s.HW), [&](int64_t begin, int64_t end) {
      FlushDenormals guard;
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t first = (bg / s.G) * s.C + (bg % s.G) * Cg;
        for (int64_t bc = first; bc < first + Cg; ++bc) {
          row_statistics<scalar_t, acc_t>(xp + bc * s.HW, s.HW, channel_mean[bc], channel_m2[bc]);
        }
        finish_group(bg, s, channel_mean.data(), channel_m2.data(), eps, a.data(), offset.data(), mean, rstd,
                     A.data(), Bc.data());
        for (int64_t bc = first; bc < first + Cg; ++bc) output.template row<false>(bc * s.HW, s.HW, bc);
      }
    });
    return;
  }
  // channels_last: a group's channels interleave with the others', so the statistics come first.
  channels_last_statistics<scalar_t, acc_t>(xp, s, channel_mean, channel_m2);
  for (int64_t bg = 0; bg < s.B * s.G; ++bg) {
    finish_group(bg, s, channel_mean.data(), channel_m2.data(), eps, a.data(), offset.data(), mean, rstd, A.data(),
                 Bc.data());
  }
  for_each_position(s, output);
}

template <typename scalar_t, typename acc_t, bool kAct>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const Shape& s, bool channels_last,
                   const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& weight,
                   const at::Tensor& bias, const at::Tensor& scale, const at::Tensor& shift, at::Tensor& dx, at::Tensor& sum_du_out, at::Tensor& sum_du_xhat_out) {
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const double* mean = mean_in.data_ptr<double>();
  const acc_t* rstd = rstd_in.data_ptr<acc_t>();
  const int64_t Cg = s.channels_per_group();

  std::vector<acc_t> a, offset;
  film_coefficients<acc_t>(s, weight, bias, scale, shift, a, offset);
  // u = x * A + Bc and xhat = x * rstd - mean * rstd, per (b, c).
  std::vector<acc_t> A(s.B * s.C), Bc(s.B * s.C), R(s.B * s.C), M(s.B * s.C);
  for (int64_t bc = 0; bc < s.B * s.C; ++bc) {
    const int64_t bg = (bc / s.C) * s.G + (bc % s.C) / Cg;
    A[bc] = a[bc] * rstd[bg];
    Bc[bc] = offset[bc] - static_cast<acc_t>(mean[bg]) * A[bc];
    R[bc] = rstd[bg];
    M[bc] = -static_cast<acc_t>(mean[bg]) * rstd[bg];
  }

  acc_t* sum_du = sum_du_out.data_ptr<acc_t>();
  acc_t* sum_du_xhat = sum_du_xhat_out.data_ptr<acc_t>();
  std::vector<acc_t> K1(s.B * s.C), K2(s.B * s.C), K3(s.B * s.C);
  if (!channels_last) {
    // One group at a time, while its rows are in cache: the sums of du and du * xhat of each of
    // its channels, then its dx.
    // du is kept for the group (in acc_t, a few kB) so that the activation's gradient, an exp, is
    // evaluated once per element.
    at::parallel_for(0, s.B * s.G, grain_for(Cg * s.HW), [&](int64_t begin, int64_t end) {
      FlushDenormals guard;
      std::vector<acc_t> group_du(Cg * s.HW);
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t first = (bg / s.G) * s.C + (bg % s.G) * Cg;
        for (int64_t bc = first; bc < first + Cg; ++bc) {
          const scalar_t* xr = xp + bc * s.HW;
          const scalar_t* dyr = dyp + bc * s.HW;
          acc_t* __restrict du_row = group_du.data() + (bc - first) * s.HW;
          const acc_t a = A[bc], b = Bc[bc], r = R[bc], m = M[bc];
          const auto sums = pair_sums<acc_t>(s.HW, [&](int64_t i, acc_t& du, acc_t& du_xhat) {
            const acc_t xv = static_cast<acc_t>(xr[i]);
            du = activation_grad<kAct>(static_cast<acc_t>(dyr[i]), xv * a + b);
            du_row[i] = du;
            du_xhat = du * (xv * r + m);
          });
          sum_du[bc] = static_cast<acc_t>(sums[0]);
          sum_du_xhat[bc] = static_cast<acc_t>(sums[1]);
        }
        input_grad_coefficients(bg, s, a.data(), sum_du, sum_du_xhat, mean, rstd, K1.data(), K2.data(), K3.data());
        for (int64_t bc = first; bc < first + Cg; ++bc) {
          const scalar_t* __restrict xr = xp + bc * s.HW;
          const acc_t* __restrict du_row = group_du.data() + (bc - first) * s.HW;
          scalar_t* __restrict dxr = dxp + bc * s.HW;
          const acc_t k1 = K1[bc], k2 = K2[bc], k3 = K3[bc];
#pragma omp simd
          for (int64_t i = 0; i < s.HW; ++i) {
            dxr[i] = static_cast<scalar_t>(k1 * du_row[i] + k2 * static_cast<acc_t>(xr[i]) + k3);
          }
        }
      }
    });
    return;
  }
  // channels_last: a group's channels interleave with the others', so the sums come first for all.
  at::parallel_for(0, s.B, grain_for(s.HW * s.C), [&](int64_t begin, int64_t end) {
    FlushDenormals guard;
    std::vector<acc_t> s1(s.C), s2(s.C);
    std::vector<double> t1(s.C), t2(s.C);
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* Ab = A.data() + b * s.C;
      const acc_t* Bb = Bc.data() + b * s.C;
      const acc_t* Rb = R.data() + b * s.C;
      const acc_t* Mb = M.data() + b * s.C;
      position_sums(s.HW, [&](int64_t i, acc_t* du, acc_t* du_xhat) {
        const int64_t row = (b * s.HW + i) * s.C;
        accumulate_gradient_sums<kAct>(xp + row, dyp + row, Ab, Bb, Rb, Mb, du, du_xhat, s.C);
      }, s1, s2, t1, t2);
      for (int64_t c = 0; c < s.C; ++c) {
        sum_du[b * s.C + c] = static_cast<acc_t>(t1[c]);
        sum_du_xhat[b * s.C + c] = static_cast<acc_t>(t2[c]);
      }
    }
  });
  for (int64_t bg = 0; bg < s.B * s.G; ++bg) {
    input_grad_coefficients(bg, s, a.data(), sum_du, sum_du_xhat, mean, rstd, K1.data(), K2.data(), K3.data());
  }
  for_each_position(s, InputGradRows<scalar_t, acc_t, kAct>{xp, dyp, dx.data_ptr<scalar_t>(), A.data(), Bc.data(),
                                                            K1.data(), K2.data(), K3.data()});
}

Shape checked_shape(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.device().is_cpu(), "lgt::csrc_group_norm_film_silu: CPU tensors only, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "lgt::csrc_group_norm_film_silu: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(num_groups > 0 && x.size(1) % num_groups == 0, "lgt::csrc_group_norm_film_silu: C=", x.size(1),
              " is not divisible by num_groups=", num_groups);
  TORCH_CHECK(x.numel() > 0, "lgt::csrc_group_norm_film_silu: x is empty");
  return Shape{x.size(0), x.size(1), num_groups, x.size(2) * x.size(3)};
}

// The ops read these through raw pointers: a wrong shape or device must fail here, not read out of
// bounds (the Python wrapper checks them too; these guard direct torch.ops calls).
void check_operand(const c10::optional<at::Tensor>& t, c10::IntArrayRef shape, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu() && t->sizes() == shape && t->is_floating_point(),
              "lgt::csrc_group_norm_film_silu: ", name, " must be a floating-point CPU tensor of shape ", shape,
              ", got ", t->sizes(), " on ", t->device());
}

void check_film(const Shape& s, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift) {
  check_operand(weight, {s.C}, "weight");
  check_operand(bias, {s.C}, "bias");
  check_operand(scale, {s.B, s.C}, "scale");
  check_operand(shift, {s.B, s.C}, "shift");
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_film_silu_fwd(
    const at::Tensor& x_in, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, double eps, bool act) {
  const Shape s = checked_shape(x_in, num_groups);
  check_film(s, weight, bias, scale, shift);
  const at::Tensor x = in_op_layout(x_in);
  const bool channels_last = is_channels_last(x);
  const at::ScalarType acc = acc_type(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({s.B, s.G}, x.options().dtype(at::kDouble));
  at::Tensor rstd = at::empty({s.B, s.G}, x.options().dtype(acc));
  const at::Tensor w = as_acc(weight, acc), b = as_acc(bias, acc), sc = as_acc(scale, acc), sh = as_acc(shift, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_group_norm_film_silu_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_impl<scalar_t, acc_t>(x, s, channels_last, w, b, sc, sh, eps, act, y, mean, rstd);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_film_silu_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t num_groups, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift, bool act) {
  const Shape s = checked_shape(x_in, num_groups);
  check_film(s, weight, bias, scale, shift);
  TORCH_CHECK(dy_in.device().is_cpu() && dy_in.sizes() == x_in.sizes(),
              "lgt::csrc_group_norm_film_silu_bwd: dy must be a CPU tensor of x's shape");
  check_operand(mean, {s.B, s.G}, "mean");
  check_operand(rstd, {s.B, s.G}, "rstd");
  const at::Tensor x = in_op_layout(x_in);
  const bool channels_last = is_channels_last(x);
  // dy in x's layout and dtype, so one index addresses both.
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor dy = dy_in.scalar_type() == x.scalar_type() && dy_in.is_contiguous(format)
                            ? dy_in : dy_in.to(x.scalar_type()).contiguous(format);
  const at::ScalarType acc = acc_type(x);
  at::Tensor dx = at::empty_like(x);
  at::Tensor sum_du = at::empty({s.B, s.C}, x.options().dtype(acc));
  at::Tensor sum_du_xhat = at::empty({s.B, s.C}, x.options().dtype(acc));
  const at::Tensor w = as_acc(weight, acc), b = as_acc(bias, acc), sc = as_acc(scale, acc), sh = as_acc(shift, acc);
  const at::Tensor mean64 = as_acc(mean, at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csrc_group_norm_film_silu_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor rstd_in = as_acc(rstd, acc);
    if (act) {
      backward_impl<scalar_t, acc_t, true>(dy, x, s, channels_last, mean64, rstd_in, w, b, sc, sh, dx, sum_du, sum_du_xhat);
    } else {
      backward_impl<scalar_t, acc_t, false>(dy, x, s, channels_last, mean64, rstd_in, w, b, sc, sh, dx, sum_du, sum_du_xhat);
    }
  });
  return {dx, sum_du, sum_du_xhat};
}


// ---------------------------------------------------------------------------------------------
// Autograd, in C++: at the small shapes of a CPU run (16k elements a call) a Python autograd
// wrapper and the [C]-sized gradient arithmetic in Python cost more than the kernels themselves.
// The forward and backward go through the dispatcher (not direct calls), so fake tensors reach the
// fake implementations kernels/group_norm_film_silu.py registers and torch.compile can trace it.
// ---------------------------------------------------------------------------------------------

using OptionalTensor = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_forward(const at::Tensor& x, int64_t num_groups,
                                                                 const OptionalTensor& weight, const OptionalTensor& bias,
                                                                 const OptionalTensor& scale, const OptionalTensor& shift,
                                                                 double eps, bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lgt::csrc_group_norm_film_silu_fwd", "")
                             .typed<decltype(group_norm_film_silu_fwd)>();
  return op.call(x, num_groups, weight, bias, scale, shift, eps, act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  int64_t num_groups, const OptionalTensor& weight,
                                                                  const OptionalTensor& bias, const OptionalTensor& scale,
                                                                  const OptionalTensor& shift, bool act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lgt::csrc_group_norm_film_silu_bwd", "")
                             .typed<decltype(group_norm_film_silu_bwd)>();
  return op.call(dy, x, mean, rstd, num_groups, weight, bias, scale, shift, act);
}

OptionalTensor optional_of(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : c10::nullopt; }

// The op as differentiable ATen ops (kernels/group_norm_film_silu.py's reference), for a backward
// that will itself be differentiated (create_graph=True, e.g. LGT's divergence penalty).
at::Tensor reference(const at::Tensor& x, int64_t num_groups, at::Tensor weight, const at::Tensor& bias,
                     const at::Tensor& scale, const at::Tensor& shift, double eps, bool act) {
  const auto compute = at::promote_types(x.scalar_type(), at::kFloat);
  auto up = [&](const at::Tensor& t) { return t.defined() ? t.to(compute) : t; };
  if (!weight.defined() && bias.defined()) weight = at::ones_like(bias);  // group_norm needs a weight with a bias
  at::Tensor h = at::group_norm(up(x), num_groups, optional_of(up(weight)), optional_of(up(bias)), eps);
  if (scale.defined()) h = h * (1 + up(scale).unsqueeze(-1).unsqueeze(-1));
  if (shift.defined()) h = h + up(shift).unsqueeze(-1).unsqueeze(-1);
  if (act) h = at::silu(h);
  return h.to(x.scalar_type());
}

// The weight, bias, scale and shift gradients (those `wanted`) into result[2..5]. With
// h = xhat * weight + bias and u = h * (1 + scale) + shift: dh = du (1 + scale) and dscale = sum du * h,
// so each is a [B, C] combination of the two sums, weight's and bias's reduced over the batch.
// Plain CPU tensors take one loop (at a CPU run's sizes the ten ATen calls of the general path
// cost more than the kernels); anything else (fake tensors while torch.compile traces) takes ATen ops.
void film_gradients(const at::Tensor& sum_du, const at::Tensor& sum_du_xhat, const at::Tensor& weight,
                    const at::Tensor& bias, const at::Tensor& scale, const at::Tensor& shift,
                    const std::array<bool, 4>& wanted, torch::autograd::variable_list& result) {
  const auto acc = sum_du.scalar_type();
  if (at::isTensorSubclassLike(sum_du) || !sum_du.device().is_cpu()) {
    const at::Tensor one_plus_scale = scale.defined() ? scale.to(acc) + 1 : at::Tensor();
    auto times_film = [&](const at::Tensor& t) { return one_plus_scale.defined() ? t * one_plus_scale : t; };
    if (wanted[0]) result[2] = times_film(sum_du_xhat).sum(0).to(weight.scalar_type());
    if (wanted[1]) result[3] = times_film(sum_du).sum(0).to(bias.scalar_type());
    if (wanted[2]) {
      at::Tensor dscale = weight.defined() ? sum_du_xhat * weight.to(acc) : sum_du_xhat;
      if (bias.defined()) dscale = dscale + sum_du * bias.to(acc);
      result[4] = dscale.to(scale.scalar_type());
    }
    if (wanted[3]) result[5] = sum_du.to(shift.scalar_type());
    return;
  }
  const int64_t B = sum_du.size(0), C = sum_du.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc, "csrc_group_norm_film_silu_film_grads", [&] {
    const at::Tensor w = weight.defined() ? weight.to(acc).contiguous() : at::Tensor();
    const at::Tensor b = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
    const at::Tensor sc = scale.defined() ? scale.to(acc).contiguous() : at::Tensor();
    const scalar_t* du = sum_du.data_ptr<scalar_t>();
    const scalar_t* du_xhat = sum_du_xhat.data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = sc.defined() ? sc.data_ptr<scalar_t>() : nullptr;
    at::Tensor dweight = at::zeros({C}, sum_du.options()), dbias = at::zeros({C}, sum_du.options());
    at::Tensor dscale = at::empty({B, C}, sum_du.options());
    scalar_t *dw = dweight.data_ptr<scalar_t>(), *db = dbias.data_ptr<scalar_t>(), *ds = dscale.data_ptr<scalar_t>();
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t c = bc % C;
      const scalar_t film = sp ? scalar_t(1) + sp[bc] : scalar_t(1);
      dw[c] += du_xhat[bc] * film;
      db[c] += du[bc] * film;
      ds[bc] = (wp ? du_xhat[bc] * wp[c] : du_xhat[bc]) + (bp ? du[bc] * bp[c] : scalar_t(0));
    }
    if (wanted[0]) result[2] = dweight.to(weight.scalar_type());
    if (wanted[1]) result[3] = dbias.to(bias.scalar_type());
    if (wanted[2]) result[4] = dscale.to(scale.scalar_type());
  });
  if (wanted[3]) result[5] = sum_du.to(shift.scalar_type());
}

class GroupNormFilmSilu : public torch::autograd::Function<GroupNormFilmSilu> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                            const OptionalTensor& weight, const OptionalTensor& bias, const OptionalTensor& scale,
                            const OptionalTensor& shift, double eps, bool act) {
    auto [y, mean, rstd] = dispatch_forward(x, num_groups, weight, bias, scale, shift, eps, act);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            scale.value_or(at::Tensor()), shift.value_or(at::Tensor()), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &scale = saved[3], &shift = saved[4];
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const bool act = ctx->saved_data["act"].toBool();
    const at::Tensor& dy = grads[0];
    const std::array<at::Tensor, 5> inputs{x, weight, bias, scale, shift};
    const std::array<size_t, 5> input_index{0, 2, 3, 4, 5};  // their places among forward's arguments
    // needs_input_grad counts only the tensors given (an absent optional has no graph edge).
    std::array<bool, 6> needed{};
    for (size_t k = 0, edge = 0; k < inputs.size(); ++k) {
      if (inputs[k].defined()) needed[input_index[k]] = ctx->needs_input_grad(edge++);
    }
    torch::autograd::variable_list result(8);
    if (at::GradMode::is_enabled()) {
      const at::Tensor y = reference(x, num_groups, weight, bias, scale, shift, ctx->saved_data["eps"].toDouble(), act);
      std::vector<at::Tensor> wanted;
      std::vector<size_t> places;
      for (size_t k = 0; k < inputs.size(); ++k) {
        if (needed[input_index[k]]) {
          wanted.push_back(inputs[k]);
          places.push_back(input_index[k]);
        }
      }
      const auto grads_in = torch::autograd::grad({y}, wanted, {dy}, /*retain_graph=*/true, /*create_graph=*/true,
                                                  /*allow_unused=*/true);
      for (size_t k = 0; k < places.size(); ++k) result[places[k]] = grads_in[k];
      return result;
    }
    auto [dx, sum_du, sum_du_xhat] = dispatch_backward(dy, x, saved[5], saved[6], num_groups, optional_of(weight),
                                                       optional_of(bias), optional_of(scale), optional_of(shift), act);
    result[0] = dx;
    const std::array<bool, 4> wanted{weight.defined() && needed[2], bias.defined() && needed[3],
                                     scale.defined() && needed[4], shift.defined() && needed[5]};
    film_gradients(sum_du, sum_du_xhat, weight, bias, scale, shift, wanted, result);
    return result;
  }
};

at::Tensor group_norm_film_silu_autograd(const at::Tensor& x, int64_t num_groups, const OptionalTensor& weight,
                                         const OptionalTensor& bias, const OptionalTensor& scale,
                                         const OptionalTensor& shift, double eps, bool act) {
  return GroupNormFilmSilu::apply(x, num_groups, weight, bias, scale, shift, eps, act);
}

// Below autograd (inference, or no input needs a gradient): the forward op's output.
at::Tensor group_norm_film_silu_no_grad(const at::Tensor& x, int64_t num_groups, const OptionalTensor& weight,
                                        const OptionalTensor& bias, const OptionalTensor& scale,
                                        const OptionalTensor& shift, double eps, bool act) {
  return std::get<0>(dispatch_forward(x, num_groups, weight, bias, scale, shift, eps, act));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lgt, m) {
  m.def("csrc_group_norm_film_silu_fwd(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
        "Tensor? shift, float eps, bool act) -> (Tensor, Tensor, Tensor)");
  m.def("csrc_group_norm_film_silu_bwd(Tensor dy, Tensor x, Tensor mean, Tensor rstd, int num_groups, "
        "Tensor? weight, Tensor? bias, Tensor? scale, Tensor? shift, bool act) -> (Tensor, Tensor, Tensor)");
  m.def("csrc_group_norm_film_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? scale, "
        "Tensor? shift, float eps, bool act) -> Tensor");
}

TORCH_LIBRARY_IMPL(lgt, CPU, m) {
  m.impl("csrc_group_norm_film_silu_fwd", &group_norm_film_silu_fwd);
  m.impl("csrc_group_norm_film_silu_bwd", &group_norm_film_silu_bwd);
}

// The differentiable op the Python wrapper calls: y only, with the autograd above.
TORCH_LIBRARY_IMPL(lgt, Autograd, m) { m.impl("csrc_group_norm_film_silu", &group_norm_film_silu_autograd); }
TORCH_LIBRARY_IMPL(lgt, CompositeExplicitAutograd, m) {
  m.impl("csrc_group_norm_film_silu", &group_norm_film_silu_no_grad);
}

}  // namespace lgt_csrc
