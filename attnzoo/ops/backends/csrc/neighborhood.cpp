// Fused neighborhood attention for CPUs (forward and backward), one generic 3-D kernel.
//
// Layout (NATTEN's): q, k [B, S0, S1, S2, H, D]; v [B, S0, S1, S2, H, DV], contiguous; 1-D and 2-D calls pass
// leading axes of extent 1. The geometry (which keys a query sees) is computed in Python and arrives as
// per-axis tables: query coordinate x attends to key coordinates start[x] + dil * j for j < count[x], and the
// relative-position index of its j-th key along that axis is rel[x] + j. Additional keys/values
// [B, NA, H, D|DV] join every query's softmax. The optional relative-position bias table is [H, R0, R1, R2]; the
// optional per-key bias kb [B, S0, S1, S2, H] is added to every logit of that key (-inf drops the key).
//
// Speed: logits are computed with the keys as SIMD lanes. K (and V for the backward) are first transposed per
// head to [D][tokens], with the last axis reordered by dilation group so that every window row -- start + dil*j,
// j < count -- is a contiguous run of columns. One vector FMA per head dimension then yields up to LANES logits
// at once, with no horizontal reductions. The P·V product accumulates value rows (head_dim as lanes).
//
// Plain C ABI (no torch headers) so that it compiles in about a second with the system compiler; threads are
// std::thread so that no second OpenMP runtime is loaded next to PyTorch's.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

// L lanes of T: 64-byte vectors for wide windows, 32-byte vectors when a window row fits (less waste).
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
  return x > -87.0f ? y : zero;
}

// float64 keeps the exact library exp (the oracle dtype).
template <int L>
inline typename Simd<double, L>::vec vexp(typename Simd<double, L>::vec x) {
  for (int i = 0; i < L; ++i) x[i] = std::exp(x[i]);
  return x;
}

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
};

template <typename Fn>
void parallel_for(int64_t n, int64_t nthreads, Fn fn) {
  nthreads = std::max<int64_t>(1, std::min(nthreads, n));
  if (nthreads == 1) {
    fn(0, n);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  for (int64_t t = 1; t < nthreads; ++t) {
    const int64_t lo = t * chunk, hi = std::min(n, lo + chunk);
    if (lo < hi) pool.emplace_back(fn, lo, hi);
  }
  fn(0, std::min(n, chunk));
  for (auto& th : pool) th.join();
}

// x [B, N, H, C] -> xt [B, H, rows, C, row_width] (+ zero padding), see Geometry.
template <typename T>
std::vector<T> transpose_heads(const T* x, const Geometry& g, int64_t C, int64_t slice, int64_t nthreads) {
  const int64_t N = g.tokens(), H = g.H, S2 = g.ax[2].extent, RW = g.row_width();
  std::vector<T> xt(g.B * H * slice, T(0));
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / H, h = item % H;
      T* dst = xt.data() + item * slice;
      for (int64_t t = 0; t < N; ++t) {
        const T* src = x + ((b * N + t) * H + h) * C;
        T* col = dst + (t / S2) * C * RW + g.xcol(t % S2);
        for (int64_t c = 0; c < C; ++c) col[c * RW] = src[c];
      }
    }
  });
  return xt;
}

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

