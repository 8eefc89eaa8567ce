// Attention with its log-sum-exp for bfloat16 on CPUs with AVX512-BF16, head dim 64.
//
// Why: torch's CPU flash kernel runs bfloat16 at float32 speed here (~1.5 ns per query-key
// score on 2 cores, the same in both dtypes), while this CPU's bfloat16 dot-product unit
// (vdpbf16ps) is ~4x float32's. Both products (q.k and p.v) run on it with float32
// accumulation; the softmax runs in float32, online over blocks of KB keys (flash style), and
// the probabilities are rounded to bfloat16 for p.v as torch's kernel does. memtx compiles this
// file on first use (kernels/attn.py) and falls back to torch's kernel when it cannot.
//
// Layout: K is repacked per call so that one 512-bit load holds one dimension pair of 16 keys
// (the operand vdpbf16ps wants), V so that one load holds 16 dimensions of a key pair.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define D 64
#define MT 32   // query rows per task: its scores (MT x KB floats, 32 KB) stay in L1/L2
#define KB 256  // keys per softmax block
#define R 4     // rows per p.v micro-kernel: 16 accumulators of 32 (and the rows' padding)
#define RQ 8    // rows per q.k micro-kernel (qk_rows): 16 accumulators

typedef uint16_t bf16;

// Scratch for packed keys and values, kept per calling thread between calls and grown as
// needed. A fresh allocation per call (megabytes: glibc maps it anew once the heap is trimmed)
// was paged in on every call: first touches cost ~1 ns per byte on this VM, as much as the
// attention itself at 192 queries per key.
static __thread char *ws_ptr = NULL;
static __thread size_t ws_size = 0;
static char *workspace(size_t n) {
    n = (n + 63) / 64 * 64;
    if (n > ws_size) {
        free(ws_ptr);
        ws_ptr = aligned_alloc(64, n);
        ws_size = ws_ptr ? n : 0;
        if (ws_ptr) memset(ws_ptr, 0, n);  // touched now, once
    }
    return ws_ptr;
}

static inline __m512 exp512(__m512 x) {  // e^x for x <= 0; exactly 0 below -87
    __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // |y| <= 0.347
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(ok, _mm512_scalef_ps(p, n));
}

// bfloat16 -> float32 for 16 values
static inline __m512 bf16x16(const bf16 *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// K (S, D) -> Kp[Sp/16][D/2][16][2], zero-padded to Sp keys: per 16 keys and dimension pair, one vector.
static void pack_k(const bf16 *k, int64_t S, int64_t Sp, bf16 *kp) {
    for (int64_t j0 = 0; j0 < Sp; j0 += 16)
        for (int p = 0; p < D / 2; p++) {
            uint32_t *dst = (uint32_t *)(kp + (j0 * D) + p * 32);
            for (int j = 0; j < 16; j++)
                dst[j] = j0 + j < S ? *(const uint32_t *)(k + (j0 + j) * D + 2 * p) : 0;
        }
}

// V (S, D) -> Vp[Sp/2][D][2], zero-padded to Sp keys: per pair of keys, the D dims interleaved.
static void pack_v(const bf16 *v, int64_t S, int64_t Sp, bf16 *vp) {
    for (int64_t j = 0; j < Sp; j += 2) {
        bf16 *dst = vp + j * D;
        for (int d = 0; d < D; d++) {
            dst[2 * d] = j < S ? v[j * D + d] : 0;
            dst[2 * d + 1] = j + 1 < S ? v[(j + 1) * D + d] : 0;
        }
    }
}

// s[r][0..n) = q[r] . k[j0 + ..] for r < rows (a constant: 4 or RQ), n a multiple of 32 (padded
// keys are zero). 8 rows: 16 accumulators per pair of key loads (10-20% faster than 4 rows,
// attn_kernel_timing.py); 4 rows where fewer are left (decoding: 3 rows).
// Packed keys come in groups of 32 (2 x 16 keys, 32 x D bf16): kg[g] is group g's (contiguous
// packing: kp + 32 g D; memory blocks packed where they are stored: each block's own groups).
static inline __attribute__((always_inline)) void qk_rows(const bf16 *q, const bf16 *const *kg, int64_t n, float *s,
                                                          const int rows) {
    for (int64_t j = 0; j < n; j += 32) {
        __m512 acc[RQ][2];
        for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const bf16 *kb = kg[j / 32];
#pragma GCC unroll 8
        for (int p = 0; p < D / 2; p++) {
            __m512bh k0 = (__m512bh)_mm512_loadu_si512(kb + p * 32);
            __m512bh k1 = (__m512bh)_mm512_loadu_si512(kb + 16 * D + p * 32);
            for (int r = 0; r < rows; r++) {
                __m512bh qb = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(q + r * D + 2 * p));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
            }
        }
        for (int r = 0; r < rows; r++) {
            _mm512_storeu_ps(s + r * KB + j, acc[r][0]);
            _mm512_storeu_ps(s + r * KB + j + 16, acc[r][1]);
        }
    }
}

#define MAXG (KB / 32)  // groups of 32 keys per softmax block

static inline void groups(const bf16 *p, int64_t n, const bf16 **g) {  // contiguous packing
    for (int64_t i = 0; i < n / 32; i++) g[i] = p + i * 32 * D;
}

