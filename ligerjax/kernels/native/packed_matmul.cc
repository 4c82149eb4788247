// out[M, N] = x[M, K] @ W for the CPU, W packed in column panels: an XLA FFI custom call.
//
// w_pkc [P, K, 16] holds W[K, N] as P = ceil(N / 16) panels of 16 columns, each panel's K
// rows contiguous (columns past N are zero). Packed once when the weights are loaded, a
// panel streams through memory in order, where XLA:CPU's GEMM packs the whole [K, N] matrix
// again on every call: the skinny products of decode steps (8-64 rows) are bound by that copy.
//
// x is repacked per call into groups of 6 rows, k-major (x_gkr [G, K, 6]), small next to W.
// Work items are runs of consecutive panels, shared out over XLA's intra-op pool. For each
// panel, every row group walks the panel's depth in blocks of kDepth rows: a 6 x 16 register
// tile of 12 AVX2 accumulators, one FMA per (row, k, 8 columns).
//
// A scalar live_rows operand marks the rows past it as padding (a step's bucket beyond its
// tokens): they are not multiplied and come out 0.
//
// Every output element is summed in the same order (k ascending within a depth block, the
// blocks added in order) whatever M, the row's group, the item or the thread: a row's
// result does not depend on the other rows of the call.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "share_out.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 6;     // rows of x in a register tile
constexpr int64_t kCols = 16;    // panel width: two 8-float vectors
constexpr int64_t kDepth = 256;  // k rows of a panel per block

struct Problem {
  const float* w_pkc;  // [P, K, 16]
  float* out;          // [M, N]
  int64_t M, K, N, P;
};

// acc[r, c] (+)= sum_{k < depth} x_kr[k, r] * w_kc[k, c] for r < R, all 16 columns; the tile
// is written to c_rc (row stride ldc), added to what it holds unless first. With next_kc,
// the tile also asks for the same depth rows of the next panel (one cache line per k) to be
// brought into L2, so that panel's first row group finds them on its way instead of waiting
// on memory. Into L2, not L1: a panel (36 KiB for K = 576) and the next do not fit L1
// together, and the current one is read again by the other row groups.
#if defined(__AVX2__) && defined(__FMA__)
template <int R>
void Tile(const float* x_kr, const float* w_kc, int64_t depth, float* c_rc, int64_t ldc,
          bool first, const float* next_kc) {
  __m256 lo[R], hi[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < depth; ++k) {
    if (next_kc != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next_kc + k * kCols), _MM_HINT_T1);
    }
    const __m256 w_lo = _mm256_loadu_ps(w_kc + k * kCols);
    const __m256 w_hi = _mm256_loadu_ps(w_kc + k * kCols + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(x_kr + k * kRows + r);
      lo[r] = _mm256_fmadd_ps(x, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, w_hi, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* c = c_rc + r * ldc;
    if (!first) {
      lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(c));
      hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, lo[r]);
    _mm256_storeu_ps(c + 8, hi[r]);
  }
}
#else
template <int R>
void Tile(const float* x_kr, const float* w_kc, int64_t depth, float* c_rc, int64_t ldc,
          bool first, const float* /*next_kc*/) {
  float acc[R][kCols] = {};
  for (int64_t k = 0; k < depth; ++k) {
    for (int r = 0; r < R; ++r) {
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] += x_kr[k * kRows + r] * w_kc[k * kCols + c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t c = 0; c < kCols; ++c) c_rc[r * ldc + c] = first ? acc[r][c] : c_rc[r * ldc + c] + acc[r][c];
  }
}
#endif

using TileFn = void (*)(const float*, const float*, int64_t, float*, int64_t, bool,
                       const float*);
constexpr TileFn kTiles[kRows + 1] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>, Tile<5>, Tile<6>};

// An item is a run of consecutive panels; panel p of the output: tiles written in place, or
// through a 6 x 16 scratch tile when the panel is the last and N leaves it partial. While the
// first row group of a panel runs, the next panel of the run is fetched.
struct PanelTask {
  Problem p;
  std::vector<float> x_gkr;  // [G, K, 6], rows past M are 0
  int64_t run;               // panels an item

