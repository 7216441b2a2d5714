/* The int8 multiply-accumulate peak of one core: 12 independent chains of AVX-512 VNNI
 * vpdpbusd (64 u8 x s8 products per instruction), so the loop is bound by the instruction's
 * throughput, not its latency. Prints GMAC/s for this thread; run one copy per core at once.
 *   gcc -O2 -mavx512f -mavx512bw -mavx512vnni benchmarks/vnni_peak.c -o /tmp/vnni_peak
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
  __m512i c[12];
  for (int j = 0; j < 12; j++) c[j] = _mm512_setzero_si512();
  const long n = 200000000;
  double t = now();
  for (long i = 0; i < n; i++) {
    c[0] = _mm512_dpbusd_epi32(c[0], a, b);
    c[1] = _mm512_dpbusd_epi32(c[1], a, b);
    c[2] = _mm512_dpbusd_epi32(c[2], a, b);
    c[3] = _mm512_dpbusd_epi32(c[3], a, b);
    c[4] = _mm512_dpbusd_epi32(c[4], a, b);
    c[5] = _mm512_dpbusd_epi32(c[5], a, b);
    c[6] = _mm512_dpbusd_epi32(c[6], a, b);
    c[7] = _mm512_dpbusd_epi32(c[7], a, b);
    c[8] = _mm512_dpbusd_epi32(c[8], a, b);
    c[9] = _mm512_dpbusd_epi32(c[9], a, b);
    c[10] = _mm512_dpbusd_epi32(c[10], a, b);
    c[11] = _mm512_dpbusd_epi32(c[11], a, b);
    __asm__ volatile("" : "+v"(a));
  }
  double dt = now() - t;
  __m512i s = c[0];
  for (int j = 1; j < 12; j++) s = _mm512_add_epi32(s, c[j]);
  int r = _mm512_reduce_add_epi32(s);
  printf("%.3f %d\n", (double)n * 12 * 64 / dt / 1e9, r & 1);
  return 0;
}