static inline void qk_tile(const bf16 *q, const bf16 *kp, int64_t n, float *s) {  // n <= KB
    const bf16 *kg[MAXG];
    groups(kp, n, kg);
    qk_rows(q, kg, n, s, RQ);
}

// o[r][:] += sum_j p[r][j] v[j][:], n a multiple of 32 (padded probabilities are zero); values
// packed in groups of 32 keys as keys are: vg[g] holds keys 32g.. as 16 pairs of (D, 2)
static inline void pv_tile(const bf16 *p, const bf16 *const *vg, int64_t n, float *o) {
    __m512 acc[R][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o + r * D + 16 * c);
    for (int64_t j = 0; j < n; j += 2) {
        const bf16 *vb = vg[j / 32] + (j % 32) * D;
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(vb);
        __m512bh v1 = (__m512bh)_mm512_loadu_si512(vb + 32);
        __m512bh v2 = (__m512bh)_mm512_loadu_si512(vb + 64);
        __m512bh v3 = (__m512bh)_mm512_loadu_si512(vb + 96);
        for (int r = 0; r < R; r++) {
            __m512bh pb = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(p + r * KB + j));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pb, v0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pb, v1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], pb, v2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], pb, v3);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + r * D + 16 * c, acc[r][c]);
}

// One task: rows [i0, i0 + m) of batch b.
// o_init / l_init (or NULL): an attention over other keys (output, log-sum-exp) to continue from,
// so the result is the attention over both (flash-attention's merge, without a second pass).
// kg / vg (or NULL: kp / vp packed contiguously): the S32 / 32 groups of packed keys and values.
static void tile(const bf16 *q, const bf16 *kp, const bf16 *vp, const bf16 *const *kg, const bf16 *const *vg,
                 const float *bias, int64_t S, int64_t S16, int64_t causal_t, float scale, int64_t i0, int64_t m,
                 bf16 *out, float *lse, const bf16 *o_init, const float *l_init) {
    bf16 qt[MT * D] __attribute__((aligned(64)));
    float s[MT * KB] __attribute__((aligned(64)));
    bf16 pb[MT * KB] __attribute__((aligned(64)));
    float o[MT * D] __attribute__((aligned(64)));
    float mx[MT], l[MT];
    int64_t mr = (m + R - 1) / R * R;
    memset(qt, 0, sizeof(qt));
    memcpy(qt, q + i0 * D, m * D * sizeof(bf16));
    memset(o, 0, sizeof(o));
    int64_t lim[MT];  // keys allowed per row: [0, lim)
    int64_t jmax = 0;
    for (int64_t r = 0; r < mr; r++) {
        mx[r] = -INFINITY;
        l[r] = 0.0f;
        lim[r] = S;
        if (causal_t > 0 && r < m) lim[r] = S - causal_t + (i0 + r) % causal_t + 1;
        if (r >= m) lim[r] = 0;
        if (lim[r] > jmax) jmax = lim[r];
        if (o_init && r < m && l_init[i0 + r] > -INFINITY) {  // start from the other keys' state
            mx[r] = l_init[i0 + r];
            l[r] = 1.0f;
            for (int c = 0; c < D; c += 16) _mm512_storeu_ps(o + r * D + c, bf16x16(o_init + (i0 + r) * D + c));
        }
    }
    __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < jmax; j0 += KB) {
        int64_t n = S16 - j0 < KB ? S16 - j0 : KB;  // keys in this block (multiple of 16)
        int64_t n32 = (n + 31) / 32 * 32;            // qk_tile works in 32s; Kp has room (S32 padding)
        const bf16 *kl[MAXG], *vl[MAXG];
        const bf16 *const *kb = kg ? kg + j0 / 32 : kl, *const *vb = vg ? vg + j0 / 32 : vl;
        if (!kg) groups(kp + j0 * D, n32, kl), groups(vp + j0 * D, n32, vl);
        for (int64_t r = 0; r < mr; r += mr - r >= RQ ? RQ : R) {
            if (mr - r >= RQ) qk_rows(qt + r * D, kb, n32, s + r * KB, RQ);
            else qk_rows(qt + r * D, kb, n32, s + r * KB, R);
        }
        for (int64_t r = 0; r < mr; r++) {
            float *sr = s + r * KB;
            int64_t valid = lim[r] - j0;  // keys of this block the row may see
            if (valid > n) valid = n;
            __m512 vm = _mm512_set1_ps(-INFINITY);
            for (int64_t j = 0; j < n; j += 16) {
                int64_t left = valid - j;
                __mmask16 keep = left >= 16 ? 0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
                __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), vscale);
                if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(keep, bias + j0 + j));
                x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, x);
                _mm512_storeu_ps(sr + j, x);
                vm = _mm512_max_ps(vm, x);
            }
            float bm = _mm512_reduce_max_ps(vm);
            float mn = bm > mx[r] ? bm : mx[r];
            bf16 *pr = pb + r * KB;
            if (mn == -INFINITY) {  // nothing seen yet: zero weights
                memset(pr, 0, n32 * sizeof(bf16));
                continue;
            }
            float alpha = expf(mx[r] - mn);  // 0 when mx was -inf
            __m512 vmn = _mm512_set1_ps(mn), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vmn));
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256((__m256i *)(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
            }
            for (int64_t j = n; j < n32; j++) pr[j] = 0;
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            mx[r] = mn;
            if (alpha != 1.0f) {
                __m512 va = _mm512_set1_ps(alpha);
                for (int c = 0; c < D; c += 16) _mm512_storeu_ps(o + r * D + c, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + c), va));
            }
        }
        for (int64_t r = 0; r < mr; r += R) pv_tile(pb + r * KB, vb, n32, o + r * D);
    }
    for (int64_t r = 0; r < m; r++) {
        float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
        __m512 vi = _mm512_set1_ps(inv);
        for (int c = 0; c < D; c += 16)
            _mm256_storeu_si256((__m256i *)(out + (i0 + r) * D + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + r * D + c), vi)));
        lse[i0 + r] = l[r] > 0 ? mx[r] + logf(l[r]) : -INFINITY;
    }
}

