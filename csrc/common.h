// Helpers shared by the CPU ops of the csrc library.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace lgt_csrc {

// For the per-element helpers: a call left in a loop stops it from vectorising.
#define LGT_ALWAYS_INLINE inline __attribute__((always_inline))

// Flushes denormal results to zero and reads denormal inputs as zero on this thread while alive
// (x86 MXCSR FTZ | DAZ; nothing elsewhere), restoring the previous mode after. Trap: GCC if-converts
// exp_float's clamps by computing the rest of the expression for the clamped constants too and
// selecting afterwards, so every element also evaluates e.g. u / (1 + exp(87)), a denormal; without
// this guard each such vector costs a ~150-cycle microcode assist (the silu loop ran 8x slower).
// The results differ from IEEE only where they are below 1.2e-38 in magnitude.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// exp(x) for float, branch-free so loops over it vectorise (libm's expf is a call per element):
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7 polynomial, 2^n by building the exponent
// bits (Cephes' expf). Relative error ~2e-7 (about 2 ulp) on [-87, 88]; inputs are clamped there, so exp of a
// large negative number is ~1e-38 instead of 0 and of a large positive one ~1.7e38 instead of inf
// (both give the right sigmoid). NaN propagates.
LGT_ALWAYS_INLINE float exp_float(float x) {
  // Comparisons rather than fmin/fmax: they vectorise, and a NaN fails both and passes through.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;  // x / ln2
  // Round to nearest without a libm call: adding and subtracting 1.5 * 2^23 drops the fraction.
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts (Cephes)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // A NaN n would make the conversion below undefined: 0 instead (p is NaN, so the result is too).
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.0f) + 127) * (1 << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

LGT_ALWAYS_INLINE double exp_any(double x) { return std::exp(x); }
LGT_ALWAYS_INLINE float exp_any(float x) { return exp_float(x); }

template <typename acc_t>
LGT_ALWAYS_INLINE acc_t sigmoid(acc_t u) {
  return acc_t(1) / (acc_t(1) + exp_any(-u));
}

// The two memory formats the ops read without a copy. Anything else is made contiguous first.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor in_op_layout(const at::Tensor& x) {
  if (x.is_contiguous() || is_channels_last(x)) {
    return x;
  }
  return x.contiguous();
}

// An optional per-channel ([C]) or per-(batch, channel) ([B, C]) tensor as a contiguous tensor of
// the accumulation dtype, or an undefined tensor.
inline at::Tensor as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  // Checked first: even a no-op .to() / .contiguous() is a dispatcher call, which at a CPU run's
  // sizes costs as much as the kernel's arithmetic.
  return t->scalar_type() == acc && t->is_contiguous() ? *t : t->to(acc).contiguous();
}

}  // namespace lgt_csrc
