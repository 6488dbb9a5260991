/* Ember's quantized matmul kernels for the CPU (built with cpu_kernels.c, see __init__.py).
 *
 * Weights stay quantized in memory and in the dot products: the activations of a call are
 * quantized once per row to int8 in 32-wide blocks (one float scale each, as llama.cpp's Q8
 * activations are), each weight block's integer dot product with them is taken in int32, and
 * the scales apply in float32.
 *
 * The weights are kept in a tiled layout (made once at load by models/quant.py `pack`), in
 * which a 512-bit register holds 16 output columns x 4 consecutive inputs: one vpdpbusd then
 * takes 64 products for 16 outputs against 4 activation bytes broadcast to every lane, and the
 * same weight register serves every activation row of a register tile. Kp (the padded input
 * width) is a multiple of 64, N is padded to T = ceil(N / 16) tiles of 16 columns:
 *
 *   bits 8: tile t, quad j (inputs 4j..4j+3): 64 bytes at t*Kp*16 + j*64, byte 4c + i is the
 *           code of column 16t + c at input 4j + i, plus 128 (so unsigned: vpdpbusd multiplies
 *           unsigned weight bytes by signed activation bytes; the 128 * sum(x) it adds is taken
 *           back in int32 per block).
 *   bits 4: tile t, block b (inputs 32b..32b+31): four 64-byte vectors v at t*Kp*8 + b*256 +
 *           v*64; byte 4c + i holds column 16t + c at input 32b + 4v + i in its low nibble and
 *           at input 32b + 16 + 4v + i in its high one. Codes are 0..15.
 *   scales, mins: float32 [T, Kp / G, 16]: column 16t + c of group g at (t * ng + g) * 16 + c.
 *
 * A weight is w = code * scale + min (bits 8: code = byte - 128), in groups of G inputs: 16, a
 * multiple of 32, or the whole row. The minimum's share of a dot product is min * sum(x over the
 * group), from the block sums of the quantized activations.
 *
 * Paths: AVX-512 VNNI (16 columns a register); AVX2 (8 columns a register: vpdpbusd where the
 * CPU has AVX-VNNI, else maddubs + madd with the sign trick for int8 weights); plain C loops
 * that compute the same integers elsewhere. Column tiles are split across OpenMP threads.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int ember_num_threads(void); /* cpu_kernels.c: threads for the parallel loops */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define EMBER_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define EMBER_AVX2 1
#endif

/* x [M, K] (row stride ldx) to xq int8 [M, Kp], xd [M, Kp/32] block scales, xs [M, Kp/16]
 * integer sums of the codes over each 16 columns. Columns K..Kp are zeros. */
void quantize_rows_q8(const float *x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int8_t *xq,
                      float *xd, int32_t *xs) {
    const int64_t nb = Kp / 32;
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (M * Kp > 65536)
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * ldx;
        for (int64_t b = 0; b < nb; b++) {
            float v[32], amax = 0.0f;
            for (int64_t i = 0; i < 32; i++) {
                const int64_t k = b * 32 + i;
                v[i] = k < K ? xr[k] : 0.0f;
                amax = fmaxf(amax, fabsf(v[i]));
            }
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
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
            xd[m * nb + b] = amax / 127.0f;
            xs[m * 2 * nb + 2 * b] = s0;
            xs[m * 2 * nb + 2 * b + 1] = s1;
        }
    }
}

/* What the kernels read of the quantized activations. */
typedef struct {
    const int8_t *xq;  /* [M, Kp] */
    const float *xd;   /* [M, nb] block scales */
    const int32_t *xc; /* [M, ne] 128 * code sum per sub-block of E inputs (bits 8) */
    const float *xg;   /* [M, ng] dequantized sum per group (with minimums) */
    int64_t Kp, nb, ne, ng;
} acts_t;

/* Sub-block width of the float epilogue: 16 for G = 16, else 32 (one activation block). */
static inline int64_t sub_width(int64_t G) { return G == 16 ? 16 : 32; }

enum { GK16 = 16, GK32 = 32, GKBIG = 0 }; /* group-size classes the kernels specialise on */

