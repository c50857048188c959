// Fused neighborhood attention for CPUs (forward and backward), one generic 3-D kernel.
//
// Layout (NATTEN's): q, k [B, S0, S1, S2, H, D]; v [B, S0, S1, S2, H, DV]; 1-D and 2-D calls pass leading axes of
// extent 1. q, k and v may be strided (e.g. views of one fused qkv projection): each has a batch, token and head
// stride (the spatial axes flatten to one token stride) and unit stride along its last axis. Everything else
// (additional keys/values, biases, out, lse, gradients) is contiguous. The geometry (which keys a query sees) is
// computed in Python and arrives as per-axis tables: query coordinate x attends to key coordinates
// start[x] + dil * j for j < count[x], and the relative-position index of its j-th key along that axis is
// rel[x] + j. Additional keys/values
// [B, NA, H, D|DV] join every query's softmax. The optional relative-position bias table is [H, R0, R1, R2]; the
// optional per-key bias kb [B, S0, S1, S2, H] is added to every logit of that key (-inf drops the key).
//
// Speed: K (and V for the backward) are first transposed per head to [window row][D][columns], with the last axis
// reordered by dilation group so that every window row -- start + dil*j, j < count -- is a contiguous run of
// columns. Forward, away from the borders ("lane blocks"): L neighbouring queries of a dilation group whose windows
// start at consecutive columns are the SIMD lanes; the logit of each one's j-th key in a window row is one FMA per
// head dimension against the transposed keys at column start + j (an unaligned load), and the softmax needs no
// horizontal reductions. Elsewhere ("general blocks"): the keys of a window row are the lanes and up to 8
// neighbouring queries share every key-vector load. P·V accumulates value rows (head_dim as lanes). The backward
// computes dP = dO·Vᵀ with the keys as lanes, dQ as a P·V product, then dK and dV per key over the queries whose
// window holds it (the inverse windows, per axis), so every gradient row is written once, without atomics.
//
// Training: the forward can also write the softmax probabilities of every query's window keys (`probs`,
// [B, H, N, K01 * K2], K01 = kernel extent of the two leading axes, K2 = of the last); the backward then reads them
// instead of recomputing the logits and their exponentials, and needs no transposed copy of K.
//
// Plain C ABI (no torch headers) so that it compiles in about a second with the system compiler; threads are
// std::thread so that no second OpenMP runtime is loaded next to PyTorch's.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// ---- SIMD helpers ------------------------------------------------------------------------------------------

// L lanes of T (the kernels use 64-byte vectors).
template <typename T, int L>
struct Simd {
  static constexpr int lanes = L;
  typedef T vec __attribute__((vector_size(L * sizeof(T))));
};

// exp over a vector of float logits (relative error ~2e-7); lanes below -87 (masked keys, -inf) give exactly 0.
template <int L>
inline typename Simd<float, L>::vec vexp(typename Simd<float, L>::vec x) {
  typedef int32_t ivec __attribute__((vector_size(L * 4)));
  typedef typename Simd<float, L>::vec V;
  const V zero = {};
  const V clamped = x > -87.0f ? (x < 88.0f ? x : zero + 88.0f) : zero - 87.0f;
  const V t = clamped * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(t, ivec), V);  // truncation toward zero
  n = n > t ? n - 1.0f : n;                                              // floor: n = round(x / ln2)
  const V r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;       // Cody-Waite reduction
  V y = zero + 1.0f / 720.0f;
  y = y * r + 1.0f / 120.0f;
  y = y * r + 1.0f / 24.0f;
  y = y * r + 1.0f / 6.0f;
  y = y * r + 0.5f;
  y = y * r + 1.0f;
  y = y * r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  V pow2;
  std::memcpy(&pow2, &bits, sizeof(V));
  y *= pow2;
  return x > -87.0f ? y : (x != x ? x : zero);  // NaN stays NaN (as std::exp)
}

// max that propagates NaN (std::max and a > b ? a : b drop it), so a NaN logit makes its whole softmax NaN as in
// the reference; needs -fno-finite-math-only next to -ffast-math.
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

template <typename V>
inline V nan_max_vec(V a, V b) {
  return ((a > b) | (a != a)) ? a : b;
}

// float64 keeps the exact library exp (the oracle dtype).
template <int L>
inline typename Simd<double, L>::vec vexp(typename Simd<double, L>::vec x) {
  for (int i = 0; i < L; ++i) x[i] = std::exp(x[i]);
  return x;
}

// ---- Geometry: which keys each query sees -------------------------------------------------------------------

struct Axis {
  const int64_t* start;
  const int64_t* count;
  const int64_t* rel;
  int64_t extent;
  int64_t dil;
  int64_t rel_size;
};

struct Geometry {
  Axis ax[3];
  int64_t B, H, D, DV, NA;
  int64_t tokens() const { return ax[0].extent * ax[1].extent * ax[2].extent; }
  int64_t max_count(int a) const {
    int64_t c = 0;
    for (int64_t x = 0; x < ax[a].extent; ++x) c = std::max(c, ax[a].count[x]);
    return c;
  }
  // Transposed layout of a [B, N, H, C] tensor: per (batch, head) and per window row (all axes but the last),
  // a [C][row_width] block; the last axis is reordered by dilation group so window rows are contiguous runs.
  int64_t sub_len() const { return (ax[2].extent + ax[2].dil - 1) / ax[2].dil; }
  int64_t row_width() const { return ax[2].dil * sub_len(); }
  int64_t xcol(int64_t x) const { return (x % ax[2].dil) * sub_len() + x / ax[2].dil; }
  int64_t rows() const { return ax[0].extent * ax[1].extent; }
  // Saved probabilities: per query, run r (a window row) at r * kernel2() + j for its j-th key.
  int64_t kernel2() const { return (ax[2].rel_size + 1) / 2; }
  int64_t probs_per_query() const { return (ax[0].rel_size + 1) / 2 * ((ax[1].rel_size + 1) / 2) * kernel2(); }
};

// Element (b, token t, head h, 0) of a strided q, k or v tensor is at b * batch + t * token + h * head.
struct Layout {
  int64_t batch, token, head;
};

template <typename T>
inline const T* head_base(const T* x, const Layout& l, int64_t b, int64_t h) {
  return x + b * l.batch + h * l.head;
}

// ---- Threads and scratch memory ----------------------------------------------------------------------------

// Run fn(lo, hi, worker) over [0, n) on up to nthreads threads (worker 0 is the caller); items are handed out
// dynamically in small grains so that a thread slowed down by other processes does not hold the others back.
template <typename Fn>
void parallel_for(int64_t n, int64_t nthreads, Fn fn) {
  nthreads = std::max<int64_t>(1, std::min(nthreads, n));
  if (nthreads == 1) {
    fn(0, n, 0);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, n / (8 * nthreads));
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t id) {
    for (int64_t lo = next.fetch_add(grain); lo < n; lo = next.fetch_add(grain)) fn(lo, std::min(n, lo + grain), id);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nthreads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
}

