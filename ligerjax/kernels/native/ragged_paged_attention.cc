// Ragged paged attention for the CPU, an XLA FFI custom call: float32 queries and output,
// float32, float16 or bfloat16 pages (converted exactly to float32 as they are read).
//
// Packed query tokens of several sequences (chunked prefill and decode in one call) attend
// to their own sequence's keys, read in place from the pages through the block table: no
// gathered copy of K/V and no padding to the longest context. Token t of sequence b
// (cu_q_lens[b] <= t < cu_q_lens[b + 1]) sits at position
//   context_lens[b] - q_len[b] + (t - cu_q_lens[b])
// and sees that sequence's keys at positions up to its own (and below context_lens[b],
// clipped to the table's M * P slots). Rows that see no key, and tokens past
// cu_q_lens[B], come out 0.
//
// Work items are (sequence, tile of up to kTileTokens query tokens); each item runs the
// online softmax one page at a time for all its (token, head) rows, so a page of keys is
// read from memory once per tile. With AVX2 and FMA, logits come 8 keys at a time and the
// exponentials from a vector polynomial; otherwise plain loops. Items are shared out over
// XLA's intra-op thread pool (share_out.h), largest first. Every row goes through the same code in the same key order whatever the batch,
// tile or thread, so a token's output does not depend on what else is in the step.
//
// Layouts: q, out [T, H, D]; k_pages, v_pages [N, P, K, D]; block_tables [B, M];
// context_lens [B]; cu_q_lens [B + 1]; H = K * G, query head h reads kv head h / G.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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
#endif

constexpr int64_t kTileTokens = 16;
constexpr int64_t kMaxPage = 256;
constexpr int64_t kLine = 64;  // bytes in a cache line

// Page elements: float, or 16-bit floats kept as their bits.
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