#ifdef EMBER_AVX512
/* MR activation rows x NT tiles of 16 columns, over the whole of K. `w` points at the first
 * tile's codes, `ws`/`wm` at its scales/minimums; tiles follow each other tb bytes (codes) and
 * ng * 16 floats (scales) apart. gb = blocks per group (GKBIG). */
static inline __attribute__((always_inline)) void tile_avx512(
    const int MR, const int NT, const int BITS, const int GK, const uint8_t *w, int64_t tb,
    const float *ws, const float *wm, int64_t gb, const acts_t *a, int64_t m0, int64_t n0, int64_t N,
    const float *bias, float *out, int64_t ldo) {
    const int64_t Kp = a->Kp, nb = a->nb, ng = a->ng;
    /* Sized by the largest tile, not by MR and NT: arrays sized by parameters would be
     * variable-length, which GCC keeps on the stack even after inlining makes MR and NT
     * constants (every dpbusd then loads and stores its accumulator: 3-4x slower). */
    __m512 facc[4][4], gacc[4][4];
    __m512i acc[4][4];
    const __m512i low4 = _mm512_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) facc[m][t] = gacc[m][t] = _mm512_setzero_ps();

#define EPILOGUE(E_INDEX, G_INDEX, GROUP_END)                                                        \
    do {                                                                                             \
        _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                                       \
            const __m512 d = _mm512_set1_ps(a->xd[(m0 + m) * nb + b]);                               \
            const __m512i c = _mm512_set1_epi32(BITS == 8 ? a->xc[(m0 + m) * a->ne + (E_INDEX)] : 0); \
            _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {                                   \
                __m512 f = _mm512_cvtepi32_ps(BITS == 8 ? _mm512_sub_epi32(acc[m][t], c) : acc[m][t]); \
                if (GK == GKBIG) {                                                                   \
                    gacc[m][t] = _mm512_fmadd_ps(f, d, gacc[m][t]);                                  \
                } else {                                                                             \
                    const __m512 s = _mm512_loadu_ps(ws + t * ng * 16 + (G_INDEX) * 16);            \
                    facc[m][t] = _mm512_fmadd_ps(_mm512_mul_ps(f, d), s, facc[m][t]);                \
                }                                                                                    \
                acc[m][t] = _mm512_setzero_si512();                                                  \
            }                                                                                        \
        }                                                                                            \
        if (GROUP_END) {                                                                             \
            _Pragma("GCC unroll 8") for (int t = 0; t < NT; t++) {                                   \
                const __m512 s = _mm512_loadu_ps(ws + t * ng * 16 + (G_INDEX) * 16);                \
                const __m512 mn = wm != NULL ? _mm512_loadu_ps(wm + t * ng * 16 + (G_INDEX) * 16)    \
                                             : _mm512_setzero_ps();                                  \
                _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                               \
                    if (GK == GKBIG) {                                                               \
                        facc[m][t] = _mm512_fmadd_ps(gacc[m][t], s, facc[m][t]);                     \
                        gacc[m][t] = _mm512_setzero_ps();                                            \
                    }                                                                                \
                    if (wm != NULL)                                                                  \
                        facc[m][t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a->xg[(m0 + m) * ng + (G_INDEX)]), \
                                                     facc[m][t]);                                    \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    } while (0)

#pragma GCC unroll 8
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) acc[m][t] = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xb = a->xq + m0 * Kp + b * 32;
        if (BITS == 8) {
            const uint8_t *wb = w + b * 512;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                if (GK == GK16 && j == 4) EPILOGUE(2 * b, 2 * b, 1);
                __m512i wv[4];
#pragma GCC unroll 8
                for (int t = 0; t < NT; t++) wv[t] = _mm512_loadu_si512((const void *)(wb + t * tb + j * 64));
#pragma GCC unroll 8
                for (int m = 0; m < MR; m++) {
                    int32_t x4;
                    memcpy(&x4, xb + m * Kp + 4 * j, 4);
                    const __m512i xv = _mm512_set1_epi32(x4);
#pragma GCC unroll 8
                    for (int t = 0; t < NT; t++) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], wv[t], xv);
                }
            }
        } else {
            const uint8_t *wb = w + b * 256;
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m512i lo[4], hi[4];
#pragma GCC unroll 8
                for (int t = 0; t < NT; t++) {
                    const __m512i raw = _mm512_loadu_si512((const void *)(wb + t * tb + v * 64));
                    lo[t] = _mm512_and_si512(raw, low4);
                    hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                }
#pragma GCC unroll 8
                for (int m = 0; m < MR; m++) {
                    int32_t x4l, x4h;
                    memcpy(&x4l, xb + m * Kp + 4 * v, 4);
                    memcpy(&x4h, xb + m * Kp + 16 + 4 * v, 4);
                    const __m512i xl = _mm512_set1_epi32(x4l), xh = _mm512_set1_epi32(x4h);
#pragma GCC unroll 8
                    for (int t = 0; t < NT; t++)
                        acc[m][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][t], lo[t], xl), hi[t], xh);
                }
            }
        }
        if (GK == GK16)
            EPILOGUE(2 * b + 1, 2 * b + 1, 1);
        else if (GK == GK32)
            EPILOGUE(b, b, 1);
        else
            EPILOGUE(b, b / gb, (b + 1) % gb == 0);
    }