// Scratch memory reused across calls from the same calling thread: fresh multi-megabyte allocations would be
// mmap'ed and page-faulted in on every call, which costs as much as the attention itself at these sizes.
template <typename T>
struct Scratch {
  std::vector<T> kt, vt;
  std::vector<std::vector<T>> a, b, c, d;  // per worker
  std::vector<std::vector<int64_t>> runs, pairs;  // per worker: Run records; window rows holding a key row
  void workers(int64_t n) {
    for (auto* v : {&a, &b, &c, &d}) v->resize(std::max<size_t>(v->size(), n));
    for (auto* v : {&runs, &pairs}) v->resize(std::max<size_t>(v->size(), n));
  }
};

template <typename T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// ---- Transposed layout of K and V (keys as SIMD lanes) -----------------------------------------------------

// x [B, N, H, C] (strided as `lx`) -> xt [B, H, rows, C, row_width] (+ zero padding), see Geometry.
template <typename T>
const T* transpose_heads(const T* x, const Layout& lx, const Geometry& g, int64_t C, int64_t slice, int64_t nthreads,
                         std::vector<T>& buffer) {
  const int64_t N = g.tokens(), H = g.H, S2 = g.ax[2].extent, RW = g.row_width();
  T* xt = sized(buffer, g.B * H * slice);
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi, int64_t) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / H, h = item % H;
      T* dst = xt + item * slice;
      if (RW != S2) std::fill(dst, dst + slice, T(0));  // columns no token maps to (extent not a multiple of dil)
      std::fill(dst + g.rows() * C * RW, dst + slice, T(0));  // the padding vector loads may read past the end
      const T* head = head_base(x, lx, b, h);
      // Tiles of 16 tokens of a window row: 16 source rows stay in L1 while each channel's 16 columns are written.
      for (int64_t row = 0; row < N / S2; ++row)
        for (int64_t x0 = 0; x0 < S2; x0 += 16) {
          const int64_t n = std::min<int64_t>(16, S2 - x0);
          const T* src = head + (row * S2 + x0) * lx.token;
          T* out = dst + row * C * RW;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < n; ++i) out[c * RW + g.xcol(x0 + i)] = src[i * lx.token + c];
        }
    }
  });
  return xt;
}

// ---- Windows and query blocks --------------------------------------------------------------------------------

// The window of query token t, as runs of contiguous transposed columns.
struct Run {
  int64_t row;    // window row (flattened leading axes)
  int64_t col;    // first column of the run in the reordered last axis
  int64_t token;  // first key token (natural layout); consecutive keys are dil2 tokens apart
  int64_t bias;   // flat rel-pos-bias index of the first key
  int64_t count;
};

inline int64_t window_runs(const Geometry& g, int64_t t, Run* runs) {
  const Axis &A0 = g.ax[0], &A1 = g.ax[1], &A2 = g.ax[2];
  const int64_t S12 = A1.extent * A2.extent;
  const int64_t z = t / S12, y = (t / A2.extent) % A1.extent, x = t % A2.extent;
  int64_t n = 0;
  for (int64_t i = 0; i < A0.count[z]; ++i) {
    const int64_t kz = A0.start[z] + A0.dil * i, rz = A0.rel[z] + i;
    for (int64_t j = 0; j < A1.count[y]; ++j) {
      const int64_t ky = A1.start[y] + A1.dil * j, ry = A1.rel[y] + j;
      const int64_t row = kz * A1.extent + ky;
      runs[n].row = row;
      runs[n].col = g.xcol(A2.start[x]);
      runs[n].token = row * A2.extent + A2.start[x];
      runs[n].bias = (rz * A1.rel_size + ry) * A2.rel_size + A2.rel[x];
      runs[n].count = A2.count[x];
      ++n;
    }
  }
  return n;
}

constexpr int kBlock = 8;  // queries that share every key-vector load

// Up to kBlock query tokens of one window row and dilation group whose last-axis windows all lie in `chunks`
// vectors starting at reordered column `base` (several queries only when chunks == 1).
struct Block {
  int64_t n;
  int64_t base;
  int64_t token[kBlock];
};

// Split the queries of leading row `row` (tokens row*S2 .. row*S2+S2-1) into blocks, greedily along each dilation
// group; window starts and ends are non-decreasing along a group, so a block spans first start .. last end.
// Queries whose last-axis coordinate is marked in `skip` are left out (the forward runs them as lane blocks).
inline std::vector<Block> make_blocks(const Geometry& g, int64_t row, int64_t L, int64_t chunks,
                                      const std::vector<char>* skip = nullptr) {
  const Axis& A = g.ax[2];
  std::vector<Block> blocks;
  for (int64_t r = 0; r < A.dil && r < A.extent; ++r) {
    Block cur{0, 0, {}};
    for (int64_t x = r; x < A.extent; x += A.dil) {
      if (skip && (*skip)[x]) continue;
      const int64_t first = g.xcol(A.start[x]), last = first + A.count[x] - 1;
      if (cur.n > 0 && (chunks > 1 || cur.n == kBlock || last - cur.base >= L)) {
        blocks.push_back(cur);
        cur.n = 0;
      }
      if (cur.n == 0) cur.base = first;
      cur.token[cur.n++] = row * A.extent + x;
    }
    if (cur.n > 0) blocks.push_back(cur);
  }
  return blocks;
}

// Lane blocks (forward): L queries of one dilation group, x0 + dil*i for i < L, whose last-axis windows start at
// consecutive reordered columns with equal counts and relative positions (every query away from the borders).
// With the queries as SIMD lanes, the logits of the j-th key of a window row are one FMA per head dimension
// against the transposed keys at column start(x0) + j (an unaligned load): no lane is wasted.
struct LaneBlocks {
  std::vector<int64_t> x0;  // first query of each lane block (last-axis coordinate)
  std::vector<char> taken;  // per last-axis coordinate: part of a lane block
};

inline LaneBlocks lane_blocks(const Geometry& g, int64_t L) {
  const Axis& A = g.ax[2];
  LaneBlocks lb{{}, std::vector<char>(A.extent, 0)};
  for (int64_t r = 0; r < A.dil && r < A.extent; ++r) {
    int64_t x = r;
    while (x + A.dil * (L - 1) < A.extent) {
      bool ok = true;
      for (int64_t i = 1; i < L && ok; ++i) {
        const int64_t xi = x + A.dil * i;
        ok = g.xcol(A.start[xi]) == g.xcol(A.start[x]) + i && A.count[xi] == A.count[x] && A.rel[xi] == A.rel[x];
      }
      if (!ok) {
        x += A.dil;
        continue;
      }
      lb.x0.push_back(x);
      for (int64_t i = 0; i < L; ++i) lb.taken[x + A.dil * i] = 1;
      x += A.dil * L;
    }
  }
  return lb;
}

// ---- Micro-kernels: logits (Q·Kᵀ), their adjoint (outer products), P·V ------------------------------------

