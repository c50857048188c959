// Fused neighborhood attention for CPUs (forward and backward), one generic 3-D kernel.
//
// Layout (NATTEN's): q, k [B, S0, S1, S2, H, D]; v [B, S0, S1, S2, H, DV], contiguous; 1-D and 2-D calls pass
// leading axes of extent 1. The geometry (which keys a query sees) is computed in Python and arrives as
// per-axis tables: query coordinate x attends to key coordinates start[x] + dil * j for j < count[x], and the
// relative-position index of its j-th key along that axis is rel[x] + j. Additional keys/values
// [B, NA, H, D|DV] join every query's softmax. The optional relative-position bias table is [H, R0, R1, R2]; the
// optional per-key bias kb [B, S0, S1, S2, H] is added to every logit of that key (-inf drops the key).
//
// Plain C ABI (no torch headers) so that it compiles in about a second with the system compiler; threads are
// std::thread so that no second OpenMP runtime is loaded next to PyTorch's.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

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
  int64_t max_keys() const {
    int64_t m = 1;
    for (int a = 0; a < 3; ++a) {
      int64_t c = 0;
      for (int64_t x = 0; x < ax[a].extent; ++x) c = std::max(c, ax[a].count[x]);
      m *= c;
    }
    return m + NA;
  }
};

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Enumerate the neighborhood of query token (z, y, x): key token indices and bias-table offsets.
inline int64_t gather_keys(const Geometry& g, int64_t z, int64_t y, int64_t x, int64_t* key, int64_t* bias) {
  const Axis &A0 = g.ax[0], &A1 = g.ax[1], &A2 = g.ax[2];
  int64_t n = 0;
  for (int64_t i = 0; i < A0.count[z]; ++i) {
    const int64_t kz = A0.start[z] + A0.dil * i, rz = A0.rel[z] + i;
    for (int64_t j = 0; j < A1.count[y]; ++j) {
      const int64_t ky = A1.start[y] + A1.dil * j, ry = A1.rel[y] + j;
      const int64_t row = (kz * A1.extent + ky) * A2.extent;
      const int64_t brow = (rz * A1.rel_size + ry) * A2.rel_size;
      const int64_t c = A2.count[x], s = A2.start[x], d = A2.dil, r = A2.rel[x];
      for (int64_t l = 0; l < c; ++l) {
        key[n] = row + s + d * l;
        bias[n] = brow + r + l;
        ++n;
      }
    }
  }
  return n;
}

template <typename Fn>
void parallel_for(int64_t n, int64_t nthreads, Fn fn) {
  nthreads = std::max<int64_t>(1, std::min(nthreads, n));
  if (nthreads == 1) {
    fn(0, n, 0);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  for (int64_t t = 1; t < nthreads; ++t) {
    const int64_t lo = t * chunk, hi = std::min(n, lo + chunk);
    if (lo < hi) pool.emplace_back(fn, lo, hi, t);
  }
  fn(0, std::min(n, chunk), 0);
  for (auto& th : pool) th.join();
}

template <typename T>
void forward(const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, T* out, T* lse,
             const Geometry& g, T scale, int64_t nthreads) {
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, NA = g.NA;
  const int64_t maxk = g.max_keys();
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  const int64_t S12 = g.ax[1].extent * g.ax[2].extent, S2 = g.ax[2].extent;
  // Work item = (batch, query token); all heads of a token share the key list.
  parallel_for(g.B * N, nthreads, [&](int64_t lo, int64_t hi, int64_t) {
    std::vector<int64_t> key(maxk), bias(maxk);
    std::vector<T> score(maxk), acc(DV);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / N, t = item % N;
      const int64_t z = t / S12, y = (t / S2) % g.ax[1].extent, x = t % S2;
      const int64_t nk = gather_keys(g, z, y, x, key.data(), bias.data());
      for (int64_t h = 0; h < H; ++h) {
        const T* qi = q + ((b * N + t) * H + h) * D;
        T m = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
          T s = scale * dot(qi, k + ((b * N + key[j]) * H + h) * D, D);
          if (rpb) s += rpb[h * R + bias[j]];
          if (kb) s += kb[(b * N + key[j]) * H + h];
          score[j] = s;
          m = std::max(m, s);
        }
        for (int64_t j = 0; j < NA; ++j) {
          const T s = scale * dot(qi, addk + ((b * NA + j) * H + h) * D, D);
          score[nk + j] = s;
          m = std::max(m, s);
        }
        const int64_t total = nk + NA;
        T* o = out + ((b * N + t) * H + h) * DV;
        if (m == -INFINITY) {  // every key dropped by kb: empty softmax
          std::fill(o, o + DV, T(0));
          lse[(b * N + t) * H + h] = -INFINITY;
          continue;
        }
        T l = 0;
#pragma omp simd reduction(+ : l)
        for (int64_t j = 0; j < total; ++j) {
          score[j] = std::exp(score[j] - m);
          l += score[j];
        }
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = 0; j < nk; ++j) axpy(score[j], v + ((b * N + key[j]) * H + h) * DV, acc.data(), DV);
        for (int64_t j = 0; j < NA; ++j) axpy(score[nk + j], addv + ((b * NA + j) * H + h) * DV, acc.data(), DV);
        const T inv = T(1) / l;
#pragma omp simd
        for (int64_t c = 0; c < DV; ++c) o[c] = acc[c] * inv;
        lse[(b * N + t) * H + h] = m + std::log(l);
      }
    }
  });
}