// logits[j] = scale * <qi, key j> over the runs, keys as lanes; writes nrun*chunks*LANES values (-inf padding).
// Four runs (and two head-dimension halves) are accumulated at once so that the FMA chains overlap.
template <typename T, int L>
inline void run_logits(const T* __restrict qi, const T* __restrict kt, int64_t stride, int64_t D, const Run* runs,
                       int64_t nrun, int64_t chunks, T scale, T* __restrict out) {
  using V = typename Simd<T, L>::vec;
  auto load = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  };
  const int64_t n = nrun * chunks;
  auto base = [&](int64_t i) { return kt + (runs[i / chunks].row * D) * stride + runs[i / chunks].col + (i % chunks) * L; };
  auto finish = [&](int64_t i, V acc) {
    acc *= scale;
    T* o = out + i * L;
    std::memcpy(o, &acc, sizeof(V));
    const int64_t valid = runs[i / chunks].count - (i % chunks) * L;
    for (int64_t l = std::max<int64_t>(valid, 0); l < L; ++l) o[l] = -INFINITY;
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const T *b0 = base(i), *b1 = base(i + 1), *b2 = base(i + 2), *b3 = base(i + 3);
    V a0 = {}, a1 = {}, a2 = {}, a3 = {}, c0 = {}, c1 = {}, c2 = {}, c3 = {};
    int64_t d = 0;
    for (; d + 2 <= D; d += 2) {
      const T q0 = qi[d], q1 = qi[d + 1];
      const int64_t o0 = d * stride, o1 = o0 + stride;
      a0 += q0 * load(b0 + o0);
      a1 += q0 * load(b1 + o0);
      a2 += q0 * load(b2 + o0);
      a3 += q0 * load(b3 + o0);
      c0 += q1 * load(b0 + o1);
      c1 += q1 * load(b1 + o1);
      c2 += q1 * load(b2 + o1);
      c3 += q1 * load(b3 + o1);
    }
    for (; d < D; ++d) {
      const int64_t o0 = d * stride;
      a0 += qi[d] * load(b0 + o0);
      a1 += qi[d] * load(b1 + o0);
      a2 += qi[d] * load(b2 + o0);
      a3 += qi[d] * load(b3 + o0);
    }
    finish(i, a0 + c0);
    finish(i + 1, a1 + c1);
    finish(i + 2, a2 + c2);
    finish(i + 3, a3 + c3);
  }
  for (; i < n; ++i) {
    const T* b0 = base(i);
    V a0 = {}, c0 = {};
    int64_t d = 0;
    for (; d + 2 <= D; d += 2) {
      a0 += qi[d] * load(b0 + d * stride);
      c0 += qi[d + 1] * load(b0 + (d + 1) * stride);
    }
    for (; d < D; ++d) a0 += qi[d] * load(b0 + d * stride);
    finish(i, a0 + c0);
  }
}

// acc[0:DV] += p_j * v_j over the window, value rows as lanes; NV = DV / LANES vectors kept in registers.
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

template <typename T>
struct Problem {
  const T *q, *k, *v, *addk, *addv, *rpb, *kb;
  Geometry g;
  T scale;
};

template <typename T, int L>
void forward(const Problem<T>& p, T* out, T* lse, int64_t nthreads) {
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, NA = g.NA;
  const int64_t stride = g.row_width(), slice = g.rows() * D * stride + 2 * L;
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t width = max_runs * chunks * L;
  const int64_t dil2 = g.ax[2].dil;
  const std::vector<T> kt = transpose_heads(p.k, g, D, slice, nthreads);
  // Work item = (batch, block of query tokens); the window is enumerated once per token for all heads.
  const int64_t block = 32, nblocks = (N + block - 1) / block;
  parallel_for(g.B * nblocks, nthreads, [&](int64_t lo, int64_t hi) {
    using V = typename Simd<T, L>::vec;
    std::vector<Run> runs(max_runs);
    std::vector<T> score(width + NA);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / nblocks;
      for (int64_t t = (item % nblocks) * block, tend = std::min(N, t + block); t < tend; ++t) {
        const int64_t nrun = window_runs(g, t, runs.data());
        const int64_t used = nrun * chunks * L;
        for (int64_t h = 0; h < H; ++h) {
          const int64_t qoff = (b * N + t) * H + h;
          const T* qi = p.q + qoff * D;
          run_logits<T, L>(qi, kt.data() + (b * H + h) * slice, stride, D, runs.data(), nrun, chunks, p.scale,
                     score.data());
          if (p.rpb || p.kb) {
            for (int64_t r = 0; r < nrun; ++r)
              for (int64_t j = 0; j < runs[r].count; ++j) {
                T& s = score[r * chunks * L + j];
                if (p.rpb) s += p.rpb[h * R + runs[r].bias + j];
                if (p.kb) s += p.kb[(b * N + runs[r].token + dil2 * j) * H + h];
              }
          }
          for (int64_t j = 0; j < NA; ++j) {
            const T* kj = p.addk + ((b * NA + j) * H + h) * D;
            T s = 0;
            for (int64_t d = 0; d < D; ++d) s += qi[d] * kj[d];
            score[used + j] = p.scale * s;
          }
          V mv = score[0] + V{};
          for (int64_t j = 0; j < used; j += L) {
            V sv;
            std::memcpy(&sv, score.data() + j, sizeof(V));
            mv = mv > sv ? mv : sv;
          }
          T m = -INFINITY;
          for (int i = 0; i < L; ++i) m = std::max(m, mv[i]);
          for (int64_t j = used; j < used + NA; ++j) m = std::max(m, score[j]);
          T* o = out + qoff * DV;
          if (m == -INFINITY) {  // every key dropped by kb: empty softmax
            std::fill(o, o + DV, T(0));
            lse[qoff] = -INFINITY;
            continue;
          }
          V lv = {};
          for (int64_t j = 0; j < used; j += L) {
            V sv;
            std::memcpy(&sv, score.data() + j, sizeof(V));
            sv = vexp<L>(sv - m);
            std::memcpy(score.data() + j, &sv, sizeof(V));
            lv += sv;
          }
          T l = 0;
          for (int i = 0; i < L; ++i) l += lv[i];
          for (int64_t j = used; j < used + NA; ++j) {
            score[j] = std::exp(score[j] - m);
            l += score[j];
          }
          accumulate_values_any<T, L>(p.v + ((b * N) * H + h) * DV, score.data(), runs.data(), nrun, chunks, dil2, H * DV,
                                DV, o);
          for (int64_t j = 0; j < NA; ++j) {
            const T pj = score[used + j];
            const T* vj = p.addv + ((b * NA + j) * H + h) * DV;
            for (int64_t c = 0; c < DV; ++c) o[c] += pj * vj[c];
          }
          const T inv = T(1) / l;
          for (int64_t c = 0; c < DV; ++c) o[c] *= inv;
          lse[qoff] = m + std::log(l);
        }
      }
    }
  });
}