// Logits of QB queries (pointers qs, QB in {1, kBlock}) against the window rows `runs` of a transposed head slice
// kt [rows][D][RW]: out[i][(r * chunks + c) * L + lane] = scale * <q_i, key at column base + c*L + lane of row r>.
template <typename T, int L, int QB>
inline void block_logits(const T* const* qs, const T* __restrict kt, int64_t RW, int64_t D, const Run* runs,
                         int64_t nrun, int64_t chunks, int64_t base, T scale, T* const* out, int64_t n) {
  using V = typename Simd<T, L>::vec;
  for (int64_t r = 0; r < nrun; ++r) {
    for (int64_t c = 0; c < chunks; ++c) {
      const T* b0 = kt + runs[r].row * D * RW + base + c * L;
      V acc[QB] = {};
      V acc2[QB] = {};
      int64_t d = 0;
      for (; d + 2 <= D; d += 2) {
        V k0, k1;
        std::memcpy(&k0, b0 + d * RW, sizeof(V));
        std::memcpy(&k1, b0 + (d + 1) * RW, sizeof(V));
        for (int i = 0; i < QB; ++i) {
          acc[i] += qs[i][d] * k0;
          acc2[i] += qs[i][d + 1] * k1;
        }
      }
      for (; d < D; ++d) {
        V k0;
        std::memcpy(&k0, b0 + d * RW, sizeof(V));
        for (int i = 0; i < QB; ++i) acc[i] += qs[i][d] * k0;
      }
      for (int64_t i = 0; i < n; ++i) {
        const V res = (acc[i] + acc2[i]) * scale;
        std::memcpy(out[i] + (r * chunks + c) * L, &res, sizeof(V));
      }
    }
  }
}

// Per query: lanes outside its window [off, off + count) become -inf.
template <typename T, int L>
inline void mask_lanes(T* score, int64_t nrun, int64_t chunks, int64_t off, int64_t count) {
  using V = typename Simd<T, L>::vec;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // lane indices as wide as T
  typedef I IV __attribute__((vector_size(L * sizeof(T))));
  for (int64_t c = 0; c < chunks; ++c) {
    IV lane;
    for (int l = 0; l < L; ++l) lane[l] = c * L + l;
    const IV keep = (lane >= I(off)) & (lane < I(off + count));
    const V minus_inf = V{} - INFINITY;
    for (int64_t r = 0; r < nrun; ++r) {
      V v;
      std::memcpy(&v, score + (r * chunks + c) * L, sizeof(V));
      v = keep ? v : minus_inf;
      std::memcpy(score + (r * chunks + c) * L, &v, sizeof(V));
    }
  }
}

// Logits for every query of a block, into per-query buffers (stride `width`), masked to each window.
template <typename T, int L>
inline void logits_for_block(const Block& blk, const T* x, int64_t xoff_stride, const T* kt, int64_t RW, int64_t D,
                             const Geometry& g, const Run* runs0, int64_t nrun, int64_t chunks, T scale,
                             T* score, int64_t width, bool mask = true) {
  const T* qs[kBlock];
  T* outs[kBlock];
  for (int i = 0; i < kBlock; ++i) {
    const int64_t t = blk.token[std::min<int64_t>(i, blk.n - 1)];
    qs[i] = x + t * xoff_stride;
    outs[i] = score + i * width;
  }
  if (blk.n == 1)
    block_logits<T, L, 1>(qs, kt, RW, D, runs0, nrun, chunks, blk.base, scale, outs, 1);
  else
    block_logits<T, L, kBlock>(qs, kt, RW, D, runs0, nrun, chunks, blk.base, scale, outs, blk.n);
  for (int64_t i = 0; i < blk.n && mask; ++i) {
    const int64_t x2 = blk.token[i] % g.ax[2].extent;
    mask_lanes<T, L>(outs[i], nrun, chunks, g.xcol(g.ax[2].start[x2]) - blk.base, g.ax[2].count[x2]);
  }
}

template <typename T, int L, int NV>
inline void accumulate_values(const T* __restrict v, const T* __restrict p, const Run* runs, int64_t nrun,
                              int64_t chunks, int64_t slot_lanes, int64_t dil2, int64_t token_stride,
                              T* __restrict acc) {
  using V = typename Simd<T, L>::vec;
  V a[NV] = {}, c[NV] = {};
  for (int64_t r = 0; r < nrun; ++r) {
    const T* pr = p + r * chunks * slot_lanes;
    const T* vr = v + runs[r].token * token_stride;
    const int64_t cnt = runs[r].count, step = dil2 * token_stride;
    int64_t j = 0;
    for (; j + 2 <= cnt; j += 2) {
      const T p0 = pr[j], p1 = pr[j + 1];
      const T *v0 = vr + j * step, *v1 = v0 + step;
      for (int u = 0; u < NV; ++u) {
        V x0, x1;
        std::memcpy(&x0, v0 + u * L, sizeof(V));
        std::memcpy(&x1, v1 + u * L, sizeof(V));
        a[u] += p0 * x0;
        c[u] += p1 * x1;
      }
    }
    for (; j < cnt; ++j) {
      const T* v0 = vr + j * step;
      for (int u = 0; u < NV; ++u) {
        V x0;
        std::memcpy(&x0, v0 + u * L, sizeof(V));
        a[u] += pr[j] * x0;
      }
    }
  }
  for (int u = 0; u < NV; ++u) {
    const V sum = a[u] + c[u];
    std::memcpy(acc + u * L, &sum, sizeof(V));
  }
}

template <typename T, int L>
inline void accumulate_values_any(const T* __restrict v, const T* __restrict p, const Run* runs, int64_t nrun,
                                  int64_t chunks, int64_t dil2, int64_t token_stride, int64_t DV, T* __restrict acc) {
  // value rows as 64-byte vectors: W lanes of T
  constexpr int W = 64 / sizeof(T);
  switch (DV) {
    case W / 2: return accumulate_values<T, W / 2, 1>(v, p, runs, nrun, chunks, L, dil2, token_stride, acc);
    case W: return accumulate_values<T, W, 1>(v, p, runs, nrun, chunks, L, dil2, token_stride, acc);
    case 2 * W: return accumulate_values<T, W, 2>(v, p, runs, nrun, chunks, L, dil2, token_stride, acc);
    case 4 * W: return accumulate_values<T, W, 4>(v, p, runs, nrun, chunks, L, dil2, token_stride, acc);
    case 8 * W: return accumulate_values<T, W, 8>(v, p, runs, nrun, chunks, L, dil2, token_stride, acc);
  }
  std::fill(acc, acc + DV, T(0));
  for (int64_t r = 0; r < nrun; ++r)
    for (int64_t j = 0; j < runs[r].count; ++j) {
      const T pj = p[r * chunks * L + j];
      const T* vj = v + (runs[r].token + dil2 * j) * token_stride;
      for (int64_t c = 0; c < DV; ++c) acc[c] += pj * vj[c];
    }
}

// ---- The problem and per-query steps shared by forward and backward -------------------------------------------

template <typename T>
struct Problem {
  const T *q, *k, *v, *addk, *addv, *rpb, *kb;
  Layout lq, lk, lv;
  Geometry g;
  T scale;
};