// q (B, M, D), k/v (B, S, D) bf16, rows contiguous, batches qs/ks/vs elements apart; bias (B, S)
// float32 or NULL (added to the scaled scores; -inf masks); causal_t > 0: row i sees keys
// j <= S - causal_t + i % causal_t (G query heads of causal_t tokens folded into M, keys aligned
// bottom-right). out (B, M, D) bf16 and lse (B, M) float32, contiguous. A row that sees no key
// gets out 0 and lse -inf. Returns 0, or 1 when out of memory.
int memtx_attention(const bf16 *q, const bf16 *k, const bf16 *v, const float *bias, int64_t B, int64_t M, int64_t S,
                    int64_t qs, int64_t ks, int64_t vs, int64_t causal_t, float scale, const bf16 *o_init,
                    const float *l_init, bf16 *out, float *lse, int threads) {
    int64_t S16 = (S + 15) / 16 * 16, S32 = (S + 31) / 32 * 32;
    size_t part = (size_t)B * S32 * D * sizeof(bf16);
    char *ws = workspace(2 * part);
    if (!ws) return 1;
    bf16 *kp = (bf16 *)ws, *vp = (bf16 *)(ws + part);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        pack_k(k + b * ks, S, S32, kp + b * S32 * D);
        pack_v(v + b * vs, S, S32, vp + b * S32 * D);
    }
    int64_t tiles = (M + MT - 1) / MT;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t t = 0; t < B * tiles; t++) {
        int64_t b = t / tiles, i0 = (t % tiles) * MT, m = M - i0 < MT ? M - i0 : MT;
        tile(q + b * qs, kp + b * S32 * D, vp + b * S32 * D, NULL, NULL, bias ? bias + b * S : NULL, S, S16, causal_t,
             scale, i0, m, out + b * M * D, lse + b * M, o_init ? o_init + b * M * D : NULL,
             o_init ? l_init + b * M : NULL);
    }
    return 0;
}

// Block maxima of exact logits, for block selection: out[h][i][c] = max over the keys j of block
// i (b keys, j < n_valid) of keys[h][j] . voters[h][c], -inf for a block with no valid key.
// keys (KV, N, D) bf16, rows contiguous, heads ks elements apart, N a multiple of b (b a multiple
// of R); voters (KV, Qn, D) bf16, heads vs apart; out (KV, N/b, Qn) float32. The micro-kernel is
// q.k's above with the roles swapped: R keys broadcast, 32 voters per pair of vectors. Fusing the
// maxima into the product skips writing (and converting) the full (N, Qn) logits.
int memtx_block_max(const bf16 *keys, const bf16 *voters, int64_t KV, int64_t N, int64_t Qn, int64_t ks, int64_t vs,
                    int64_t b, int64_t n_valid, float *out, int threads) {
    int64_t Q32 = (Qn + 31) / 32 * 32, nb = N / b;
    if (Q32 > KB || b % RQ) return 2;
    bf16 *vp = aligned_alloc(64, KV * Q32 * D * sizeof(bf16));
    if (!vp) return 1;
    for (int64_t h = 0; h < KV; h++) pack_k(voters + h * vs, Qn, Q32, vp + h * Q32 * D);
    const int64_t per = 8;  // blocks per task
    int64_t tasks_h = (nb + per - 1) / per;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t t = 0; t < KV * tasks_h; t++) {
        int64_t h = t / tasks_h, i0 = (t % tasks_h) * per, i1 = i0 + per < nb ? i0 + per : nb;
        float s[RQ * KB] __attribute__((aligned(64)));
        for (int64_t i = i0; i < i1; i++) {
            float *o = out + (h * nb + i) * Qn;
            int64_t rows = n_valid - i * b;  // valid keys of this block
            if (rows > b) rows = b;
            for (int64_t c = 0; c < Qn; c++) o[c] = -INFINITY;
            for (int64_t r0 = 0; r0 < rows; r0 += RQ) {
                qk_tile(keys + h * ks + (i * b + r0) * D, vp + h * Q32 * D, Q32, s);
                int64_t rr = rows - r0 < RQ ? rows - r0 : RQ;
                for (int64_t r = 0; r < rr; r++) {
                    int64_t c = 0;
                    for (; c + 16 <= Qn; c += 16)
                        _mm512_storeu_ps(o + c, _mm512_max_ps(_mm512_loadu_ps(o + c), _mm512_loadu_ps(s + r * KB + c)));
                    for (; c < Qn; c++) o[c] = o[c] > s[r * KB + c] ? o[c] : s[r * KB + c];
                }
            }
        }
    }
    free(vp);
    return 0;
}

