// out[M, N] = x[M, K] @ W for the CPU, W packed in column panels: an XLA FFI custom call.
//
// w_pkc [P, K, 16] holds W[K, N] as P = ceil(N / 16) panels of 16 columns, each panel's K
// rows contiguous (columns past N are zero). Packed once when the weights are loaded, a
// panel streams through memory in order, where XLA:CPU's GEMM packs the whole [K, N] matrix
// again on every call: the skinny products of decode steps (8-64 rows) are bound by that copy.
//
// x is repacked per call into groups of 6 rows, k-major (x_gkr [G, K, 6]), small next to W.
// Work items are runs of consecutive panels, shared out over XLA's intra-op pool. For each
// tile of panels (two with AVX-512, one with AVX2), every row group walks the panels' depth
// in blocks of kDepth rows: a register tile of 12 accumulators, 6 rows by two 16-float
// vectors (AVX-512: two panels) or by two 8-float halves of one panel (AVX2), one FMA per
// (row, k, vector). A 6 x 32 tile keeps both of the AVX-512 FMA pipes busy where they are
// 512 bits wide (Zen 5: twice AVX2's peak); the arithmetic of each element is the same.
//
// A scalar live_rows operand marks the rows past it as padding (a step's bucket beyond its
// tokens): they are not multiplied and come out 0.
//
// Every output element is summed in the same order (k ascending within a depth block, the
// blocks added in order) whatever M, the row's group, the tile, the item, the thread or the
// vector width: a row's result does not depend on the other rows of the call, and AVX-512
// and AVX2 builds agree bit for bit.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "share_out.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 6;     // rows of x in a register tile
constexpr int64_t kCols = 16;    // panel width
constexpr int64_t kDepth = 256;  // k rows of a panel per block
#if defined(__AVX512F__)
constexpr int64_t kTilePanels = 2;
#else
constexpr int64_t kTilePanels = 1;
#endif

struct Problem {
  const float* w_pkc;  // [P, K, 16]
  float* out;          // [M, N]
  int64_t M, K, N, P;
};

// The operands of one tile: R rows of x against NP panels over `depth` k rows, the panels
// `stride` floats apart. The tile is written to c_rc (row stride ldc, panel j at column 16 j),
// added to what it holds unless first. With next_kc (next_panels of them, `stride` apart), the
// tile also asks for the same depth rows of the next panels (one cache line per k) to be
// brought into L2, so that their first row group finds them on its way instead of waiting on
// memory. Into L2, not L1: the tile's panels and the next do not fit L1 together, and the
// current ones are read again by the other row groups.
struct TileArgs {
  const float* x_kr;  // [depth, 6]
  const float* w_kc;  // NP x [depth, 16], `stride` apart
  int64_t stride, depth;
  float* c_rc;
  int64_t ldc;
  bool first;
  const float* next_kc;
  int64_t next_panels;
};

static_assert(kTilePanels <= 2, "FetchNext asks for at most two panels");
// Inlined before the optimiser sees a call: GCC's IPA drops a call that only prefetches.
[[gnu::always_inline]] inline void FetchNext(const TileArgs& a, int64_t k) {
  if (a.next_panels > 0) __builtin_prefetch(a.next_kc + k * kCols, 0, 2);  // into L2
  if (a.next_panels > 1) __builtin_prefetch(a.next_kc + a.stride + k * kCols, 0, 2);
}

