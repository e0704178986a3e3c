// Float32 kernels for XLA:CPU: fused multi-head attention (softmax(q k^T * scale) v) and
// GroupNorm, each with its gradients.
//
// Built at run time by mre_jax/ops/cpu_kernels.py (g++ -O3 -march=native) and called through the
// XLA FFI. Layouts are the projections' own: q [B, T, H*d], k and v [B, S, H*d]; the row
// logsumexp of the scaled scores is [B, H, T]. Work items are (batch, head) pairs, spread over
// XLA's intra-op thread pool. Per item, query rows go in blocks whose [rows, S] scores stay in
// cache: forward = scores, exact row softmax, P v; backward recomputes P from the logsumexp.
// Matrix products use one register-blocked kernel (GCC vector extensions: AVX-512 or AVX2,
// whatever -march=native gives): C[M, 16*NV] (+)= A[M, K] B[K, 16*NV], A read through two
// strides (so A may be a transposed view), B and C rows contiguous.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf Load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}

inline void Store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }

inline vf Splat(float x) { return x - vf{}; }  // x - (+0) is x exactly, so this folds to a broadcast

// exp(x) for x <= 0 (softmax arguments, after the row maximum is subtracted; rounding may leave
// them a little above 0): x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, times 2^n.
// Relative error ~2e-7; results below 2^-126 flush to ~1e-38.
inline vf Exp(vf x) {
  x = x < -87.0f ? Splat(-87.0f) : x;
  const vf magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;  // ln2 in two parts (Cody-Waite)
  r = r - n * -2.12194440e-4f;
  vf p = Splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)bits;
}

inline float HorizontalMax(vf x) {
  float m = x[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, x[i]);
  return m;
}

inline float HorizontalSum(vf x) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += x[i];
  return s;
}

// C[R, 16*NV] (+)= sum_k A(r, k) B[k, :], with A(r, k) = a[r*ars + k*aks].
template <int R, int NV>
inline void Tile(int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) acc[r][n] = accumulate ? Load(c + r * ldc + n * kLanes) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf bk[NV];
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) bk[n] = Load(b + k * ldb + n * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const vf x = Splat(a[r * ars + k * aks]);
#pragma GCC unroll 16
      for (int n = 0; n < NV; ++n) acc[r][n] += x * bk[n];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int n = 0; n < NV; ++n) Store(c + r * ldc + n * kLanes, acc[r][n]);
}

// Rows per tile: about 24 accumulators, at most 12 rows.
constexpr int RowsFor(int nv) { return std::min(12, std::max(1, 24 / nv)); }

template <int NV>
void GemmCols(int64_t M, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int R = RowsFor(NV);
  int64_t m = 0;
  for (; m + R <= M; m += R) Tile<R, NV>(K, a + m * ars, ars, aks, b, ldb, c + m * ldc, ldc, accumulate);
  for (; m < M; ++m) Tile<1, NV>(K, a + m * ars, ars, aks, b, ldb, c + m * ldc, ldc, accumulate);
}

// C[M, N] (+)= A[M, K] B[K, N]; N a multiple of 16. Wide outputs go in column blocks of 32.
void Gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const int64_t nv = N / kLanes;
  switch (nv) {  // outputs up to 160 wide in one pass (each A element loaded once)
#define MRE_CASE(V) \
  case V:           \
    return GemmCols<V>(M, K, a, ars, aks, b, ldb, c, ldc, accumulate);
    MRE_CASE(1) MRE_CASE(2) MRE_CASE(3) MRE_CASE(4) MRE_CASE(5)
    MRE_CASE(6) MRE_CASE(7) MRE_CASE(8) MRE_CASE(9) MRE_CASE(10)
#undef MRE_CASE
    default:
      break;
  }
  int64_t n = 0;
  for (; n + 2 * kLanes <= N; n += 2 * kLanes) GemmCols<2>(M, K, a, ars, aks, b + n, ldb, c + n, ldc, accumulate);
  if (n < N) GemmCols<1>(M, K, a, ars, aks, b + n, ldb, c + n, ldc, accumulate);
}

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Dims {
  int64_t batch, t, s, heads, d, sp, dp, rows;
  float scale;

  Dims(int64_t batch, int64_t t, int64_t s, int64_t heads, int64_t width, float scale)
      : batch(batch), t(t), s(s), heads(heads), d(width / heads), sp(RoundUp(s, kLanes)),
        dp(RoundUp(width / heads, kLanes)), scale(scale) {
    // query rows per block: a multiple of 24 (whole tiles for every width), with the [rows, sp]
    // scores (and their gradient) within ~256 KB
    rows = std::max<int64_t>(24, std::min<int64_t>(96, (65536 / sp) / 24 * 24));
  }
  int64_t width() const { return heads * d; }
};

