"""What bounds the native kernel on this CPU: its peak vector FMA rate, and the rate of the kernel's own tile
micro-kernels (logits Q·Kᵀ and P·V of a 3-row lane tile, head_dim 32, kernel 7) on data that fits L1 and on rows
streamed from L2, in float32 FMAs per ns and as a fraction of the peak.

Peak: 16 independent chains of FMAs on 64-byte (and 32-byte) vectors. The micro-kernels are the kernel's templates
(``csrc/neighborhood.cpp`` is included, built with the kernel's flags), called on transposed key/value rows the way a
lane tile calls them: "plain" blocks load each lane's key at column start + j (unaligned loads), "border" blocks pick
it out of two vectors with a permute (clamped windows).

Run: ``python benchmarks/kernel_roofline.py`` (about 10 s; needs the C++ compiler the kernel is built with).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from attnzoo.ops.backends import _native_lib

DRIVER = r"""
#include "@SOURCE@"
#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace {
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <int BYTES>
double fma_peak(long n) {  // FMAs per ns, 16 independent chains
  using vec = typename Simd<float, BYTES / 4>::vec;
  vec a[16], x, y;
  for (int l = 0; l < BYTES / 4; ++l) { x[l] = 1.0000001f; y[l] = 0.999999f; }
  for (int i = 0; i < 16; ++i) a[i] = x * float(i);
  const double t = now();
  for (long k = 0; k < n; ++k) {
    ATTNZOO_UNROLL
    for (int i = 0; i < 16; ++i) a[i] = a[i] * x + y;  // in registers: 16 chains, each FMA-latency bound
  }
  const double dt = now() - t;
  float s = 0;
  for (int i = 0; i < 16; ++i) s += a[i][0];
  if (s == 1.0f) std::printf("%f", s);
  return n * 16.0 / dt / 1e9;
}
}  // namespace

int main() {
  constexpr int L = 16;
  const int64_t D = 32, RW = 56, K = 7;
  std::printf("peak_64 %.3f\npeak_32 %.3f\n", fma_peak<64>(50000000), fma_peak<32>(50000000) / 2);
  for (int64_t rows : {1, 64}) {
    std::vector<float> qt(3 * D * L, 0.01f), kt(rows * D * RW + 2 * L, 0.02f), S(3 * 8 * L), P(3 * 8 * L, 0.01f);
    std::vector<float> O(3 * D * L);
    const float* q3[3] = {qt.data(), qt.data() + D * L, qt.data() + 2 * D * L};
    float* s3[3] = {S.data(), S.data() + 8 * L, S.data() + 16 * L};
    const float* p3[3] = {P.data(), P.data() + 8 * L, P.data() + 16 * L};
    float* o3[3] = {O.data(), O.data() + D * L, O.data() + 2 * D * L};
    Simd<float, L>::index shift{};
    for (int i = 0; i < L; ++i) shift[i] = i;
    const long n = 400000;
    for (int border = 0; border < 2; ++border) {
      double t = now();
      for (long it = 0; it < n; ++it) {
        const float* row = kt.data() + (it * 7 % rows) * D * RW + (it & 7);
        if (border) tile_logits<float, L, 7, K, true>(q3, row, RW, D, 1.f, s3, shift);
        else tile_logits<float, L, 7, K, false>(q3, row, RW, D, 1.f, s3, shift);
        __asm__ volatile("" ::: "memory");
      }
      std::printf("logits_%s_%ld %.3f\n", border ? "border" : "plain", long(rows), n * 3.0 * K * D / (now() - t) / 1e9);
      t = now();
      for (long it = 0; it < n; ++it) {
        const float* row = kt.data() + (it * 7 % rows) * D * RW + (it & 7);
        TileValues<float, L, 7>::run(p3, row, RW, K, D, o3, border ? &shift : nullptr);
        __asm__ volatile("" ::: "memory");
      }
      std::printf("values_%s_%ld %.3f\n", border ? "border" : "plain", long(rows), n * 3.0 * K * D / (now() - t) / 1e9);
    }
    if (S[1] == 1.f && O[1] == 1.f) std::printf("\n");
  }
}
"""


def measure() -> dict[str, float]:
    """Compile and run the driver; FMAs per ns (64-byte vectors; the 32-byte peak as 64-byte equivalents)."""
    cxx = _native_lib._compiler()
    if cxx is None:
        raise SystemExit("kernel_roofline: no C++ compiler found (the native kernel needs one too)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "roofline.cpp", Path(tmp) / "roofline"
        src.write_text(DRIVER.replace("@SOURCE@", str(_native_lib.SOURCE)))
        flags = [f for f in _native_lib.FLAGS if f not in ("-shared", "-fPIC")]
        flags += _native_lib._threading_flags() + _native_lib._arch_flags(cxx)
        subprocess.run([cxx, *flags, str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
        lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    return {name: float(value) for name, value in zip(lines[::2], lines[1::2])}


def main(argv: list[str] | None = None) -> dict[str, float]:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    r = measure()
    peak = r["peak_64"]
    print(f"peak: {peak:.2f} FMA/ns on 64-byte vectors ({peak * 32:.0f} GFLOP/s fp32), "
          f"{r['peak_32']:.2f} on 32-byte vectors (as 64-byte equivalents)")  # fmt: skip
    for kind in ("logits", "values"):
        for where, rows in (("L1", 1), ("L2", 64)):
            rates = {block: r[f"{kind}_{block}_{rows}"] for block in ("plain", "border")}
            cells = ", ".join(f"{block} {rate:.2f} ({rate / peak:.0%})" for block, rate in rates.items())
            print(f"{kind:6s} tile, rows from {where}: {cells}")
    return r


if __name__ == "__main__":
    main()
