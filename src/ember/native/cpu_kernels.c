/* Ember's CPU kernels: float32, compiled on first use for the host CPU (see native/__init__.py).
 *
 * paged_attention: query rows (decodes and prefill tokens alike) attend over their sequences'
 * paged KV cache in place, with a row's arithmetic fixed by the row alone (described below);
 * decode_attention is its case of one new token per sequence. The cache of a layer is laid out
 * [slots, 2 (key, value), kv_heads, head_dim]; a sequence's position p lives in slot
 * block_table[p / block_size] * block_size + p % block_size.
 *
 * silu_and_mul: out = silu(x[:, :n]) * x[:, n:], the gated MLP activation in one pass.
 *
 * rms_norm: out = x / sqrt(mean(x^2) + eps) * weight per row, in one pass where torch's CPU
 * path makes five (square, mean, add, rsqrt, two products) with a temporary each.
 *
 * rotary: rotates the first rot_dim dims of each head in place, from per-token cos/sin tables;
 * rows may be strided, so Q and K rotate inside the fused QKV projection's output.
 *
 * sample_logits, top_p_mask: the sampler's inverse-CDF draw and top_p cut, straight from
 * logits (described where they are defined).
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Threads for every parallel loop here: `set_threads` (Ember's --num-threads, or the container's
 * CPU quota) or, left at 0, OpenMP's default of one per visible core, which a CPU-limited pod
 * would oversubscribe. The engine calls the kernels from its own thread, so the per-thread
 * omp_set_num_threads of another thread would not reach them. */
static int ember_threads = 0;

void set_threads(int64_t n) { ember_threads = n > 0 ? (int)n : 0; }

int ember_num_threads(void) { return ember_threads > 0 ? ember_threads : omp_get_max_threads(); }

/* e^x for x <= 0. glibc's vectorised expf falls back to a slow scalar path for lanes far below
 * zero or at -inf (masked logits); below e^-80 nothing registers against a sum of at least 1. */
static inline float exp_nonpositive(float x) { return expf(fmaxf(x, -80.0f)); }

/* ------------------------------------------------------------------ paged attention
 *
 * Every query row (a decode's new token, or one token of a prefill chunk) attends over keys
 * 0 .. len - 1 of its sequence in the paged cache, read where they lie. A row's arithmetic is
 * fixed by the row alone: keys go in chunks of CH at absolute positions 0, CH, 2 CH, ..., each
 * chunk's scores, maximum, weights and weighted values are formed in one fixed order, and the
 * same code runs whether the row is a decode, part of a long prefill, a prompt's last token
 * after a prefix-cache hit, or one of many sequences in a step. So a token's attention output
 * is bit for bit the same however the scheduler batched it. That matters on the CPU: with
 * weights and activations quantized to 8 bits (quant_kernels.c), a change in the last bit of
 * an activation can move a rounding step, and the drift grows through the layers, enough to
 * change a greedy token. The arithmetic is written in explicit vectors (GCC/Clang vector
 * extensions: one AVX-512 register, two AVX2 halves, or NEON quarters), and every row goes
 * through the same inlined code, so no row's sums are ordered differently from another's.
 *
 * Work: a task is one KV head of a tile of consecutive tokens of one sequence (at least 32,
 * more while under 256 query rows; a decode is a tile of one). Its query rows (tokens x the
 * KV head's query heads) go through a chunk's keys in pairs that share the loads, and a
 * chunk's keys stay in L1 for the whole tile, which is what makes a long prefill nearly as
 * fast as SDPA's matrix products. */
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
enum { CH = 16, TILE = 32, TILE_ROWS = 256 };

static inline v16 v16_splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline v16 v16_select(vi16 mask, v16 a, v16 b) { /* mask lane -1: a, 0: b */
    return (v16)(((vi16)a & mask) | ((vi16)b & ~mask));
}

/* e^x for x <= 0, in plain vector arithmetic (a libm call could take another path for some
 * lanes): x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
 * error below 2e-7), times 2^n built in the exponent bits. Lanes below -87 give about 1e-38. */