float ToFloat(float x) { return x; }
float ToFloat(BF16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
float ToFloat(F16 x) {
  const uint32_t sign = (x.bits & 0x8000u) << 16, exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mant = x.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mant * 2^-24
    const float f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  const uint32_t bits =
      sign | (exponent == 31 ? 0x7f800000u : (exponent + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Everything but the pages, whose element type varies.
struct Geometry {
  const float* q;
  const int32_t* block_tables;
  const int32_t* context_lens;
  const int32_t* cu_q_lens;
  float* out;
  float sm_scale;
  int64_t T, H, D, N, P, K, G, B, M;
};

template <typename Elem>
struct Problem : Geometry {
  const Elem* k_pages;
  const Elem* v_pages;
};

struct Item {
  int64_t b, t0, t1, cost;
};

#if defined(__AVX2__) && defined(__FMA__)
__m256 Load8(const float* x) { return _mm256_loadu_ps(x); }
__m256 Load8(const BF16* x) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#if defined(__F16C__)
__m256 Load8(const F16* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
#else
__m256 Load8(const F16* x) {
  alignas(32) float f[8];
  for (int i = 0; i < 8; ++i) f[i] = ToFloat(x[i]);
  return _mm256_load_ps(f);
}
#endif

// The 8 dot products of q_d with the 8 keys at k_jd, k_jd + stride, ...: lane j is key j.
template <typename Elem>
__m256 Dot8(const float* q_d, const Elem* k_jd, int64_t stride, int64_t D) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 q = _mm256_loadu_ps(q_d + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(q, Load8(k_jd + j * stride + d), a[j]);
  }
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

template <typename Elem>
float Dot(const float* a, const Elem* b, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += a[i] * ToFloat(b[i]);
  return s;
}

int64_t SeqLen(const Geometry& p, int64_t b) {
  return std::clamp<int64_t>(p.context_lens[b], 0, p.M * p.P);
}

// Keys the token t of sequence b sees: positions [0, Seen).
int64_t Seen(const Geometry& p, int64_t b, int64_t t) {
  const int64_t q_len = p.cu_q_lens[b + 1] - p.cu_q_lens[b];
  const int64_t pos = p.context_lens[b] - q_len + (t - p.cu_q_lens[b]);
  return std::clamp<int64_t>(pos + 1, 0, SeqLen(p, b));
}

// One row against keys [0, n) of a page: s_j <- exp(logit_j - m_new) with m_new the running
// max after this page (returned in *m); returns sum_j s_j. Vector path: lanes past n are
// masked out, so a page's keys are read in whole vectors of 8 (the page holds them).
template <typename Elem>
float PageSoftmax(const Problem<Elem>& p, const float* q_d, const Elem* k_jd, int64_t n, float* m,
                  float* s_j) {
  const int64_t stride = p.K * p.D;
#if defined(__AVX2__) && defined(__FMA__)
  if (p.D % 8 == 0 && p.P % 8 == 0) {
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 max8 = neg_inf;
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 live = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n - j)), lane));
      const __m256 x = _mm256_blendv_ps(neg_inf, Dot8(q_d, k_jd + j * stride, stride, p.D), live);
      _mm256_storeu_ps(s_j + j, x);
      max8 = _mm256_max_ps(max8, x);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, max8);
    *m = std::max(*m, *std::max_element(lanes, lanes + 8));
    __m256 sum8 = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 x = _mm256_loadu_ps(s_j + j);
      const __m256 e = _mm256_and_ps(Exp(_mm256_sub_ps(x, _mm256_set1_ps(*m))),
                                     _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
      _mm256_storeu_ps(s_j + j, e);
      sum8 = _mm256_add_ps(sum8, e);
    }
    _mm256_store_ps(lanes, sum8);
    float sum = 0.f;
    for (float x : lanes) sum += x;
    return sum;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    s_j[j] = Dot(q_d, k_jd + j * stride, p.D);
    *m = std::max(*m, s_j[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s_j[j] = std::exp(s_j[j] - *m);
    sum += s_j[j];
  }
  return sum;
}

// acc_d <- alpha * acc_d + sum_j s_j v_j over keys [0, n).
template <typename Elem>
void PageValues(const Problem<Elem>& p, const Elem* v_jd, const float* s_j, int64_t n, float alpha,
                float* acc_d) {
  const int64_t stride = p.K * p.D;
  int64_t d0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; d0 + 64 <= p.D; d0 += 64) {  // 8 accumulators in registers across the page
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) {
      acc[i] = _mm256_mul_ps(_mm256_set1_ps(alpha), _mm256_loadu_ps(acc_d + d0 + 8 * i));
    }
    for (int64_t j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(s_j[j]);
      const Elem* v_d = v_jd + j * stride + d0;
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(w, Load8(v_d + 8 * i), acc[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc_d + d0 + 8 * i, acc[i]);
  }
#endif
  for (int64_t d = d0; d < p.D; ++d) {
    float a = alpha * acc_d[d];
    for (int64_t j = 0; j < n; ++j) a += s_j[j] * ToFloat(v_jd[j * stride + d]);
    acc_d[d] = a;
  }
}

// Bytes [lo, hi) of a page asked for into L2 (prefetcht1), one request a cache line.
template <typename Elem>
void FetchSlice(const Elem* page, int64_t lo, int64_t hi) {
  const char* bytes = reinterpret_cast<const char*>(page);
  for (int64_t at = lo; at < hi; at += kLine) __builtin_prefetch(bytes + at, 0, 2);
}

// The item's (token, head) rows against its pages in order. While a page is worked on, the
// next one is fetched a slice before each row, so that the memory keeps busy through the
// page's work: decode waits on memory, and asking for the whole next page at once did not
// overlap (the same time as no fetch at all), where the slices do (docs/BENCHMARKS.md).
template <typename Elem>
void RunItem(const Problem<Elem>& p, const Item& item) {
  const int64_t D = p.D, H = p.H, P = p.P;
  const int64_t rows = (item.t1 - item.t0) * H;  // row r: token t0 + r / H, head r % H
  std::vector<float> q_rd(rows * D), acc_rd(rows * D, 0.f);
  std::vector<float> m_r(rows, -std::numeric_limits<float>::infinity()), l_r(rows, 0.f);
  std::vector<int64_t> seen_r(rows);
  int64_t max_seen = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = item.t0 + r / H;
    seen_r[r] = Seen(p, item.b, t);
    max_seen = std::max(max_seen, seen_r[r]);
    const float* q_d = p.q + (t * H + r % H) * D;
    for (int64_t d = 0; d < D; ++d) q_rd[r * D + d] = q_d[d] * p.sm_scale;
  }
  const int32_t* table = p.block_tables + item.b * p.M;
  float s_j[kMaxPage + 8] = {};
  const int64_t page_elems = P * p.K * D;
  const int64_t page_bytes = page_elems * static_cast<int64_t>(sizeof(Elem));
  const int64_t slice = (page_bytes + rows * kLine - 1) / (rows * kLine) * kLine;  // bytes a row
  for (int64_t page = 0; page * P < max_seen; ++page) {
    const int64_t block = std::clamp<int64_t>(table[page], 0, p.N - 1);
    const bool fetch = (page + 1) * P < max_seen;
    const int64_t next = fetch ? std::clamp<int64_t>(table[page + 1], 0, p.N - 1) * page_elems : 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (fetch) {
        const int64_t lo = r * slice, hi = std::min(page_bytes, lo + slice);
        FetchSlice(p.k_pages + next, lo, hi);
        FetchSlice(p.v_pages + next, lo, hi);
      }
      const int64_t n = std::min(P, seen_r[r] - page * P);
      if (n <= 0) continue;
      const int64_t offset = block * page_elems + (r % H) / p.G * D;  // key 0 of r's kv head
      float m_new = m_r[r];
      const float sum = PageSoftmax(p, &q_rd[r * D], p.k_pages + offset, n, &m_new, s_j);
      const float alpha = std::exp(m_r[r] - m_new);  // 0 before the first key
      PageValues(p, p.v_pages + offset, s_j, n, alpha, &acc_rd[r * D]);
      l_r[r] = alpha * l_r[r] + sum;
      m_r[r] = m_new;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o_d = p.out + ((item.t0 + r / H) * H + r % H) * D;
    const float inv = l_r[r] > 0.f ? 1.f / l_r[r] : 0.f;
    for (int64_t d = 0; d < D; ++d) o_d[d] = acc_rd[r * D + d] * inv;
  }
}

std::vector<Item> MakeItems(const Geometry& p) {
  std::vector<Item> items;
  const int64_t end = std::clamp<int64_t>(p.cu_q_lens[p.B], 0, p.T);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t lo = std::clamp<int64_t>(p.cu_q_lens[b], 0, end);
    const int64_t hi = std::clamp<int64_t>(p.cu_q_lens[b + 1], lo, end);
    for (int64_t t0 = lo; t0 < hi; t0 += kTileTokens) {
      const int64_t t1 = std::min(hi, t0 + kTileTokens);
      const int64_t cost = (t1 - t0) * (Seen(p, b, t1 - 1) + 1);
      items.push_back({b, t0, t1, cost});
    }
  }
  // Largest first, so that the dynamic share-out ends with small items.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

template <typename Elem>
struct ItemTask {
  Problem<Elem> p;
  std::vector<Item> items;

  void Run(int64_t i) const { RunItem(p, items[i]); }
};

ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                                ffi::Buffer<ffi::S32> block_tables,
                                ffi::Buffer<ffi::S32> context_lens,
                                ffi::Buffer<ffi::S32> cu_q_lens, float sm_scale,
                                ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions();
  const auto kv_dims = k_pages.dimensions();
  const auto bt_dims = block_tables.dimensions();
  if (q_dims.size() != 3 || kv_dims.size() != 4 || bt_dims.size() != 2) {
    return ffi::Error::InvalidArgument("ragged paged attention: bad ranks");
  }
  Geometry p{q.typed_data(), block_tables.typed_data(), context_lens.typed_data(),
             cu_q_lens.typed_data(), out->typed_data(), sm_scale,
             q_dims[0], q_dims[1], q_dims[2], kv_dims[0], kv_dims[1], kv_dims[2],
             0, bt_dims[0], bt_dims[1]};
  const bool shapes_fit =
      p.K > 0 && p.H % p.K == 0 && kv_dims[3] == p.D && p.P <= kMaxPage &&
      v_pages.element_type() == k_pages.element_type() &&
      v_pages.element_count() == k_pages.element_count() &&
      static_cast<int64_t>(context_lens.element_count()) == p.B &&
      static_cast<int64_t>(cu_q_lens.element_count()) == p.B + 1 &&
      out->element_count() == q.element_count();
  if (!shapes_fit) return ffi::Error::InvalidArgument("ragged paged attention: bad shapes");
  p.G = p.H / p.K;
  std::memset(p.out, 0, sizeof(float) * p.T * p.H * p.D);
  if (p.B == 0 || p.M == 0 || p.N == 0 || p.T == 0) return ffi::Error::Success();
  // The geometry with the pages, read as elements of type Elem.
  auto with_pages = [&](auto* tag) {
    using Elem = std::remove_pointer_t<decltype(tag)>;
    const Problem<Elem> typed{p, static_cast<const Elem*>(k_pages.untyped_data()),
                              static_cast<const Elem*>(v_pages.untyped_data())};
    std::vector<Item> items = MakeItems(typed);
    const int64_t count = static_cast<int64_t>(items.size());
    ligerjax::ShareOut(pool, count, ItemTask<Elem>{typed, std::move(items)});
    return ffi::Error::Success();
  };
  switch (k_pages.element_type()) {
    case ffi::DataType::F32:
      return with_pages(static_cast<float*>(nullptr));
    case ffi::DataType::F16:
      return with_pages(static_cast<F16*>(nullptr));
    case ffi::DataType::BF16:
      return with_pages(static_cast<BF16*>(nullptr));
    default:
      return ffi::Error::InvalidArgument("ragged paged attention: pages must be f32, f16 or bf16");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LigerjaxRaggedPagedAttention, RaggedPagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