#undef EPILOGUE
#pragma GCC unroll 8
    for (int t = 0; t < NT; t++) {
        const int64_t n = n0 + 16 * t;
        if (n >= N) break;
        const __mmask16 mask = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        const __m512 bv = bias != NULL ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++)
            _mm512_mask_storeu_ps(out + (m0 + m) * ldo + n, mask, _mm512_add_ps(facc[m][t], bv));
    }
}

#define TILE_ARGS w, tb, ws, wm, gb, a, m0, n0, N, bias, out, ldo
#define DISPATCH_GK(MR, NT, BITS)                                                      \
    do {                                                                               \
        if (G == 16)                                                                   \
            tile_avx512(MR, NT, BITS, GK16, TILE_ARGS);                                \
        else if (G == 32)                                                              \
            tile_avx512(MR, NT, BITS, GK32, TILE_ARGS);                                \
        else                                                                           \
            tile_avx512(MR, NT, BITS, GKBIG, TILE_ARGS);                               \
    } while (0)
#define DISPATCH(MR, NT)                       \
    do {                                       \
        if (bits == 8)                         \
            DISPATCH_GK(MR, NT, 8);            \
        else                                   \
            DISPATCH_GK(MR, NT, 4);            \
    } while (0)

/* Rows m0.. (mr of them, at most 4) against nt tiles starting at n0, in register tiles of
 * up to 4 tiles for 1-2 rows and up to 2 tiles for 3-4 rows. */
static void tiles(int64_t mr, int64_t nt, int64_t bits, int64_t G, const uint8_t *w, int64_t tb,
                  const float *ws, const float *wm, int64_t gb, const acts_t *a, int64_t m0, int64_t n0,
                  int64_t N, const float *bias, float *out, int64_t ldo) {
    const int64_t ng = a->ng;
    while (nt > 0) {
        const int64_t step = nt >= 4 && mr <= 2 ? 4 : nt >= 2 ? 2 : 1;
        switch (mr * 8 + step) {
        case 1 * 8 + 4: DISPATCH(1, 4); break;
        case 1 * 8 + 2: DISPATCH(1, 2); break;
        case 1 * 8 + 1: DISPATCH(1, 1); break;
        case 2 * 8 + 4: DISPATCH(2, 4); break;
        case 2 * 8 + 2: DISPATCH(2, 2); break;
        case 2 * 8 + 1: DISPATCH(2, 1); break;
        case 3 * 8 + 2: DISPATCH(3, 2); break;
        case 3 * 8 + 1: DISPATCH(3, 1); break;
        case 4 * 8 + 2: DISPATCH(4, 2); break;
        default: DISPATCH(4, 1); break;
        }
        w += step * tb;
        ws += step * ng * 16;
        if (wm != NULL) wm += step * ng * 16;
        n0 += 16 * step;
        nt -= step;
    }
}
#undef DISPATCH
#undef DISPATCH_GK
#undef TILE_ARGS
#endif /* EMBER_AVX512 */

#ifdef EMBER_AVX2
/* AVX2: the same tiles, as two 8-column halves a 64-byte vector. */
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define EMBER_DPBUSD 1
static inline __m256i dot8(__m256i acc, __m256i w_u8, __m256i x_s8, int bits) {
    (void)bits;
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, w_u8, x_s8);
#else
    return _mm256_dpbusd_epi32(acc, w_u8, x_s8);
