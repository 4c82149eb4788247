// exp of 8 floats at once, for the kernels' AVX2 paths (empty without AVX2 and FMA).
//
// Exp(x) for x <= 0 (values minus their maximum), ~2 ulp: 2^n * p(r), |r| <= ln2 / 2, with
// x clamped at -87 (exp(-inf) comes out ~1.6e-38: callers that need an exact 0 mask it).

#ifndef LIGERJAX_KERNELS_NATIVE_VECTOR_EXP_H_
#define LIGERJAX_KERNELS_NATIVE_VECTOR_EXP_H_

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace ligerjax {

inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
}  // namespace ligerjax

#endif  // __AVX2__ && __FMA__
#endif  // LIGERJAX_KERNELS_NATIVE_VECTOR_EXP_H_
