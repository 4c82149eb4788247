// Greedy tokens and their log-probabilities for the CPU: an XLA FFI custom call.
//
// For each row of logits [B, V] f32: token = the first index of the row's maximum,
// logprob = (logit[token] - max) - log(sum_v exp(logit_v - max)), log_softmax's arithmetic at
// the chosen token. Two passes over the row (max, then exponentials and the index), rows
// shared out over XLA's intra-op pool: the 64-row batch of a decode step over a 49k
// vocabulary is read twice from cache instead of going through XLA:CPU's single-threaded
// argmax and exp reductions. A row holding a NaN gives its first NaN's index and a NaN
// logprob, as jnp.argmax and log_softmax do.

#include <cmath>
#include <cstdint>
#include <limits>

#include "share_out.h"
#include "vector_exp.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX2__) && defined(__FMA__)
using ligerjax::Exp;

float Max(const float* x, int64_t V, int64_t* nan_at) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  __m256 unordered = _mm256_setzero_ps();
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const __m256 a = _mm256_loadu_ps(x + v), b = _mm256_loadu_ps(x + v + 8);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, lanes[i]);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (; v < V; ++v) {
    nan |= std::isnan(x[v]);
    m = std::max(m, x[v]);
  }
  *nan_at = -1;
  if (nan) {
    for (v = 0; v < V && !std::isnan(x[v]); ++v) {
    }
    *nan_at = v;
  }
  return m;
}

// sum_v exp(x_v - m), summed in double, and the first v with x_v == m.
double SumExp(const float* x, int64_t V, float m, int64_t* first) {
  const __m256 m8 = _mm256_set1_ps(m);
  __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                  _mm256_setzero_pd()};
  *first = -1;
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const __m256 a = _mm256_loadu_ps(x + v), b = _mm256_loadu_ps(x + v + 8);
    if (*first < 0) {
      const int hits = _mm256_movemask_ps(_mm256_cmp_ps(a, m8, _CMP_EQ_OQ)) |
                       _mm256_movemask_ps(_mm256_cmp_ps(b, m8, _CMP_EQ_OQ)) << 8;
      if (hits != 0) *first = v + __builtin_ctz(hits);
    }
    const __m256 ea = Exp(_mm256_sub_ps(a, m8)), eb = Exp(_mm256_sub_ps(b, m8));
    s[0] = _mm256_add_pd(s[0], _mm256_cvtps_pd(_mm256_castps256_ps128(ea)));
    s[1] = _mm256_add_pd(s[1], _mm256_cvtps_pd(_mm256_extractf128_ps(ea, 1)));
    s[2] = _mm256_add_pd(s[2], _mm256_cvtps_pd(_mm256_castps256_ps128(eb)));
    s[3] = _mm256_add_pd(s[3], _mm256_cvtps_pd(_mm256_extractf128_ps(eb, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3])));
  double sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; v < V; ++v) {
    if (*first < 0 && x[v] == m) *first = v;
    sum += std::exp(x[v] - m);
  }
  return sum;
}
#else
float Max(const float* x, int64_t V, int64_t* nan_at) {
  float m = -std::numeric_limits<float>::infinity();
  *nan_at = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(x[v]) && *nan_at < 0) *nan_at = v;
    m = std::max(m, x[v]);
  }
  return m;
}

double SumExp(const float* x, int64_t V, float m, int64_t* first) {
  double sum = 0.0;
  *first = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (*first < 0 && x[v] == m) *first = v;
    sum += std::exp(x[v] - m);
  }
  return sum;
}
#endif

struct RowTask {
  const float* logits;  // [B, V]
  int32_t* token;       // [B]
  float* logprob;       // [B]
  int64_t V;

  void Run(int64_t b) const {
    const float* x = logits + b * V;
    int64_t nan_at;
    const float m = Max(x, V, &nan_at);
    if (nan_at >= 0 || V == 0) {
      token[b] = static_cast<int32_t>(nan_at >= 0 ? nan_at : 0);
      logprob[b] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    int64_t first;
    const double sum = SumExp(x, V, m, &first);
    token[b] = static_cast<int32_t>(first < 0 ? 0 : first);
    logprob[b] = static_cast<float>(-std::log(sum));  // (x[first] - m) is 0
  }
};

ffi::Error GreedySample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                        ffi::ResultBuffer<ffi::S32> token, ffi::ResultBuffer<ffi::F32> logprob) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2 || token->element_count() != static_cast<size_t>(dims[0]) ||
      logprob->element_count() != static_cast<size_t>(dims[0])) {
    return ffi::Error::InvalidArgument("greedy sample: bad shapes");
  }
  ligerjax::ShareOut(pool, dims[0],
                     RowTask{logits.typed_data(), token->typed_data(), logprob->typed_data(),
                             dims[1]});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LigerjaxGreedySample, GreedySample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
