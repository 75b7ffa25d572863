// codebook_topk on CPU: the k best codes of each row of x[N, D] among codebook[K, D], without
// the N x K score matrix. Threads take blocks of rows; for each block, tiles of codes are
// multiplied with ATen's GEMM into a per-thread buffer that stays in cache, and each row's
// best k are updated from the tile at once (a sorted list per row, ties to the lower index).
// Ranking as pacofr/ops/reference.py: keys are higher-is-better (ip: the product, l2: minus the
// squared distance, computed as (2 x.c - x.x) - c.c), -inf ranks as the lowest finite float,
// NaN below everything; scores come back from the kept keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMaxK = 32;
// Rows x codes of one product tile: 128 x 512 fp32 scores (256 KB), the code tile (128 KB at
// D = 64) and the row block stay in a core's L2 while the tile is computed and scanned.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kCodeTile = 512;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The rank of a key: -inf is the lowest finite float (infinitely bad still beats NaN), NaN -inf.
inline float rank_of(float key) {
  if (std::isnan(key)) return -kInf;
  return key < -FLT_MAX ? -FLT_MAX : key;
}

// One row's best list: `n` entries sorted by rank, best first, equal ranks in index order.
struct Best {
  float* rank;
  float* key;
  int32_t* idx;
  int64_t k;
  int64_t n;

  // Codes arrive in increasing index order, so a new entry goes after every equal rank.
  void insert(float r, float key_value, int32_t j) {
    int64_t p = n < k ? n++ : k - 1;
    for (; p > 0 && rank[p - 1] < r; --p) {
      rank[p] = rank[p - 1];
      key[p] = key[p - 1];
      idx[p] = idx[p - 1];
    }
    rank[p] = r;
    key[p] = key_value;
    idx[p] = j;
  }

  float worst() const { return rank[k - 1]; }
};

template <bool kL2>
inline float key_of(float dot, float x_sq, const float* codes_sq, int64_t j) {
  return kL2 ? (2.0f * dot - x_sq) - codes_sq[j] : dot;
}

constexpr int64_t kChunk = 16;

// The screen: one bit per entry of a chunk of 16 whose rank beats `worst` (NaN never does).
struct PlainScreen {
  template <bool kL2>
  static uint32_t better(const float* dots, const float* codes_sq, float x_sq, float worst) {
    uint32_t mask = 0;
    for (int i = 0; i < kChunk; ++i) {
      float key = key_of<kL2>(dots[i], x_sq, codes_sq, i);
      mask |= static_cast<uint32_t>((key < -FLT_MAX ? -FLT_MAX : key) > worst) << i;
    }
    return mask;
  }
};

#if defined(__GNUC__) && defined(__x86_64__)
#define PACOFR_AVX512 1
struct Avx512Screen {
  template <bool kL2>
  __attribute__((target("avx512f"))) static uint32_t better(const float* dots, const float* codes_sq, float x_sq,
                                                            float worst) {
    __m512 key = _mm512_loadu_ps(dots);
    if (kL2)
      key = _mm512_sub_ps(_mm512_sub_ps(_mm512_add_ps(key, key), _mm512_set1_ps(x_sq)), _mm512_loadu_ps(codes_sq));
    // -inf becomes the lowest finite float; NaN stays (ordered compares are false for it)
    const __m512 lowest = _mm512_set1_ps(-FLT_MAX);
    const __m512 rank = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(key, lowest, _CMP_LT_OQ), key, lowest);
    return _mm512_cmp_ps_mask(rank, _mm512_set1_ps(worst), _CMP_GT_OQ);
  }
};
#endif

// Merges one row of a product tile (codes c0 .. c0 + cols) into the row's best list. Chunks of
// 16 are screened for entries better than the current worst (after the first tiles almost no
// chunk has one); only those entries are merged, in index order.
template <bool kL2, class Screen>
inline __attribute__((always_inline)) void scan_row(Best& best, const float* dots, int64_t cols, int64_t c0,
                                                    float x_sq, const float* codes_sq) {
  int64_t j = 0;
  for (; best.n < best.k && j < cols; ++j) {  // the first k codes fill the list
    float key = key_of<kL2>(dots[j], x_sq, codes_sq, j);
    best.insert(rank_of(key), key, static_cast<int32_t>(c0 + j));
  }
  float worst = best.worst();
  auto merge = [&](int64_t at) {
    float key = key_of<kL2>(dots[at], x_sq, codes_sq, at);
    float r = rank_of(key);
    if (r > worst) {
      best.insert(r, key, static_cast<int32_t>(c0 + at));
      worst = best.worst();
    }
  };
  for (; j + kChunk <= cols; j += kChunk) {
    for (uint32_t mask = Screen::template better<kL2>(dots + j, kL2 ? codes_sq + j : nullptr, x_sq, worst); mask;
         mask &= mask - 1)
      merge(j + __builtin_ctz(mask));
  }
  for (; j < cols; ++j) merge(j);
}

// Every row of a tile, in the screen's instruction set.
template <bool kL2>
void scan_tile_plain(Best* best, const float* dots, int64_t rows, int64_t cols, int64_t c0, const float* x_sq,
                     const float* codes_sq) {
  for (int64_t r = 0; r < rows; ++r)
    scan_row<kL2, PlainScreen>(best[r], dots + r * cols, cols, c0, kL2 ? x_sq[r] : 0.0f, codes_sq);
}

