/* Decode attention over the paged KV cache on CPU, float32: the two passes that read the cache, and the write of
 * new K/V rows (one C call where index_copy_ takes several torch ops per layer).
 *
 * attention_backends/cpu_kernels.py has it built (hfbridge/native_build.py: -O3 -march=native -fopenmp, HEAD_DIM
 * fixed per build) and runs  scores = paged_qk(...);  probs = torch.softmax(scores);  out = paged_pv(probs, ...).
 *
 * Shapes (row-major, contiguous):
 *   query   [B, H, HEAD_DIM]            one token per request; query head h reads KV head h / (H / Hkv)
 *   cache   [N * block_size, Hkv, HEAD_DIM]   the K half or the V half of one layer's cache, slot-major
 *   tables  [B, table_width] int32      physical block ids of each request's context
 *   lens    [B] int32                   context lengths (>= 1), the new token included
 *   scores  [B, H, max_len]             max_len >= every len; entries past len[b] are set to -inf
 *   out     [B, H, HEAD_DIM]
 *
 * Why it is shaped so: the cache is far larger than the caches of the CPU, so time is memory traffic. Each request
 * is one work item that reads every cached row it needs exactly once per pass, whole (Hkv * HEAD_DIM floats,
 * all KV heads), and asks for the next rows early (__builtin_prefetch): the hardware prefetcher alone does not
 * follow a block table. Dot products are done LANES keys at a time and reduced together (sum_lanes in simd.h), instead
 * of one horizontal sum per key. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<multiple of 16>"
#endif
#define CHUNKS (HEAD_DIM / LANES)
#define PREFETCH_ROWS_AHEAD 4 /* paged_pv: rows of V asked for ahead of use */

static inline const float *row_at(const float *cache, const int32_t *table, int64_t t, int64_t block_size,
                                  int64_t row_floats) {
    return cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row_floats;
}

/* Into L2, not L1 (locality 1: prefetcht2): a group of rows asked for at once is more lines than L1 can have in
 * flight, and the L1 requests stall the loads of the current rows. Measured at 64 requests x 192 tokens, random
 * blocks: paged_qk 0.86 -> 0.68 ms and paged_pv 0.73 -> 0.59 ms per layer against prefetches into L1. */
static inline void prefetch_row(const float *row, int64_t row_floats) {
    for (int64_t byte = 0; byte < row_floats * (int64_t)sizeof(float); byte += 64)
        __builtin_prefetch((const char *)row + byte, 0, 1);
}

/* scores[b, h, t] = scale * query[b, h] . K[t of request b, KV head of h] */
void paged_qk(const float *restrict query, const float *restrict key_cache, const int32_t *restrict tables,
              int64_t table_width, const int32_t *restrict lens, float *restrict scores, int64_t batch,
              int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t max_len, float scale,
              int num_threads) {
    const int64_t group = num_heads / num_kv_heads, row_floats = num_kv_heads * HEAD_DIM;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b];
        const int32_t *table = tables + b * table_width;
        for (int64_t t0 = 0; t0 < len; t0 += LANES) {
            const int64_t n = len - t0 < LANES ? len - t0 : LANES;
            const float *rows[LANES];
            for (int64_t i = 0; i < LANES; i++)  /* a short last group repeats its first key; not stored */
                rows[i] = row_at(key_cache, table, t0 + (i < n ? i : 0), block_size, row_floats);
            for (int64_t t = t0 + LANES; t < len && t < t0 + 2 * LANES; t++)
                prefetch_row(row_at(key_cache, table, t, block_size, row_floats), row_floats);
            for (int64_t h = 0; h < num_heads; h++) {
                const int64_t offset = (h / group) * HEAD_DIM;
                vf q[CHUNKS], partial[LANES];
                for (int c = 0; c < CHUNKS; c++) q[c] = load(query + (b * num_heads + h) * HEAD_DIM + c * LANES);
                for (int i = 0; i < LANES; i++) {
                    vf s = q[0] * load(rows[i] + offset);
                    for (int c = 1; c < CHUNKS; c++) s += q[c] * load(rows[i] + offset + c * LANES);
                    partial[i] = s;
                }
                const vf dots = sum_lanes(partial) * scale;
                float *out = scores + (b * num_heads + h) * max_len + t0;
                for (int64_t i = 0; i < n; i++) out[i] = dots[i];
            }
        }
        for (int64_t h = 0; h < num_heads; h++)
            for (int64_t t = len; t < max_len; t++) scores[(b * num_heads + h) * max_len + t] = -INFINITY;
    }
}

/* out[b, h] = sum over t < lens[b] of probs[b, h, t] * V[t of request b, KV head of h] */
void paged_pv(const float *restrict probs, const float *restrict value_cache, const int32_t *restrict tables,
              int64_t table_width, const int32_t *restrict lens, float *restrict out, int64_t batch,
              int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t max_len, int num_threads) {
    const int64_t group = num_heads / num_kv_heads, row_floats = num_kv_heads * HEAD_DIM;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = lens[b];
        const int32_t *table = tables + b * table_width;
        const float *p = probs + b * num_heads * max_len;
        vf acc[num_heads][CHUNKS];
        memset(acc, 0, sizeof acc);
        for (int64_t t = 0; t < len; t++) {
            const float *row = row_at(value_cache, table, t, block_size, row_floats);
            if (t + PREFETCH_ROWS_AHEAD < len)
                prefetch_row(row_at(value_cache, table, t + PREFETCH_ROWS_AHEAD, block_size, row_floats), row_floats);
            for (int64_t h = 0; h < num_heads; h++) {
                const float w = p[h * max_len + t];
                const float *v = row + (h / group) * HEAD_DIM;
                for (int c = 0; c < CHUNKS; c++) acc[h][c] += w * load(v + c * LANES);
            }
        }
        memcpy(out + b * num_heads * HEAD_DIM, acc, sizeof acc);
    }
}

/* key_cache / value_cache rows [slot] = key / value [t] for t < num_tokens with slots[t] >= 0 (-1: not stored).
 * Token t's row starts at key + t * key_stride (the K of a fused qkv output is a strided view). Returns the first
 * slot past num_slots, writing nothing, if there is one; else -1. */
int64_t write_kv(const float *restrict key, int64_t key_stride, const float *restrict value, int64_t value_stride,
                 float *restrict key_cache, float *restrict value_cache, const int64_t *restrict slots,
                 int64_t num_tokens, int64_t row_floats, int64_t num_slots) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= num_slots) return slots[t];
    for (int64_t t = 0; t < num_tokens; t++) {
        if (slots[t] < 0) continue;
        memcpy(key_cache + slots[t] * row_floats, key + t * key_stride, row_floats * sizeof(float));
        memcpy(value_cache + slots[t] * row_floats, value + t * value_stride, row_floats * sizeof(float));
    }
    return -1;
}
