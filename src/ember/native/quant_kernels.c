/* Ember's quantized matmul kernels for the CPU (built with cpu_kernels.c, see __init__.py).
 *
 * Weights stay quantized in memory and in the dot products: the activations of a call are
 * quantized once per row to int8 in 32-wide blocks (one float scale each, as llama.cpp's Q8
 * activations are), and each weight block's integer dot product with them is taken in int32,
 * then scaled in float32. Two weight layouts, both [N rows, Kp columns], Kp = K rounded up to 64:
 *
 *   q8: int8 codes, one byte each. Groups of G weights along K (G = 16, or a multiple of 32)
 *       share a float32 scale, and optionally a float32 minimum: w = q * scale + min.
 *   q4: codes 0..15, two to a byte. In each 32-wide block, byte j holds element j in its low
 *       nibble and element j + 16 in its high one (GGUF's Q4_0/Q4_1 order). G is a multiple
 *       of 32; w = q * scale + min.
 *
 * The minimum's part of a dot product is min * sum(x over the group), taken from the sums of
 * the quantized activations kept per 16 columns.
 *
 * With AVX-512 VNNI, two blocks go through one 512-bit vpdpbusd (int8 weights meet the
 * activations offset to unsigned, and the offset's share is subtracted per lane). On AVX2 the
 * block product is maddubs + madd (unsigned x signed bytes; signed weights go
 * through the sign trick), or one dpbusd where the CPU has AVX-VNNI or AVX512-VNNI; elsewhere
 * plain C loops compute the same integers. Output rows are split across OpenMP threads.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMBER_AVX2 1
#endif

/* x [M, K] (row stride ldx) to xq int8 [M, Kp], xd [M, Kp/32] block scales, xs [M, Kp/16]
 * sums of the dequantized values over each 16 columns. Columns K..Kp are zeros. */
void quantize_rows_q8(const float *x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int8_t *xq,
                      float *xd, float *xs) {
    /* Kp is a multiple of 64 (whole pairs of blocks, for the AVX-512 path). */
    const int64_t nb = Kp / 32;
#pragma omp parallel for schedule(static) if (M * Kp > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        for (int64_t b = 0; b < nb; b++) {
            float v[32], amax = 0.0f;
            for (int64_t i = 0; i < 32; i++) {
                const int64_t k = b * 32 + i;
                v[i] = k < K ? xr[k] : 0.0f;
                amax = fmaxf(amax, fabsf(v[i]));
            }
            const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t s0 = 0, s1 = 0;
            int8_t *q = xq + m * Kp + b * 32;
            for (int64_t i = 0; i < 32; i++) {
                const int32_t qi = (int32_t)nearbyintf(v[i] * id);
                q[i] = (int8_t)qi;
                if (i < 16)
                    s0 += qi;
                else
                    s1 += qi;
            }
            xd[m * nb + b] = d;
            xs[m * 2 * nb + 2 * b] = d * (float)s0;
            xs[m * 2 * nb + 2 * b + 1] = d * (float)s1;
        }
    }
}

#ifdef EMBER_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight int32 lanes: lane i sums the products of bytes 4i..4i+3 (unsigned a, signed b). */
static inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}
#endif

/* Sums of the quantized activations per weight group (for the minimum's term). */
static void group_sums(const float *xs, int64_t M, int64_t Kp, int64_t G, float *out) {
    const int64_t ng = Kp / G, per = G / 16;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            for (int64_t h = 0; h < per; h++) s += xs[m * (Kp / 16) + g * per + h];
            out[m * ng + g] = s;
        }
}

enum { MT = 4 }; /* activation rows computed together against one weight row */

/* One weight row n against activation rows m0..m0+mm of the q8 layout. */
static inline __attribute__((always_inline)) void q8_row(
    const int8_t *wr, const float *sr, const int8_t *xq, const float *xd, int64_t m0, int64_t mm,
    int64_t Kp, const int64_t G, float *acc_out) {
    const int64_t nb = Kp / 32;
#ifdef EMBER_AVX2
    __m256 acc[MT];
    for (int64_t j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wr + b * 32));
        const __m256i aw = _mm256_sign_epi8(w, w);
        const __m256 sv = G == 16 ? _mm256_set_m128(_mm_set1_ps(sr[2 * b + 1]), _mm_set1_ps(sr[2 * b]))
                                  : _mm256_set1_ps(sr[b * 32 / G]);
        for (int64_t j = 0; j < mm; j++) {
            const int64_t m = m0 + j;
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * Kp + b * 32));
            const __m256i p = dot_u8s8(aw, _mm256_sign_epi8(x, w));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, _mm256_set1_ps(xd[m * nb + b])), acc[j]);
        }
    }
    for (int64_t j = 0; j < mm; j++) acc_out[j] = hsum(acc[j]);
