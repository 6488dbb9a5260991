/* Ember's CPU kernels: float32, compiled on first use for the host CPU (see native/__init__.py).
 *
 * decode_attention: one new query token per sequence attends over its paged KV cache in place,
 * so no per-step gather copies the context out of the cache. One pass with a running softmax
 * (as flash-decoding does) reads each block once, keys and values together, while the next
 * block is prefetched: measured 2x faster than a pass for scores and another for values. The
 * cache of a layer is laid out [slots, 2 (key, value), kv_heads, head_dim]; a sequence's
 * position p lives in slot block_table[p / block_size] * block_size + p % block_size.
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

/* e^x for x <= 0. glibc's vectorised expf falls back to a slow scalar path for lanes far below
 * zero or at -inf (masked logits); below e^-80 nothing registers against a sum of at least 1. */
static inline float exp_nonpositive(float x) { return expf(fmaxf(x, -80.0f)); }

/* One task of decode_attention: query heads [h0 * group, (h0 + hpt) * group) of sequence s.
 * Always inlined, so the calls below with a constant head_dim get loops the compiler unrolls. */
static inline __attribute__((always_inline)) void attend_one(
    const float *qs, float *os, const float *cache, const int32_t *table, int64_t len,
    int64_t h0, int64_t nq, int64_t group, int64_t kv_width, int64_t block_size,
    float scale, float *acc, float *m, float *l, const int64_t head_dim) {
    enum { CHUNK = 32 };
    const int64_t slot_width = 2 * kv_width;
    for (int64_t i = 0; i < nq; i++) {
        m[i] = -FLT_MAX;
        l[i] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)(nq * head_dim));
    const int64_t nblocks = (len + block_size - 1) / block_size;
    for (int64_t b = 0; b < nblocks; b++) {
        const float *base = cache + (int64_t)table[b] * block_size * slot_width;
        if (b + 1 < nblocks) { /* fetch the next block while this one is computed */
            const char *next = (const char *)(cache + (int64_t)table[b + 1] * block_size * slot_width);
            for (int64_t off = 0; off < block_size * slot_width * (int64_t)sizeof(float); off += 64)
                __builtin_prefetch(next + off);
        }
        const int64_t in_block = len - b * block_size < block_size ? len - b * block_size : block_size;
        for (int64_t j0 = 0; j0 < in_block; j0 += CHUNK) {
            const int64_t n = in_block - j0 < CHUNK ? in_block - j0 : CHUNK;
            for (int64_t i = 0; i < nq; i++) {
                const float *qh = qs + i * head_dim;
                const int64_t kv_off = (h0 + i / group) * head_dim;
                float sc[CHUNK], bm = -FLT_MAX;
                for (int64_t j = 0; j < n; j++) {
                    const float *kh = base + (j0 + j) * slot_width + kv_off;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                    sc[j] = dot * scale;
                    bm = sc[j] > bm ? sc[j] : bm;
                }
                float *a = acc + i * head_dim;
                if (bm > m[i]) { /* a new maximum: rescale what was summed so far */
                    const float alpha = exp_nonpositive(m[i] - bm);
                    l[i] *= alpha;
                    for (int64_t d = 0; d < head_dim; d++) a[d] *= alpha;
                    m[i] = bm;
                }
                for (int64_t j = 0; j < n; j++) {
                    const float p = exp_nonpositive(sc[j] - m[i]);
                    const float *vh = base + (j0 + j) * slot_width + kv_width + kv_off;
                    l[i] += p;
                    for (int64_t d = 0; d < head_dim; d++) a[d] += p * vh[d];
                }
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < head_dim; d++) os[i * head_dim + d] = acc[i * head_dim + d] * inv;
    }
}

void decode_attention(const float *q, int64_t q_stride, const float *cache, float *out,
                      const int32_t *block_tables, const int32_t *context_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
    const int64_t group = num_heads / num_kv_heads; /* query heads per KV head */
    const int64_t kv_width = num_kv_heads * head_dim; /* a slot holds its keys, then values */
    /* A task is one sequence's KV heads, or a single KV head when there are too few
     * sequences to keep every core busy. */
    const int64_t split = num_seqs < 4 * omp_get_max_threads() ? num_kv_heads : 1;
    const int64_t hpt = num_kv_heads / split; /* KV heads per task */
    const int64_t nq = hpt * group;           /* query heads per task */
#pragma omp parallel
    {
        float *acc = (float *)malloc(sizeof(float) * (size_t)(nq * head_dim + 2 * nq));
        float *m = acc + nq * head_dim, *l = m + nq;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_seqs * split; t++) {
            const int64_t s = t / split, h0 = (t % split) * hpt;
            const float *qs = q + s * q_stride + h0 * group * head_dim;
            float *os = out + (s * num_heads + h0 * group) * head_dim;
            const int32_t *table = block_tables + s * max_blocks;
            const int64_t len = context_lens[s];
            if (head_dim == 64)
                attend_one(qs, os, cache, table, len, h0, nq, group, kv_width, block_size, scale, acc, m, l, 64);
            else if (head_dim == 128)
                attend_one(qs, os, cache, table, len, h0, nq, group, kv_width, block_size, scale, acc, m, l, 128);
            else
                attend_one(qs, os, cache, table, len, h0, nq, group, kv_width, block_size, scale, acc, m, l, head_dim);
        }
        free(acc);
    }
}

void silu_and_mul(const float *x, float *out, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = x + r * 2 * n, *up = gate + n;
        float *o = out + r * n;
        /* exp's argument is capped: fast math does not promise x / inf == 0. */
        for (int64_t i = 0; i < n; i++) o[i] = gate[i] / (1.0f + expf(fminf(-gate[i], 80.0f))) * up[i];
    }
}

void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim,
              float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > 32768)
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
#pragma omp parallel for schedule(static) if (rows * heads * rot_dim > 65536)
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
#pragma omp parallel for schedule(static) if (rows > 1)
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
#pragma omp parallel
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