// Reorder (s, id)[0..n) so that the first k hold the k largest scores; returns the smallest of
// them (quickselect, Hoare partition: [0, lo) >= [lo, hi] >= (hi, n) throughout).
static float select_top(float *s, int64_t *id, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float a = s[lo], b = s[(lo + hi) / 2], c = s[hi];  // median of three as the pivot
        float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (s[i] > pivot) i++;
            while (s[j] < pivot) j--;
            if (i <= j) {
                float ts = s[i];
                int64_t ti = id[i];
                s[i] = s[j], id[i] = id[j], s[j] = ts, id[j] = ti;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else break;  // s[want] equals the pivot, as does everything between j and i
    }
    float t = s[0];
    for (int64_t a = 1; a < k; a++) t = s[a] < t ? s[a] : t;
    return t;
}

// Cut (s, id)[0..*n) to the entries >= t, for a t with at least m of them and few more, found by
// bisection on the values with vector counts (no branches per entry); returns t and sets *n. A
// quickselect to exactly m (select_top) mispredicts about every other comparison: ~1 us per
// 128 entries, which was most of the far scan's time below ~20,000 keys. With many equal
// values the count can stay far above m; the caller then falls back to select_top.
static float trim_top(float *s, int64_t *id, int64_t *n, int64_t m) {
    int64_t N = *n;
    __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
    for (int64_t a = 0; a < N; a += 16) {
        __mmask16 in = N - a >= 16 ? 0xFFFF : (__mmask16)((1u << (N - a)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(in, s + a);
        vlo = _mm512_mask_min_ps(vlo, in, vlo, x);
        vhi = _mm512_mask_max_ps(vhi, in, vhi, x);
    }
    float lo = _mm512_reduce_min_ps(vlo), hi = _mm512_reduce_max_ps(vhi);  // count(>= lo) = N >= m
    int64_t cnt = N;
    for (int it = 0; it < 24 && cnt > m + m / 8; it++) {
        float mid = 0.5f * (lo + hi);
        if (!(mid > lo && mid < hi)) break;  // float resolution reached (equal values)
        __m512 vm = _mm512_set1_ps(mid);
        int64_t c = 0;
        for (int64_t a = 0; a < N; a += 16) {
            __mmask16 in = N - a >= 16 ? 0xFFFF : (__mmask16)((1u << (N - a)) - 1);
            c += __builtin_popcount(_mm512_mask_cmp_ps_mask(in, _mm512_loadu_ps(s + a), vm, _CMP_GE_OQ));
        }
        if (c >= m) lo = mid, cnt = c;
        else hi = mid;
    }
    __m512 vt = _mm512_set1_ps(lo);
    int64_t w = 0;
    for (int64_t a = 0; a < N; a += 16) {  // compress in place: writes never pass the reads
        __mmask16 in = N - a >= 16 ? 0xFFFF : (__mmask16)((1u << (N - a)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(in, s + a);
        __mmask16 keep = _mm512_mask_cmp_ps_mask(in, x, vt, _CMP_GE_OQ);
        __m512i i0 = _mm512_maskz_loadu_epi64((__mmask8)in, id + a);
        __m512i i1 = _mm512_maskz_loadu_epi64((__mmask8)(in >> 8), id + a + 8);
        _mm512_mask_compressstoreu_ps(s + w, keep, x);
        _mm512_mask_compressstoreu_epi64(id + w, (__mmask8)keep, i0);
        int c0 = __builtin_popcount(keep & 0xFF);
        _mm512_mask_compressstoreu_epi64(id + w + c0, (__mmask8)(keep >> 8), i1);
        w += __builtin_popcount(keep);
    }
    *n = w;
    return lo;
}

// float32 -> bfloat16 rounded to nearest even (as torch).
static inline bf16 to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
// float32 q . bfloat16 k over D = 64 dims, float32 products and sum
static inline float dot_fb(const float *q, const bf16 *k) {
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), bf16x16(k));
    a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16), bf16x16(k + 16), a);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 32), bf16x16(k + 32), a);
    a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 48), bf16x16(k + 48), a);
    return _mm512_reduce_add_ps(a);
}

// Attention of query i's G heads (qa (G, T, D)) over the kk keys cand[0..kk) of keys / values,
// scores scale * q.k - bias in float32: out (G, T, D) float32, lse (G, T); kk = 0: out 0,
// lse -inf. ex: room for kk floats.
static void attend_rows(const bf16 *keys, const bf16 *values, const bf16 *qa, const int64_t *cand, int64_t kk,
                        int64_t i, int64_t T, int64_t G, float scale, float bias, float *ex, float *out, float *lse) {
    float qf[D] __attribute__((aligned(64)));
    for (int64_t g = 0; g < G; g++) {
        float *o = out + (g * T + i) * D;
        if (kk == 0) {
            memset(o, 0, D * sizeof(float));
            lse[g * T + i] = -INFINITY;
            continue;
        }
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(qf + d, bf16x16(qa + (g * T + i) * D + d));
        float mx = -INFINITY;
        for (int64_t a = 0; a < kk; a++) {
            ex[a] = dot_fb(qf, keys + cand[a] * D) * scale - bias;
            if (ex[a] > mx) mx = ex[a];
        }
        float sum = 0;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t a = 0; a < kk; a++) {
            float w = expf(ex[a] - mx);
            sum += w;
            __m512 vw = _mm512_set1_ps(w);
            const bf16 *vr = values + cand[a] * D;
            for (int c4 = 0; c4 < 4; c4++) acc[c4] = _mm512_fmadd_ps(vw, bf16x16(vr + 16 * c4), acc[c4]);
        }
        __m512 inv = _mm512_set1_ps(1.0f / sum);
        for (int c4 = 0; c4 < 4; c4++) _mm512_storeu_ps(o + 16 * c4, _mm512_mul_ps(acc[c4], inv));
        lse[g * T + i] = mx + logf(sum);
    }
}

