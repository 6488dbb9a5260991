/* Ember's decode step through every decoder layer in one call (built with cpu_kernels.c and
 * quant_kernels.c, see __init__.py).
 *
 * At one or a few sequences a decode step of a small quantized model is mostly overhead: each
 * layer makes about twenty trips from Python into torch and the C kernels, each costing more
 * than the work it starts. decode_layers runs the same kernels in the same order, with the same
 * arithmetic (so the same results, bit for bit, as the layer-by-layer path), from here:
 *
 *   residual += x;  h = rms_norm(residual)            (the first layer: residual = x)
 *   qkv = h @ Wqkv (+ bias);  rotary on the Q and K heads;  K, V written to their slots
 *   a = paged decode attention (the new token included);  x = a @ Wo (+ bias)
 *   residual += x;  h = rms_norm(residual)
 *   x = silu_and_mul(h @ Wgate_up (+ bias)) @ Wdown (+ bias)
 *
 * and at the end out = rms_norm(residual + x) with the final norm. Every linear layer is a
 * quantized one in the tiled layout of quant_kernels.c. The KV cache of a layer is laid out
 * [slots, 2 (key, value), kv_heads, head_dim], as decode_attention reads it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void decode_attention(const float *q, int64_t q_stride, const float *cache, float *out,
                      const int32_t *block_tables, const int32_t *context_lens,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale);
void silu_and_mul(const float *x, float *out, int64_t rows, int64_t n);
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t dim,
              float eps);
void rotary(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
            int64_t rot_dim, const float *cos, const float *sin, int64_t neox);
void linear_quant(const float *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t bits,
                  const float *scales, const float *mins, int64_t N, int64_t Kp, int64_t G,
                  const float *bias, float *out, int64_t ldo);

/* A quantized linear layer (models/quant.py TiledRows): n outputs, k inputs (kp stored). */
typedef struct {
    const void *codes;
    const float *scales, *mins, *bias; /* mins and bias may be NULL */
    int64_t bits, n, k, kp, group;
} ember_qlinear;

typedef struct {
    const float *input_norm, *post_norm;
    ember_qlinear qkv, o, gate_up, down;
    float *cache;
} ember_layer;

/* The model's shapes (the same for every layer). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, rot_dim, neox, block_size;
    float eps, scale;
} ember_dims;

static void linear(const ember_qlinear *l, const float *x, int64_t M, float *out) {
    linear_quant(x, M, l->k, l->k, l->codes, l->bits, l->scales, l->mins, l->n, l->kp, l->group,
                 l->bias, out, l->n);
}

static void add_into(float *residual, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) residual[i] += x[i];
}

/* x [M, hidden]: the step's embeddings in, the last layer's MLP output after. residual
 * [M, hidden]: scratch. out [M, hidden]: the final norm of the residual stream. cos, sin
 * [M, rot_dim / 2]; slots [M]: where each token's K and V go; block_tables [M, max_blocks] and
 * context_lens [M] (the new token counted) as decode_attention reads them. */
void decode_layers(const ember_layer *layers, int64_t num_layers, const ember_dims *d,
                   const float *final_norm, int64_t M, float *x, float *residual, float *out,
                   const float *cos, const float *sin, const int64_t *slots,
                   const int32_t *block_tables, const int32_t *context_lens,
                   int64_t max_blocks) {
    const int64_t H = d->hidden, q_size = d->heads * d->head_dim;
    const int64_t kv_width = d->kv_heads * d->head_dim;
    const int64_t qkv_n = layers[0].qkv.n, inter = layers[0].gate_up.n / 2;
    float *h = (float *)malloc(sizeof(float) * (size_t)(M * H));
    float *qkv = (float *)malloc(sizeof(float) * (size_t)(M * qkv_n));
    float *attn = (float *)malloc(sizeof(float) * (size_t)(M * q_size));
    float *gate_up = (float *)malloc(sizeof(float) * (size_t)(M * 2 * inter));
    float *act = (float *)malloc(sizeof(float) * (size_t)(M * inter));
    memcpy(residual, x, sizeof(float) * (size_t)(M * H));
    for (int64_t l = 0; l < num_layers; l++) {
        const ember_layer *L = layers + l;
        if (l > 0) add_into(residual, x, M * H);
        rms_norm(residual, L->input_norm, h, M, H, d->eps);
        linear(&L->qkv, h, M, qkv);
        rotary(qkv, M, qkv_n, d->heads + d->kv_heads, d->head_dim, d->rot_dim, cos, sin, d->neox);
        for (int64_t m = 0; m < M; m++) {
            float *slot = L->cache + slots[m] * 2 * kv_width;
            memcpy(slot, qkv + m * qkv_n + q_size, sizeof(float) * (size_t)kv_width);
            memcpy(slot + kv_width, qkv + m * qkv_n + q_size + kv_width,
                   sizeof(float) * (size_t)kv_width);
        }
        decode_attention(qkv, qkv_n, L->cache, attn, block_tables, context_lens, M, d->heads,
                         d->kv_heads, d->head_dim, d->block_size, max_blocks, d->scale);
        linear(&L->o, attn, M, x);
        add_into(residual, x, M * H);
        rms_norm(residual, L->post_norm, h, M, H, d->eps);
        linear(&L->gate_up, h, M, gate_up);
        silu_and_mul(gate_up, act, M, inter);
        linear(&L->down, act, M, x);
    }
    add_into(residual, x, M * H);
    rms_norm(residual, final_norm, out, M, H, d->eps);
    free(h);
    free(qkv);
    free(attn);
    free(gate_up);
    free(act);
}