// Adds the relative-position bias and the per-key bias to query t's logits (window keys at sc[r * rstride + off + j]).
template <typename T>
inline void add_biases(const Problem<T>& p, int64_t b, int64_t h, const Run* runs, int64_t nrun, int64_t rstride,
                       int64_t off, T* sc) {
  if (!p.rpb && !p.kb) return;
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, dil2 = g.ax[2].dil;
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  for (int64_t r = 0; r < nrun; ++r)
    for (int64_t j = 0; j < runs[r].count; ++j) {
      T& s = sc[r * rstride + off + j];
      if (p.rpb) s += p.rpb[h * R + runs[r].bias + j];
      if (p.kb) s += p.kb[(b * N + runs[r].token + dil2 * j) * H + h];
    }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- Forward ----------------------------------------------------------------------------------------------------

// Logits of a lane block against one window row: S[j][lane] = scale * <q_lane, key j of the lane's window> for
// j < count, from qt [D][L] (the block's queries transposed) and kr = the transposed row at the first lane's start.
// Computed in groups of 8 keys (a group may read up to 7 columns past the window: padding, discarded).
template <typename T, int L>
inline void lane_logits(const T* __restrict qt, const T* __restrict kr, int64_t RW, int64_t D, int64_t count, T scale,
                        T* __restrict S) {
  using V = typename Simd<T, L>::vec;
  for (int64_t j0 = 0; j0 < count; j0 += 8) {
    V a[8] = {};
    for (int64_t d = 0; d < D; ++d) {
      V qd;
      std::memcpy(&qd, qt + d * L, sizeof(V));
      const T* kd = kr + d * RW + j0;
      for (int u = 0; u < 8; ++u) {
        V k;
        std::memcpy(&k, kd + u, sizeof(V));
        a[u] += qd * k;
      }
    }
    for (int u = 0; u < 8 && j0 + u < count; ++u) {
      const V r = a[u] * scale;
      std::memcpy(S + (j0 + u) * L, &r, sizeof(V));
    }
  }
}

// o = sum over the window of E[key][lane] * v[key of `lane`] (head_dim as NV vectors of W lanes); E is [keys][L].
template <typename T, int W, int NV, int L>
inline void lane_values(const T* __restrict v, int64_t vstride, const T* __restrict E, const Run* runs, int64_t nrun,
                        int64_t count, int64_t dil2, int64_t lane, T* __restrict o) {
  using V = typename Simd<T, W>::vec;
  V a[NV] = {}, c[NV] = {};
  for (int64_t r = 0; r < nrun; ++r) {
    const T* vr = v + (runs[r].token + dil2 * lane) * vstride;
    const T* er = E + r * count * L + lane;
    const int64_t step = dil2 * vstride;
    int64_t j = 0;
    for (; j + 2 <= count; j += 2) {
      const T w0 = er[j * L], w1 = er[(j + 1) * L];
      const T *v0 = vr + j * step, *v1 = v0 + step;
      for (int u = 0; u < NV; ++u) {
        V x0, x1;
        std::memcpy(&x0, v0 + u * W, sizeof(V));
        std::memcpy(&x1, v1 + u * W, sizeof(V));
        a[u] += w0 * x0;
        c[u] += w1 * x1;
      }
    }
    for (; j < count; ++j) {
      const T* v0 = vr + j * step;
      for (int u = 0; u < NV; ++u) {
        V x0;
        std::memcpy(&x0, v0 + u * W, sizeof(V));
        a[u] += er[j * L] * x0;
      }
    }
  }
  for (int u = 0; u < NV; ++u) {
    const V sum = a[u] + c[u];
    std::memcpy(o + u * W, &sum, sizeof(V));
  }
}

template <typename T, int L>
inline void lane_values_any(const T* v, int64_t vstride, const T* E, const Run* runs, int64_t nrun, int64_t count,
                            int64_t dil2, int64_t lane, int64_t DV, T* o) {
  constexpr int W = 64 / sizeof(T);
  switch (DV) {
    case W / 2: return lane_values<T, W / 2, 1, L>(v, vstride, E, runs, nrun, count, dil2, lane, o);
    case W: return lane_values<T, W, 1, L>(v, vstride, E, runs, nrun, count, dil2, lane, o);
    case 2 * W: return lane_values<T, W, 2, L>(v, vstride, E, runs, nrun, count, dil2, lane, o);
    case 4 * W: return lane_values<T, W, 4, L>(v, vstride, E, runs, nrun, count, dil2, lane, o);
    case 8 * W: return lane_values<T, W, 8, L>(v, vstride, E, runs, nrun, count, dil2, lane, o);
  }
  std::fill(o, o + DV, T(0));
  for (int64_t r = 0; r < nrun; ++r)
    for (int64_t j = 0; j < count; ++j) {
      const T w = E[(r * count + j) * L + lane];
      const T* vj = v + (runs[r].token + dil2 * (lane + j)) * vstride;
      for (int64_t c = 0; c < DV; ++c) o[c] += w * vj[c];
    }
}

// One lane block of (batch b, head h, leading row `row`), queries x0 + dil*i: logits, biases, softmax, P·V, lse
// (and the saved probabilities). Needs no key bias and no additional keys (the caller checks). Returns false,
// writing nothing, when a lane's softmax would be empty or NaN-led (the general path then handles the block).
template <typename T, int L>
inline bool forward_lane_block(const Problem<T>& p, int64_t b, int64_t h, int64_t row, int64_t x0, const T* kth,
                               Run* runs, T* qt, T* S, T* out, T* lse, T* probs) {
  using V = typename Simd<T, L>::vec;
  const Geometry& g = p.g;
  const Axis& A = g.ax[2];
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, S2 = A.extent, RW = g.row_width();
  const int64_t t0 = row * S2 + x0;
  const int64_t nrun = window_runs(g, t0, runs), count = runs[0].count, keys = nrun * count;
  const T* qh = head_base(p.q, p.lq, b, h);
  for (int i = 0; i < L; ++i) {
    const T* qi = qh + (t0 + A.dil * i) * p.lq.token;
    for (int64_t d = 0; d < D; ++d) qt[d * L + i] = qi[d];
  }
  for (int64_t r = 0; r < nrun; ++r)
    lane_logits<T, L>(qt, kth + runs[r].row * D * RW + runs[r].col, RW, D, count, p.scale, S + r * count * L);
  if (p.rpb) {
    const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
    for (int64_t r = 0; r < nrun; ++r)
      for (int64_t j = 0; j < count; ++j) {
        V sv;
        std::memcpy(&sv, S + (r * count + j) * L, sizeof(V));
        sv += p.rpb[h * R + runs[r].bias + j];
        std::memcpy(S + (r * count + j) * L, &sv, sizeof(V));
      }
  }
  V m = S[0] + V{};
  for (int64_t k = 0; k < keys; ++k) {
    V sv;
    std::memcpy(&sv, S + k * L, sizeof(V));
    m = nan_max_vec(m, sv);
  }
  for (int i = 0; i < L; ++i)
    if (!(m[i] > -INFINITY) || m[i] == INFINITY) return false;
  V l = {};
  for (int64_t k = 0; k < keys; ++k) {
    V sv;
    std::memcpy(&sv, S + k * L, sizeof(V));
    sv = vexp<L>(sv - m);
    std::memcpy(S + k * L, &sv, sizeof(V));
    l += sv;
  }
  const int64_t KK = g.probs_per_query(), K2 = g.kernel2();
  for (int i = 0; i < L; ++i) {
    const int64_t t = t0 + A.dil * i, qoff = (b * N + t) * H + h;
    T* o = out + qoff * DV;
    lane_values_any<T, L>(head_base(p.v, p.lv, b, h), p.lv.token, S, runs, nrun, count, A.dil, i, DV, o);
    const T inv = T(1) / l[i];
    for (int64_t c = 0; c < DV; ++c) o[c] *= inv;
    lse[qoff] = m[i] + std::log(l[i]);
    if (probs) {
      T* pq = probs + ((b * H + h) * N + t) * KK;
      for (int64_t r = 0; r < nrun; ++r)
        for (int64_t j = 0; j < count; ++j) pq[r * K2 + j] = S[(r * count + j) * L + i] * inv;
    }
  }
  return true;
}

// Softmax over query t's logits (window lanes sc[0, used) with -inf off-window, then NA additional logits), P·V into
// o, lse; and, when `probs` is given, its normalised window probabilities (compact, see Geometry::kernel2).
template <typename T, int L>
inline void forward_query(const Problem<T>& p, int64_t b, int64_t h, int64_t t, const Run* runs, int64_t nrun,
                          int64_t rstride, int64_t off, T* sc, T* o, T* lse, T* probs) {
  using V = typename Simd<T, L>::vec;
  const Geometry& g = p.g;
  const int64_t H = g.H, D = g.D, DV = g.DV, NA = g.NA, used = nrun * rstride;
  const T* qi = head_base(p.q, p.lq, b, h) + t * p.lq.token;
  add_biases(p, b, h, runs, nrun, rstride, off, sc);
  for (int64_t j = 0; j < NA; ++j) sc[used + j] = p.scale * dot(qi, p.addk + ((b * NA + j) * H + h) * D, D);
  V mv = sc[0] + V{};
  for (int64_t j = 0; j < used; j += L) {
    V sv;
    std::memcpy(&sv, sc + j, sizeof(V));
    mv = nan_max_vec(mv, sv);
  }
  T m = -INFINITY;
  for (int l = 0; l < L; ++l) m = nan_max(m, mv[l]);
  for (int64_t j = used; j < used + NA; ++j) m = nan_max(m, sc[j]);
  if (m == -INFINITY) {  // every key dropped by kb: empty softmax
    std::fill(o, o + DV, T(0));
    *lse = -INFINITY;
    if (probs) std::fill(probs, probs + g.probs_per_query(), T(0));
    return;
  }
  V lv = {};
  for (int64_t j = 0; j < used; j += L) {
    V sv;
    std::memcpy(&sv, sc + j, sizeof(V));
    sv = vexp<L>(sv - m);
    std::memcpy(sc + j, &sv, sizeof(V));
    lv += sv;
  }
  T l = 0;
  for (int k = 0; k < L; ++k) l += lv[k];
  for (int64_t j = used; j < used + NA; ++j) {
    sc[j] = std::exp(sc[j] - m);
    l += sc[j];
  }
  accumulate_values_any<T, L>(head_base(p.v, p.lv, b, h), sc + off, runs, nrun, rstride / L, g.ax[2].dil,
                              p.lv.token, DV, o);
  for (int64_t j = 0; j < NA; ++j) {
    const T pj = sc[used + j];
    const T* vj = p.addv + ((b * NA + j) * H + h) * DV;
    for (int64_t c = 0; c < DV; ++c) o[c] += pj * vj[c];
  }
  const T inv = T(1) / l;
  for (int64_t c = 0; c < DV; ++c) o[c] *= inv;
  *lse = m + std::log(l);
  if (probs) {
    const int64_t K2 = g.kernel2();
    for (int64_t r = 0; r < nrun; ++r)
      for (int64_t j = 0; j < runs[r].count; ++j) probs[r * K2 + j] = sc[r * rstride + off + j] * inv;
  }
}

// A general block (up to kBlock queries sharing key loads, keys as lanes): logits, then each query's softmax and P·V.
template <typename T, int L>
inline void forward_block(const Problem<T>& p, int64_t b, int64_t h, const Block& blk, const T* kth, Run* runs,
                          int64_t chunks, T* score, int64_t width, T* out, T* lse, T* probs) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, DV = g.DV, KK = g.probs_per_query();
  const int64_t nrun = window_runs(g, blk.token[0], runs);
  logits_for_block<T, L>(blk, head_base(p.q, p.lq, b, h), p.lq.token, kth, g.row_width(), g.D, g, runs, nrun, chunks,
                         p.scale, score, width);
  for (int64_t i = 0; i < blk.n; ++i) {
    const int64_t t = blk.token[i], qoff = (b * N + t) * H + h;
    window_runs(g, t, runs);
    forward_query<T, L>(p, b, h, t, runs, nrun, chunks * L, runs[0].col - blk.base, score + i * width,
                        out + qoff * DV, lse + qoff, probs ? probs + ((b * H + h) * N + t) * KK : nullptr);
  }
}