// Far reads, token by token, fused: each query's own top k keys among rows [0, bound[i]) of
// keys (N, D), then attention over them for the G heads that share the search.
//  1. shortlist: the m (>= k) rows with the largest bfloat16 products with qs[i] rounded to
//     bfloat16, float32 sums. 32 queries per task; the micro-kernel is q.k's with the roles
//     swapped (R keys broadcast, 32 queries per pair of vectors); a key is kept only when it
//     beats its query's threshold, a vector compare across 16 queries; each query stops at its
//     own bound. No (N, T) score matrix is written;
//  2. exact: the shortlist rescored with the float32 qs[i]; its best k kept (all of it when the
//     bound is <= m: then the result is the exact top k);
//  3. attention: for each g, scores scale * qa[g][i] . key - bias over those k keys in float32,
//     softmax, weighted sum of their values: out (G, T, D) float32, lse (G, T); a query with no
//     key (bound 0) gets out 0 and lse -inf. ids (T, k): the keys read (-1 past the count), or NULL.
// No (T, k) gather of keys or values is written: the torch path it replaces gathered the
// shortlist's keys, the chosen keys and values, and ran ~30 small torch ops per chunk.
// Pages (Quest, Tang et al. 2024; kmin / kmax non-NULL, pages > 0): a task scans only the
// union of its queries' `pages` best blocks of bs rows each (all of a query's blocks when it has
// no more), ranked per query by the bound sum_c max(q_c kmin[b][c], q_c kmax[b][c]) >= q . k of
// every key of block b (kmin / kmax (nb, D) float32: per-channel key minimum and maximum).
static int64_t union_pages(const float *qs, const int64_t *bnd, int64_t nq, const float *kmin, const float *kmax,
                           int64_t bs, int64_t pages, float *ub, int64_t *bid, uint8_t *mark, int64_t nbt,
                           int64_t *blocks) {
    memset(mark, 0, nbt);
    for (int64_t c = 0; c < nq; c++) {
        int64_t nb = (bnd[c] + bs - 1) / bs;
        if (nb <= pages) {
            memset(mark, 1, nb);
            continue;
        }
        __m512 qv[4];
        for (int c4 = 0; c4 < 4; c4++) qv[c4] = _mm512_loadu_ps(qs + c * D + 16 * c4);
        for (int64_t b = 0; b < nb; b++) {
            __m512 a = _mm512_setzero_ps();
            for (int c4 = 0; c4 < 4; c4++) {
                __m512 lo = _mm512_mul_ps(qv[c4], _mm512_loadu_ps(kmin + b * D + 16 * c4));
                __m512 hi = _mm512_mul_ps(qv[c4], _mm512_loadu_ps(kmax + b * D + 16 * c4));
                a = _mm512_add_ps(a, _mm512_max_ps(lo, hi));
            }
            ub[b] = _mm512_reduce_add_ps(a);
            bid[b] = b;
        }
        select_top(ub, bid, nb, pages);
        for (int64_t u = 0; u < pages; u++) mark[bid[u]] = 1;
    }
    int64_t n = 0;
    for (int64_t b = 0; b < nbt; b++)
        if (mark[b]) blocks[n++] = b;
    return n;
}