template <typename T>
void backward(const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb,
              const T* out, const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* daddk, T* daddv,
              T* drpb, T* dkb,
              const Geometry& g, T scale, int64_t nthreads) {
  // Work item = (batch, head): every write to dk/dv/daddk/daddv of that slice stays in one thread.
  // drpb is [B, H, R] so that batches never share a slot either; the caller sums over B.
  const int64_t N = g.tokens(), H = g.H, D = g.D, DV = g.DV, NA = g.NA;
  const int64_t maxk = g.max_keys();
  const int64_t R = g.ax[0].rel_size * g.ax[1].rel_size * g.ax[2].rel_size;
  const int64_t S12 = g.ax[1].extent * g.ax[2].extent, S2 = g.ax[2].extent;
  parallel_for(g.B * H, nthreads, [&](int64_t lo, int64_t hi, int64_t) {
    std::vector<int64_t> key(maxk), bias(maxk);
    std::vector<T> p(maxk);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / H, h = item % H;
      for (int64_t t = 0; t < N; ++t) {
        const int64_t z = t / S12, y = (t / S2) % g.ax[1].extent, x = t % S2;
        const int64_t nk = gather_keys(g, z, y, x, key.data(), bias.data());
        const int64_t qoff = ((b * N + t) * H + h);
        const T* qi = q + qoff * D;
        const T* doi = dout + qoff * DV;
        const T li = lse[qoff];
        if (li == -INFINITY) continue;  // empty softmax: no gradient
        const T delta = dot(doi, out + qoff * DV, DV) - (dlse ? dlse[qoff] : T(0));
        T* dqi = dq + qoff * D;
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t koff = (b * N + key[j]) * H + h;
          T s = scale * dot(qi, k + koff * D, D);
          if (rpb) s += rpb[h * R + bias[j]];
          if (kb) s += kb[koff];
          const T pj = std::exp(s - li);
          const T ds = pj * (dot(doi, v + koff * DV, DV) - delta);
          axpy(scale * ds, k + koff * D, dqi, D);
          axpy(scale * ds, qi, dk + koff * D, D);
          axpy(pj, doi, dv + koff * DV, DV);
          if (drpb) drpb[(b * H + h) * R + bias[j]] += ds;
          if (dkb) dkb[koff] += ds;
        }
        for (int64_t j = 0; j < NA; ++j) {
          const int64_t aoff = (b * NA + j) * H + h;
          const T pj = std::exp(scale * dot(qi, addk + aoff * D, D) - li);
          const T ds = pj * (dot(doi, addv + aoff * DV, DV) - delta);
          axpy(scale * ds, addk + aoff * D, dqi, D);
          axpy(scale * ds, qi, daddk + aoff * D, D);
          axpy(pj, doi, daddv + aoff * DV, DV);
        }
      }
    }
  });
}

Geometry make_geometry(const int64_t* shape, const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables,
                       int64_t B, int64_t H, int64_t D, int64_t DV, int64_t NA) {
  Geometry g;
  for (int a = 0; a < 3; ++a) {
    g.ax[a] = Axis{tables[3 * a], tables[3 * a + 1], tables[3 * a + 2], shape[a], dil[a], rel_size[a]};
  }
  g.B = B;
  g.H = H;
  g.D = D;
  g.DV = DV;
  g.NA = NA;
  return g;
}

}  // namespace

#define ATTNZOO_DEFINE(T, SUFFIX)                                                                                  \
  extern "C" void attnzoo_na_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* addk, const T* addv,    \
                                              const T* rpb, const T* kb, T* out, T* lse, const int64_t* shape,     \
                                              const int64_t* dil, const int64_t* rel_size,                         \
                                              const int64_t* const* tables, int64_t B, int64_t H, int64_t D,       \
                                              int64_t DV, int64_t NA, double scale, int64_t nthreads) {            \
    forward<T>(q, k, v, addk, addv, rpb, kb, out, lse, make_geometry(shape, dil, rel_size, tables, B, H, D, DV, NA),   \
               T(scale), nthreads);                                                                                \
  }                                                                                                                \
  extern "C" void attnzoo_na_backward_##SUFFIX(                                                                    \
      const T* q, const T* k, const T* v, const T* addk, const T* addv, const T* rpb, const T* kb, const T* out,   \
      const T* lse, const T* dout, const T* dlse, T* dq, T* dk, T* dv, T* daddk, T* daddv, T* drpb, T* dkb,        \
      const int64_t* shape,                                                                                        \
      const int64_t* dil, const int64_t* rel_size, const int64_t* const* tables, int64_t B, int64_t H, int64_t D,  \
      int64_t DV, int64_t NA, double scale, int64_t nthreads) {                                                    \
    backward<T>(q, k, v, addk, addv, rpb, kb, out, lse, dout, dlse, dq, dk, dv, daddk, daddv, drpb, dkb,           \
                make_geometry(shape, dil, rel_size, tables, B, H, D, DV, NA), T(scale), nthreads);                 \
  }

ATTNZOO_DEFINE(float, f32)
ATTNZOO_DEFINE(double, f64)