#endif
}
#else
/* maddubs saturates pairs at int16: codes 0..255 against activations would, so int8 weights
 * go signed (byte - 128) through the sign trick, and the 128 * sum(x) correction is skipped. */
static inline __m256i dot8(__m256i acc, __m256i w_u8, __m256i x_s8, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 8) {
        const __m256i ws = _mm256_xor_si256(w_u8, _mm256_set1_epi8((char)0x80));
        return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(x_s8, ws)), ones));
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, x_s8), ones));
}
#endif

static inline __attribute__((always_inline)) void tile_avx2(
    const int MR, const int BITS, const int GK, const uint8_t *w, const float *ws, const float *wm, int64_t gb,
    const acts_t *a, int64_t m0, int64_t n0, int64_t N, const float *bias, float *out, int64_t ldo) {
    /* One tile (16 columns, two halves h) against MR rows. */
    const int64_t Kp = a->Kp, nb = a->nb, ng = a->ng;
    __m256 facc[2][2], gacc[2][2]; /* fixed sizes: see tile_avx512 */
    __m256i acc[2][2];
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#ifdef EMBER_DPBUSD
    const int corr = BITS == 8;
#else
    const int corr = 0;
#endif
    for (int m = 0; m < MR; m++)
        for (int h = 0; h < 2; h++) {
            facc[m][h] = gacc[m][h] = _mm256_setzero_ps();
            acc[m][h] = _mm256_setzero_si256();
        }

#define EPILOGUE2(E_INDEX, G_INDEX, GROUP_END)                                                         \
    do {                                                                                               \
        for (int m = 0; m < MR; m++) {                                                                 \
            const __m256 d = _mm256_set1_ps(a->xd[(m0 + m) * nb + b]);                                 \
            const __m256i c = _mm256_set1_epi32(corr ? a->xc[(m0 + m) * a->ne + (E_INDEX)] : 0);       \
            for (int h = 0; h < 2; h++) {                                                              \
                __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[m][h], c));                         \
                if (GK == GKBIG)                                                                       \
                    gacc[m][h] = _mm256_fmadd_ps(f, d, gacc[m][h]);                                    \
                else                                                                                   \
                    facc[m][h] = _mm256_fmadd_ps(_mm256_mul_ps(f, d), _mm256_loadu_ps(ws + (G_INDEX) * 16 + 8 * h), facc[m][h]); \
                acc[m][h] = _mm256_setzero_si256();                                                    \
            }                                                                                          \
        }                                                                                              \
        if (GROUP_END)                                                                                 \
            for (int h = 0; h < 2; h++) {                                                              \
                const __m256 s = _mm256_loadu_ps(ws + (G_INDEX) * 16 + 8 * h);                         \
                for (int m = 0; m < MR; m++) {                                                         \
                    if (GK == GKBIG) {                                                                 \
                        facc[m][h] = _mm256_fmadd_ps(gacc[m][h], s, facc[m][h]);                       \
                        gacc[m][h] = _mm256_setzero_ps();                                              \
                    }                                                                                  \
                    if (wm != NULL)                                                                    \
                        facc[m][h] = _mm256_fmadd_ps(_mm256_loadu_ps(wm + (G_INDEX) * 16 + 8 * h),     \
                                                     _mm256_set1_ps(a->xg[(m0 + m) * ng + (G_INDEX)]), facc[m][h]); \
                }                                                                                      \
            }                                                                                          \
    } while (0)

    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xb = a->xq + m0 * Kp + b * 32;
        if (BITS == 8) {
            for (int j = 0; j < 8; j++) {
                if (GK == GK16 && j == 4) EPILOGUE2(2 * b, 2 * b, 1);
                const uint8_t *wv = w + b * 512 + j * 64;
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)wv), w1 = _mm256_loadu_si256((const __m256i *)(wv + 32));
                for (int m = 0; m < MR; m++) {
                    int32_t x4;
                    memcpy(&x4, xb + m * Kp + 4 * j, 4);
                    const __m256i xv = _mm256_set1_epi32(x4);
                    acc[m][0] = dot8(acc[m][0], w0, xv, 8);
                    acc[m][1] = dot8(acc[m][1], w1, xv, 8);
                }
            }
        } else {
            for (int v = 0; v < 4; v++) {
                const uint8_t *wv = w + b * 256 + v * 64;
                __m256i lo[2], hi[2];
                for (int h = 0; h < 2; h++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(wv + 32 * h));
                    lo[h] = _mm256_and_si256(raw, low4);
                    hi[h] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                }
                for (int m = 0; m < MR; m++) {
                    int32_t x4l, x4h;
                    memcpy(&x4l, xb + m * Kp + 4 * v, 4);
                    memcpy(&x4h, xb + m * Kp + 16 + 4 * v, 4);
                    const __m256i xl = _mm256_set1_epi32(x4l), xh = _mm256_set1_epi32(x4h);
                    for (int h = 0; h < 2; h++) acc[m][h] = dot8(dot8(acc[m][h], lo[h], xl, 4), hi[h], xh, 4);
                }
            }
        }
        if (GK == GK16)
            EPILOGUE2(2 * b + 1, 2 * b + 1, 1);
        else if (GK == GK32)
            EPILOGUE2(b, b, 1);
        else
            EPILOGUE2(b, b / gb, (b + 1) % gb == 0);
    }