int memtx_far_attention(const bf16 *keys, const bf16 *values, const float *qs, const bf16 *qa,
                        const int64_t *bound, int64_t T, int64_t G, int64_t k, int64_t m, float scale, float bias,
                        const float *kmin, const float *kmax, int64_t bs, int64_t pages, float *out, float *lse,
                        int64_t *ids, int threads) {
    if (k <= 0 || m < k || (pages > 0 && (!kmin || !kmax || bs <= 0 || bs % RQ))) return 2;
    int64_t tasks = (T + 31) / 32;
    int fail = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t q0 = t * 32, nq = T - q0 < 32 ? T - q0 : 32;
        bf16 qb[32 * D] __attribute__((aligned(64)));
        bf16 vp[32 * D] __attribute__((aligned(64)));
        float s[RQ * KB] __attribute__((aligned(64)));
        bf16 tail[RQ * D] __attribute__((aligned(64)));
        float thr[32] __attribute__((aligned(64)));
        int64_t size[32], bnd[32], nmax = 0;
        // per query: a buffer of 2m candidates (scores above its threshold); when full, it is cut
        // to about its best m (trim_top) and the cut becomes the threshold. A quickselect to
        // exactly m there made the scan 10.9 vs 8.6 ms (one head, 512 queries, 56,000 real keys
        // of the Lua run at 64K) and 2.1 vs 1.1 ms at 1,024 keys (scratch A/B, one process).
        int64_t cap = 2 * m;
        float *hs = malloc(32 * cap * sizeof(float) + m * sizeof(float));
        int64_t *hi = malloc(32 * cap * sizeof(int64_t));
        if (!hs || !hi) {
            fail = 1;
            free(hs);
            free(hi);
            continue;
        }
        float *ex = hs + 32 * cap;  // exact scores of one query's shortlist
        for (int64_t c = 0; c < nq; c++)
            for (int d = 0; d < D; d++) qb[c * D + d] = to_bf16(qs[(q0 + c) * D + d]);
        pack_k(qb, nq, 32, vp);
        for (int c = 0; c < 32; c++) {
            bnd[c] = c < nq ? bound[q0 + c] : 0;
            thr[c] = bnd[c] > 0 ? -INFINITY : INFINITY;  // no rows (or a padded query): never takes one
            size[c] = 0;
            if (bnd[c] > nmax) nmax = bnd[c];
        }
        // the rows scanned: [0, nmax), or the task's pages (runs of bs rows)
        int64_t nbt = pages > 0 ? (nmax + bs - 1) / bs : 0, nruns = 1, *blocks = NULL;
        float *ub = NULL;
        if (pages > 0) {
            ub = malloc(nbt * (sizeof(float) + 2 * sizeof(int64_t) + 1) + 64);
            if (!ub) {
                fail = 1;
                free(hs);
                free(hi);
                continue;
            }
            int64_t *bid = (int64_t *)(ub + nbt + 8 - (nbt % 8));
            blocks = bid + nbt;
            nruns = union_pages(qs + q0 * D, bnd, nq, kmin, kmax, bs, pages, ub, bid, (uint8_t *)(blocks + nbt), nbt,
                                blocks);
        }
        for (int64_t run = 0; run < nruns; run++) {
            int64_t j0 = blocks ? blocks[run] * bs : 0, j1 = blocks ? (j0 + bs < nmax ? j0 + bs : nmax) : nmax;
            for (int64_t j = j0; j < j1; j += RQ) {
                const bf16 *kr = keys + j * D;
                int64_t rr = j1 - j < RQ ? j1 - j : RQ;
                if (rr < RQ) {
                    memset(tail, 0, sizeof(tail));
                    memcpy(tail, kr, rr * D * sizeof(bf16));
                    kr = tail;
                }
                qk_tile(kr, vp, 32, s);
                for (int64_t r = 0; r < rr; r++)
                    for (int c0 = 0; c0 < 32; c0 += 16) {
                        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + r * KB + c0), _mm512_loadu_ps(thr + c0), _CMP_GT_OQ);
                        while (hit) {
                            int c = c0 + __builtin_ctz(hit);
                            hit &= hit - 1;
                            if (j + r >= bnd[c]) {  // past this query's bound: it takes nothing more
                                thr[c] = INFINITY;
                                continue;
                            }
                            hs[c * cap + size[c]] = s[r * KB + c];
                            hi[c * cap + size[c]++] = j + r;
                            if (size[c] == cap) {  // keep ~m of them: a cheap cut, exact only on many ties
                                thr[c] = trim_top(hs + c * cap, hi + c * cap, &size[c], m);
                                if (2 * size[c] > cap + m) {
                                    thr[c] = select_top(hs + c * cap, hi + c * cap, size[c], m);
                                    size[c] = m;
                                }
                            }
                        }
                    }
            }
        }
        free(ub);
        for (int64_t c = 0; c < nq; c++) {
            if (size[c] > m) {  // exactly the best m (the shortlist retrieve_far takes)
                trim_top(hs + c * cap, hi + c * cap, &size[c], m);
                if (size[c] > m) select_top(hs + c * cap, hi + c * cap, size[c], m);
                size[c] = m;
            }
            int64_t i = q0 + c, n = size[c], *cand = hi + c * cap;
            int64_t kk = n < k ? n : k;
            // exact scores; the best kk of them (then best first when the ids are asked for:
            // an insertion sort of the whole shortlist took ~1.5 us per query)
            for (int64_t a = 0; a < n; a++) ex[a] = dot_fb(qs + i * D, keys + cand[a] * D);
            if (n > kk) {
                trim_top(ex, cand, &n, kk);
                if (n > kk) select_top(ex, cand, n, kk);
                n = kk;
            }
            for (int64_t a = 1; ids && a < n; a++) {
                float e = ex[a];
                int64_t id = cand[a], b = a - 1;
                for (; b >= 0 && ex[b] < e; b--) {
                    ex[b + 1] = ex[b];
                    cand[b + 1] = cand[b];
                }
                ex[b + 1] = e;
                cand[b + 1] = id;
            }
            if (ids)
                for (int64_t a = 0; a < k; a++) ids[i * k + a] = a < kk ? cand[a] : -1;
            attend_rows(keys, values, qa, cand, kk, i, T, G, scale, bias, ex, out, lse);
        }
        free(hs);
        free(hi);
    }
    return fail;
}

