// y (M, O) = x (M, I) . W (O, I)^T in float32 for weights stored as GGUF's blocks of 32:
// Q4_1, w_j = d * q_j + m with 4-bit q_j, and Q8_0, w_j = d * q_j with 8-bit signed q_j (d, m
// float32, read from the file's float16). The float32 weights the model otherwise holds are
// exactly these values (d * q needs at most 19 bits; d * q + m rounds once, as the loader's
// dequantization does), so this is the same product as F.linear on them, summed in another order.
//
// Why: decoding multiplies one row by every weight matrix, a pass over the weights bound by
// memory bandwidth; 4.5 bits a weight (plus the float32 scales) instead of 32 is about a
// sixth of the bytes. Per block: sum_j (d q_j + m) x_j = d (sum_j q_j x_j) + m (sum_j x_j),
// the x sums computed once per block for all rows. AVX2 and FMA only: it runs on every x86-64
// CPU memtx meets. Q4_1: qs (O, I/2) bytes, block b's 16 bytes holding q_j (low nibble, j < 16)
// and q_{j+16} (high nibble), as in the file; dm (O, I/32, 2) float32 (d, m). Q8_0: qs (O, I)
// int8, d (O, I/32) float32.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define QB 32  // weights per block

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 q8(__m128i bytes) {  // 8 bytes (low half) -> 8 floats
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// rows [o0, o1) of y for one row of x; xs: the block sums of x
static void q4_rows(const float *x, const float *xs, const uint8_t *qs, const float *dm, int64_t I, int64_t o0,
                    int64_t o1, float *y) {
    int64_t nb = I / QB;
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t o = o0; o < o1; o++) {
        const uint8_t *q = qs + o * (I / 2);
        const float *s = dm + o * nb * 2;
        __m256 acc = _mm256_setzero_ps();
        float mterm = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + b * 16));
            __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            const float *xb = x + b * QB;
            __m256 t = _mm256_mul_ps(q8(lo), _mm256_loadu_ps(xb));
            t = _mm256_fmadd_ps(q8(_mm_unpackhi_epi64(lo, lo)), _mm256_loadu_ps(xb + 8), t);
            t = _mm256_fmadd_ps(q8(hi), _mm256_loadu_ps(xb + 16), t);
            t = _mm256_fmadd_ps(q8(_mm_unpackhi_epi64(hi, hi)), _mm256_loadu_ps(xb + 24), t);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[2 * b]), t, acc);
            mterm += s[2 * b + 1] * xs[b];
        }
        y[o] = hsum(acc) + mterm;
    }
}

// rows [o0, o1) of y for one row of x, Q8_0 weights
static void q8_rows(const float *x, const int8_t *qs, const float *d, int64_t I, int64_t o0, int64_t o1, float *y) {
    int64_t nb = I / QB;
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *q = qs + o * I;
        const float *s = d + o * nb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *qb = q + b * QB;
            const float *xb = x + b * QB;
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb))),
                                     _mm256_loadu_ps(xb));
            for (int j = 8; j < QB; j += 8)
                t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + j)))),
                                    _mm256_loadu_ps(xb + j), t);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s[b]), t, acc);
        }
        y[o] = hsum(acc);
    }
}

int memtx_q8_linear(const float *x, const int8_t *qs, const float *d, int64_t M, int64_t I, int64_t O, float *y,
                    int threads) {
    if (I % QB || M < 1 || O < 1 || threads < 1) return 2;
    int64_t chunk = (O + threads - 1) / threads;
    int64_t n = (O + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < n; c++) {
            int64_t o0 = c * chunk, o1 = o0 + chunk < O ? o0 + chunk : O;
            q8_rows(x + m * I, qs, d, I, o0, o1, y + m * O);
        }
    return 0;
}

int memtx_q4_linear(const float *x, const uint8_t *qs, const float *dm, int64_t M, int64_t I, int64_t O, float *y,
                    int threads) {
    if (I % QB || M < 1 || O < 1 || threads < 1) return 2;
    int64_t nb = I / QB;
    float *xs = malloc(M * nb * sizeof(float));
    if (!xs) return 1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            float a = 0.0f;
            for (int j = 0; j < QB; j++) a += x[m * I + b * QB + j];
            xs[m * nb + b] = a;
        }
    int64_t chunk = (O + threads - 1) / threads;  // one contiguous range of rows per thread
    int64_t n = (O + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < n; c++) {
            int64_t o0 = c * chunk, o1 = o0 + chunk < O ? o0 + chunk : O;
            q4_rows(x + m * I, xs + m * nb, qs, dm, I, o0, o1, y + m * O);
        }
    free(xs);
    return 0;
}