static inline v16 v16_exp(v16 x) {
    const v16 lo = v16_splat(-87.0f);
    x = v16_select(x < lo, lo, x);
    const vi16 n = __builtin_convertvector(x * 1.44269504f - 0.5f, vi16); /* rounds toward 0 */
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = (x - nf * 0.693145752f) - nf * 1.42860677e-06f;
    v16 p = r * (1.0f / 720.0f) + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (v16)((n + 127) << 23);
}

#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

static inline float v16_hsum(v16 a) {
    a = a + SHUF(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    a = a + SHUF(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    a = a + SHUF(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    a = a + SHUF(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return a[0];
}

static inline v16 v16_max(v16 a, v16 b) { return v16_select(a > b, a, b); }

static inline float v16_hmax(v16 a) {
    a = v16_max(a, SHUF(a, a, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
    a = v16_max(a, SHUF(a, a, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
    a = v16_max(a, SHUF(a, a, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
    a = v16_max(a, SHUF(a, a, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
    return a[0];
}

/* The four steps of summing the lanes of 16 vectors at once (a transpose by halves: 15 adds
 * where 16 separate sums would take 64): pairs of vectors, then pairs of those, ... */
static inline v16 sum_l1(v16 x, v16 y) {
    return SHUF(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
static inline v16 sum_l2(v16 x, v16 y) {
    return SHUF(x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
static inline v16 sum_l3(v16 x, v16 y) {
    return SHUF(x, y, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF(x, y, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
static inline v16 sum_l4(v16 x, v16 y) {
    return SHUF(x, y, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           SHUF(x, y, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

static inline __attribute__((always_inline)) v16 dot_lanes(const v16 *q, const v16 *k, int64_t nv) {
    v16 d = q[0] * k[0];
    for (int64_t t = 1; t < nv; t++) d += q[t] * k[t];
    return d;
}

/* Lane j of *sa (*sb): qa (qb) . key j, the scores of a chunk's 16 keys (each nv vectors at
 * kp[j]) for two rows at once, so each key is loaded once for both. */
static inline __attribute__((always_inline)) void chunk_dots(const v16 *qa, const v16 *qb,
                                                             const v16 *const *kp, int64_t nv,
                                                             v16 *sa, v16 *sb) {
    v16 ca[2], cb[2];
    for (int h = 0; h < 2; h++) {
        v16 ba[2], bb[2];
        for (int i = 0; i < 2; i++) {
            const v16 *const *k = kp + h * 8 + i * 4;
            v16 da[4], db[4];
            for (int u = 0; u < 4; u++) {
                da[u] = dot_lanes(qa, k[u], nv);
                db[u] = dot_lanes(qb, k[u], nv);
            }
            ba[i] = sum_l2(sum_l1(da[0], da[1]), sum_l1(da[2], da[3]));
            bb[i] = sum_l2(sum_l1(db[0], db[1]), sum_l1(db[2], db[3]));
        }
        ca[h] = sum_l3(ba[0], ba[1]);
        cb[h] = sum_l3(bb[0], bb[1]);
    }
    *sa = sum_l4(ca[0], ca[1]);
    *sb = sum_l4(cb[0], cb[1]);
}

/* One row's running softmax state. */
typedef struct {
    float m, l;
} row_state;

/* One query row's part of a chunk, given its scores for the chunk's CH keys (`valid` of them
 * are its own, the rest are masked): its running maximum, sum and accumulator (acc, nv
 * vectors) moved to the new maximum. Returns the keys' weights. */
static inline __attribute__((always_inline)) v16 row_weights(v16 dots, int64_t nv, int64_t valid,
                                                             float scale, row_state *restrict st,
                                                             v16 *restrict acc) {
    static const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vi16 mine = lane < (int32_t)valid;
    const v16 s = v16_select(mine, dots * scale, v16_splat(-FLT_MAX));
    const float bm = v16_hmax(s);
    if (bm > st->m) { /* a new maximum: rescale what was summed so far */
        const float alpha = v16_exp(v16_splat(st->m - bm))[0];
        st->l *= alpha;
        for (int64_t t = 0; t < nv; t++) acc[t] *= alpha;
        st->m = bm;
    }
    const v16 p = v16_select(mine, v16_exp(s - st->m), v16_splat(0.0f));
    st->l += v16_hsum(p);
    return p;
}

/* Two query rows (a and b) over one chunk, sharing the loads of its keys and values. Every
 * row goes through this one function, in either place (a row with no partner is paired with a
 * copy of itself), so its arithmetic never depends on its neighbours. Keys a row does not see
 * get weight 0, and x + 0 * v == x, so running a row past its own keys changes nothing. */
static inline __attribute__((always_inline)) void attend_pair(
    const v16 *restrict qa, const v16 *restrict qb, const v16 *const *kp, const v16 *const *vp,
    int64_t nv, int64_t valid_a, int64_t valid_b, float scale, row_state *restrict sa,
    row_state *restrict sb, v16 *restrict acc_a, v16 *restrict acc_b) {
    v16 da, db;
    chunk_dots(qa, qb, kp, nv, &da, &db);
    const v16 pa = row_weights(da, nv, valid_a, scale, sa, acc_a);
    const v16 pb = row_weights(db, nv, valid_b, scale, sb, acc_b);
    float wa[CH], wb[CH];
    memcpy(wa, &pa, sizeof(wa));
    memcpy(wb, &pb, sizeof(wb));
    v16 a[16], b[16]; /* held in registers across the chunk */
    for (int64_t t = 0; t < nv; t++) {
        a[t] = acc_a[t];
        b[t] = acc_b[t];
    }
    const int64_t n = valid_a > valid_b ? valid_a : valid_b;
    for (int64_t j = 0; j < n; j++)
        for (int64_t t = 0; t < nv; t++) {
            const v16 v = vp[j][t];
            a[t] += wa[j] * v;
            b[t] += wb[j] * v;
        }
    for (int64_t t = 0; t < nv; t++) {
        acc_a[t] = a[t];
        acc_b[t] = b[t];
    }
}

/* Query rows [r0, r0 + nr) of one sequence (table), KV head g; nv = head_dim / 16, a constant
 * where this is inlined, so the loops over a head's vectors unroll. */
static inline __attribute__((always_inline)) void attend_tile(
    const float *q, int64_t q_stride, const float *cache, float *out, const int32_t *table,
    const int32_t *row_len, int64_t r0, int64_t nr, int64_t g, int64_t group, int64_t num_heads,
    int64_t kv_width, int64_t block_size, float scale, v16 *work, const int64_t nv) {
    const int64_t head_dim = nv * 16, rows = nr * group;
    /* rows + 1: the last is the partner of a row left over (see attend_pair) */
    v16 *qv = work, *acc = qv + (rows + 1) * nv;
    row_state *st = (row_state *)(acc + (rows + 1) * nv);
    static const v16 zeros[16]; /* the key and value of a position past every row's context */
    int64_t max_len = 0;
    for (int64_t i = 0; i < nr; i++) max_len = row_len[r0 + i] > max_len ? row_len[r0 + i] : max_len;
    for (int64_t i = 0; i < nr; i++)
        for (int64_t h = 0; h < group; h++) {
            const int64_t r = i * group + h;
            memcpy(qv + r * nv, q + (r0 + i) * q_stride + (g * group + h) * head_dim,
                   sizeof(float) * (size_t)head_dim);
            memset(acc + r * nv, 0, sizeof(v16) * (size_t)nv);
            st[r].m = -FLT_MAX;
            st[r].l = 0.0f;
        }
    if (rows % 2) { /* the left-over row's partner: a copy of it, whose results are dropped */
        memcpy(qv + rows * nv, qv + (rows - 1) * nv, sizeof(v16) * (size_t)nv);
        memset(acc + rows * nv, 0, sizeof(v16) * (size_t)nv);
        st[rows].m = -FLT_MAX;
        st[rows].l = 0.0f;
    }
    for (int64_t c0 = 0; c0 < max_len; c0 += CH) {
        const int64_t n = max_len - c0 < CH ? max_len - c0 : CH;
        const v16 *kp[CH], *vp[CH]; /* read in place: the cache is 64-byte aligned per head */
        for (int64_t j = 0; j < CH; j++) {
            if (j < n) {
                const int64_t pos = c0 + j;
                const float *slot = cache + ((int64_t)table[pos / block_size] * block_size + pos % block_size) * 2 * kv_width + g * head_dim;
                kp[j] = (const v16 *)slot;
                vp[j] = (const v16 *)(slot + kv_width);
            } else {
                kp[j] = vp[j] = zeros;
            }
        }
        for (int64_t ra = 0; ra < rows; ra += 2) {
            const int64_t rb = ra + 1 < rows ? ra + 1 : rows; /* rows: the copy's place */
            const int64_t la = row_len[r0 + ra / group] - c0;
            const int64_t lb = row_len[r0 + (rb < rows ? rb : ra) / group] - c0;
            if (la <= 0 && lb <= 0) continue;
            attend_pair(qv + ra * nv, qv + rb * nv, kp, vp, nv, la < 0 ? 0 : la < CH ? la : CH,
                        lb < 0 ? 0 : lb < CH ? lb : CH, scale, st + ra, st + rb, acc + ra * nv,
                        acc + rb * nv);
        }
    }
    for (int64_t i = 0; i < nr; i++)
        for (int64_t h = 0; h < group; h++) {
            const int64_t r = i * group + h;
            const float inv = 1.0f / st[r].l;
            float *o = out + ((r0 + i) * num_heads + g * group + h) * head_dim;
            for (int64_t t = 0; t < nv; t++) {
                const v16 x = acc[r * nv + t] * inv;
                memcpy(o + t * 16, &x, sizeof(v16));
            }
        }
}

/* out [rows, heads, head_dim] = attention of q (row stride q_stride floats, heads contiguous)
 * over the paged cache. Row r belongs to sequence row_seq[r] (NULL: r), whose block table is
 * block_tables[row_seq[r] * max_blocks ...], and sees its keys 0 .. row_len[r] - 1. Rows of a
 * sequence are consecutive. head_dim is a multiple of 16.
 * The cache of a layer is [slots, 2 (key, value), kv_heads, head_dim]; position p lives in
 * slot block_table[p / block_size] * block_size + p % block_size. */
void paged_attention(const float *q, int64_t q_stride, const float *cache, float *out,
                     const int32_t *block_tables, int64_t max_blocks, const int32_t *row_seq,
                     const int32_t *row_len, int64_t rows, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale) {
    const int64_t group = num_heads / num_kv_heads, kv_width = num_kv_heads * head_dim;
    const int64_t nv = head_dim / 16;
    /* Tiles: runs of up to `tile` tokens of one sequence. A tile reads its keys once for all
     * its rows, so with few query heads per KV head (Llama-2's 1) longer tiles save most of the
     * cache traffic of a long prefill; but not so long that the cores run short of tiles. */
    int64_t tile = TILE_ROWS / group;
    const int64_t spread = rows * num_kv_heads / (4 * (int64_t)ember_num_threads());
    tile = tile < spread ? tile : spread;
    tile = tile > TILE ? tile : TILE;
    int64_t *tile_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows + 1));
    int64_t tiles = 0, longest = 1;
    for (int64_t r = 0; r < rows;) {
        const int64_t s = row_seq != NULL ? row_seq[r] : r;
        int64_t e = r + 1;
        while (e < rows && e - r < tile && row_seq != NULL && row_seq[e] == s) e++;
        tile_start[tiles++] = r;
        longest = e - r > longest ? e - r : longest;
        r = e;
    }
    tile_start[tiles] = rows;
#pragma omp parallel num_threads(ember_num_threads())
    {
        /* Per row of a tile and a spare: its query, accumulator and state (8 a vector). */
        const int64_t tile_rows = longest * group + 1;
        v16 *work = (v16 *)aligned_alloc(64, sizeof(v16) * (size_t)(nv * 2 * tile_rows + tile_rows / 8 + 1));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tiles * num_kv_heads; t++) {
            /* Later tiles of a prefill have more keys: hand them out first. */
            const int64_t k = tiles - 1 - t / num_kv_heads, g = t % num_kv_heads;
            const int64_t r0 = tile_start[k], nr = tile_start[k + 1] - r0;
            const int64_t s = row_seq != NULL ? row_seq[r0] : r0;
            const int32_t *table = block_tables + s * max_blocks;
            if (nv == 4)
                attend_tile(q, q_stride, cache, out, table, row_len, r0, nr, g, group, num_heads, kv_width, block_size, scale, work, 4);
            else if (nv == 8)
                attend_tile(q, q_stride, cache, out, table, row_len, r0, nr, g, group, num_heads, kv_width, block_size, scale, work, 8);
            else
                attend_tile(q, q_stride, cache, out, table, row_len, r0, nr, g, group, num_heads, kv_width, block_size, scale, work, nv);
        }
        free(work);
    }
    free(tile_start);
}

/* One new query token per sequence over its paged cache (the decode step's case). */
void decode_attention(const float *q, int64_t q_stride, const float *cache, float *out,
                      const int32_t *block_tables, const int32_t *context_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    paged_attention(q, q_stride, cache, out, block_tables, max_blocks, NULL, context_lens,
                    num_seqs, num_heads, num_kv_heads, head_dim, block_size, scale);
}

void silu_and_mul(const float *x, float *out, int64_t rows, int64_t n) {
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (rows * n > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * n, *up = gate + n;
        float *o = out + r * n;
        /* exp's argument is capped: fast math does not promise x / inf == 0. */
        for (int64_t i = 0; i < n; i++) o[i] = gate[i] / (1.0f + expf(fminf(-gate[i], 80.0f))) * up[i];
    }
}

void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim,
              float eps) {
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (rows * dim > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) o[i] = xr[i] * inv * weight[i];
    }
}

void rotary(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
            int64_t rot_dim, const float *cos, const float *sin, int64_t neox) {
    const int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (rows * heads * rot_dim > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * half, *sn = sin + r * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + r * row_stride + h * head_dim;
            if (neox) { /* pairs (i, i + half), as Hugging Face Llama weights expect */
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[i], b = v[i + half];
                    v[i] = a * c[i] - b * sn[i];
                    v[i + half] = b * c[i] + a * sn[i];
                }
            } else { /* neighbours (2i, 2i + 1), GPT-J style */
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * c[i] - b * sn[i];
                    v[2 * i + 1] = b * c[i] + a * sn[i];
                }
            }
        }
    }
}

/* Inverse-CDF sampling straight from logits, one uniform u in [0, 1) per row: the first token
 * whose running sum of exp(z - max) exceeds u times the total. Chunk sums are kept in double
 * so a vocabulary of 150k tokens still sums exactly enough. Tokens more than e^80 below the
 * best (masked ones are -inf) get no mass. */
static inline float sample_weight(float z, float m) {
    const float d = z - m;
    return d < -80.0f ? 0.0f : exp_nonpositive(d);
}

static inline float row_max(const float *z, int64_t n) {
    float m = -FLT_MAX;
    for (int64_t i = 0; i < n; i++) m = z[i] > m ? z[i] : m;
    return m;
}

/* The sum of sample_weight over z[0, n), float within chunks and double across them; the
 * weights are also stored in w unless it is NULL (each call site compiles its own loop). */
static inline __attribute__((always_inline)) double weight_total(const float *z, float m,
                                                                 int64_t n, float *w) {
    enum { SUM_CHUNK = 256 };
    double total = 0.0;
    for (int64_t c = 0; c < n; c += SUM_CHUNK) {
        const int64_t e = c + SUM_CHUNK < n ? c + SUM_CHUNK : n;
        float s = 0.0f;
        for (int64_t i = c; i < e; i++) {
            const float x = sample_weight(z[i], m);
            if (w) w[i] = x;
            s += x;
        }
        total += s;
    }
    return total;
}

void sample_logits(const float *logits, int64_t rows, int64_t vocab, const double *u,
                   int64_t *out) {
    enum { CHUNK = 256 }; /* the scan skips whole chunks by their sums */
#pragma omp parallel for num_threads(ember_num_threads()) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *z = logits + r * vocab;
        const float m = row_max(z, vocab);
        const double target = u[r] * weight_total(z, m, vocab, NULL);
        int64_t pick = -1, last = 0;
        double acc = 0.0;
        for (int64_t c = 0; c < vocab && pick < 0; c += CHUNK) {
            const int64_t e = c + CHUNK < vocab ? c + CHUNK : vocab;
            const double s = weight_total(z + c, m, e - c, NULL);
            if (acc + s <= target) {
                acc += s;
                if (s > 0.0) last = e - 1;
                continue;
            }
            for (int64_t i = c; i < e; i++) { /* the chunk that crosses: token by token */
                const float w = sample_weight(z[i], m);
                if (w <= 0.0f) continue;
                last = i;
                acc += w;
                if (acc > target) {
                    pick = i;
                    break;
                }
            }
        }
        if (pick < 0) { /* rounding left target at the very end: the last token with mass */
            pick = last;
            while (pick > 0 && sample_weight(z[pick], m) <= 0.0f) pick--;
        }
        out[r] = pick;
    }
}

/* top_p_mask, in place on temperature-scaled logits (-inf = already masked): keep the smallest
 * set of most likely tokens whose probability reaches p[r]; a token stays while the mass of
 * the tokens before it, in descending order, is short of p. No sort of the vocabulary: one
 * pass buckets the mass by distance below the best logit, the buckets locate the cut, and only
 * the tokens of the bucket holding the cut are sorted. */
typedef struct {
    float z;
    int64_t i;
} scored_token;

static int by_logit_desc(const void *a, const void *b) {
    const scored_token *x = a, *y = b;
    if (x->z != y->z) return x->z > y->z ? -1 : 1;
    return x->i < y->i ? -1 : (x->i > y->i);
}

void top_p_mask(float *logits, int64_t rows, int64_t vocab, const float *p) {
    enum { BUCKETS = 2048 };
    const float per_unit = BUCKETS / 32.0f; /* buckets cover 32 logits below the best */
#pragma omp parallel num_threads(ember_num_threads())
    {
        double *mass = (double *)malloc(sizeof(double) * BUCKETS);
        float *w = (float *)malloc(sizeof(float) * (size_t)vocab);
        scored_token *cut = (scored_token *)malloc(sizeof(scored_token) * (size_t)vocab);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *z = logits + r * vocab;
            const float m = row_max(z, vocab);
            /* Weights and their total in vectorised passes; bucketing then needs no exp. */
            const double total = weight_total(z, m, vocab, w);
            memset(mass, 0, sizeof(double) * BUCKETS);
            for (int64_t i = 0; i < vocab; i++) {
                const float v = (m - z[i]) * per_unit;
                if (v < BUCKETS) mass[(int64_t)v] += w[i];
            }
            const double target = (double)p[r] * total;
            double before = 0.0; /* mass of the buckets above the cut */
            int64_t cb = 0;      /* the bucket holding the cut; BUCKETS: the tail below them all */
            while (cb < BUCKETS && before + mass[cb] < target) before += mass[cb++];
            const float hi = cb < BUCKETS ? (float)(cb + 1) : INFINITY;
            int64_t n = 0;
            for (int64_t i = 0; i < vocab; i++) {
                const float v = (m - z[i]) * per_unit;
                if (v >= (float)cb && v < hi && w[i] > 0.0f) {
                    cut[n].z = z[i];
                    cut[n++].i = i;
                }
            }
            for (int64_t i = 0; i < vocab; i++) /* drop the cut bucket and all below it */
                z[i] = (m - z[i]) * per_unit >= (float)cb ? -INFINITY : z[i];
            qsort(cut, (size_t)n, sizeof(scored_token), by_logit_desc);
            /* then restore its head; the best token always stays, even where p is 0 (a top_p
             * under float32's smallest value) */
            for (int64_t j = 0; j < n && (before < target || (cb == 0 && j == 0)); j++) {
                before += w[cut[j].i];
                z[cut[j].i] = cut[j].z;
            }
        }
        free(mass);
        free(w);
        free(cut);
    }
}
