/* Ember's CPU kernels: float32, compiled on first use for the host CPU (see native/__init__.py).
 *
 * decode_attention: one new query token per sequence attends over its paged KV cache in place,
 * so no per-step gather copies the context out of the cache. The cache of a layer is laid out
 * [slots, 2 (key, value), kv_heads, head_dim]; a sequence's position p lives in slot
 * block_table[p / block_size] * block_size + p % block_size.
 *
 * silu_and_mul: out = silu(x[:, :n]) * x[:, n:], the gated MLP activation in one pass.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void decode_attention(const float *q, const float *cache, float *out,
                      const int32_t *block_tables, const int32_t *context_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks,
                      int64_t max_context, float scale) {
    const int64_t group = num_heads / num_kv_heads; /* query heads per KV head */
    const int64_t kv_width = num_kv_heads * head_dim; /* a slot holds its keys, then values */
    /* A task is one sequence's KV heads, or a single KV head when there are too few
     * sequences to keep every core busy. Reading all of a slot's heads in one task uses each
     * cache line fetched (the heads of a slot are one run of memory); measured 1.5-2x faster
     * than a task per head at 32 sequences. */
    const int64_t split = num_seqs < 4 * omp_get_max_threads() ? num_kv_heads : 1;
    const int64_t heads_per_task = num_kv_heads / split;
#pragma omp parallel
    {
        /* Per thread: a task's scores, for each of its query heads over the whole context. */
        float *scores = (float *)malloc(
            sizeof(float) * (size_t)(heads_per_task * group * (max_context > 0 ? max_context : 1)));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_seqs * split; t++) {
            const int64_t s = t / split, h0 = (t % split) * heads_per_task;
            const int64_t nq = heads_per_task * group; /* query heads in this task */
            const int64_t len = context_lens[s];
            const int32_t *table = block_tables + s * max_blocks;
            const float *qs = q + (s * num_heads + h0 * group) * head_dim;
            float *os = out + (s * num_heads + h0 * group) * head_dim;
            /* Pass 1: scores q.k for every position and query head. */
            for (int64_t p = 0; p < len; p++) {
                const int64_t slot = (int64_t)table[p / block_size] * block_size + p % block_size;
                const float *k = cache + slot * 2 * kv_width + h0 * head_dim;
                for (int64_t i = 0; i < nq; i++) {
                    const float *qh = qs + i * head_dim, *kh = k + (i / group) * head_dim;
                    float dot = 0.0f;
                    for (int64_t d = 0; d < head_dim; d++) dot += qh[d] * kh[d];
                    scores[i * len + p] = dot * scale;
                }
            }
            /* Softmax weights per query head; the division by their sum comes last. */
            for (int64_t i = 0; i < nq; i++) {
                float *si = scores + i * len, m = -FLT_MAX, sum = 0.0f;
                for (int64_t p = 0; p < len; p++) m = si[p] > m ? si[p] : m;
                for (int64_t p = 0; p < len; p++) {
                    si[p] = expf(si[p] - m);
                    sum += si[p];
                }
                const float inv = 1.0f / sum;
                for (int64_t p = 0; p < len; p++) si[p] *= inv;
            }
            /* Pass 2: the weighted sum of values. */
            memset(os, 0, sizeof(float) * (size_t)(nq * head_dim));
            for (int64_t p = 0; p < len; p++) {
                const int64_t slot = (int64_t)table[p / block_size] * block_size + p % block_size;
                const float *v = cache + slot * 2 * kv_width + kv_width + h0 * head_dim;
                for (int64_t i = 0; i < nq; i++) {
                    const float w = scores[i * len + p], *vh = v + (i / group) * head_dim;
                    float *oh = os + i * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) oh[d] += w * vh[d];
                }
            }
        }
        free(scores);
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