template <typename T, int L>
void backward(const Problem<T>& p, const T* out, const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv,
              T* daddk, T* daddv, T* drpb, T* dkb, int64_t nthreads) {
  // Work item = (batch, head): every write to dk/dv/daddk/daddv/dkb of that slice stays in one thread.
  // drpb is [B, H, R] so that batches never share a slot either; the caller sums over B.
  const Geometry& g = p.g;
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, NA = g.NA;
  const int64_t kstride = g.row_width();
  const int64_t kslice = g.rows() * D * kstride + 2 * L, vslice = g.rows() * DV * kstride + 2 * L;
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  const int64_t max_runs = g.max_count(0) * g.max_count(1);
  const int64_t chunks = (g.max_count(2) + L - 1) / L;
  const int64_t width = max_runs * chunks * L;
  const int64_t dil2 = g.ax[2].dil;
  const std::vector<T> kt = transpose_heads(p.k, g, D, kslice, nthreads);
  const std::vector<T> vt = transpose_heads(p.v, g, DV, vslice, nthreads);
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi) {
    using V = typename Simd<T, L>::vec;
    std::vector<Run> runs(max_runs);
    std::vector<T> prob(width), dprob(width);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* ktb = kt.data() + bh * kslice;
      const T* vtb = vt.data() + bh * vslice;
      for (int64_t t = 0; t < N; ++t) {
        const int64_t qoff = (b * N + t) * H + h;
        const T li = lse[qoff];
        if (li == -INFINITY) continue;  // empty softmax: no gradient
        const T* qi = p.q + qoff * D;
        const T* doi = dout + qoff * DV;
        T delta = 0;
        for (int64_t c = 0; c < DV; ++c) delta += doi[c] * out[qoff * DV + c];
        if (dlse) delta -= dlse[qoff];
        const int64_t nrun = window_runs(g, t, runs.data());
        const int64_t used = nrun * chunks * L;
        run_logits<T, L>(qi, ktb, kstride, D, runs.data(), nrun, chunks, p.scale, prob.data());
        run_logits<T, L>(doi, vtb, kstride, DV, runs.data(), nrun, chunks, T(1), dprob.data());
        if (p.rpb || p.kb) {
          for (int64_t r = 0; r < nrun; ++r)
            for (int64_t j = 0; j < runs[r].count; ++j) {
              T& s = prob[r * chunks * L + j];
              if (p.rpb) s += p.rpb[h * R + runs[r].bias + j];
              if (p.kb) s += p.kb[(b * N + runs[r].token + dil2 * j) * H + h];
            }
        }
        // p = exp(s - lse); ds = p * (dP - delta); masked lanes have s = -inf, so p = ds = 0.
        for (int64_t j = 0; j < used; j += L) {
          V sv, dpv;
          std::memcpy(&sv, prob.data() + j, sizeof(V));
          std::memcpy(&dpv, dprob.data() + j, sizeof(V));
          sv = vexp<L>(sv - li);
          dpv = sv * (dpv - delta);
          std::memcpy(prob.data() + j, &sv, sizeof(V));
          std::memcpy(dprob.data() + j, &dpv, sizeof(V));
        }
        T* dqi = dq + qoff * D;
        // dq_i = scale * sum_j ds_j k_j (the P·V kernel with ds as weights and K rows as values)
        accumulate_values_any<T, L>(p.k + (b * N * H + h) * D, dprob.data(), runs.data(), nrun, chunks, dil2, H * D, D,
                                    dqi);
        for (int64_t d = 0; d < D; ++d) dqi[d] *= p.scale;
        for (int64_t r = 0; r < nrun; ++r) {
          const T* pr = prob.data() + r * chunks * L;
          const T* dsr = dprob.data() + r * chunks * L;
          for (int64_t j = 0; j < runs[r].count; ++j) {
            const int64_t koff = (b * N + runs[r].token + dil2 * j) * H + h;
            const T pj = pr[j], sds = p.scale * dsr[j];
            T* __restrict dkj = dk + koff * D;
            T* __restrict dvj = dv + koff * DV;
            for (int64_t d = 0; d < D; ++d) dkj[d] += sds * qi[d];
            for (int64_t c = 0; c < DV; ++c) dvj[c] += pj * doi[c];
            if (drpb) drpb[bh * R + runs[r].bias + j] += dsr[j];
            if (dkb) dkb[koff] += dsr[j];
          }
        }
        for (int64_t j = 0; j < NA; ++j) {
          const int64_t aoff = (b * NA + j) * H + h;
          const T* kj = p.addk + aoff * D;
          const T* vj = p.addv + aoff * DV;
          T s = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) s += qi[d] * kj[d];
          for (int64_t c = 0; c < DV; ++c) dp += doi[c] * vj[c];
          const T pj = std::exp(p.scale * s - li);
          const T ds = pj * (dp - delta);
          const T sds = p.scale * ds;
          T* dkj = daddk + aoff * D;
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += sds * kj[d];
            dkj[d] += sds * qi[d];
          }
          T* dvj = daddv + aoff * DV;
          for (int64_t c = 0; c < DV; ++c) dvj[c] += pj * doi[c];
        }
        (void)used;
      }
    }
  });
}