#undef EPILOGUE2
    for (int h = 0; h < 2; h++) {
        const int64_t n = n0 + 8 * h;
        if (n >= N) break;
        const int64_t cols = N - n < 8 ? N - n : 8;
        for (int m = 0; m < MR; m++) {
            float v[8];
            _mm256_storeu_ps(v, facc[m][h]);
            for (int64_t c = 0; c < cols; c++) out[(m0 + m) * ldo + n + c] = v[c] + (bias != NULL ? bias[n + c] : 0.0f);
        }
    }
}

/* One tile at a time, against pairs of rows. */
static void tiles(int64_t mr, int64_t nt, int64_t bits, int64_t G, const uint8_t *w, int64_t tb,
                  const float *ws, const float *wm, int64_t gb, const acts_t *a, int64_t m0, int64_t n0,
                  int64_t N, const float *bias, float *out, int64_t ldo) {
    const int64_t ng = a->ng;
    for (int64_t t = 0; t < nt; t++) {
        const uint8_t *wt = w + t * tb;
        const float *wst = ws + t * ng * 16, *wmt = wm != NULL ? wm + t * ng * 16 : NULL;
        for (int64_t r = 0; r < mr; r += 2) {
            const int64_t rows = mr - r < 2 ? mr - r : 2, m = m0 + r, n = n0 + 16 * t;
#define CALL2(MR, BITS, GK) tile_avx2(MR, BITS, GK, wt, wst, wmt, gb, a, m, n, N, bias, out, ldo)
#define BY_GK(MR, BITS)             \
    do {                            \
        if (G == 16)                \
            CALL2(MR, BITS, GK16);  \
        else if (G == 32)           \
            CALL2(MR, BITS, GK32);  \
        else                        \
            CALL2(MR, BITS, GKBIG); \
    } while (0)
            if (rows == 2 && bits == 8)
                BY_GK(2, 8);
            else if (rows == 2)
                BY_GK(2, 4);
            else if (bits == 8)
                BY_GK(1, 8);
            else
                BY_GK(1, 4);
#undef BY_GK
#undef CALL2
        }
    }
}
#endif /* EMBER_AVX2 */