template <typename T, int L>
void forward(const Problem<T>& p, T* out, T* lse, T* probs, int64_t nthreads) {
  const Geometry& g = p.g;
  const int64_t H = g.H, D = g.D, NA = g.NA, S2 = g.ax[2].extent, dil2 = g.ax[2].dil;
  const int64_t slice = g.rows() * D * g.row_width() + 2 * L;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t width = max_runs * chunks * L + NA;
  Scratch<T>& mem = scratch<T>();
  mem.workers(nthreads);
  const T* kt = transpose_heads(p.k, p.lk, g, D, slice, nthreads, mem.kt);
  // Lane blocks where the geometry allows (no key bias, no additional keys), general blocks for the other queries.
  const LaneBlocks lanes = !p.kb && NA == 0 ? lane_blocks(g, L) : LaneBlocks{{}, std::vector<char>(S2, 0)};
  const int64_t nl = static_cast<int64_t>(lanes.x0.size());
  // Work item = (batch, window row, part of the row); parts keep both threads busy on 1-D inputs.
  const int64_t parts = std::max<int64_t>(1, (4 * nthreads + g.B * g.rows() - 1) / (g.B * g.rows()));
  parallel_for(g.B * g.rows() * parts, nthreads, [&](int64_t lo, int64_t hi, int64_t worker) {
    Run* runs = reinterpret_cast<Run*>(sized(mem.runs[worker], max_runs * int64_t(sizeof(Run) / sizeof(int64_t))));
    T* score = sized(mem.a[worker], kBlock * width);
    T* qt = sized(mem.b[worker], D * L);
    T* lane_scores = sized(mem.c[worker], max_runs * (g.max_count(2) + 8) * L);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / (g.rows() * parts), row = (item / parts) % g.rows(), part = item % parts;
      const std::vector<Block> blocks = make_blocks(g, row, L, chunks, &lanes.taken);
      const int64_t nb = static_cast<int64_t>(blocks.size());
      for (int64_t h = 0; h < H; ++h) {
        const T* kth = kt + (b * H + h) * slice;
        for (int64_t li = part * nl / parts; li < (part + 1) * nl / parts; ++li) {
          const int64_t x0 = lanes.x0[li];
          if (forward_lane_block<T, L>(p, b, h, row, x0, kth, runs, qt, lane_scores, out, lse, probs)) continue;
          std::vector<char> others(S2, 1);  // declined (an empty or NaN-led softmax): its queries as general blocks
          for (int64_t i = 0; i < L; ++i) others[x0 + dil2 * i] = 0;
          for (const Block& blk : make_blocks(g, row, L, chunks, &others))
            forward_block<T, L>(p, b, h, blk, kth, runs, chunks, score, width, out, lse, probs);
        }
        for (int64_t bi = part * nb / parts; bi < (part + 1) * nb / parts; ++bi)
          forward_block<T, L>(p, b, h, blocks[bi], kth, runs, chunks, score, width, out, lse, probs);
      }
    }
  });
}