  void Run(int64_t item) const {
    const int64_t end = std::min(p.P, (item + 1) * run);
    for (int64_t panel = item * run; panel < end; ++panel) RunPanel(panel, panel + 1 < end);
  }

  void RunPanel(int64_t panel, bool fetch_next) const {
    const int64_t col0 = panel * kCols, cols = std::min(kCols, p.N - col0);
    const float* w_kc = p.w_pkc + panel * p.K * kCols;
    float scratch[kRows * kCols];
    for (int64_t row0 = 0; row0 < p.M; row0 += kRows) {
      const int64_t rows = std::min(kRows, p.M - row0);
      const float* x_kr = x_gkr.data() + row0 * p.K;  // group row0 / 6
      float* c_rc = cols == kCols ? p.out + row0 * p.N + col0 : scratch;
      const int64_t ldc = cols == kCols ? p.N : kCols;
      const float* next_kc = fetch_next && row0 == 0 ? w_kc + p.K * kCols : nullptr;
      for (int64_t k0 = 0; k0 < p.K; k0 += kDepth) {
        kTiles[rows](x_kr + k0 * kRows, w_kc + k0 * kCols, std::min(kDepth, p.K - k0), c_rc, ldc,
                     k0 == 0, next_kc == nullptr ? nullptr : next_kc + k0 * kCols);
      }
      if (cols < kCols) {
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(p.out + (row0 + r) * p.N + col0, scratch + r * kCols, cols * sizeof(float));
        }
      }
    }
  }
};

// x [M, K] into x_gkr [G, K, 6] (zeroed beforehand), one item per group of 6 rows.
struct PackTask {
  const float* x;
  float* x_gkr;
  int64_t M, K;

  void Run(int64_t group) const {
    const int64_t row0 = group * kRows, rows = std::min(kRows, M - row0);
    float* dst_kr = x_gkr + group * K * kRows;
    for (int64_t r = 0; r < rows; ++r) {
      const float* src = x + (row0 + r) * K;
      for (int64_t k = 0; k < K; ++k) dst_kr[k * kRows + r] = src[k];
    }
  }
};

// Packing 6 rows is a small job: worth sharing out only for big products.
constexpr int64_t kSharedPackElems = 1 << 16;

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::S32> live_rows, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const auto out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || out_dims.size() != 2 ||
      live_rows.element_count() != 1) {
    return ffi::Error::InvalidArgument("packed matmul: bad ranks");
  }
  const int64_t rows = x_dims[0], K = x_dims[1], P = w_dims[0], N = out_dims[1];
  if (w_dims[1] != K || w_dims[2] != kCols || out_dims[0] != rows || N > P * kCols ||
      N <= (P - 1) * kCols) {
    return ffi::Error::InvalidArgument("packed matmul: bad shapes");
  }
  // Rows from live_rows on are padding: not multiplied, and 0 in the output.
  const int64_t M = std::clamp<int64_t>(live_rows.typed_data()[0], 0, rows);
  std::memset(out->typed_data() + M * N, 0, sizeof(float) * (rows - M) * N);
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(out->typed_data(), 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const int64_t groups = (M + kRows - 1) / kRows;
  std::vector<float> x_gkr(groups * K * kRows, 0.f);
  const PackTask pack{x.typed_data(), x_gkr.data(), M, K};
  if (M * K >= kSharedPackElems) {
    ligerjax::ShareOut(pool, groups, pack);
  } else {
    for (int64_t g = 0; g < groups; ++g) pack.Run(g);
  }
  // About 8 runs a thread: enough to even out, long enough for the next-panel fetch to pay.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t run = std::max<int64_t>(1, P / (8 * workers));
  const Problem problem{w.typed_data(), out->typed_data(), M, K, N, P};
  ligerjax::ShareOut(pool, (P + run - 1) / run, PanelTask{problem, std::move(x_gkr), run});
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LigerjaxPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