#if !defined(EMBER_AVX512) && !defined(EMBER_AVX2)
/* Plain C: the same integers, one output at a time. */
static void tiles(int64_t mr, int64_t nt, int64_t bits, int64_t G, const uint8_t *w, int64_t tb,
                  const float *ws, const float *wm, int64_t gb, const acts_t *a, int64_t m0, int64_t n0,
                  int64_t N, const float *bias, float *out, int64_t ldo) {
    (void)gb;
    const int64_t Kp = a->Kp, nb = a->nb, ng = a->ng, E = sub_width(G);
    for (int64_t t = 0; t < nt; t++)
        for (int64_t c = 0; c < 16; c++) {
            const int64_t n = n0 + 16 * t + c;
            if (n >= N) break;
            const uint8_t *wt = w + t * tb;
            const float *wst = ws + t * ng * 16, *wmt = wm != NULL ? wm + t * ng * 16 : NULL;
            for (int64_t m = m0; m < m0 + mr; m++) {
                const int8_t *xr = a->xq + m * Kp;
                float total = 0.0f, gsum = 0.0f;
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t e0 = 0; e0 < 32; e0 += E) {
                        int32_t s = 0;
                        for (int64_t i = e0; i < e0 + E; i++) {
                            const int64_t k = b * 32 + i;
                            int32_t code;
                            if (bits == 8)
                                code = (int32_t)wt[(k / 4) * 64 + 4 * c + k % 4] - 128;
                            else {
                                const int64_t v = (i % 16) / 4;
                                const uint8_t byte = wt[b * 256 + v * 64 + 4 * c + i % 4];
                                code = i < 16 ? byte & 0x0F : byte >> 4;
                            }
                            s += code * (int32_t)xr[k];
                        }
                        const int64_t g = (b * 32 + e0) / G;
                        gsum += (float)s * a->xd[m * nb + b];
                        if ((b * 32 + e0 + E) % G == 0) {
                            total += gsum * wst[g * 16 + c];
                            if (wmt != NULL) total += wmt[g * 16 + c] * a->xg[m * ng + g];
                            gsum = 0.0f;
                        }
                    }
                out[m * ldo + n] = total + (bias != NULL ? bias[n] : 0.0f);
            }
        }
}
#endif

/* out[m, n] (row stride ldo) = sum_k x[m, k] * w[n, k] + bias[n] for x [M, K] (row stride ldx)
 * and a weight in the tiled layout above (bits 8 or 4, N columns, Kp inputs, groups of G).
 * mins and bias may be NULL. */
void linear_quant(const float *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t bits,
                  const float *scales, const float *mins, int64_t N, int64_t Kp, int64_t G,
                  const float *bias, float *out, int64_t ldo) {
    const int64_t nb = Kp / 32, E = sub_width(G), ne = Kp / E, ng = Kp / G;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)(M * Kp));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *xs = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * Kp / 16));
    int32_t *xc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * ne));
    float *xg = mins != NULL ? (float *)malloc(sizeof(float) * (size_t)(M * ng)) : NULL;
    quantize_rows_q8(x, M, K, ldx, Kp, xq, xd, xs);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t e = 0; e < ne; e++) {
            const int32_t s = E == 16 ? xs[m * (Kp / 16) + e] : xs[m * (Kp / 16) + 2 * e] + xs[m * (Kp / 16) + 2 * e + 1];
            xc[m * ne + e] = 128 * s;
        }
        if (xg != NULL)
            for (int64_t g = 0; g < ng; g++) {
                float s = 0.0f;
                for (int64_t h = g * (G / 16); h < (g + 1) * (G / 16); h++) s += xd[m * nb + h / 2] * (float)xs[m * (Kp / 16) + h];
                xg[m * ng + g] = s;
            }
    }
    const acts_t a = {xq, xd, xc, xg, Kp, nb, ne, ng};
    const int64_t T = (N + 15) / 16, tb = bits == 8 ? Kp * 16 : Kp * 8, gb = G / 32 > 0 ? G / 32 : 1;
    /* Register tiles: 4 rows x 2 tiles (32 columns), or for 1-3 rows up to 4 tiles. */
    const int64_t MR = M >= 4 ? 4 : M, NT = M >= 3 ? 2 : 4, groups = (T + NT - 1) / NT;
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (N * M * Kp > 32768)
    for (int64_t i = 0; i < groups; i++) {
        const int64_t t0 = i * NT, nt = T - t0 < NT ? T - t0 : NT;
        const uint8_t *wt = (const uint8_t *)w + t0 * tb;
        const float *wst = scales + t0 * ng * 16, *wmt = mins != NULL ? mins + t0 * ng * 16 : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = M - m0 < MR ? M - m0 : MR;
            tiles(mr, nt, bits, G, wt, tb, wst, wmt, gb, &a, m0, t0 * 16, N, bias, out, ldo);
        }
    }
    free(xq);
    free(xd);
    free(xs);
    free(xc);
    free(xg);
}