#else
    for (int64_t j = 0; j < mm; j++) {
        const int64_t m = m0 + j;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t s[2] = {0, 0};
            for (int64_t i = 0; i < 32; i++) s[i / 16] += (int32_t)wr[b * 32 + i] * (int32_t)xq[m * Kp + b * 32 + i];
            const float d = xd[m * nb + b];
            if (G == 16)
                total += d * (sr[2 * b] * (float)s[0] + sr[2 * b + 1] * (float)s[1]);
            else
                total += d * sr[b * 32 / G] * (float)(s[0] + s[1]);
        }
        acc_out[j] = total;
    }
#endif
}

/* One weight row n against activation rows m0..m0+mm of the q4 layout. */
static inline __attribute__((always_inline)) void q4_row(
    const uint8_t *wr, const float *sr, const int8_t *xq, const float *xd, int64_t m0, int64_t mm,
    int64_t Kp, const int64_t G, float *acc_out) {
    const int64_t nb = Kp / 32;
#ifdef EMBER_AVX2
    __m256 acc[MT];
    for (int64_t j = 0; j < MT; j++) acc[j] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const __m128i raw = _mm_loadu_si128((const __m128i *)(wr + b * 16));
        const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low4);
        const __m256 sv = _mm256_set1_ps(sr[b * 32 / G]);
        for (int64_t j = 0; j < mm; j++) {
            const int64_t m = m0 + j;
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * Kp + b * 32));
            const __m256i p = dot_u8s8(w, x);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, _mm256_set1_ps(xd[m * nb + b])), acc[j]);
        }
    }
    for (int64_t j = 0; j < mm; j++) acc_out[j] = hsum(acc[j]);
#else
    for (int64_t j = 0; j < mm; j++) {
        const int64_t m = m0 + j;
        float total = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t s = 0;
            for (int64_t i = 0; i < 16; i++) {
                const uint8_t byte = wr[b * 16 + i];
                s += (int32_t)(byte & 0x0F) * (int32_t)xq[m * Kp + b * 32 + i];
                s += (int32_t)(byte >> 4) * (int32_t)xq[m * Kp + b * 32 + 16 + i];
            }
            total += xd[m * nb + b] * sr[b * 32 / G] * (float)s;
        }
        acc_out[j] = total;
    }
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EMBER_AVX512 1
/* AVX-512 VNNI: two 32-wide blocks per 512-bit register, one vpdpbusd for 64 products.
 * For each weight row the per-pair scale vectors (and, for int8 weights, the byte offset's
 * correction) are prepared once and reused for every activation row. */
enum { MT512 = 8 };

static inline __m512 pair_scales(const float *sr, int64_t p, const int64_t G) {
    if (G == 16)
        return _mm512_castsi512_ps(_mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set_m128(_mm_set1_ps(sr[4 * p + 1]), _mm_set1_ps(sr[4 * p])))),
            _mm256_castps_si256(_mm256_set_m128(_mm_set1_ps(sr[4 * p + 3]), _mm_set1_ps(sr[4 * p + 2]))), 1));
    const float lo = sr[2 * p * 32 / G], hi = sr[(2 * p + 1) * 32 / G];
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}

static void gemm_rows_avx512(const int8_t *xq, const __m512 *xdv, int64_t M, const uint8_t *wr,
                             int64_t bits, const float *sr, int64_t Kp, int64_t G, __m512i *wbuf,
                             __m512i *corr, __m512 *sv, float *acc_out) {
    const int64_t np = Kp / 64;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i low4 = _mm512_set1_epi8(0x0F), perm = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);
    if (M <= MT512) {
        /* A few activation rows (a decode step): one pass, each weight pair unpacked and
         * used at once, nothing stored for reuse. */
        __m512 acc[MT512];
        for (int64_t j = 0; j < MT512; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t p = 0; p < np; p++) {
            const __m512 s = pair_scales(sr, p, G);
            __m512i w, c = _mm512_setzero_si512();
            if (bits == 8) {
                w = _mm512_loadu_si512((const void *)(wr + p * 64));
                c = _mm512_dpbusd_epi32(c, flip, w);
            } else {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + p * 32));
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
                w = _mm512_permutexvar_epi64(perm, _mm512_and_si512(both, low4));
            }
            for (int64_t m = 0; m < M; m++) {
                const __m512i x = _mm512_loadu_si512((const void *)(xq + m * Kp + p * 64));
                const __m512i d = bits == 8 ? _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(x, flip), w), c)
                                            : _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, xdv[m * np + p]), acc[m]);
            }
        }
        for (int64_t m = 0; m < M; m++) acc_out[m] = _mm512_reduce_add_ps(acc[m]);
        return;
    }
    for (int64_t p = 0; p < np; p++) {
        sv[p] = pair_scales(sr, p, G);
        if (bits == 8) {
            /* x is fed as unsigned (x + 128): sum((x + 128) w) - 128 sum(w), per lane. */
            wbuf[p] = _mm512_loadu_si512((const void *)(wr + p * 64));
            corr[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), wbuf[p]);
        } else {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(wr + p * 32));
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
            wbuf[p] = _mm512_permutexvar_epi64(perm, _mm512_and_si512(both, low4));
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MT512) {
        const int64_t mm = M - m0 < MT512 ? M - m0 : MT512;
        __m512 acc[MT512];
        for (int64_t j = 0; j < MT512; j++) acc[j] = _mm512_setzero_ps();
        for (int64_t p = 0; p < np; p++) {
            const __m512i w = wbuf[p];
            for (int64_t j = 0; j < mm; j++) {
                const int64_t m = m0 + j;
                const __m512i x = _mm512_loadu_si512((const void *)(xq + m * Kp + p * 64));
                __m512i d;
                if (bits == 8)
                    d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(x, flip), w), corr[p]);
                else
                    d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv[p], xdv[m * np + p]), acc[j]);
            }
        }
        for (int64_t j = 0; j < mm; j++) acc_out[m0 + j] = _mm512_reduce_add_ps(acc[j]);
    }
}
#endif