// ---- Backward ---------------------------------------------------------------------------------------------------
//
// Work item = (batch, head): every write to dk/dv/daddk/daddv/dkb of that slice stays in one thread. drpb is
// [B, H, R] so that batches never share a slot either; the caller sums over B. Per block of queries:
//   1. block_probabilities: P in the lane layout (read from the saved probabilities, or logits + biases + exp(s - lse))
//   2. block_score_grads:   dP = dO·Vᵀ (logits against transposed V), dS = P ∘ (dP − delta)
//   3. query_grads:         dQ = scale · dS·K, bias gradients, additional keys and values
//   4. store_block_weights: P (when not saved) and dS of every query, compact (see Geometry::kernel2)
// and then, per key, over the queries whose window holds it (the inverse windows, so no two keys share a write):
//   5. key_grads:           dK = scale · dSᵀ·Q, dV = Pᵀ·dO

template <typename T>
struct Grads {
  const T *out, *lse, *dout, *dlse, *probs;
  T *dq, *dk, *dv, *daddk, *daddv, *drpb, *dkb;
};

// Per-worker buffers of the backward: lane-layout P and dS of a block; compact P (when not saved) and dS of one
// (batch, head); the (query, weight index) pairs of one key.
template <typename T>
struct BackwardScratch {
  Run* runs;
  T *prob, *dprob, *pc, *dsc;
  int64_t *rows, *wi;
  int64_t width;
};

// The queries whose window holds key coordinate c along one axis: pairs (query[i], pos[i]) for
// i in [first[c], first[c + 1]), pos = the key's index in that query's window along the axis.
struct InverseAxis {
  std::vector<int64_t> first, query, pos;
  explicit InverseAxis(const Axis& a) : first(a.extent + 1, 0) {
    for (int64_t x = 0; x < a.extent; ++x)
      for (int64_t j = 0; j < a.count[x]; ++j) ++first[a.start[x] + a.dil * j + 1];
    for (int64_t c = 0; c < a.extent; ++c) first[c + 1] += first[c];
    query.resize(first[a.extent]);
    pos.resize(first[a.extent]);
    std::vector<int64_t> fill(first.begin(), first.end() - 1);
    for (int64_t x = 0; x < a.extent; ++x)
      for (int64_t j = 0; j < a.count[x]; ++j) {
        const int64_t i = fill[a.start[x] + a.dil * j]++;
        query[i] = x;
        pos[i] = j;
      }
  }
  int64_t max_queries() const {
    int64_t n = 0;
    for (size_t c = 0; c + 1 < first.size(); ++c) n = std::max(n, first[c + 1] - first[c]);
    return n;
  }
};

template <typename T, int L>
inline void block_probabilities(const Problem<T>& p, const Grads<T>& gr, const T* ktb, int64_t b, int64_t h,
                                const Block& blk, int64_t nrun, int64_t chunks, BackwardScratch<T>& s) {
  using V = typename Simd<T, L>::vec;
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, rstride = chunks * L, used = nrun * rstride;
  if (gr.probs) {
    const int64_t KK = g.probs_per_query(), K2 = g.kernel2();
    for (int64_t i = 0; i < blk.n; ++i) {
      window_runs(g, blk.token[i], s.runs);
      const int64_t off = s.runs[0].col - blk.base;
      const T* saved = gr.probs + ((b * H + h) * N + blk.token[i]) * KK;
      T* pr = s.prob + i * s.width;
      std::fill(pr, pr + used, T(0));
      for (int64_t r = 0; r < nrun; ++r)
        std::copy(saved + r * K2, saved + r * K2 + s.runs[r].count, pr + r * rstride + off);
    }
    return;
  }
  window_runs(g, blk.token[0], s.runs);
  logits_for_block<T, L>(blk, head_base(p.q, p.lq, b, h), p.lq.token, ktb, g.row_width(), g.D, g, s.runs, nrun,
                         chunks, p.scale, s.prob, s.width);
  for (int64_t i = 0; i < blk.n; ++i) {
    const int64_t t = blk.token[i];
    const T li = gr.lse[(b * N + t) * H + h];
    T* pr = s.prob + i * s.width;
    if (li == -INFINITY) {  // empty softmax: no weights
      std::fill(pr, pr + used, T(0));
      continue;
    }
    window_runs(g, t, s.runs);
    add_biases(p, b, h, s.runs, nrun, rstride, s.runs[0].col - blk.base, pr);
    for (int64_t j = 0; j < used; j += L) {  // masked lanes have s = -inf, so p = 0
      V sv;
      std::memcpy(&sv, pr + j, sizeof(V));
      sv = vexp<L>(sv - li);
      std::memcpy(pr + j, &sv, sizeof(V));
    }
  }
}

// delta_i = <dO_i, O_i> - dlse_i (the softmax Jacobian's row term).
template <typename T>
inline T softmax_delta(const Problem<T>& p, const Grads<T>& gr, int64_t qoff) {
  const T delta = dot(gr.dout + qoff * p.g.DV, gr.out + qoff * p.g.DV, p.g.DV);
  return gr.dlse ? delta - gr.dlse[qoff] : delta;
}

template <typename T, int L>
inline void block_score_grads(const Problem<T>& p, const Grads<T>& gr, const T* vtb, int64_t b, int64_t h,
                              const Block& blk, int64_t nrun, int64_t chunks, BackwardScratch<T>& s) {
  using V = typename Simd<T, L>::vec;
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, DV = g.DV, used = nrun * chunks * L;
  window_runs(g, blk.token[0], s.runs);
  logits_for_block<T, L>(blk, gr.dout + (b * N * H + h) * DV, H * DV, vtb, g.row_width(), DV, g, s.runs, nrun, chunks,
                         T(1), s.dprob, s.width, /*mask=*/false);
  for (int64_t i = 0; i < blk.n; ++i) {
    const int64_t qoff = (b * N + blk.token[i]) * H + h;
    T* dsr = s.dprob + i * s.width;
    if (gr.lse[qoff] == -INFINITY) {  // empty softmax: no gradient
      std::fill(dsr, dsr + used, T(0));
      continue;
    }
    const T delta = softmax_delta(p, gr, qoff);
    const T* pr = s.prob + i * s.width;
    for (int64_t j = 0; j < used; j += L) {
      V pv, dpv;
      std::memcpy(&pv, pr + j, sizeof(V));
      std::memcpy(&dpv, dsr + j, sizeof(V));
      dpv = pv * (dpv - delta);
      std::memcpy(dsr + j, &dpv, sizeof(V));
    }
  }
}