template <typename T>
Problem<T> make_problem(const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb,
                        const int64_t* shape, const int64_t* dil, const int64_t* rel_size,
                        const int64_t* const* tables, int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA,
                        double scale) {
  Problem<T> p{q, k, v, addk, addv, rpb, kb, Geometry{}, T(scale)};
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

// Narrow vectors when every window row fits in them, wide ones otherwise.
template <typename T>
void forward_any(const Problem<T>& p, T* out, T* lse, int64_t nthreads) {
  constexpr int W = 64 / sizeof(T);
  if (p.g.max_count(2) <= W / 2)
    forward<T, W / 2>(p, out, lse, nthreads);
  else
    forward<T, W>(p, out, lse, nthreads);
}

template <typename T>
void backward_any(const Problem<T>& p, const T* out, const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv,
                  T* daddk, T* daddv, T* drpb, T* dkb, int64_t nthreads) {
  constexpr int W = 64 / sizeof(T);
  if (p.g.max_count(2) <= W / 2)
    backward<T, W / 2>(p, out, lse, dout, dlse, dq, dk, dv, daddk, daddv, drpb, dkb, nthreads);
  else
    backward<T, W>(p, out, lse, dout, dlse, dq, dk, dv, daddk, daddv, drpb, dkb, nthreads);
}

}  // namespace

#define ATTNZOO_DEFINE(T, SUFFIX)                                                                                  \
  extern "C" void attnzoo_na_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* addk, const T* addv,    \
                                              const T* rpb, const T* kb, T* out, T* lse, const int64_t* shape,     \
                                              const int64_t* dil, const int64_t* rel_size,                         \
                                              const int64_t* const* tables, int64_t B, int64_t H, int64_t D,       \
                                              int64_t DV, int64_t NA, double scale, int64_t nthreads) {            \
    forward_any<T>(make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, B, H, D, DV, NA, scale), \
               out, lse, nthreads);                                                                                \
  }                                                                                                                \
  extern "C" void attnzoo_na_backward_##SUFFIX(                                                                    \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, const T* out,   \
      const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* daddk, T* daddv, T* drpb, T* dkb,        \
      const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables, int64_t B,  \
      int64_t H, int64_t D, int64_t DV, int64_t NA, double scale, int64_t nthreads) {                              \
    backward_any<T>(make_problem<T>(q, k, v, addk, addv, rpb, kb, shape, dil, rel_size, tables, B, H, D, DV, NA,       \
                                scale),                                                                            \
                out, lse, dout, dlse, dq, dk, dv, daddk, daddv, drpb, dkb, nthreads);                              \
  }

ATTNZOO_DEFINE(float, f32)
ATTNZOO_DEFINE(double, f64)