// Runs fn(i) for i in [0, n) on the caller and XLA's intra-op pool. Helpers that start after all
// items are claimed return at once, and the caller waits only for claimed items, so a busy pool
// cannot deadlock it.
class ParallelFor {
 public:
  static void Run(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> fn) {
    auto state = std::make_shared<ParallelFor>();
    state->n_ = n;
    state->fn_ = std::move(fn);
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
    for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Work(); });
    state->Work();
    std::unique_lock<std::mutex> lock(state->mu_);
    state->cv_.wait(lock, [&] { return state->done_.load() == state->n_; });
  }

 private:
  void Work() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) {
      fn_(i);
      if (done_.fetch_add(1) + 1 == n_) {
        std::lock_guard<std::mutex> lock(mu_);
        cv_.notify_all();
      }
    }
  }

  int64_t n_ = 0;
  std::function<void(int64_t)> fn_;
  std::atomic<int64_t> next_{0}, done_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Per-thread work buffers, kept between calls (XLA's pool threads live as long as the process).
float* Scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[10];
  if (static_cast<int64_t>(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// dst[j, c] (stride ld, `rows` rows) <- src[j, c] (row stride src_ld) for j < n, c < d; zero
// elsewhere (columns d <= c < ld, rows n <= j < rows).
void PackRows(const float* src, int64_t src_ld, int64_t n, int64_t d, float* dst, int64_t ld, int64_t rows) {
  for (int64_t j = 0; j < n; ++j) {
    std::memcpy(dst + j * ld, src + j * src_ld, d * sizeof(float));
    std::fill(dst + j * ld + d, dst + (j + 1) * ld, 0.0f);
  }
  std::fill(dst + n * ld, dst + rows * ld, 0.0f);
}

// Panels of kPanel columns: a [K, N] matrix stored panel by panel, each [K, kPanel] contiguous
// (the last one may be 16 wide), so that a product streams one small contiguous block of B per
// column panel; with rows of N floats, B's rows at a 4 KB stride fall into one L1 set.
constexpr int64_t kPanel = 32;

// dst (panels over j, ld = n rounded up to 16 columns) <- src[j, c] transposed: dst(c, j), for
// j < n, c < d; zero for n <= j < ld.
void PackTransposedPanels(const float* src, int64_t src_ld, int64_t n, int64_t d, float* dst, int64_t ld) {
  for (int64_t j0 = 0; j0 < ld; j0 += kPanel) {
    const int64_t width = std::min(kPanel, ld - j0);
    float* panel = dst + j0 * d;
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = 0; j < width; ++j) panel[c * width + j] = j0 + j < n ? src[(j0 + j) * src_ld + c] : 0.0f;
  }
}

// C[M, N] (+)= A[M, K] B[K, N] with B in panels (see kPanel).
void GemmPanels(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t aks, const float* b, float* c,
                int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    if (n0 + kPanel <= N)
      GemmCols<2>(M, K, a, ars, aks, b + n0 * K, kPanel, c + n0, ldc, accumulate);
    else
      GemmCols<1>(M, K, a, ars, aks, b + n0 * K, N - n0, c + n0, ldc, accumulate);
  }
}

// Lanes of the last vector of a row that lie past s (the padding), as a mask of true lanes.
inline vf TailKeep(int64_t s) {
  vf keep;
  for (int i = 0; i < kLanes; ++i) keep[i] = (s % kLanes == 0 || i < s % kLanes) ? 1.0f : 0.0f;
  return keep;
}

// exp(x[j..j+15] * scale - shift), with the lanes past s (padding keys) set to 0.
inline vf ExpScores(const float* x, int64_t j, const Dims& dm, vf shift) {
  const vf p = Exp(Load(x + j) * dm.scale - shift);
  return j + kLanes > dm.s ? p * TailKeep(dm.s) : p;
}

// One row of scores (sp wide) -> unnormalised exp((x - max) * scale) in place; returns
// (max * scale, sum). Padding columns become 0.
inline std::pair<float, float> SoftmaxRow(float* x, const Dims& dm) {
  const int64_t full = dm.s / kLanes * kLanes;
  vf top0 = Splat(-std::numeric_limits<float>::infinity()), top1 = top0;
  int64_t j = 0;
  for (; j + 2 * kLanes <= full; j += 2 * kLanes) {
    const vf v0 = Load(x + j), v1 = Load(x + j + kLanes);
    top0 = v0 > top0 ? v0 : top0;
    top1 = v1 > top1 ? v1 : top1;
  }
  if (j < full) top0 = Load(x + j) > top0 ? Load(x + j) : top0;
  float m = HorizontalMax(top0 > top1 ? top0 : top1);
  for (j = full; j < dm.s; ++j) m = std::max(m, x[j]);
  const vf shift = Splat(m * dm.scale);
  vf sum0{}, sum1{};
  for (j = 0; j + 2 * kLanes <= full; j += 2 * kLanes) {
    const vf p0 = Exp(Load(x + j) * dm.scale - shift), p1 = Exp(Load(x + j + kLanes) * dm.scale - shift);
    Store(x + j, p0);
    Store(x + j + kLanes, p1);
    sum0 += p0;
    sum1 += p1;
  }
  for (; j < dm.sp; j += kLanes) {
    const vf p = ExpScores(x, j, dm, shift);
    Store(x + j, p);
    sum0 += p;
  }
  return {m * dm.scale, HorizontalSum(sum0 + sum1)};
}

void ForwardItem(int64_t item, const Dims& dm, const float* q, const float* k, const float* v, float* out,
                 float* lse) {
  const int64_t b = item / dm.heads, h = item % dm.heads, w = dm.width();
  const float* qb = q + b * dm.t * w + h * dm.d;
  const float* kb = k + b * dm.s * w + h * dm.d;
  const float* vb = v + b * dm.s * w + h * dm.d;
  float *kt = Scratch(0, dm.d * dm.sp), *vp = Scratch(1, dm.sp * dm.dp), *scores = Scratch(2, dm.rows * dm.sp),
        *o = Scratch(3, dm.rows * dm.dp);
  PackTransposedPanels(kb, w, dm.s, dm.d, kt, dm.sp);
  PackRows(vb, w, dm.s, dm.d, vp, dm.dp, dm.sp);  // padding keys: zero values
  for (int64_t i0 = 0; i0 < dm.t; i0 += dm.rows) {
    const int64_t rows = std::min(dm.rows, dm.t - i0);
    GemmPanels(rows, dm.sp, dm.d, qb + i0 * w, w, 1, kt, scores, dm.sp, false);
    float inv[96];
    for (int64_t i = 0; i < rows; ++i) {
      auto [shift, sum] = SoftmaxRow(scores + i * dm.sp, dm);
      inv[i] = 1.0f / sum;
      lse[(b * dm.heads + h) * dm.t + i0 + i] = shift + std::log(sum);
    }
    Gemm(rows, dm.dp, dm.sp, scores, dm.sp, 1, vp, dm.dp, o, dm.dp, false);
    for (int64_t i = 0; i < rows; ++i) {
      float* dst = out + (b * dm.t + i0 + i) * w + h * dm.d;
      for (int64_t c = 0; c < dm.d; ++c) dst[c] = o[i * dm.dp + c] * inv[i];
    }
  }
}

void BackwardItem(int64_t item, const Dims& dm, const float* q, const float* k, const float* v, const float* out,
                  const float* lse, const float* d_out, float* dq, float* dk, float* dv) {
  const int64_t b = item / dm.heads, h = item % dm.heads, w = dm.width(), off = h * dm.d;
  const int64_t q0 = b * dm.t * w + off, k0 = b * dm.s * w + off;
  float *kt = Scratch(0, dm.d * dm.sp), *vt = Scratch(1, dm.d * dm.sp), *kp = Scratch(2, dm.sp * dm.dp),
        *dkp = Scratch(3, dm.sp * dm.dp), *dvp = Scratch(4, dm.sp * dm.dp), *qblk = Scratch(5, dm.rows * dm.dp),
        *dblk = Scratch(6, dm.rows * dm.dp), *p = Scratch(7, dm.rows * dm.sp), *ds = Scratch(8, dm.rows * dm.sp),
        *g = Scratch(9, dm.rows * dm.dp);
  PackTransposedPanels(k + k0, w, dm.s, dm.d, kt, dm.sp);
  PackTransposedPanels(v + k0, w, dm.s, dm.d, vt, dm.sp);
  PackRows(k + k0, w, dm.s, dm.d, kp, dm.dp, dm.sp);
  const float* lse_bh = lse + (b * dm.heads + h) * dm.t;
  for (int64_t i0 = 0; i0 < dm.t; i0 += dm.rows) {
    const int64_t rows = std::min(dm.rows, dm.t - i0);
    PackRows(q + q0 + i0 * w, w, rows, dm.d, qblk, dm.dp, rows);
    PackRows(d_out + q0 + i0 * w, w, rows, dm.d, dblk, dm.dp, rows);
    GemmPanels(rows, dm.sp, dm.d, qblk, dm.dp, 1, kt, p, dm.sp, false);
    GemmPanels(rows, dm.sp, dm.d, dblk, dm.dp, 1, vt, ds, dm.sp, false);
    for (int64_t i = 0; i < rows; ++i) {
      const float* o = out + q0 + (i0 + i) * w;
      float delta = 0;  // rowsum(P * dP) = d_out . out
      for (int64_t c = 0; c < dm.d; ++c) delta += dblk[i * dm.dp + c] * o[c];
      const vf shift = Splat(lse_bh[i0 + i]), dv_shift = Splat(delta);
      float* pr = p + i * dm.sp;
      float* dr = ds + i * dm.sp;
      for (int64_t j = 0; j < dm.sp; j += kLanes) {
        const vf pj = ExpScores(pr, j, dm, shift);
        Store(pr + j, pj);
        Store(dr + j, pj * (Load(dr + j) - dv_shift));
      }
    }
    // dq = dS k * scale
    Gemm(rows, dm.dp, dm.sp, ds, dm.sp, 1, kp, dm.dp, g, dm.dp, false);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < dm.d; ++c) dq[q0 + (i0 + i) * w + c] = g[i * dm.dp + c] * dm.scale;
    // dv += P^T d_out, dk += dS^T q (A read transposed: row stride 1, k stride sp)
    // (the first block writes them: no zeroing)
    Gemm(dm.sp, dm.dp, rows, p, 1, dm.sp, dblk, dm.dp, dvp, dm.dp, i0 > 0);
    Gemm(dm.sp, dm.dp, rows, ds, 1, dm.sp, qblk, dm.dp, dkp, dm.dp, i0 > 0);
  }
  for (int64_t j = 0; j < dm.s; ++j)
    for (int64_t c = 0; c < dm.d; ++c) {
      dk[k0 + j * w + c] = dkp[j * dm.dp + c] * dm.scale;
      dv[k0 + j * w + c] = dvp[j * dm.dp + c];
    }
}

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v, int64_t heads) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument("attention: q, k, v must be [batch, tokens, heads * head_dim]");
  if (kd[0] != qd[0] || vd[0] != qd[0] || kd[1] != vd[1] || kd[2] != qd[2] || vd[2] != qd[2])
    return ffi::Error::InvalidArgument("attention: q, k, v shapes do not match");
  if (heads <= 0 || qd[2] % heads != 0) return ffi::Error::InvalidArgument("attention: width not divisible by heads");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t heads, float scale) {
  if (auto error = CheckShapes(q, k, v, heads); error.failure()) return error;
  const auto qd = q.dimensions();
  const Dims dm(qd[0], qd[1], k.dimensions()[1], heads, qd[2], scale);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor::Run(pool, dm.batch * dm.heads, [&](int64_t i) { ForwardItem(i, dm, qp, kp, vp, op, lp); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t heads, float scale) {
  if (auto error = CheckShapes(q, k, v, heads); error.failure()) return error;
  const auto qd = q.dimensions();
  const Dims dm(qd[0], qd[1], k.dimensions()[1], heads, qd[2], scale);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  ParallelFor::Run(pool, dm.batch * dm.heads,
                   [&](int64_t i) { BackwardItem(i, dm, qp, kp, vp, op, lp, gp, dqp, dkp, dvp); });
  return ffi::Error::Success();
}


// ------------------------------------------------------------------------------------ GroupNorm
// x [B, N, C] (N positions, channels last), G groups of C/G channels; statistics per (batch,
// group) in two passes (mean, then mean squared deviation), accumulated in float over blocks of
// rows and in double across blocks. Work items are (batch, run of whole groups).

struct NormDims {
  int64_t batch, n, c, groups, cg, chunks, chunk_groups;

  NormDims(int64_t batch, int64_t n, int64_t c, int64_t groups, int64_t threads)
      : batch(batch), n(n), c(c), groups(groups), cg(c / groups) {
    chunks = std::min<int64_t>(groups, std::max<int64_t>(1, (2 * threads + batch - 1) / batch));
    while (groups % chunks) ++chunks;  // equal runs of groups
    chunk_groups = groups / chunks;
  }
};

constexpr int64_t kNormRows = 64;

// p[j..j+15] where that lies within [0, len); past the last full vector, p[j] in lane 0 only.
inline vf LoadRun(const float* p, int64_t j, int64_t len) {
  if (j + kLanes <= len) return Load(p + j);
  vf v{};
  v[0] = p[j];
  return v;
}

// Sum of per-channel sums over the channels of group g (cg channels each).
inline double GroupTotal(const double* sums, int64_t g, int64_t cg) {
  double total = 0;
  for (int64_t j = g * cg; j < (g + 1) * cg; ++j) total += sums[j];
  return total;
}

// sums[j] = sum over rows r < n of f(r, j)[0..] for channels j in [0, len): f(r, j) gives the
// (transformed) values of row r, channels j..j+15 (lane 0 only past the last full vector). Sums
// go in float within blocks of kNormRows rows, in double across blocks.
template <typename F>
void ChannelSums(int64_t n, int64_t len, F f, double* sums, float* block) {
  std::fill(sums, sums + len, 0.0);
  const int64_t full = len / kLanes * kLanes;
  for (int64_t r0 = 0; r0 < n; r0 += kNormRows) {
    std::fill(block, block + len, 0.0f);
    for (int64_t r = r0; r < std::min(n, r0 + kNormRows); ++r) {
      for (int64_t j = 0; j < full; j += kLanes) Store(block + j, Load(block + j) + f(r, j));
      for (int64_t j = full; j < len; ++j) block[j] += f(r, j)[0];
    }
    for (int64_t j = 0; j < len; ++j) sums[j] += block[j];
  }
}

void GroupNormForwardItem(int64_t item, const NormDims& dm, float epsilon, const float* x, const float* gamma,
                          const float* beta, float* y, float* mean, float* rstd) {
  const int64_t b = item / dm.chunks, g0 = item % dm.chunks * dm.chunk_groups, c0 = g0 * dm.cg;
  const int64_t len = dm.chunk_groups * dm.cg, full = len / kLanes * kLanes;
  const float* xb = x + b * dm.n * dm.c + c0;
  float* yb = y + b * dm.n * dm.c + c0;
  thread_local std::vector<double> sums;
  sums.resize(len);
  float *block = Scratch(0, len), *shift = Scratch(1, len), *mul = Scratch(2, len), *add = Scratch(3, len);
  auto row = [&](int64_t r, int64_t j) { return LoadRun(xb + r * dm.c, j, len); };
  ChannelSums(dm.n, len, row, sums.data(), block);
  const double count = static_cast<double>(dm.n * dm.cg);
  for (int64_t g = 0; g < dm.chunk_groups; ++g) {
    const float m = static_cast<float>(GroupTotal(sums.data(), g, dm.cg) / count);
    std::fill(shift + g * dm.cg, shift + (g + 1) * dm.cg, m);
  }
  auto centered = [&](int64_t r, int64_t j) {
    const vf d = row(r, j) - LoadRun(shift, j, len);
    return d * d;
  };
  ChannelSums(dm.n, len, centered, sums.data(), block);
  for (int64_t g = 0; g < dm.chunk_groups; ++g) {
    const float m = shift[g * dm.cg];
    const float r = static_cast<float>(1.0 / std::sqrt(GroupTotal(sums.data(), g, dm.cg) / count + epsilon));
    mean[b * dm.groups + g0 + g] = m;
    rstd[b * dm.groups + g0 + g] = r;
    for (int64_t j = g * dm.cg; j < (g + 1) * dm.cg; ++j) {
      mul[j] = r * gamma[c0 + j];
      add[j] = beta[c0 + j] - m * mul[j];
    }
  }
  for (int64_t r = 0; r < dm.n; ++r) {
    for (int64_t j = 0; j < full; j += kLanes) Store(yb + r * dm.c + j, Load(xb + r * dm.c + j) * Load(mul + j) + Load(add + j));
    for (int64_t j = full; j < len; ++j) yb[r * dm.c + j] = xb[r * dm.c + j] * mul[j] + add[j];
  }
}

void GroupNormBackwardItem(int64_t item, const NormDims& dm, const float* x, const float* dy, const float* gamma,
                           const float* mean, const float* rstd, float* dx, float* dgamma, float* dbeta) {
  const int64_t b = item / dm.chunks, g0 = item % dm.chunks * dm.chunk_groups, c0 = g0 * dm.cg;
  const int64_t len = dm.chunk_groups * dm.cg, full = len / kLanes * kLanes, off = b * dm.n * dm.c + c0;
  thread_local std::vector<double> s1, s2;
  s1.resize(len);
  s2.resize(len);
  float *block = Scratch(0, len), *ca = Scratch(1, len), *cb = Scratch(2, len), *cc = Scratch(3, len);
  auto load = [&](const float* p, int64_t r, int64_t j) { return LoadRun(p + off + r * dm.c, j, len); };
  ChannelSums(dm.n, len, [&](int64_t r, int64_t j) { return load(dy, r, j); }, s1.data(), block);
  ChannelSums(dm.n, len, [&](int64_t r, int64_t j) { return load(dy, r, j) * load(x, r, j); }, s2.data(), block);
  const double count = static_cast<double>(dm.n * dm.cg);
  for (int64_t g = 0; g < dm.chunk_groups; ++g) {
    const double m = mean[b * dm.groups + g0 + g], r = rstd[b * dm.groups + g0 + g];
    double m1 = 0, m2 = 0;  // group means of d(x_hat) and d(x_hat) * x_hat, d(x_hat) = gamma dy
    for (int64_t j = g * dm.cg; j < (g + 1) * dm.cg; ++j) {
      const double dg = r * (s2[j] - m * s1[j]);  // sum of dy * x_hat
      dgamma[b * dm.c + c0 + j] = static_cast<float>(dg);
      dbeta[b * dm.c + c0 + j] = static_cast<float>(s1[j]);
      m1 += gamma[c0 + j] * s1[j];
      m2 += gamma[c0 + j] * dg;
    }
    m1 /= count;
    m2 /= count;
    // dx = r (gamma dy - m1 - x_hat m2) = dy (r gamma) + x (-r^2 m2) + (r^2 m2 mean - r m1)
    for (int64_t j = g * dm.cg; j < (g + 1) * dm.cg; ++j) {
      ca[j] = static_cast<float>(r * gamma[c0 + j]);
      cb[j] = static_cast<float>(-r * r * m2);
      cc[j] = static_cast<float>(r * r * m2 * m - r * m1);
    }
  }
  for (int64_t r = 0; r < dm.n; ++r) {
    const int64_t o = off + r * dm.c;
    for (int64_t j = 0; j < full; j += kLanes)
      Store(dx + o + j, Load(dy + o + j) * Load(ca + j) + Load(x + o + j) * Load(cb + j) + Load(cc + j));
    for (int64_t j = full; j < len; ++j) dx[o + j] = dy[o + j] * ca[j] + x[o + j] * cb[j] + cc[j];
  }
}

ffi::Error CheckNorm(ffi::Buffer<ffi::F32>& x, int64_t groups) {
  const auto xd = x.dimensions();
  if (xd.size() != 3) return ffi::Error::InvalidArgument("group_norm: x must be [batch, positions, channels]");
  if (groups <= 0 || xd[2] % groups != 0)
    return ffi::Error::InvalidArgument("group_norm: channels not divisible by groups");
  return ffi::Error::Success();
}

ffi::Error GroupNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                            ffi::Buffer<ffi::F32> beta, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                            ffi::ResultBuffer<ffi::F32> rstd, int64_t groups, float epsilon) {
  if (auto error = CheckNorm(x, groups); error.failure()) return error;
  const auto xd = x.dimensions();
  const NormDims dm(xd[0], xd[1], xd[2], groups, pool.num_threads());
  const float *xp = x.typed_data(), *gp = gamma.typed_data(), *bp = beta.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
  ParallelFor::Run(pool, dm.batch * dm.chunks,
                   [&](int64_t i) { GroupNormForwardItem(i, dm, epsilon, xp, gp, bp, yp, mp, rp); });
  return ffi::Error::Success();
}

ffi::Error GroupNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                             ffi::Buffer<ffi::F32> gamma, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                             ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dgamma,
                             ffi::ResultBuffer<ffi::F32> dbeta, int64_t groups) {
  if (auto error = CheckNorm(x, groups); error.failure()) return error;
  const auto xd = x.dimensions();
  const NormDims dm(xd[0], xd[1], xd[2], groups, pool.num_threads());
  const float *xp = x.typed_data(), *dyp = dy.typed_data(), *gp = gamma.typed_data(), *mp = mean.typed_data(),
              *rp = rstd.typed_data();
  float *dxp = dx->typed_data(), *dgp = dgamma->typed_data(), *dbp = dbeta->typed_data();
  ParallelFor::Run(pool, dm.batch * dm.chunks,
                   [&](int64_t i) { GroupNormBackwardItem(i, dm, xp, dyp, gp, mp, rp, dxp, dgp, dbp); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MreAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MreAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MreGroupNormForward, GroupNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MreGroupNormBackward, GroupNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups"));
