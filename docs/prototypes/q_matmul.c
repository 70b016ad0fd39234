// A measurement, not part of Conclave: README, "Re-measured later on 2026-12-01" (part 10). Build and run:
//   gcc -O3 -march=native -fopenmp -shared -fPIC docs/prototypes/q_matmul.c -o /tmp/libq.so
//   OMP_NUM_THREADS=2 python -m workers.cpu_path docs.prototypes.q_matmul /tmp/libq.so   (MKL preloaded)
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#include <omp.h>
static inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a)); a = _mm_add_ss(a, _mm_movehdup_ps(a)); return _mm_cvtss_f32(a);
}
void q_matmul(const float* x, int rows, const uint32_t* w, const float* scales, const float* biases,
              float* y, int out, int in, int G, int bits) {
  int ng = in / G, wpr = in * bits / 32;
  if (G != 32 || rows > 16 || ng > 64 || (bits != 4 && bits != 8)) abort();  // what this prototype handles
  float xsum[16 * 64];
  for (int r = 0; r < rows; r++)
    for (int g = 0; g < ng; g++) { float s = 0; for (int i = 0; i < G; i++) s += x[r*in + g*G + i]; xsum[r*ng + g] = s; }
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), m4 = _mm256_set1_epi32(15);
  #pragma omp parallel for schedule(static)
  for (int o = 0; o < out; o++) {
    const uint32_t* wr = w + (long)o * wpr;
    __m256 acc[16]; float bsum[16];
    for (int r = 0; r < rows; r++) { acc[r] = _mm256_setzero_ps(); bsum[r] = 0; }
    for (int g = 0; g < ng; g++) {
      __m256 wv[4];  // the group's 32 weights as floats
      if (bits == 4) {
        for (int k = 0; k < 4; k++) {
          __m256i v = _mm256_set1_epi32((int)wr[g * 4 + k]);
          wv[k] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), m4));
        }
      } else {
        const uint8_t* bytes = (const uint8_t*)(wr + g * 8);
        for (int k = 0; k < 4; k++)
          wv[k] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(bytes + 8 * k))));
      }
      __m256 s = _mm256_set1_ps(scales[o * ng + g]);
      float b = biases[o * ng + g];
      for (int r = 0; r < rows; r++) {
        const float* xp = x + (long)r * in + g * G;
        __m256 d = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xp));
        d = _mm256_fmadd_ps(wv[1], _mm256_loadu_ps(xp + 8), d);
        d = _mm256_fmadd_ps(wv[2], _mm256_loadu_ps(xp + 16), d);
        d = _mm256_fmadd_ps(wv[3], _mm256_loadu_ps(xp + 24), d);
        acc[r] = _mm256_fmadd_ps(s, d, acc[r]);
        bsum[r] += b * xsum[r * ng + g];
      }
    }
    for (int r = 0; r < rows; r++) y[(long)r * out + o] = hsum(acc[r]) + bsum[r];
  }
}