// dS and P of query t's additional keys (recomputed: they are few), accumulated into dq_i, daddk, daddv.
template <typename T>
inline void additional_key_grads(const Problem<T>& p, const Grads<T>& gr, int64_t b, int64_t h, int64_t t, T* dqi) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV;
  const int64_t qoff = (b * N + t) * H + h;
  const T* qi = head_base(p.q, p.lq, b, h) + t * p.lq.token;
  const T* doi = gr.dout + qoff * DV;
  const T li = gr.lse[qoff], delta = softmax_delta(p, gr, qoff);
  for (int64_t j = 0; j < g.NA; ++j) {
    const int64_t aoff = (b * g.NA + j) * H + h;
    const T* kj = p.addk + aoff * D;
    const T* vj = p.addv + aoff * DV;
    const T pj = std::exp(p.scale * dot(qi, kj, D) - li);
    const T sds = p.scale * pj * (dot(doi, vj, DV) - delta);
    T* dkj = gr.daddk + aoff * D;
    for (int64_t d = 0; d < D; ++d) {
      dqi[d] += sds * kj[d];
      dkj[d] += sds * qi[d];
    }
    T* dvj = gr.daddv + aoff * DV;
    for (int64_t c = 0; c < DV; ++c) dvj[c] += pj * doi[c];
  }
}

template <typename T, int L>
inline void query_grads(const Problem<T>& p, const Grads<T>& gr, int64_t b, int64_t h, const Block& blk,
                        int64_t nrun, int64_t chunks, BackwardScratch<T>& s) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, rstride = chunks * L, dil2 = g.ax[2].dil;
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  for (int64_t i = 0; i < blk.n; ++i) {
    const int64_t t = blk.token[i], qoff = (b * N + t) * H + h;
    T* dqi = gr.dq + qoff * D;
    if (gr.lse[qoff] == -INFINITY) {
      std::fill(dqi, dqi + D, T(0));
      continue;
    }
    window_runs(g, t, s.runs);
    const T* dsr = s.dprob + i * s.width + s.runs[0].col - blk.base;
    // dq_i = scale * sum_j ds_j k_j: the P·V kernel with dS as weights and K rows as values.
    accumulate_values_any<T, L>(head_base(p.k, p.lk, b, h), dsr, s.runs, nrun, chunks, dil2, p.lk.token, D, dqi);
    for (int64_t d = 0; d < D; ++d) dqi[d] *= p.scale;
    if (gr.drpb || gr.dkb) {
      for (int64_t r = 0; r < nrun; ++r)
        for (int64_t j = 0; j < s.runs[r].count; ++j) {
          if (gr.drpb) gr.drpb[(b * H + h) * R + s.runs[r].bias + j] += dsr[r * rstride + j];
          if (gr.dkb) gr.dkb[(b * N + s.runs[r].token + dil2 * j) * H + h] += dsr[r * rstride + j];
        }
    }
    if (g.NA) additional_key_grads(p, gr, b, h, t, dqi);
  }
}

template <typename T, int L>
inline void store_block_weights(const Problem<T>& p, const Grads<T>& gr, const Block& blk, int64_t nrun,
                                int64_t chunks, BackwardScratch<T>& s) {
  const Geometry& g = p.g;
  const int64_t KK = g.probs_per_query(), K2 = g.kernel2(), rstride = chunks * L;
  for (int64_t i = 0; i < blk.n; ++i) {
    window_runs(g, blk.token[i], s.runs);
    const int64_t off = s.runs[0].col - blk.base, t = blk.token[i];
    for (int64_t r = 0; r < nrun; ++r) {
      const T* src = s.dprob + i * s.width + r * rstride + off;
      std::copy(src, src + s.runs[r].count, s.dsc + t * KK + r * K2);
      if (!gr.probs) {
        const T* pr = s.prob + i * s.width + r * rstride + off;
        std::copy(pr, pr + s.runs[r].count, s.pc + t * KK + r * K2);
      }
    }
  }
}

// dV = sum_i P_i dO_i and dK = scale * sum_i dS_i Q_i over one key's m queries: query rows t[i] (from row bases and
// the last axis' inverse list), weights at t * KK + w[i] + pos2; NV vectors of W lanes per row (D = DV = NV * W).
template <typename T, int W, int NV>
inline void gather_key_grads(const T* __restrict qh, int64_t qstride, const T* __restrict doh, int64_t dstride,
                             const T* __restrict pc, const T* __restrict dsc, int64_t KK, const int64_t* rows,
                             const int64_t* runs, int64_t nrows, const int64_t* q2, const int64_t* pos2, int64_t n2,
                             T scale, T* __restrict dk, T* __restrict dv) {
  using V = typename Simd<T, W>::vec;
  V ak[NV] = {}, av[NV] = {};
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t i = 0; i < n2; ++i) {
      const int64_t t = rows[r] + q2[i], w = t * KK + runs[r] + pos2[i];
      const T pw = pc[w], dw = dsc[w];
      const T *qr = qh + t * qstride, *dr = doh + t * dstride;
      for (int u = 0; u < NV; ++u) {
        V x, y;
        std::memcpy(&x, qr + u * W, sizeof(V));
        std::memcpy(&y, dr + u * W, sizeof(V));
        ak[u] += dw * x;
        av[u] += pw * y;
      }
    }
  for (int u = 0; u < NV; ++u) {
    const V k = ak[u] * scale;
    std::memcpy(dk + u * W, &k, sizeof(V));
    std::memcpy(dv + u * W, &av[u], sizeof(V));
  }
}

