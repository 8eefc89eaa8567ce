// y (M, O) = x (M, I) . W (O, I)^T for bfloat16 x and W (a Linear layer without bias), float32
// accumulation on the bfloat16 dot-product unit (vdpbf16ps), y rounded to bfloat16.
//
// Why: decoding multiplies one row by every weight matrix, a pass over the weights that is
// bound by memory bandwidth; torch's bfloat16 matrix-vector path (oneDNN) streams weights at
// about two thirds of the rate this loop reaches on the CPUs measured (docs/decisions.md).
// Four weight rows share each load of x; each thread takes a contiguous range of rows, so
// its reads are one sequential stream per row group.
#include <immintrin.h>
#include <stdint.h>

typedef uint16_t bf16;

static inline bf16 round_bf16(float x) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (bf16)((u >> 16) | 64);
    u += 0x7fff + ((u >> 16) & 1);
    return (bf16)(u >> 16);
}

// rows [o0, o1) of y for one row of x; I is a multiple of 32
static void linear_rows(const bf16 *x, const bf16 *w, int64_t I, int64_t o0, int64_t o1, bf16 *y) {
    int64_t o = o0;
    for (; o + 4 <= o1; o += 4) {
        const bf16 *w0 = w + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < I; i += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + i), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + i), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + i), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + i), xv);
        }
        y[o] = round_bf16(_mm512_reduce_add_ps(a0));
        y[o + 1] = round_bf16(_mm512_reduce_add_ps(a1));
        y[o + 2] = round_bf16(_mm512_reduce_add_ps(a2));
        y[o + 3] = round_bf16(_mm512_reduce_add_ps(a3));
    }
    for (; o < o1; o++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t i = 0; i < I; i += 32)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + o * I + i), (__m512bh)_mm512_loadu_si512(x + i));
        y[o] = round_bf16(_mm512_reduce_add_ps(a));
    }
}

int memtx_linear(const bf16 *x, const bf16 *w, int64_t M, int64_t I, int64_t O, bf16 *y, int threads) {
    if (I % 32 || M < 1 || O < 1 || threads < 1) return 2;
    int64_t chunk = ((O + threads - 1) / threads + 3) / 4 * 4;  // one contiguous range per thread
    int64_t n = (O + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < n; c++) {
            int64_t o0 = c * chunk, o1 = o0 + chunk < O ? o0 + chunk : O;
            linear_rows(x + m * I, w, I, o0, o1, y + m * O);
        }
    return 0;
}