#ifdef PACOFR_AVX512
template <bool kL2>
__attribute__((target("avx512f"))) void scan_tile_avx512(Best* best, const float* dots, int64_t rows, int64_t cols,
                                                         int64_t c0, const float* x_sq, const float* codes_sq) {
  for (int64_t r = 0; r < rows; ++r)
    scan_row<kL2, Avx512Screen>(best[r], dots + r * cols, cols, c0, kL2 ? x_sq[r] : 0.0f, codes_sq);
}
#endif

// The AVX-512 screen where the CPU has it, so that the build needs no -march flag; the plain
// one elsewhere or with PACOFR_NATIVE_SIMD=0 (the tests run both).
template <bool kL2>
auto tile_scanner() {
#ifdef PACOFR_AVX512
  const char* simd = std::getenv("PACOFR_NATIVE_SIMD");
  if (__builtin_cpu_supports("avx512f") && !(simd && std::string_view(simd) == "0")) return &scan_tile_avx512<kL2>;
#endif
  return &scan_tile_plain<kL2>;
}

std::vector<float> squared_norms(const float* rows, int64_t n, int64_t d) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) {
    float s = 0.0f;
    for (int64_t t = 0; t < d; ++t) s += rows[i * d + t] * rows[i * d + t];
    out[i] = s;
  }
  return out;
}

template <bool kL2>
void search(const at::Tensor& x, const at::Tensor& codes, int64_t k, at::Tensor& scores, at::Tensor& idx) {
  const int64_t n = x.size(0), num_codes = codes.size(0), d = x.size(1);
  const float* cb = codes.const_data_ptr<float>();
  const std::vector<float> codes_sq = kL2 ? squared_norms(cb, num_codes, d) : std::vector<float>();
  float* out_scores = scores.mutable_data_ptr<float>();
  int64_t* out_idx = idx.mutable_data_ptr<int64_t>();
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const int64_t tile = std::min(kCodeTile, num_codes);
  const auto scan = tile_scanner<kL2>();

  // Each thread takes the next block from a shared counter rather than a fixed share, so that
  // a core slowed by other work does not hold the others up (rows do not depend on their thread).
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> dots(kRowBlock * tile), x_rows(kRowBlock * d);
    std::vector<float> rank(kRowBlock * k), key(kRowBlock * k);
    std::vector<int32_t> pos(kRowBlock * k);
    std::vector<Best> best(kRowBlock);
    for (int64_t b; (b = next_block.fetch_add(1)) < blocks;) {
      const int64_t r0 = b * kRowBlock, rows = std::min(kRowBlock, n - r0);
      // fp32 rows (a copy for bf16/fp16 inputs, a view for fp32)
      at::Tensor xb = x.narrow(0, r0, rows);
      if (xb.scalar_type() != at::kFloat) {
        at::Tensor copy = at::from_blob(x_rows.data(), {rows, d}, at::kFloat);
        copy.copy_(xb);
        xb = copy;
      }
      const std::vector<float> x_sq = kL2 ? squared_norms(xb.const_data_ptr<float>(), rows, d) : std::vector<float>();
      for (int64_t r = 0; r < rows; ++r) best[r] = Best{&rank[r * k], &key[r * k], &pos[r * k], k, 0};
      for (int64_t c0 = 0; c0 < num_codes; c0 += tile) {
        const int64_t cols = std::min(tile, num_codes - c0);
        at::Tensor out = at::from_blob(dots.data(), {rows, cols}, at::kFloat);
        at::mm_out(out, xb, codes.narrow(0, c0, cols).t());
        scan(best.data(), dots.data(), rows, cols, c0, x_sq.data(), kL2 ? codes_sq.data() + c0 : nullptr);
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < k; ++i) {
          const float kv = best[r].key[i];
          out_scores[(r0 + r) * k + i] = kL2 ? -kv : kv;
          out_idx[(r0 + r) * k + i] = best[r].idx[i];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> codebook_topk(const at::Tensor& x, const at::Tensor& codebook, int64_t k,
                                                 c10::string_view metric) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2 && x.size(1) == codebook.size(1),
              "codebook_topk wants x[N, D] and codebook[K, D], got ", x.sizes(), " and ", codebook.sizes());
  TORCH_CHECK(metric == "l2" || metric == "ip", "codebook_topk: metric must be l2 or ip, got ", metric);
  TORCH_CHECK(1 <= k && k <= std::min(kMaxK, codebook.size(0)), "codebook_topk: need 1 <= k <= min(32, K), got k=", k);
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "codebook_topk (native): CPU tensors only");
  TORCH_CHECK(codebook.size(0) < std::numeric_limits<int32_t>::max(), "codebook_topk (native): K must be below 2^31");
  for (const at::Tensor* t : {&x, &codebook}) {
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "codebook_topk (native): float32, bfloat16 or float16 inputs, got ", dt);
  }
  // fp32 accumulation whatever the stored dtype: the codebook is converted once, x per block.
  // Detached: the worker threads of at::parallel_for run with grad mode on (it is per thread),
  // where at::mm_out refuses inputs that require grad.
  const at::Tensor xc = x.detach().contiguous();
  const at::Tensor codes = codebook.detach().to(at::kFloat).contiguous();
  at::Tensor scores = at::empty({x.size(0), k}, x.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  if (metric == "l2")
    search<true>(xc, codes, k, scores, idx);
  else
    search<false>(xc, codes, k, scores, idx);
  return {scores, idx};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pacofr_native, m) {
  m.def("codebook_topk(Tensor x, Tensor codebook, int k, str metric) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pacofr_native, CPU, m) { m.impl("codebook_topk", &codebook_topk); }