/* out[m, n] (row stride ldo) = sum_k x[m, k] * w[n, k] + bias[n], for quantized activations
 * (quantize_rows_q8) and a q8 (bits 8) or q4 (bits 4) weight. mins and bias may be NULL. */
void gemm_quant(const int8_t *xq, const float *xd, const float *xs, int64_t M, const void *w,
                int64_t bits, const float *scales, const float *mins, int64_t N, int64_t Kp,
                int64_t G, const float *bias, float *out, int64_t ldo) {
    const int64_t ng = Kp / G;
    float *xg = NULL;
    if (mins != NULL) {
        xg = (float *)malloc(sizeof(float) * (size_t)(M * ng));
        group_sums(xs, M, Kp, G, xg);
    }
    const int64_t row_bytes = bits == 8 ? Kp : Kp / 2;
#ifdef EMBER_AVX512
    const int64_t np = Kp / 64;
    __m512 *xdv = (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)(M * np));
    const int64_t nb = Kp / 32;
    for (int64_t m = 0; m < M; m++)
        for (int64_t p = 0; p < np; p++)
            xdv[m * np + p] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(xd[m * nb + 2 * p])),
                                                 _mm256_set1_ps(xd[m * nb + 2 * p + 1]), 1);
#pragma omp parallel if (N * M * Kp > 32768)
    {
        __m512i *wbuf = (__m512i *)aligned_alloc(64, sizeof(__m512i) * (size_t)(2 * np));
        __m512 *sv = (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)np);
        float *acc = (float *)malloc(sizeof(float) * (size_t)M);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            gemm_rows_avx512(xq, xdv, M, (const uint8_t *)w + n * row_bytes, bits, scales + n * ng, Kp, G,
                             wbuf, wbuf + np, sv, acc);
            for (int64_t m = 0; m < M; m++) {
                float v = acc[m];
                if (mins != NULL) {
                    const float *mr = mins + n * ng, *xr = xg + m * ng;
                    for (int64_t g = 0; g < ng; g++) v += mr[g] * xr[g];
                }
                if (bias != NULL) v += bias[n];
                out[m * ldo + n] = v;
            }
        }
        free(wbuf);
        free(sv);
        free(acc);
    }
    free(xdv);
#else
#pragma omp parallel for schedule(static) if (N * M * Kp > 32768)
    for (int64_t n = 0; n < N; n++) {
        const float *sr = scales + n * ng;
        const uint8_t *wr = (const uint8_t *)w + n * row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += MT) {
            const int64_t mm = M - m0 < MT ? M - m0 : MT;
            float acc[MT];
            if (bits == 8) {
                if (G == 16)
                    q8_row((const int8_t *)wr, sr, xq, xd, m0, mm, Kp, 16, acc);
                else if (G == 32)
                    q8_row((const int8_t *)wr, sr, xq, xd, m0, mm, Kp, 32, acc);
                else
                    q8_row((const int8_t *)wr, sr, xq, xd, m0, mm, Kp, G, acc);
            } else {
                if (G == 32)
                    q4_row(wr, sr, xq, xd, m0, mm, Kp, 32, acc);
                else
                    q4_row(wr, sr, xq, xd, m0, mm, Kp, G, acc);
            }
            for (int64_t j = 0; j < mm; j++) {
                float v = acc[j];
                if (mins != NULL) {
                    const float *mr = mins + n * ng, *xr = xg + (m0 + j) * ng;
                    for (int64_t g = 0; g < ng; g++) v += mr[g] * xr[g];
                }
                if (bias != NULL) v += bias[n];
                out[(m0 + j) * ldo + n] = v;
            }
        }
    }
#endif
    free(xg);
}

/* quantize_rows_q8 then gemm_quant in one call, with the activation buffers on the heap:
 * a decode step makes over a hundred of these, and each call from Python costs. */
void linear_quant(const float *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t bits,
                  const float *scales, const float *mins, int64_t N, int64_t Kp, int64_t G,
                  const float *bias, float *out, int64_t ldo) {
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)(M * Kp));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * Kp / 32));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * Kp / 16));
    quantize_rows_q8(x, M, K, ldx, Kp, xq, xd, xs);
    gemm_quant(xq, xd, xs, M, w, bits, scales, mins, N, Kp, G, bias, out, ldo);
    free(xq);
    free(xd);
    free(xs);
}
