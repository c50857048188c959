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
// Speed: K and V rows are transposed per head to [D][columns] (in-register L × L block transposes), with the last axis
// reordered by dilation group so that every window row -- start + dil*j, j < count -- is a contiguous run of columns;
// each worker keeps them in a small ring of row slots, made when a tile first needs them and reused by the next tiles
// of its band while still in its cache (see RowRing). Lane tiles (forward and backward): L neighbouring queries of a
// dilation group are the SIMD lanes and up to 3 query rows form a tile; the logit of each lane's j-th key in a window
// row is one FMA per head dimension against the transposed keys at column start + j (an unaligned load, or a two-source
// shuffle where border windows are clamped), every key and value vector loaded once for all the tile's rows whose
// windows hold that window row; the softmax needs no horizontal reductions and P·V runs against the transposed values.
// Whole rows are covered (a last block overlapping its predecessor skips the lanes already written). Elsewhere
// ("general blocks", e.g. rows narrower than L, key biases, additional keys): the keys of a window row are the lanes
// and up to 8 neighbouring queries share every key-vector load; P·V accumulates value rows (head_dim as lanes). The
// backward recomputes P (or reads the saved probabilities), computes dP = dO·Vᵀ, dS and dQ in the same tiles, then dK
// and dV per key over the queries whose window holds it (the inverse windows, per axis; key tiles of neighbouring key
// rows share the rows of Q and dO they read), so every gradient row is written once, without atomics.
//
// Training: the forward can also write the softmax probabilities of every query's window keys (`probs`,
// [B, H, N, K01 * K2], K01 = kernel extent of the two leading axes, K2 = of the last); the backward then reads them
// instead of recomputing the logits and their exponentials (the caller decides when: see saves_probabilities).
//
// Plain C ABI (no torch headers) so that the system compiler builds it without PyTorch (about fifteen seconds,
// once); threads are PyTorch's own OpenMP team where torch runs on libgomp, else std::thread (see parallel_for).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Full unrolling of the register-tile loops (so that arrays of vectors stay in registers).
#if defined(__clang__)
#define ATTNZOO_UNROLL _Pragma("unroll")
#else
#define ATTNZOO_UNROLL _Pragma("GCC unroll 16")
#endif