// Attention over memory blocks read in place (no gather): batch b's keys are the nbk blocks
// blocks[b][..] (bsize rows each, bsize a multiple of 32) of head heads[b] of kbuf / vbuf
// ((KV, cap, D) bf16, rows contiguous; ring_blocks > 0: a ring, block i in slot i % ring_blocks).
// Keys with id >= n_valid, and every key of a block with
// ok[b][i] == 0 (ok may be NULL), are masked. q (B, M, D) bf16, rows contiguous, batches qs
// apart; out (B, M, D) bf16 and lse (B, M) float32 as memtx_attention's (a row that sees no key:
// out 0, lse -inf). Packing from the blocks replaces packing from a gathered copy of them.
// kpk / vpk (or NULL): the buffers already packed per block ((KV, pring_blocks, bsize * D), block i
// in slot i % pring_blocks, each block's keys as groups of 32, qk_rows' and pv_tile's layouts):
// then nothing is packed per call (packing took 15-18% of this kernel's time, scratch A/B).
int memtx_block_attention(const bf16 *q, const bf16 *kbuf, const bf16 *vbuf, const int64_t *heads,
                          const int64_t *blocks, const uint8_t *ok, int64_t B, int64_t M, int64_t nbk, int64_t bsize,
                          int64_t cap, int64_t ring_blocks, int64_t n_valid, int64_t qs, float scale,
                          const bf16 *kpk, const bf16 *vpk, int64_t pring_blocks, bf16 *out, float *lse,
                          int threads) {
    if (bsize % 32) return 2;
    int64_t S = nbk * bsize, ng = S / 32;
    size_t part = kpk ? 0 : (size_t)B * S * D * sizeof(bf16), nbias = (size_t)B * S * sizeof(float);
    size_t nptr = (size_t)B * ng * sizeof(bf16 *);
    char *ws = workspace(2 * part + 2 * nptr + nbias + B);
    if (!ws) return 1;
    bf16 *kp = (bf16 *)ws, *vp = (bf16 *)(ws + part);
    const bf16 **kg = (const bf16 **)(ws + 2 * part), **vg = (const bf16 **)(ws + 2 * part + nptr);
    float *bias = (float *)(ws + 2 * part + 2 * nptr);
    uint8_t *masked = (uint8_t *)(ws + 2 * part + 2 * nptr + nbias);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        masked[b] = 0;
        for (int64_t i = 0; i < nbk; i++) {
            int64_t blk = blocks[b * nbk + i], first = blk * bsize;
            if (kpk) {  // packed where stored: point at the block's groups
                int64_t at = (heads[b] * pring_blocks + blk % pring_blocks) * bsize * D;
                for (int64_t g = 0; g < bsize / 32; g++) {
                    kg[b * ng + i * bsize / 32 + g] = kpk + at + g * 32 * D;
                    vg[b * ng + i * bsize / 32 + g] = vpk + at + g * 32 * D;
                }
            } else {
                int64_t row = heads[b] * cap + (ring_blocks ? blk % ring_blocks : blk) * bsize;
                pack_k(kbuf + row * D, bsize, bsize, kp + (b * S + i * bsize) * D);
                pack_v(vbuf + row * D, bsize, bsize, vp + (b * S + i * bsize) * D);
            }
            int64_t valid = ok && !ok[b * nbk + i] ? 0 : n_valid - first;
            valid = valid < 0 ? 0 : (valid > bsize ? bsize : valid);
            if (valid < bsize) masked[b] = 1;
            float *bb = bias + b * S + i * bsize;
            for (int64_t j = 0; j < bsize; j++) bb[j] = j < valid ? 0.0f : -INFINITY;
        }
    }
    int64_t tiles = (M + MT - 1) / MT;
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t t = 0; t < B * tiles; t++) {
        int64_t b = t / tiles, i0 = (t % tiles) * MT, m = M - i0 < MT ? M - i0 : MT;
        tile(q + b * qs, kpk ? NULL : kp + b * S * D, kpk ? NULL : vp + b * S * D, kpk ? kg + b * ng : NULL,
             kpk ? vg + b * ng : NULL,
             masked[b] ? bias + b * S : NULL, S, S, 0, scale, i0, m, out + b * M * D, lse + b * M, NULL, NULL);
    }
    return 0;
}

// The k largest of a[0..n) sorted in descending order into a[0..k) (quicksort that skips
// partitions past k; insertion sort below 16 entries).
static void sort_top(uint64_t *a, int64_t n, int64_t k) {
    while (n > 16) {
        uint64_t x = a[0], y = a[n / 2], z = a[n - 1];
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t i = 0, j = n - 1;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                uint64_t t = a[i];
                a[i++] = a[j], a[j--] = t;
            }
        }
        // [0, j] >= pivot >= [i, n); entries between j and i equal the pivot
        if (i < k) sort_top(a + i, n - i, k - i);  // the right part holds some of the top k
        n = j + 1;  // then the left part, on for its first k
        if (k > n) k = n;
    }
    for (int64_t i = 1; i < n; i++) {
        uint64_t v = a[i];
        int64_t j = i - 1;
        for (; j >= 0 && a[j] < v; j--) a[j + 1] = a[j];
        a[j + 1] = v;
    }
}