#if defined(__AVX512F__)
template <int R, int NP>
void Tile(const TileArgs& a) {
  __m512 acc[NP][R];
#pragma GCC unroll 12
  for (int i = 0; i < NP * R; ++i) acc[i / R][i % R] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < a.depth; ++k) {
    FetchNext(a, k);
    __m512 w[NP];
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) w[j] = _mm512_loadu_ps(a.w_kc + j * a.stride + k * kCols);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a.x_kr[k * kRows + r]);
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) acc[j][r] = _mm512_fmadd_ps(x, w[j], acc[j][r]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < NP * R; ++i) {
    float* c = a.c_rc + (i % R) * a.ldc + (i / R) * kCols;
    __m512 sum = acc[i / R][i % R];
    if (!a.first) sum = _mm512_add_ps(sum, _mm512_loadu_ps(c));
    _mm512_storeu_ps(c, sum);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
template <int R, int NP>
void Tile(const TileArgs& a) {
  static_assert(NP == 1, "the AVX2 tile is one panel wide");
  __m256 lo[R], hi[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < a.depth; ++k) {
    FetchNext(a, k);
    const __m256 w_lo = _mm256_loadu_ps(a.w_kc + k * kCols);
    const __m256 w_hi = _mm256_loadu_ps(a.w_kc + k * kCols + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a.x_kr + k * kRows + r);
      lo[r] = _mm256_fmadd_ps(x, w_lo, lo[r]);
      hi[r] = _mm256_fmadd_ps(x, w_hi, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    float* c = a.c_rc + r * a.ldc;
    if (!a.first) {
      lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(c));
      hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, lo[r]);
    _mm256_storeu_ps(c + 8, hi[r]);
  }
}
#else
template <int R, int NP>
void Tile(const TileArgs& a) {
  float acc[NP][R][kCols] = {};
  for (int64_t k = 0; k < a.depth; ++k) {
    for (int j = 0; j < NP; ++j) {
      const float* w = a.w_kc + j * a.stride + k * kCols;
      for (int r = 0; r < R; ++r) {
        for (int64_t c = 0; c < kCols; ++c) acc[j][r][c] += a.x_kr[k * kRows + r] * w[c];
      }
    }
  }
  for (int j = 0; j < NP; ++j) {
    for (int r = 0; r < R; ++r) {
      float* c_out = a.c_rc + r * a.ldc + j * kCols;
      for (int64_t c = 0; c < kCols; ++c) c_out[c] = a.first ? acc[j][r][c] : c_out[c] + acc[j][r][c];
    }
  }
}
#endif

using TileFn = void (*)(const TileArgs&);
template <int NP>
constexpr TileFn kTiles[kRows + 1] = {nullptr,      Tile<1, NP>, Tile<2, NP>, Tile<3, NP>,
                                      Tile<4, NP>, Tile<5, NP>, Tile<6, NP>};

// kTiles<np>[rows], for np <= kTilePanels.
TileFn TileFor(int64_t rows, int64_t np) {
#if defined(__AVX512F__)
  if (np == 2) return kTiles<2>[rows];
#endif
  return kTiles<1>[rows];
}

// An item is a run of consecutive panels, taken kTilePanels at a time (fewer at the run's end
// and for the last panel when N leaves it partial); tiles are written in place, or through a
// 6 x 16 scratch tile for a partial panel. While the first row group of a tile runs, the
// next tile's panels are fetched.
struct PanelTask {
  Problem p;
  std::vector<float> x_gkr;  // [G, K, 6], rows past M are 0
  int64_t run;               // panels an item

  // Panels from `panel` in one tile: up to kTilePanels, within [panel, end), full ones
  // together, a partial one alone.
  int64_t TilePanels(int64_t panel, int64_t end) const {
    const int64_t full = p.N / kCols;
    return std::max<int64_t>(1, std::min({kTilePanels, end - panel, full - panel}));
  }

  void Run(int64_t item) const {
    const int64_t end = std::min(p.P, (item + 1) * run);
    for (int64_t panel = item * run; panel < end;) {
      const int64_t np = TilePanels(panel, end), next = panel + np;
      RunTile(panel, np, next < end ? TilePanels(next, end) : 0);
      panel = next;
    }
  }

  void RunTile(int64_t panel, int64_t np, int64_t next_panels) const {
    const int64_t col0 = panel * kCols, cols = std::min(np * kCols, p.N - col0);
    const int64_t stride = p.K * kCols;
    const float* w_kc = p.w_pkc + panel * stride;
    const bool in_place = cols == np * kCols;  // a partial panel is alone (np == 1)
    float scratch[kRows * kCols];
    for (int64_t row0 = 0; row0 < p.M; row0 += kRows) {
      const int64_t rows = std::min(kRows, p.M - row0);
      const float* x_kr = x_gkr.data() + row0 * p.K;  // group row0 / 6
      float* c_rc = in_place ? p.out + row0 * p.N + col0 : scratch;
      const TileFn tile = TileFor(rows, np);
      for (int64_t k0 = 0; k0 < p.K; k0 += kDepth) {
        tile({x_kr + k0 * kRows, w_kc + k0 * kCols, stride, std::min(kDepth, p.K - k0), c_rc,
              in_place ? p.N : kCols, k0 == 0, w_kc + np * stride + k0 * kCols,
              row0 == 0 ? next_panels : 0});
      }
      if (!in_place) {
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
  // About 8 runs a thread: enough to even out, long enough for the next tile's fetch to pay;
  // a whole number of tiles.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = std::max<int64_t>(1, P / (8 * workers * kTilePanels));
  const int64_t run = tiles * kTilePanels;
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