namespace {

// ---- SIMD helpers ------------------------------------------------------------------------------------------

// L lanes of T (the kernels use 64-byte vectors).
template <typename T, int L>
struct Simd {
  static constexpr int lanes = L;
  typedef T vec __attribute__((vector_size(L * sizeof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> index __attribute__((vector_size(L * sizeof(T))));
};

// Unaligned vector load and store (by value, so that arrays of vectors stay in registers).
template <typename V, typename T>
inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

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
  // Transposed K and V rows live in per-worker rings of `slots` rows (enough for every tile's window rows).
  int64_t slots;
  int64_t slot(int64_t row) const { return row % slots; }
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
// Built with -fopenmp (where PyTorch runs on libgomp, see _native_lib.torch_uses_libgomp) the threads are the
// OpenMP team of torch's own runtime -- the threads still spinning after torch's last parallel op, not competitors
// for the cores; otherwise std::thread workers.
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
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
  worker(omp_get_thread_num());
#else
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nthreads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
#endif
}

// Scratch memory reused across calls from the same calling thread: fresh multi-megabyte allocations would be
// mmap'ed and page-faulted in on every call, which costs as much as the attention itself at these sizes.
template <typename T>
struct Scratch {
  std::vector<T> delta;
  std::vector<std::vector<T>> a, b, c, d;  // per worker
  std::vector<std::vector<T>> kr, vr;  // per worker: transposed K and V rows (see RowRing)
  std::vector<std::vector<int64_t>> ktag, vtag;
  std::vector<std::vector<T>> tq, ts, to, tdo, tds;  // per worker: lane tile buffers (see TileScratch)
  std::vector<std::vector<int64_t>> runs, pairs, tile_rows;  // per worker: Run records; window rows holding a key row
  void workers(int64_t n) {
    for (auto* v : {&a, &b, &c, &d, &tq, &ts, &to, &tdo, &tds, &kr, &vr}) v->resize(std::max<size_t>(v->size(), n));
    for (auto* v : {&runs, &pairs, &tile_rows, &ktag, &vtag}) v->resize(std::max<size_t>(v->size(), n));
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

// In-register transpose of an L × L block (x[r][i] -> x[i][r]): log2(L) levels, each swapping the off-diagonal
// S × S blocks of every 2S × 2S block with two-source shuffles (GCC's __builtin_shuffle; other compilers take the
// scalar paths of transpose_row and gather_lanes / scatter_lanes).
#if defined(__GNUC__) && !defined(__clang__)
#define ATTNZOO_SHUFFLE_TRANSPOSE 1
template <typename T, int L, int S>
inline void transpose_level(typename Simd<T, L>::vec* x) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I IV __attribute__((vector_size(L * sizeof(T))));
  IV lo = {}, hi = {};
  for (int i = 0; i < L; ++i) {
    lo[i] = (i & S) ? L + i - S : i;  // row r keeps its blocks with bit S clear, takes row r+S's from the left
    hi[i] = (i & S) ? L + i : i + S;  // row r+S takes row r's blocks with bit S set, keeps its own
  }
  ATTNZOO_UNROLL
  for (int r = 0; r < L; ++r)
    if (!(r & S)) {
      const auto a = x[r], b = x[r + S];
      x[r] = __builtin_shuffle(a, b, lo);
      x[r + S] = __builtin_shuffle(a, b, hi);
    }
}

template <typename T, int L>
inline void transpose_block(typename Simd<T, L>::vec* x) {
  if constexpr (L >= 2) transpose_level<T, L, 1>(x);
  if constexpr (L >= 4) transpose_level<T, L, 2>(x);
  if constexpr (L >= 8) transpose_level<T, L, 4>(x);
  if constexpr (L >= 16) transpose_level<T, L, 8>(x);
}
#endif

// Two-source lane selection: lane i of the result is lane idx[i] of the concatenation (a, b), 0 <= idx[i] < 2L.
template <typename V, typename IV>
inline V shuffle2(const V& a, const V& b, const IV& idx) {
#ifdef ATTNZOO_SHUFFLE_TRANSPOSE
  return __builtin_shuffle(a, b, idx);
#else
  constexpr int L = sizeof(V) / sizeof(a[0]);
  V r;
  for (int i = 0; i < L; ++i) r[i] = idx[i] < L ? a[idx[i]] : b[idx[i] - L];
  return r;
#endif
}

// Transposed rows of K or V for one worker: a direct-mapped ring of g.slots rows, row `row` of head slice bh in
// slot g.slot(row), each [C][row_width] (+ zero padding after the last slot, read by vector loads). Rows are
// transposed when a tile first needs them, so they are written and read again while they sit in the worker's cache.
template <typename T>
struct RowRing {
  T* data;
  int64_t* tag;  // bh * rows + row held by each slot, or -1
  int64_t C;
};

template <typename T, int L>
RowRing<T> row_ring(std::vector<T>& data, std::vector<int64_t>& tags, const Geometry& g, int64_t C) {
  const int64_t size = g.slots * C * g.row_width();
  T* d = sized(data, size + 2 * L);
  std::fill(d + size, d + size + 2 * L, T(0));
  int64_t* t = sized(tags, g.slots);
  std::fill(t, t + g.slots, int64_t(-1));
  return RowRing<T>{d, t, C};
}

// Row `row` of x [B, N, H, C] (strided as `lx`), head h of batch b -> out [C][row_width], columns reordered by
// dilation group (cols[x] = reordered column of last-axis coordinate x); L × L blocks transposed in registers.
template <typename T, int L>
void transpose_row(const T* x, const Layout& lx, const Geometry& g, int64_t C, int64_t b, int64_t h, int64_t row,
                   const int64_t* cols, T* __restrict out) {
  using V = typename Simd<T, L>::vec;
  const int64_t S2 = g.ax[2].extent, RW = g.row_width();
  if (RW != S2) std::fill(out, out + C * RW, T(0));  // columns no token maps to (extent not a multiple of dil)
  const T* src0 = head_base(x, lx, b, h) + row * S2 * lx.token;
  for (int64_t x0 = 0; x0 < S2; x0 += L) {
    const int64_t n = std::min<int64_t>(L, S2 - x0);
    const T* src = src0 + x0 * lx.token;
    int64_t c0 = 0;
#ifdef ATTNZOO_SHUFFLE_TRANSPOSE
    if (n == L && g.ax[2].dil == 1)  // a tile of consecutive columns: L × L blocks
      for (; c0 + L <= C; c0 += L) {
        V block[L];
        ATTNZOO_UNROLL
        for (int i = 0; i < L; ++i) block[i] = vload<V>(src + i * lx.token + c0);
        transpose_block<T, L>(block);
        ATTNZOO_UNROLL
        for (int c = 0; c < L; ++c) vstore(out + (c0 + c) * RW + cols[x0], block[c]);
      }
#endif
    for (int64_t c = c0; c < C; ++c)
      for (int64_t i = 0; i < n; ++i) out[c * RW + cols[x0 + i]] = src[i * lx.token + c];
  }
}

// Slots for the rings: the widest span of window rows of any tile of kTileRows query rows (all of them when smaller).
inline int64_t ring_slots(const Geometry& g, int64_t tile_rows) {
  const Axis &A0 = g.ax[0], &A1 = g.ax[1];
  int64_t span = 1;
  for (int64_t row0 = 0; row0 < g.rows(); row0 += tile_rows) {
    int64_t lo = INT64_MAX, hi = -1;
    for (int64_t qr = row0; qr < std::min(g.rows(), row0 + tile_rows); ++qr) {
      const int64_t z = qr / A1.extent, y = qr % A1.extent;
      if (A0.count[z] == 0 || A1.count[y] == 0) continue;
      lo = std::min(lo, A0.start[z] * A1.extent + A1.start[y]);
      const int64_t last_z = A0.start[z] + A0.dil * (A0.count[z] - 1);
      const int64_t last_y = A1.start[y] + A1.dil * (A1.count[y] - 1);
      hi = std::max(hi, last_z * A1.extent + last_y);
    }
    if (hi >= lo) span = std::max(span, hi - lo + 1);
  }
  return std::min(span, g.rows());
}

// ---- Windows and query blocks --------------------------------------------------------------------------------

// The window of query token t, as runs of contiguous transposed columns.
struct Run {
  int64_t row;    // window row (flattened leading axes)
  int64_t slot;   // its slot in the transposed-row rings (Geometry::slot)
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
      runs[n].slot = g.slot(row);
      runs[n].col = g.xcol(A2.start[x]);
      runs[n].token = row * A2.extent + A2.start[x];
      runs[n].bias = (rz * A1.rel_size + ry) * A2.rel_size + A2.rel[x];
      runs[n].count = A2.count[x];
      ++n;
    }
  }
  return n;
}

// Every window row of query rows row0 .. row0+n-1 (head h of batch b) present in `ring` (runs: scratch for
// window_runs, which names the rows and their slots).
template <typename T, int L>
void need_rows(RowRing<T>& ring, const T* x, const Layout& lx, const Geometry& g, const int64_t* cols, int64_t b,
               int64_t h, int64_t row0, int64_t n, Run* runs) {
  const int64_t key0 = (b * g.H + h) * g.rows(), width = ring.C * g.row_width();
  for (int64_t qr = row0; qr < row0 + n; ++qr) {
    const int64_t nrun = window_runs(g, qr * g.ax[2].extent, runs);
    for (int64_t r = 0; r < nrun; ++r) {
      if (ring.tag[runs[r].slot] == key0 + runs[r].row) continue;
      transpose_row<T, L>(x, lx, g, ring.C, b, h, runs[r].row, cols, ring.data + runs[r].slot * width);
      ring.tag[runs[r].slot] = key0 + runs[r].row;
    }
  }
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

// Lane blocks: L queries of one dilation group, x0 + dil*i for i < L, with equal window counts along the last axis,
// computed with the queries as SIMD lanes. Lane i's window starts offset[i] reordered columns after lane 0's:
// offset[i] = i away from the borders, where the j-th keys of all lanes are one unaligned vector load at column
// start(x0) + j; near the borders (clamped windows) each lane's key is picked out of two vectors by a two-source
// shuffle. Every dilation group of at least L queries is covered by blocks; a group whose length is not a multiple
// of L ends with a block that overlaps its predecessor, whose first `skip` lanes are computed but not written.
constexpr int kMaxLanes = 16;

struct LaneBlock {
  int64_t x0;
  int64_t skip;
  bool shuffled;              // offsets other than 0, 1, 2, ...
  bool rel_varies;            // lanes' relative positions differ (their bias is read lane by lane)
  int64_t offset[kMaxLanes];  // start column of lane i's window minus lane 0's
  int64_t rel[kMaxLanes];     // relative position of lane i's first key minus lane 0's
};

struct LaneBlocks {
  std::vector<LaneBlock> blocks;
  std::vector<char> taken;  // per last-axis coordinate: part of a lane block
};

inline LaneBlocks lane_blocks(const Geometry& g, int64_t L) {
  const Axis& A = g.ax[2];
  LaneBlocks lb{{}, std::vector<char>(A.extent, 0)};
  for (int64_t r = 0; r < A.dil && r < A.extent; ++r) {
    const int64_t n = (A.extent - r + A.dil - 1) / A.dil;  // queries of this dilation group
    if (n < L) continue;
    for (int64_t k = 0; k < n; k += L) {
      const int64_t x0 = r + A.dil * std::min(k, n - L);
      const int64_t c0 = g.xcol(A.start[x0]), count = A.count[x0];
      LaneBlock blk{x0, 0, false, false, {}, {}};
      bool ok = true;
      for (int64_t i = 0; i < L; ++i) {
        const int64_t xi = x0 + A.dil * i;
        blk.offset[i] = g.xcol(A.start[xi]) - c0;
        blk.rel[i] = A.rel[xi] - A.rel[x0];
        ok = ok && A.count[xi] == count && blk.offset[i] >= 0;
        blk.shuffled = blk.shuffled || blk.offset[i] != i;
        blk.rel_varies = blk.rel_varies || blk.rel[i] != 0;
      }
      if (blk.shuffled)  // every lane's keys within the two vectors at columns c0 .. c0 + 2L - 1
        for (int64_t i = 0; i < L; ++i) ok = ok && blk.offset[i] + count <= 2 * L;
      if (!ok) continue;
      while (blk.skip < L && lb.taken[x0 + A.dil * blk.skip]) ++blk.skip;
      for (int64_t i = 0; i < L; ++i) lb.taken[x0 + A.dil * i] = 1;
      lb.blocks.push_back(blk);
    }
  }
  return lb;
}

// The queries of a lane tile that declined (an empty or NaN-led softmax: query rows row0 .. row0+n-1, the lanes of
// `lb` it writes), as general blocks.
inline std::vector<Block> declined_blocks(const Geometry& g, const LaneBlock& lb, int64_t row0, int64_t n, int64_t L,
                                          int64_t chunks) {
  std::vector<char> others(g.ax[2].extent, 1);
  for (int64_t i = lb.skip; i < L; ++i) others[lb.x0 + g.ax[2].dil * i] = 0;
  std::vector<Block> blocks;
  for (int64_t i = 0; i < n; ++i)
    for (const Block& blk : make_blocks(g, row0 + i, L, chunks, &others)) blocks.push_back(blk);
  return blocks;
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
      const T* b0 = kt + runs[r].slot * D * RW + base + c * L;
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
//
// Lane tiles: up to kTileRows query rows (flattened leading axes) times one lane block (L queries along the last
// axis). Neighbouring query rows' windows share window rows, so every key (and value) vector read from a window row
// of the tile's union feeds the logits (and outputs) of all its users at once, from registers. With the queries as
// lanes and K, V transposed, no lane is wasted: the j-th key of a lane's window row is at column start + j.

constexpr int kTileRows = 3;  // 3 rows × 8 keys of accumulators + 3 query vectors fit the 32 vector registers

// A window row of a tile's union: its index, its users (bit i: query row i of the tile) and, per user, the
// position of this row among that query's window runs.
struct TileRow {
  int64_t row, slot;
  int mask;
  int64_t run[kTileRows];
};

// Logits of G keys (j0 .. j0+G-1) of one window row for each user i in MASK:
// out[i][u * L + lane] = scale * <q_i of lane, key at transposed column start + j0 + u + lane>.
// qt[i] is [D][L] (query row i of the tile, transposed); kr = the transposed window row at column start + j0.
template <typename T, int L, int MASK, int G, bool Shuffled>
inline void tile_logits(const T* const* qt, const T* __restrict kr, int64_t RW, int64_t D, T scale, T* const* out,
                        const typename Simd<T, L>::index& offset) {
  using V = typename Simd<T, L>::vec;
  V acc[kTileRows][G] = {};
  for (int64_t d = 0; d < D; ++d) {
    V q[kTileRows];
    ATTNZOO_UNROLL
    for (int i = 0; i < kTileRows; ++i)
      if (MASK >> i & 1) q[i] = vload<V>(qt[i] + d * L);
    const T* kd = kr + d * RW;
    V lo = {}, hi = {};
    if constexpr (Shuffled) {
      lo = vload<V>(kd);
      hi = vload<V>(kd + L);
    }
    ATTNZOO_UNROLL
    for (int u = 0; u < G; ++u) {
      const V k = Shuffled ? shuffle2(lo, hi, offset + u) : vload<V>(kd + u);
      ATTNZOO_UNROLL
      for (int i = 0; i < kTileRows; ++i)
        if (MASK >> i & 1) acc[i][u] += q[i] * k;
    }
  }
  ATTNZOO_UNROLL
  for (int i = 0; i < kTileRows; ++i)
    if (MASK >> i & 1)
      ATTNZOO_UNROLL
      for (int u = 0; u < G; ++u) vstore(out[i] + u * L, V(acc[i][u] * scale));
}

// O[i][c * L + lane] += sum_j P[i][j * L + lane] * vr[c * RW + j + lane] for c < CB, j < count, every user i in MASK:
// the outputs (channels as rows, queries as lanes) of one window row's values, P·V with the values transposed.
template <typename T, int L, int MASK, int CB, bool Shuffled>
inline void tile_values(const T* const* P, const T* __restrict vr, int64_t RW, int64_t count, T* const* O,
                        const typename Simd<T, L>::index& offset) {
  using V = typename Simd<T, L>::vec;
  V acc[kTileRows][CB];
  ATTNZOO_UNROLL
  for (int i = 0; i < kTileRows; ++i)
    if (MASK >> i & 1)
      ATTNZOO_UNROLL
      for (int c = 0; c < CB; ++c) acc[i][c] = vload<V>(O[i] + c * L);
  for (int64_t j = 0; j < count; ++j) {
    V w[kTileRows];
    ATTNZOO_UNROLL
    for (int i = 0; i < kTileRows; ++i)
      if (MASK >> i & 1) w[i] = vload<V>(P[i] + j * L);
    ATTNZOO_UNROLL
    for (int c = 0; c < CB; ++c) {
      const V x = Shuffled ? shuffle2(vload<V>(vr + c * RW), vload<V>(vr + c * RW + L), offset + int(j))
                           : vload<V>(vr + c * RW + j);
      ATTNZOO_UNROLL
      for (int i = 0; i < kTileRows; ++i)
        if (MASK >> i & 1) acc[i][c] += w[i] * x;
    }
  }
  ATTNZOO_UNROLL
  for (int i = 0; i < kTileRows; ++i)
    if (MASK >> i & 1)
      ATTNZOO_UNROLL
      for (int c = 0; c < CB; ++c) vstore(O[i] + c * L, acc[i][c]);
}

// Runtime (mask, group, shuffled) to the templates above; `offset` is null for consecutive lanes.
template <typename T, int L, int MASK, bool Shuffled>
inline void tile_logits_g(int G, const T* const* qt, const T* kr, int64_t RW, int64_t D, T scale, T* const* out,
                          const typename Simd<T, L>::index& offset) {
  switch (G) {
    case 1: return tile_logits<T, L, MASK, 1, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 2: return tile_logits<T, L, MASK, 2, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 3: return tile_logits<T, L, MASK, 3, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 4: return tile_logits<T, L, MASK, 4, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 5: return tile_logits<T, L, MASK, 5, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 6: return tile_logits<T, L, MASK, 6, Shuffled>(qt, kr, RW, D, scale, out, offset);
    case 7: return tile_logits<T, L, MASK, 7, Shuffled>(qt, kr, RW, D, scale, out, offset);
    default: return tile_logits<T, L, MASK, 8, Shuffled>(qt, kr, RW, D, scale, out, offset);
  }
}

// A tile's users (bits of mask, 1 <= mask < 2^kTileRows) as a compile-time constant: f(integral_constant<mask>).
template <typename F>
__attribute__((always_inline)) inline void with_mask(int mask, F&& f) {
  switch (mask) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
  }
}

template <typename T, int L, template <typename, int, int> class Fn, typename... Args>
inline void by_mask(int mask, Args&&... args) {
  with_mask(mask, [&](auto m) { Fn<T, L, decltype(m)::value>::run(args...); });
}

template <typename T, int L, int MASK>
struct TileLogits {
  static void run(int G, const T* const* qt, const T* kr, int64_t RW, int64_t D, T scale, T* const* out,
                  const typename Simd<T, L>::index* offset) {
    if (offset) tile_logits_g<T, L, MASK, true>(G, qt, kr, RW, D, scale, out, *offset);
    else tile_logits_g<T, L, MASK, false>(G, qt, kr, RW, D, scale, out, typename Simd<T, L>::index{});
  }
};

// All channels of one window row's values: blocks of CB channels, then single channels.
template <typename T, int L, int MASK>
struct TileValues {
  template <bool Shuffled>
  static void channels(const T* const* P, const T* vr, int64_t RW, int64_t count, int64_t DV, T* const* O,
                       const typename Simd<T, L>::index& offset) {
    constexpr int CB = Shuffled ? 4 : 8;  // the shuffle's operands need registers too
    int64_t c = 0;
    for (; c + CB <= DV; c += CB) {
      T* Oc[kTileRows];
      for (int i = 0; i < kTileRows; ++i) Oc[i] = O[i] ? O[i] + c * L : nullptr;
      tile_values<T, L, MASK, CB, Shuffled>(P, vr + c * RW, RW, count, Oc, offset);
    }
    for (; c < DV; ++c) {
      T* Oc[kTileRows];
      for (int i = 0; i < kTileRows; ++i) Oc[i] = O[i] ? O[i] + c * L : nullptr;
      tile_values<T, L, MASK, 1, Shuffled>(P, vr + c * RW, RW, count, Oc, offset);
    }
  }
  static void run(const T* const* P, const T* vr, int64_t RW, int64_t count, int64_t DV, T* const* O,
                  const typename Simd<T, L>::index* offset) {
    if (offset) channels<true>(P, vr, RW, count, DV, O, *offset);
    else channels<false>(P, vr, RW, count, DV, O, typename Simd<T, L>::index{});
  }
};

// Per-worker buffers of a lane tile.
template <typename T>
struct TileScratch {
  Run* runs;           // [kTileRows][max_runs]
  TileRow* rows;       // the union: at most kTileRows * max_runs
  T *qt, *S, *O;       // [kTileRows][D][L], [kTileRows][s_stride] (scores, then probabilities), [kTileRows][DV][L]
  T *dot, *dS;         // backward: dO transposed [kTileRows][DV][L]; dP, then dS [kTileRows][s_stride]
  T* dummy;            // where the skipped lanes of an overlapping block write (see LaneBlock)
  int64_t max_runs, s_stride;
};

template <typename T, int L>
TileScratch<T> tile_scratch(Scratch<T>& mem, int64_t worker, const Geometry& g, bool backward) {
  TileScratch<T> ts;
  ts.max_runs = g.max_count(0) * g.max_count(1);
  ts.s_stride = ts.max_runs * (g.max_count(2) + 8) * L;
  const int64_t run_words = sizeof(Run) / sizeof(int64_t);
  const int64_t row_words = (sizeof(TileRow) + sizeof(int64_t) - 1) / sizeof(int64_t);
  int64_t* words = sized(mem.tile_rows[worker], kTileRows * ts.max_runs * (run_words + row_words));
  ts.runs = reinterpret_cast<Run*>(words);
  ts.rows = reinterpret_cast<TileRow*>(words + kTileRows * ts.max_runs * run_words);
  ts.qt = sized(mem.tq[worker], kTileRows * g.D * L);
  ts.S = sized(mem.ts[worker], kTileRows * ts.s_stride);
  ts.O = sized(mem.to[worker], kTileRows * std::max(g.D, g.DV) * L);
  ts.dot = backward ? sized(mem.tdo[worker], kTileRows * g.DV * L) : nullptr;
  ts.dS = backward ? sized(mem.tds[worker], kTileRows * ts.s_stride + std::max({g.D, g.DV, g.probs_per_query()}))
                   : nullptr;
  ts.dummy = backward ? ts.dS + kTileRows * ts.s_stride : sized(mem.tdo[worker], std::max(g.DV, g.probs_per_query()));
  return ts;
}

// Rows of L tokens (lanes) <-> their lane layout [C][L]: gather_lanes writes xt[c * L + lane] = row[lane][c],
// scatter_lanes writes row[lane][c] = xt[c * L + lane]; L × L blocks are transposed in registers where possible.
template <typename T, int L>
inline void gather_lanes(const T* const* row, int64_t C, T* __restrict xt) {
  using V = typename Simd<T, L>::vec;
  int64_t c0 = 0;
#ifdef ATTNZOO_SHUFFLE_TRANSPOSE
  for (; c0 + L <= C; c0 += L) {
    V block[L];
    ATTNZOO_UNROLL
    for (int i = 0; i < L; ++i) block[i] = vload<V>(row[i] + c0);
    transpose_block<T, L>(block);
    ATTNZOO_UNROLL
    for (int c = 0; c < L; ++c) vstore(xt + (c0 + c) * L, block[c]);
  }
#endif
  for (int lane = 0; lane < L; ++lane)
    for (int64_t c = c0; c < C; ++c) xt[c * L + lane] = row[lane][c];
}

template <typename T, int L>
inline void scatter_lanes(const T* __restrict xt, int64_t C, T* const* row) {
  using V = typename Simd<T, L>::vec;
  int64_t c0 = 0;
#ifdef ATTNZOO_SHUFFLE_TRANSPOSE
  for (; c0 + L <= C; c0 += L) {
    V block[L];
    ATTNZOO_UNROLL
    for (int c = 0; c < L; ++c) block[c] = vload<V>(xt + (c0 + c) * L);
    transpose_block<T, L>(block);
    ATTNZOO_UNROLL
    for (int i = 0; i < L; ++i) vstore(row[i] + c0, block[i]);
  }
#endif
  for (int lane = 0; lane < L; ++lane)
    for (int64_t c = c0; c < C; ++c) row[lane][c] = xt[c * L + lane];
}

// Pointers to the rows of the L tokens t0 + dil*lane of x (rows `stride` elements apart).
// Lanes below `skip` (written by an earlier, overlapping lane block) point at `dummy` instead.
template <typename T, int L>
struct LaneRows {
  T* row[L];
  LaneRows(T* x, int64_t stride, int64_t t0, int64_t dil, int64_t skip = 0, T* dummy = nullptr) {
    for (int lane = 0; lane < L; ++lane) row[lane] = lane < skip ? dummy : x + (t0 + dil * lane) * stride;
  }
};

// The relative-position bias of key j of window run `bias` for every lane of a block, as a vector.
template <typename T, int L>
inline typename Simd<T, L>::vec lane_bias(const T* rpb, int64_t bias, int64_t j, const LaneBlock& lb) {
  typename Simd<T, L>::vec v = {};
  if (!lb.rel_varies) return v + rpb[bias + j];
  for (int lane = 0; lane < L; ++lane) v[lane] = rpb[bias + j + lb.rel[lane]];
  return v;
}

// A query's window weights, compact (run r at r * K2 + j) <-> the lane layout (r * count + j): one transpose when
// the window is full (count == K2), else run by run.
template <typename T, int L>
inline void gather_weights(const T* const* compact, int64_t nrun, int64_t count, int64_t K2, T* lanes) {
  if (count == K2) return gather_lanes<T, L>(compact, nrun * count, lanes);
  for (int lane = 0; lane < L; ++lane)
    for (int64_t r = 0; r < nrun; ++r)
      for (int64_t j = 0; j < count; ++j) lanes[(r * count + j) * L + lane] = compact[lane][r * K2 + j];
}

template <typename T, int L>
inline void scatter_weights(const T* lanes, int64_t nrun, int64_t count, int64_t K2, T* const* compact) {
  if (count == K2) return scatter_lanes<T, L>(lanes, nrun * count, compact);
  for (int lane = 0; lane < L; ++lane)
    for (int64_t r = 0; r < nrun; ++r)
      for (int64_t j = 0; j < count; ++j) compact[lane][r * K2 + j] = lanes[(r * count + j) * L + lane];
}

// The windows of a tile's query rows (row0 + i, i < n; lane block at x0) and the union of their window rows.
// Returns the union's size; nrun[i] = number of window rows of query row i.
inline int64_t tile_windows(const Geometry& g, int64_t row0, int64_t n, int64_t x0, Run* runs, int64_t max_runs,
                            int64_t* nrun, TileRow* rows) {
  int64_t nu = 0;
  for (int64_t i = 0; i < n; ++i) {
    nrun[i] = window_runs(g, (row0 + i) * g.ax[2].extent + x0, runs + i * max_runs);
    for (int64_t r = 0; r < nrun[i]; ++r) {
      const int64_t row = runs[i * max_runs + r].row;
      int64_t u = 0;
      while (u < nu && rows[u].row != row) ++u;
      if (u == nu) rows[nu++] = TileRow{row, runs[i * max_runs + r].slot, 0, {}};
      rows[u].mask |= 1 << i;
      rows[u].run[i] = r;
    }
  }
  return nu;
}

// Logits of every window row of a tile's union for its users i: dst[i][(r * count + j) * L + lane] =
// scale * <xt[i] of lane, key j of the row>, xth holding the transposed rows (C channels): Q·Kᵀ or dO·Vᵀ.
template <typename T, int L>
__attribute__((always_inline)) inline void union_logits(const TileScratch<T>& s, int64_t nu, int64_t n, int64_t count,
                                                        int64_t col, const T* const* xt, const T* xth, int64_t RW,
                                                        int64_t C, T scale, T* dst,
                                                        const typename Simd<T, L>::index* shuffle) {
  for (int64_t u = 0; u < nu; ++u) {
    const TileRow& tr = s.rows[u];
    for (int64_t j0 = 0; j0 < count; j0 += 8) {
      T* o[kTileRows] = {};
      for (int64_t i = 0; i < n; ++i)
        if (tr.mask >> i & 1) o[i] = dst + i * s.s_stride + (tr.run[i] * count + j0) * L;
      by_mask<T, L, TileLogits>(tr.mask, static_cast<int>(std::min<int64_t>(8, count - j0)), xt,
                                xth + tr.slot * C * RW + col + j0, RW, C, scale, o, shuffle);
    }
  }
}

// O[i][c * L + lane] += sum over the union's window rows and keys j of W[i][(r * count + j) * L + lane] *
// yth[row][c][col + j + lane] for its users i (C channels, O[i] = O + i * C * L): P·V or dS·K.
template <typename T, int L>
__attribute__((always_inline)) inline void union_values(const TileScratch<T>& s, int64_t nu, int64_t n, int64_t count,
                                                        int64_t col, const T* W, const T* yth, int64_t RW, int64_t C,
                                                        T* O, const typename Simd<T, L>::index* shuffle) {
  for (int64_t u = 0; u < nu; ++u) {
    const TileRow& tr = s.rows[u];
    const T* Wi[kTileRows] = {};
    T* Oi[kTileRows] = {};
    for (int64_t i = 0; i < n; ++i)
      if (tr.mask >> i & 1) {
        Wi[i] = W + i * s.s_stride + tr.run[i] * count * L;
        Oi[i] = O + i * C * L;
      }
    by_mask<T, L, TileValues>(tr.mask, Wi, yth + tr.slot * C * RW + col, RW, count, C, Oi, shuffle);
  }
}

// One lane tile of (batch b, head h): query rows row0 .. row0+n-1, queries x0 + dil*lane of each: logits, biases,
// softmax, P·V, lse (and the saved probabilities). Needs no key bias and no additional keys (the caller checks).
// Returns false, writing nothing, when a lane's softmax would be empty or NaN-led (general blocks then handle it).
template <typename T, int L>
inline bool forward_lane_tile(const Problem<T>& p, int64_t b, int64_t h, int64_t row0, int64_t n, const LaneBlock& lb,
                              const T* kth, const T* vth, TileScratch<T>& s, T* out, T* lse, T* probs) {
  using V = typename Simd<T, L>::vec;
  const int64_t x0 = lb.x0;
  typename Simd<T, L>::index offsets;
  for (int lane = 0; lane < L; ++lane) offsets[lane] = lb.offset[lane];
  const auto* shuffle = lb.shuffled ? &offsets : nullptr;
  const Geometry& g = p.g;
  const Axis& A = g.ax[2];
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, S2 = A.extent, RW = g.row_width(), MR = s.max_runs;
  int64_t nrun[kTileRows];
  const int64_t nu = tile_windows(g, row0, n, x0, s.runs, MR, nrun, s.rows);
  const int64_t count = s.runs[0].count, col = s.runs[0].col;
  const T* qh = head_base(p.q, p.lq, b, h);
  const T* qt[kTileRows] = {};
  for (int64_t i = 0; i < n; ++i) {
    gather_lanes<T, L>(LaneRows<const T, L>(qh, p.lq.token, (row0 + i) * S2 + x0, A.dil).row, D, s.qt + i * D * L);
    qt[i] = s.qt + i * D * L;
  }
  // Logits S[i][(r * count + j) * L + lane], window row by window row of the union.
  union_logits<T, L>(s, nu, n, count, col, qt, kth, RW, D, p.scale, s.S, shuffle);
  // Biases and the softmax statistics of every query row; decline before writing anything.
  V m[kTileRows], l[kTileRows];
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  for (int64_t i = 0; i < n; ++i) {
    T* Si = s.S + i * s.s_stride;
    const Run* runs = s.runs + i * MR;
    if (p.rpb)
      for (int64_t r = 0; r < nrun[i]; ++r)
        for (int64_t j = 0; j < count; ++j) {
          vstore(Si + (r * count + j) * L, V(vload<V>(Si + (r * count + j) * L) +
                                             lane_bias<T, L>(p.rpb + h * R, runs[r].bias, j, lb)));
        }
    // Each lane's maximum starts from its own first logit, in four independent chains (a single chain of
    // compare-and-blend is latency-bound).
    const int64_t nk = nrun[i] * count;
    V mx[4];
    for (int c = 0; c < 4; ++c) mx[c] = vload<V>(Si + std::min<int64_t>(c, nk - 1) * L);
    for (int64_t k = 4; k < nk; k += 4)
      for (int c = 0; c < 4 && k + c < nk; ++c) mx[c] = nan_max_vec(mx[c], vload<V>(Si + (k + c) * L));
    const V mi = nan_max_vec(nan_max_vec(mx[0], mx[1]), nan_max_vec(mx[2], mx[3]));
    for (int lane = 0; lane < L; ++lane)
      if (!(mi[lane] > -INFINITY) || mi[lane] == INFINITY) return false;
    m[i] = mi;
  }
  for (int64_t i = 0; i < n; ++i) {
    T* Si = s.S + i * s.s_stride;
    V li = {};
    for (int64_t k = 0; k < nrun[i] * count; ++k) {
      V sv;
      std::memcpy(&sv, Si + k * L, sizeof(V));
      sv = vexp<L>(sv - m[i]);
      std::memcpy(Si + k * L, &sv, sizeof(V));
      li += sv;
    }
    l[i] = li;
    std::fill(s.O + i * DV * L, s.O + (i + 1) * DV * L, T(0));
  }
  // P·V, window row by window row of the union, into O[i][c * L + lane].
  union_values<T, L>(s, nu, n, count, col, s.S, vth, RW, DV, s.O, shuffle);
  // Normalise and write out (queries back to rows), lse and the probabilities.
  const int64_t KK = g.probs_per_query(), K2 = g.kernel2();
  for (int64_t i = 0; i < n; ++i) {
    const V inv = T(1) / l[i];
    T* Oi = s.O + i * DV * L;
    for (int64_t c = 0; c < DV; ++c) vstore(Oi + c * L, V(vload<V>(Oi + c * L) * inv));
    const int64_t t0 = (row0 + i) * S2 + x0;
    scatter_lanes<T, L>(Oi, DV, LaneRows<T, L>(out + (b * N * H + h) * DV, H * DV, t0, A.dil, lb.skip, s.dummy).row);
    for (int64_t lane = lb.skip; lane < L; ++lane)
      lse[(b * N + t0 + A.dil * lane) * H + h] = m[i][lane] + std::log(l[i][lane]);
    if (probs) {
      T* Si = s.S + i * s.s_stride;
      for (int64_t k = 0; k < nrun[i] * count; ++k) vstore(Si + k * L, V(vload<V>(Si + k * L) * inv));
      scatter_weights<T, L>(Si, nrun[i], count, K2,
                            LaneRows<T, L>(probs + (b * H + h) * N * KK, KK, t0, A.dil, lb.skip, s.dummy).row);
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

// Reordered column of every last-axis coordinate (see Geometry::xcol).
inline std::vector<int64_t> reordered_columns(const Geometry& g) {
  std::vector<int64_t> cols(g.ax[2].extent);
  for (int64_t x = 0; x < g.ax[2].extent; ++x) cols[x] = g.xcol(x);
  return cols;
}

template <typename T, int L>
void forward(const Problem<T>& p, T* out, T* lse, T* probs, int64_t nthreads) {
  const Geometry& g = p.g;
  const int64_t H = g.H, NA = g.NA, S2 = g.ax[2].extent;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t width = max_runs * chunks * L + NA;
  Scratch<T>& mem = scratch<T>();
  mem.workers(nthreads);
  const std::vector<int64_t> cols = reordered_columns(g);
  // Lane tiles where the geometry allows (no key bias, no additional keys), general blocks for the other queries.
  const LaneBlocks lanes = !p.kb && NA == 0 ? lane_blocks(g, L) : LaneBlocks{{}, std::vector<char>(S2, 0)};
  const int64_t nl = static_cast<int64_t>(lanes.blocks.size());
  // Work item = (batch·head, band of tiles of kTileRows query rows, part of every tile's lane blocks): a band's tiles
  // run in order, so each transposed K/V row is made once and reused from the worker's cache by the next tiles;
  // bands and parts keep both threads busy when batch·heads is small (a band's first tile makes all its rows).
  const int64_t tiles = (g.rows() + kTileRows - 1) / kTileRows;
  const int64_t want = 4 * nthreads, BH = g.B * H;
  const int64_t bands = std::min(tiles, (want + BH - 1) / BH);
  const int64_t parts = std::max<int64_t>(1, (want + BH * bands - 1) / (BH * bands));
  parallel_for(BH * bands * parts, nthreads, [&](int64_t lo, int64_t hi, int64_t worker) {
    Run* runs = reinterpret_cast<Run*>(sized(mem.runs[worker], max_runs * int64_t(sizeof(Run) / sizeof(int64_t))));
    T* score = sized(mem.a[worker], kBlock * width);
    TileScratch<T> ts = tile_scratch<T, L>(mem, worker, g, /*backward=*/false);
    RowRing<T> kring = row_ring<T, L>(mem.kr[worker], mem.ktag[worker], g, g.D);
    RowRing<T> vring = row_ring<T, L>(mem.vr[worker], mem.vtag[worker], g, g.DV);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t bh = item / (bands * parts), band = (item / parts) % bands, part = item % parts;
      const int64_t b = bh / H, h = bh % H;
      for (int64_t tile = band * tiles / bands; tile < (band + 1) * tiles / bands; ++tile) {
        const int64_t row0 = tile * kTileRows, n = std::min<int64_t>(kTileRows, g.rows() - row0);
        need_rows<T, L>(kring, p.k, p.lk, g, cols.data(), b, h, row0, n, runs);
        if (nl) need_rows<T, L>(vring, p.v, p.lv, g, cols.data(), b, h, row0, n, runs);
        for (int64_t li = part * nl / parts; li < (part + 1) * nl / parts; ++li) {
          const LaneBlock& lb = lanes.blocks[li];
          if (forward_lane_tile<T, L>(p, b, h, row0, n, lb, kring.data, vring.data, ts, out, lse, probs)) continue;
          for (const Block& blk : declined_blocks(g, lb, row0, n, L, chunks))
            forward_block<T, L>(p, b, h, blk, kring.data, runs, chunks, score, width, out, lse, probs);
        }
        for (int64_t i = 0; i < n; ++i) {
          const std::vector<Block> blocks = make_blocks(g, row0 + i, L, chunks, &lanes.taken);
          const int64_t nb = static_cast<int64_t>(blocks.size());
          for (int64_t bi = part * nb / parts; bi < (part + 1) * nb / parts; ++bi)
            forward_block<T, L>(p, b, h, blocks[bi], kring.data, runs, chunks, score, width, out, lse, probs);
        }
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
//   5. key_grads:           dK = scale · dSᵀ·Q, dV = Pᵀ·dO, on key tiles (one key column of up to kTileRows key
//                           rows: every Q and dO row read once for all the tile's keys whose window holds it)

template <typename T>
struct Grads {
  const T *out, *lse, *dout, *dlse, *probs;
  const T* delta;  // [B, N, H]: the softmax row terms, computed once by backward() (see softmax_delta)
  T *dq, *dk, *dv, *daddk, *daddv, *drpb, *dkb;
};

// Per-worker buffers of the backward: lane-layout P and dS of a block; compact P (when not saved) and dS of one
// (batch, head); the (query, weight index) pairs of one key.
template <typename T>
struct BackwardScratch {
  Run* runs;
  T *prob, *dprob, *pc, *dsc;
  int64_t* rows;  // the union of a key tile (KeyTileRow records)
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
  if (gr.delta) return gr.delta[qoff];
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

// Key tiles: one key column c2 of up to kTileRows neighbouring key rows, which share most of the window rows holding
// them (the union: query row, users, each user's first weight index there), so that every row of Q and dO read from
// the union feeds the dK and dV of all its users at once, from registers. Its own record rather than TileRow: with
// the token base and weight offsets precomputed here, the gather ran 1.25× faster than on TileRows (in-process A/B,
// workload P). The accumulators of the tile's keys fit the registers for rows of at most two 64-byte vectors (NV).
constexpr int key_tile_rows(int NV) { return NV <= 2 ? kTileRows : 1; }

struct KeyTileRow {
  int64_t base;  // first query token of the window row
  int mask;      // users: bit u for key row kr0 + u
  int64_t wi[kTileRows];
};

// dV_u += sum_i P_i dO_i and dK_u += sum_i dS_i Q_i for the users u in MASK of one union row and the queries
// base + q2[i] holding key column c2 (weights at t * KK + wi[u] + pos2[i]); NV vectors of W lanes per row, KR rows.
template <typename T, int W, int NV, int KR, int MASK>
__attribute__((always_inline)) inline void key_tile_row(const T* __restrict qh, int64_t qstride,
                                                        const T* __restrict doh, int64_t dstride,
                                                        const T* __restrict pc, const T* __restrict dsc, int64_t KK,
                                                        const KeyTileRow& row, const int64_t* q2, const int64_t* pos2,
                                                        int64_t n2, typename Simd<T, W>::vec (&ak)[KR][NV],
                                                        typename Simd<T, W>::vec (&av)[KR][NV]) {
  using V = typename Simd<T, W>::vec;
  for (int64_t i = 0; i < n2; ++i) {
    const int64_t t = row.base + q2[i], w0 = t * KK + pos2[i];
    const T *qr = qh + t * qstride, *dr = doh + t * dstride;
    V x[NV], y[NV];
    ATTNZOO_UNROLL
    for (int v = 0; v < NV; ++v) {
      x[v] = vload<V>(qr + v * W);
      y[v] = vload<V>(dr + v * W);
    }
    ATTNZOO_UNROLL
    for (int u = 0; u < KR; ++u)
      if (MASK >> u & 1) {
        const T pw = pc[w0 + row.wi[u]], dw = dsc[w0 + row.wi[u]];
        ATTNZOO_UNROLL
        for (int v = 0; v < NV; ++v) {
          ak[u][v] += dw * x[v];
          av[u][v] += pw * y[v];
        }
      }
  }
}

// dK (times scale) and dV of key column c2 of the tile's nk <= KR key rows (dk[u] and dv[u] their rows).
template <typename T, int W, int NV, int KR>
inline void key_tile(const T* qh, int64_t qstride, const T* doh, int64_t dstride, const T* pc, const T* dsc,
                     int64_t KK, const KeyTileRow* rows, int64_t nu, const int64_t* q2, const int64_t* pos2,
                     int64_t n2, int64_t nk, T scale, T* const* dk, T* const* dv) {
  using V = typename Simd<T, W>::vec;
  V ak[KR][NV] = {}, av[KR][NV] = {};
  for (int64_t r = 0; r < nu; ++r) {  // its own switch: dispatched through with_mask the gather ran 1.14× slower
    const auto run = [&](auto mask) {
      constexpr int MASK = decltype(mask)::value & ((1 << KR) - 1);
      key_tile_row<T, W, NV, KR, MASK>(qh, qstride, doh, dstride, pc, dsc, KK, rows[r], q2, pos2, n2, ak, av);
    };
    switch (rows[r].mask) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 5: run(std::integral_constant<int, 5>{}); break;
      case 6: run(std::integral_constant<int, 6>{}); break;
      case 7: run(std::integral_constant<int, 7>{}); break;
    }
  }
  for (int64_t u = 0; u < nk; ++u)
    for (int v = 0; v < NV; ++v) {
      vstore(dk[u] + v * W, V(ak[u][v] * scale));
      vstore(dv[u] + v * W, av[u][v]);
    }
}

// dK and dV of every key of one (batch, head), each gathered from the queries whose window holds it, on key tiles
// (key_tile_rows of them where a row of Q and of dO is whole 64-byte vectors or half of one, else one key row).
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
  // Vectors of W lanes in a row of Q and of dO where the gather is specialised (D = DV = NV·W, or half a vector).
  const int64_t NV = D != DV ? 0 : D == W / 2 ? 1 : D == W || D == 2 * W || D == 4 * W || D == 8 * W ? D / W : 0;
  const int64_t tile_rows = NV > 0 ? key_tile_rows(NV) : 1;
  KeyTileRow* union_rows = reinterpret_cast<KeyTileRow*>(s.rows);
  for (int64_t kr0 = 0; kr0 < g.rows(); kr0 += tile_rows) {
    const int64_t nk = std::min(tile_rows, g.rows() - kr0);
    // The window rows holding the tile's key rows (first query token of each, as window_runs numbers runs).
    int64_t nu = 0;
    for (int64_t u = 0; u < nk; ++u) {
      const int64_t c0 = (kr0 + u) / S1, c1 = (kr0 + u) % S1;
      for (int64_t i0 = inv[0].first[c0]; i0 < inv[0].first[c0 + 1]; ++i0)
        for (int64_t i1 = inv[1].first[c1]; i1 < inv[1].first[c1 + 1]; ++i1) {
          const int64_t x1 = inv[1].query[i1], base = (inv[0].query[i0] * S1 + x1) * S2;
          int64_t r = 0;
          while (r < nu && union_rows[r].base != base) ++r;
          if (r == nu) union_rows[nu++] = KeyTileRow{base, 0, {}};
          union_rows[r].mask |= 1 << u;
          union_rows[r].wi[u] = (inv[0].pos[i0] * g.ax[1].count[x1] + inv[1].pos[i1]) * K2;
        }
    }
    for (int64_t c2 = 0; c2 < S2; ++c2) {
      const int64_t f = inv[2].first[c2], n2 = inv[2].first[c2 + 1] - f;
      const int64_t *q2 = inv[2].query.data() + f, *pos2 = inv[2].pos.data() + f;
      T* dk[kTileRows] = {};
      T* dv[kTileRows] = {};
      for (int64_t u = 0; u < nk; ++u) {
        const int64_t key = (b * N + (kr0 + u) * S2 + c2) * H + h;
        dk[u] = gr.dk + key * D;
        dv[u] = gr.dv + key * DV;
      }
      const auto fast = [&](auto lanes, auto nv) {
        constexpr int NVc = decltype(nv)::value;
        key_tile<T, decltype(lanes)::value, NVc, key_tile_rows(NVc)>(
            qh, p.lq.token, doh, H * DV, pc, s.dsc, KK, union_rows, nu, q2, pos2, n2, nk, p.scale, dk, dv);
      };
      using W1 = std::integral_constant<int, W>;
      if (NV == 1 && D == W / 2) fast(std::integral_constant<int, W / 2>{}, std::integral_constant<int, 1>{});
      else if (NV == 1) fast(W1{}, std::integral_constant<int, 1>{});
      else if (NV == 2) fast(W1{}, std::integral_constant<int, 2>{});
      else if (NV == 4) fast(W1{}, std::integral_constant<int, 4>{});
      else if (NV == 8) fast(W1{}, std::integral_constant<int, 8>{});
      else {
        std::fill(dk[0], dk[0] + D, T(0));
        std::fill(dv[0], dv[0] + DV, T(0));
        for (int64_t r = 0; r < nu; ++r)
          for (int64_t i = 0; i < n2; ++i) {
            const int64_t t = union_rows[r].base + q2[i], w = t * KK + union_rows[r].wi[0] + pos2[i];
            const T *qr = qh + t * p.lq.token, *dr = doh + t * H * DV;
            for (int64_t d = 0; d < D; ++d) dk[0][d] += s.dsc[w] * qr[d];
            for (int64_t c = 0; c < DV; ++c) dv[0][c] += pc[w] * dr[c];
          }
        for (int64_t d = 0; d < D; ++d) dk[0][d] *= p.scale;
      }
    }
  }
}

// One lane tile of the backward (batch b, head h; query rows row0 .. row0+n-1, lane block at x0): P (saved, or
// recomputed from the logits and lse), dP = dO·Vᵀ, dS = P ∘ (dP − delta), dQ = scale · dS·K and the relative-position
// bias gradient, all with the queries as lanes; then every query's compact dS (and P when not saved) for key_grads.
// Returns false, writing nothing, when a lane's lse is not finite (an empty or NaN softmax: general blocks then).
template <typename T, int L>
inline bool backward_lane_tile(const Problem<T>& p, const Grads<T>& gr, int64_t b, int64_t h, int64_t row0, int64_t n,
                               const LaneBlock& lb, const T* kth, const T* vth, TileScratch<T>& s,
                               BackwardScratch<T>& bs) {
  using V = typename Simd<T, L>::vec;
  const int64_t x0 = lb.x0;
  typename Simd<T, L>::index offsets;
  for (int lane = 0; lane < L; ++lane) offsets[lane] = lb.offset[lane];
  const auto* shuffle = lb.shuffled ? &offsets : nullptr;
  const Geometry& g = p.g;
  const Axis& A = g.ax[2];
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, S2 = A.extent, RW = g.row_width(), MR = s.max_runs;
  const int64_t KK = g.probs_per_query(), K2 = g.kernel2();
  V lse[kTileRows], delta[kTileRows];
  for (int64_t i = 0; i < n; ++i)
    for (int lane = 0; lane < L; ++lane) {
      const int64_t qoff = (b * N + (row0 + i) * S2 + x0 + A.dil * lane) * H + h;
      if (!std::isfinite(gr.lse[qoff])) return false;
      lse[i][lane] = gr.lse[qoff];
      delta[i][lane] = softmax_delta(p, gr, qoff);
    }
  int64_t nrun[kTileRows];
  const int64_t nu = tile_windows(g, row0, n, x0, s.runs, MR, nrun, s.rows);
  const int64_t count = s.runs[0].count, col = s.runs[0].col;
  const T* qt[kTileRows] = {};
  const T* dot[kTileRows] = {};
  const T* qh = head_base(p.q, p.lq, b, h);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t0 = (row0 + i) * S2 + x0;
    gather_lanes<T, L>(LaneRows<const T, L>(qh, p.lq.token, t0, A.dil).row, D, s.qt + i * D * L);
    gather_lanes<T, L>(LaneRows<const T, L>(gr.dout + (b * N * H + h) * DV, H * DV, t0, A.dil).row, DV,
                       s.dot + i * DV * L);
    qt[i] = s.qt + i * D * L;
    dot[i] = s.dot + i * DV * L;
  }
  // Logits of the union's window rows against transposed rows xt: Q·Kᵀ into S, or dO·Vᵀ into dS.
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  if (gr.probs) {
    for (int64_t i = 0; i < n; ++i)
      gather_weights<T, L>(LaneRows<const T, L>(gr.probs + (b * H + h) * N * KK, KK, (row0 + i) * S2 + x0, A.dil).row,
                           nrun[i], count, K2, s.S + i * s.s_stride);
  } else {
    union_logits<T, L>(s, nu, n, count, col, qt, kth, RW, D, p.scale, s.S, shuffle);
    for (int64_t i = 0; i < n; ++i) {
      T* Si = s.S + i * s.s_stride;
      const Run* runs = s.runs + i * MR;
      for (int64_t r = 0; r < nrun[i]; ++r)
        for (int64_t j = 0; j < count; ++j) {
          V sv = vload<V>(Si + (r * count + j) * L);
          if (p.rpb) sv += lane_bias<T, L>(p.rpb + h * R, runs[r].bias, j, lb);
          vstore(Si + (r * count + j) * L, vexp<L>(sv - lse[i]));
        }
    }
  }
  union_logits<T, L>(s, nu, n, count, col, dot, vth, RW, DV, T(1), s.dS, shuffle);
  for (int64_t i = 0; i < n; ++i) {
    T* dSi = s.dS + i * s.s_stride;
    const T* Si = s.S + i * s.s_stride;
    for (int64_t k = 0; k < nrun[i] * count; ++k)
      vstore(dSi + k * L, V(vload<V>(Si + k * L) * (vload<V>(dSi + k * L) - delta[i])));
    std::fill(s.O + i * D * L, s.O + (i + 1) * D * L, T(0));
  }
  // dQ (transposed) = dS·K over the union's window rows.
  union_values<T, L>(s, nu, n, count, col, s.dS, kth, RW, D, s.O, shuffle);
  for (int64_t i = 0; i < n; ++i) {
    T* Oi = s.O + i * D * L;
    const T* Si = s.S + i * s.s_stride;
    const T* dSi = s.dS + i * s.s_stride;
    const Run* runs = s.runs + i * MR;
    if (gr.drpb)  // the lanes this block writes (not the skipped ones), each at its own relative position
      for (int64_t r = 0; r < nrun[i]; ++r)
        for (int64_t j = 0; j < count; ++j) {
          const T* dsj = dSi + (r * count + j) * L;
          T* slot = gr.drpb + (b * H + h) * R + runs[r].bias + j;
          if (lb.rel_varies) {
            for (int64_t lane = lb.skip; lane < L; ++lane) slot[lb.rel[lane]] += dsj[lane];
          } else {
            T sum = 0;
            for (int64_t lane = lb.skip; lane < L; ++lane) sum += dsj[lane];
            *slot += sum;
          }
        }
    const int64_t t0 = (row0 + i) * S2 + x0;
    for (int64_t d = 0; d < D; ++d) vstore(Oi + d * L, V(vload<V>(Oi + d * L) * p.scale));
    scatter_lanes<T, L>(Oi, D, LaneRows<T, L>(gr.dq + (b * N * H + h) * D, H * D, t0, A.dil, lb.skip, s.dummy).row);
    scatter_weights<T, L>(dSi, nrun[i], count, K2, LaneRows<T, L>(bs.dsc, KK, t0, A.dil, lb.skip, s.dummy).row);
    if (!gr.probs)
      scatter_weights<T, L>(Si, nrun[i], count, K2, LaneRows<T, L>(bs.pc, KK, t0, A.dil, lb.skip, s.dummy).row);
  }
  return true;
}

template <typename T, int L>
void backward(const Problem<T>& p, const Grads<T>& given, int64_t nthreads) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, S2 = g.ax[2].extent;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t KK = g.probs_per_query();
  const InverseAxis inv[3] = {InverseAxis(g.ax[0]), InverseAxis(g.ax[1]), InverseAxis(g.ax[2])};
  const int64_t max_pairs = inv[0].max_queries() * inv[1].max_queries();  // window rows holding one key row
  Scratch<T>& mem = scratch<T>();
  mem.workers(nthreads);
  // The softmax row terms of every query, in one pass over dO and O in their natural layout.
  Grads<T> gr = given;
  T* delta = sized(mem.delta, g.B * N * H);
  parallel_for(g.B * N, nthreads, [&](int64_t lo, int64_t hi, int64_t) {
    for (int64_t qoff = lo * H; qoff < hi * H; ++qoff) delta[qoff] = softmax_delta(p, given, qoff);
  });
  gr.delta = delta;
  // Lane tiles for the queries the forward ran as lane tiles, general blocks for the others.
  const LaneBlocks lanes = !p.kb && g.NA == 0 ? lane_blocks(g, L) : LaneBlocks{{}, std::vector<char>(S2, 0)};
  const int64_t nl = static_cast<int64_t>(lanes.blocks.size());
  const bool need_kt = !gr.probs || nl > 0;
  const std::vector<int64_t> cols = reordered_columns(g);
  const int64_t tiles = (g.rows() + kTileRows - 1) / kTileRows;
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi, int64_t worker) {
    BackwardScratch<T> s;
    s.width = max_runs * chunks * L;
    s.runs = reinterpret_cast<Run*>(sized(mem.runs[worker], max_runs * int64_t(sizeof(Run) / sizeof(int64_t))));
    s.prob = sized(mem.a[worker], kBlock * s.width);
    s.dprob = sized(mem.b[worker], kBlock * s.width);
    s.pc = gr.probs ? nullptr : sized(mem.c[worker], N * KK);
    s.dsc = sized(mem.d[worker], N * KK);
    s.rows = sized(mem.pairs[worker], kTileRows * max_pairs * int64_t(sizeof(KeyTileRow) / sizeof(int64_t)));
    TileScratch<T> ts = tile_scratch<T, L>(mem, worker, g, /*backward=*/true);
    RowRing<T> kring = row_ring<T, L>(mem.kr[worker], mem.ktag[worker], g, D);
    RowRing<T> vring = row_ring<T, L>(mem.vr[worker], mem.vtag[worker], g, DV);
    const auto general = [&](int64_t b, int64_t h, const Block& blk) {
      const int64_t nrun = window_runs(g, blk.token[0], s.runs);
      block_probabilities<T, L>(p, gr, need_kt ? kring.data : nullptr, b, h, blk, nrun, chunks, s);
      block_score_grads<T, L>(p, gr, vring.data, b, h, blk, nrun, chunks, s);
      query_grads<T, L>(p, gr, b, h, blk, nrun, chunks, s);
      store_block_weights<T, L>(p, gr, blk, nrun, chunks, s);
    };
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t row0 = tile * kTileRows, n = std::min<int64_t>(kTileRows, g.rows() - row0);
        if (need_kt) need_rows<T, L>(kring, p.k, p.lk, g, cols.data(), b, h, row0, n, s.runs);
        need_rows<T, L>(vring, p.v, p.lv, g, cols.data(), b, h, row0, n, s.runs);
        for (const LaneBlock& lb : lanes.blocks) {
          if (backward_lane_tile<T, L>(p, gr, b, h, row0, n, lb, kring.data, vring.data, ts, s)) continue;
          for (const Block& blk : declined_blocks(g, lb, row0, n, L, chunks)) general(b, h, blk);
        }
        for (int64_t i = 0; i < n; ++i)
          for (const Block& blk : make_blocks(g, row0 + i, L, chunks, &lanes.taken)) general(b, h, blk);
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
  p.g.slots = ring_slots(p.g, kTileRows);
  return p;
}

// Lanes per vector: 64-byte vectors, except float32 rows of fewer than 16 queries per dilation group (the 14² and 7²
// maps of a Swin/NAT stage 3-4): half-width (32-byte) vectors run rows of 8-15 as lane tiles, and the general blocks
// of narrower rows waste fewer lanes (measured 1.37x forward, 1.48x backward at 14²; 1.17x / 1.07x at 7²).
template <typename T, typename Fn>
void with_lanes(const Problem<T>& p, Fn fn) {
  constexpr int full = 64 / sizeof(T);
  if constexpr (full == 16) {
    const int64_t group = p.g.ax[2].extent / p.g.ax[2].dil;
    if (group < 16) return fn(std::integral_constant<int, 8>{});
  }
  fn(std::integral_constant<int, full>{});
}

}  // namespace

#define ATTNZOO_DEFINE(T, SUFFIX)                                                                                    \
  extern "C" void attnzoo_na_forward_##SUFFIX(                                                                       \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, T* out, T* lse,   \
      T* probs, const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables,     \
      const int64_t* strides, int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA, double scale,                 \
      int64_t nthreads) {                                                                                            \
    const Problem<T> p =                                                                                             \
        make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, strides, B, H, D, DV, NA, scale); \
    with_lanes(p, [&](auto lanes) { forward<T, decltype(lanes)::value>(p, out, lse, probs, nthreads); });            \
  }                                                                                                                  \
  extern "C" void attnzoo_na_backward_##SUFFIX(                                                                      \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, const T* out,     \
      const T* lse, const T* probs, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* daddk, T* daddv, T* drpb,  \
      T* dkb, const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables,       \
      const int64_t* strides, int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA, double scale,                 \
      int64_t nthreads) {                                                                                            \
    const Problem<T> p =                                                                                             \
        make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, strides, B, H, D, DV, NA, scale); \
    const Grads<T> gr{out, lse, dout, dlse, probs, nullptr, dq, dk, dv, daddk, daddv, drpb, dkb};                    \
    with_lanes(p, [&](auto lanes) { backward<T, decltype(lanes)::value>(p, gr, nthreads); });                        \
  }

ATTNZOO_DEFINE(float, f32)
ATTNZOO_DEFINE(double, f64)