// Block selection from the voters' block maxima (memtx_block_max's out), for near blocks only:
// per KV head h and chunk c, each voter q (a non-zero row of voters) spreads a softmax over the
// chunk's near blocks of their best logits best[h][j][c*Q + q] (j < nbn; a voter with no
// finite maximum gives nothing); rel = log(max(summed shares, 1e-30)) on near blocks, -inf
// elsewhere and on the lo entries before them; each entry then takes the largest rel of itself
// and the `spread` entries before it; the best min(m, lo + nbn) entries, ties to the later
// block, are written best first: pick (KV, C, m') = entry + first, score (KV, C, m') its rel.
// near (C, nbn) uint8; voters (KV, C*Q, D) bf16, heads vs apart, Q <= 16. the memory's torch
// path computes the same (LayerMemory._exact_relevance, spread_forward, top_blocks). The work
// runs on shares (log is monotonic: the spread's maxima and the order are the same) and one
// vector of the Q voters per block; the log only for the entries written.
int memtx_block_pick(const float *best, const uint8_t *near, const bf16 *voters, int64_t KV, int64_t C, int64_t Q,
                     int64_t nbn, int64_t lo, int64_t vs, int64_t spread, int64_t m, int64_t first, int64_t *pick,
                     float *score, int threads) {
    int64_t n = lo + nbn, mm = m < n ? m : n, CQ = C * Q;
    if (Q > 16) return 2;
    int fail = 0;
    __mmask16 qm = (__mmask16)((1u << Q) - 1);
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (int64_t t = 0; t < KV * C; t++) {
        int64_t h = t / C, c = t % C;
        float *rel = malloc(n * sizeof(float) + nbn * 16 * sizeof(float));
        uint64_t *key = malloc(n * sizeof(uint64_t));
        if (!rel || !key) {
            fail = 1;
            free(rel);
            free(key);
            continue;
        }
        float *e = rel + n;  // (nbn, 16): each near block's exponentials, one lane per voter
        const uint8_t *nr = near + c * nbn;
        const float *b = best + h * nbn * CQ + c * Q;
        __mmask16 vote = 0;  // voters with a non-zero row (+-0 is zero)
        for (int64_t q = 0; q < Q; q++) {
            const bf16 *vr = voters + h * vs + (c * Q + q) * D;
            if (_mm512_test_epi16_mask(_mm512_loadu_si512(vr), _mm512_set1_epi16(0x7FFF)) |
                _mm512_test_epi16_mask(_mm512_loadu_si512(vr + 32), _mm512_set1_epi16(0x7FFF)))
                vote |= (__mmask16)(1u << q);
        }
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < nbn; j++)
            if (nr[j]) mx = _mm512_max_ps(mx, _mm512_maskz_loadu_ps(qm, b + j * CQ));
        // a voter with nothing finite near gives no share (torch: softmax NaN -> 0)
        vote &= _mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        mx = _mm512_mask_mov_ps(_mm512_setzero_ps(), vote, mx);
        for (int64_t j = 0; j < nbn; j++) {
            __m512 x = nr[j] ? exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(vote, b + j * CQ), mx)) : _mm512_setzero_ps();
            x = _mm512_maskz_mov_ps(vote, x);
            sum = _mm512_add_ps(sum, x);
            _mm512_storeu_ps(e + j * 16, x);
        }
        __m512 inv = _mm512_maskz_div_ps(vote, _mm512_set1_ps(1.0f), sum);
        for (int64_t i = 0; i < n; i++) {
            int64_t j = i - lo;
            if (j < 0 || !nr[j]) {
                rel[i] = -1.0f;  // below every share: -inf after the log
                continue;
            }
            float sh = _mm512_reduce_add_ps(_mm512_mul_ps(_mm512_loadu_ps(e + j * 16), inv));
            rel[i] = sh > 1e-30f ? sh : 1e-30f;
        }
        for (int64_t i = n - 1; i >= 0; i--) {  // spread (downwards: reads entries not yet changed)
            float r = rel[i];
            for (int64_t s = 1; s <= spread && s < n && i - s >= 0; s++) r = rel[i - s] > r ? rel[i - s] : r;
            uint32_t u;
            memcpy(&u, &r, 4);
            u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;  // float order as unsigned order
            key[i] = (uint64_t)u << 32 | (uint32_t)i;  // ties: the later entry first
            rel[i] = r;
        }
        sort_top(key, n, mm);
        for (int64_t a = 0; a < mm; a++) {
            int64_t i = (uint32_t)key[a];
            pick[t * mm + a] = i + first;
            score[t * mm + a] = rel[i] > 0 ? logf(rel[i]) : -INFINITY;
        }
        free(rel);
        free(key);
    }
    return fail;
}

// Rows of keys and values (KV heads, n rows each, n a multiple of 32, heads ks / vs elements
// apart, rows contiguous) packed into pk / pv (heads ps apart) in the kernel's layout (pack_k,
// pack_v: for 32 keys at a time, what memtx_block_attention reads from packed buffers).
int memtx_pack_rows(const bf16 *k, const bf16 *v, int64_t KV, int64_t n, int64_t ks, int64_t vs, bf16 *pk, bf16 *pv,
                    int64_t ps, int threads) {
    if (n % 32) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < KV; h++) {
        pack_k(k + h * ks, n, n, pk + h * ps);
        pack_v(v + h * vs, n, n, pv + h * ps);
    }
    return 0;
}