// dK and dV of every key of one (batch, head), each gathered from the queries whose window holds it.
template <typename T>
void key_grads(const Problem<T>& p, const Grads<T>& gr, int64_t b, int64_t h, const InverseAxis* inv,
               BackwardScratch<T>& s) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, S1 = g.ax[1].extent, S2 = g.ax[2].extent;
  const int64_t KK = g.probs_per_query(), K2 = g.kernel2();
  constexpr int W = 64 / sizeof(T);
  const T* pc = gr.probs ? gr.probs + (b * H + h) * N * KK : s.pc;
  const T* qh = head_base(p.q, p.lq, b, h);
  const T* doh = gr.dout + (b * N * H + h) * DV;
  for (int64_t c0 = 0; c0 < g.ax[0].extent; ++c0)
    for (int64_t c1 = 0; c1 < S1; ++c1) {
      // Window rows holding key row (c0, c1): first query token of the row and the run's weight offset.
      int64_t nrows = 0;
      for (int64_t i0 = inv[0].first[c0]; i0 < inv[0].first[c0 + 1]; ++i0)
        for (int64_t i1 = inv[1].first[c1]; i1 < inv[1].first[c1 + 1]; ++i1) {
          const int64_t x1 = inv[1].query[i1];
          s.rows[nrows] = (inv[0].query[i0] * S1 + x1) * S2;
          s.wi[nrows++] = (inv[0].pos[i0] * g.ax[1].count[x1] + inv[1].pos[i1]) * K2;  // as window_runs numbers runs
        }
      for (int64_t c2 = 0; c2 < S2; ++c2) {
        const int64_t f = inv[2].first[c2], n2 = inv[2].first[c2 + 1] - f;
        const int64_t *q2 = inv[2].query.data() + f, *pos2 = inv[2].pos.data() + f;
        const int64_t key = (b * N + (c0 * S1 + c1) * S2 + c2) * H + h;
        T *dk = gr.dk + key * D, *dv = gr.dv + key * DV;
        const auto fast = [&](auto lanes, auto nv) {
          gather_key_grads<T, decltype(lanes)::value, decltype(nv)::value>(
              qh, p.lq.token, doh, H * DV, pc, s.dsc, KK, s.rows, s.wi, nrows, q2, pos2, n2, p.scale, dk, dv);
        };
        using W1 = std::integral_constant<int, W>;
        if (D == DV && D == W / 2) fast(std::integral_constant<int, W / 2>{}, std::integral_constant<int, 1>{});
        else if (D == DV && D == W) fast(W1{}, std::integral_constant<int, 1>{});
        else if (D == DV && D == 2 * W) fast(W1{}, std::integral_constant<int, 2>{});
        else if (D == DV && D == 4 * W) fast(W1{}, std::integral_constant<int, 4>{});
        else if (D == DV && D == 8 * W) fast(W1{}, std::integral_constant<int, 8>{});
        else {
          std::fill(dk, dk + D, T(0));
          std::fill(dv, dv + DV, T(0));
          for (int64_t r = 0; r < nrows; ++r)
            for (int64_t i = 0; i < n2; ++i) {
              const int64_t t = s.rows[r] + q2[i], w = t * KK + s.wi[r] + pos2[i];
              const T *qr = qh + t * p.lq.token, *dr = doh + t * H * DV;
              for (int64_t d = 0; d < D; ++d) dk[d] += s.dsc[w] * qr[d];
              for (int64_t c = 0; c < DV; ++c) dv[c] += pc[w] * dr[c];
            }
          for (int64_t d = 0; d < D; ++d) dk[d] *= p.scale;
        }
      }
    }
}

template <typename T, int L>
void backward(const Problem<T>& p, const Grads<T>& gr, int64_t nthreads) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV;
  const int64_t kslice = g.rows() * D * g.row_width() + 2 * L, vslice = g.rows() * DV * g.row_width() + 2 * L;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t KK = g.probs_per_query();
  const InverseAxis inv[3] = {InverseAxis(g.ax[0]), InverseAxis(g.ax[1]), InverseAxis(g.ax[2])};
  const int64_t max_pairs = inv[0].max_queries() * inv[1].max_queries();  // window rows holding one key row
  Scratch<T>& mem = scratch<T>();
  mem.workers(nthreads);
  const T* kt = gr.probs ? nullptr : transpose_heads(p.k, p.lk, g, D, kslice, nthreads, mem.kt);
  const T* vt = transpose_heads(p.v, p.lv, g, DV, vslice, nthreads, mem.vt);
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi, int64_t worker) {
    BackwardScratch<T> s;
    s.width = max_runs * chunks * L;
    s.runs = reinterpret_cast<Run*>(sized(mem.runs[worker], max_runs * int64_t(sizeof(Run) / sizeof(int64_t))));
    s.prob = sized(mem.a[worker], kBlock * s.width);
    s.dprob = sized(mem.b[worker], kBlock * s.width);
    s.pc = gr.probs ? nullptr : sized(mem.c[worker], N * KK);
    s.dsc = sized(mem.d[worker], N * KK);
    s.rows = sized(mem.pairs[worker], 2 * max_pairs);
    s.wi = s.rows + max_pairs;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t row = 0; row < g.rows(); ++row) {
        for (const Block& blk : make_blocks(g, row, L, chunks)) {
          const int64_t nrun = window_runs(g, blk.token[0], s.runs);
          block_probabilities<T, L>(p, gr, kt ? kt + bh * kslice : nullptr, b, h, blk, nrun, chunks, s);
          block_score_grads<T, L>(p, gr, vt + bh * vslice, b, h, blk, nrun, chunks, s);
          query_grads<T, L>(p, gr, b, h, blk, nrun, chunks, s);
          store_block_weights<T, L>(p, gr, blk, nrun, chunks, s);
        }
      }
      key_grads(p, gr, b, h, inv, s);
    }
  });
}

// ---- C ABI --------------------------------------------------------------------------------------------------------

// strides: batch, token and head strides of q, k and v (9 values, in elements).
template <typename T>
Problem<T> make_problem(const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb,
                        const int64_t* shape, const int64_t* dil, const int64_t* rel_size,
                        const int64_t* const* tables, const int64_t* strides, int64_t B, int64_t H, int64_t D,
                        int64_t DV, int64_t NA, double scale) {
  Problem<T> p{q, k, v, addk, addv, rpb, kb, Layout{strides[0], strides[1], strides[2]},
               Layout{strides[3], strides[4], strides[5]}, Layout{strides[6], strides[7], strides[8]}, Geometry{},
               T(scale)};
  for (int a = 0; a < 3; ++a) {
    p.g.ax[a] = Axis{tables[3 * a], tables[3 * a + 1], tables[3 * a + 2], shape[a], dil[a], rel_size[a]};
  }
  p.g.B = B;
  p.g.H = H;
  p.g.D = D;
  p.g.DV = DV;
  p.g.NA = NA;
  return p;
}

}  // namespace

#define ATTNZOO_DEFINE(T, SUFFIX)                                                                                    \
  extern "C" void attnzoo_na_forward_##SUFFIX(                                                                       \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, T* out, T* lse,   \
      T* probs, const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables,     \
      const int64_t* strides, int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA, double scale,                 \
      int64_t nthreads) {                                                                                            \
    forward<T, 64 / sizeof(T)>(                                                                                      \
        make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, strides, B, H, D, DV, NA, scale), \
        out, lse, probs, nthreads);                                                                                  \
  }                                                                                                                  \
  extern "C" void attnzoo_na_backward_##SUFFIX(                                                                      \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, const T* out,     \
      const T* lse, const T* probs, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* daddk, T* daddv, T* drpb,  \
      T* dkb, const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables,       \
      const int64_t* strides, int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA, double scale,                 \
      int64_t nthreads) {                                                                                            \
    backward<T, 64 / sizeof(T)>(                                                                                     \
        make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, strides, B, H, D, DV, NA, scale), \
        Grads<T>{out, lse, dout, dlse, probs, dq, dk, dv, daddk, daddv, drpb, dkb}, nthreads);                       \
  }

ATTNZOO_DEFINE(float, f32)
ATTNZOO_DEFINE(double, f64)
