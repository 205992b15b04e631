/* Decode attention over the paged KV cache on CPU, float32: the two passes that read the cache, and the write of
 * new K/V rows (one C call where index_copy_ takes several torch ops per layer).
 *
 * cpu_kernels.py compiles this file with the system C compiler (-O3 -march=native -fopenmp, HEAD_DIM fixed per
 * build) and runs  scores = paged_qk(...);  probs = torch.softmax(scores);  out = paged_pv(probs, ...).
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
 * follow a block table. Dot products are done 16 keys at a time and reduced together (sum16), instead of one
 * horizontal sum per key. Plain GCC vector types: no intrinsics, so any x86 or Arm build compiles it. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<multiple of 16>"
#endif
#define LANES 16
#define CHUNKS (HEAD_DIM / LANES)
#define PREFETCH_ROWS_AHEAD 4 /* paged_pv: rows of V asked for ahead of use */

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);  /* unaligned load */
    return v;
}

static inline const float *row_at(const float *cache, const int32_t *table, int64_t t, int64_t block_size,
                                  int64_t row_floats) {
    return cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * row_floats;
}

static inline void prefetch_row(const float *row, int64_t row_floats) {
    for (int64_t byte = 0; byte < row_floats * (int64_t)sizeof(float); byte += 64)
        __builtin_prefetch((const char *)row + byte);
}

/* x[0..15] -> one vector whose lane i is the sum of x[i]'s 16 lanes. Four halving steps: each adds the two
 * halves of every lane group of two vectors, so 16 reductions cost 15 vector adds and 30 shuffles. */
#ifdef __clang__
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, (i16){__VA_ARGS__})
#endif
#define HALVES(x, y, LO, HI) (SHUFFLE(x, y, LO) + SHUFFLE(x, y, HI))
#define LO1 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI1 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO2 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI2 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO3 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI3 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LO4 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define HI4 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31

static inline v16 sum16(const v16 *x) {
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = HALVES(x[2 * i], x[2 * i + 1], LO1, HI1);
    for (int i = 0; i < 4; i++) b[i] = HALVES(a[2 * i], a[2 * i + 1], LO2, HI2);
    for (int i = 0; i < 2; i++) c[i] = HALVES(b[2 * i], b[2 * i + 1], LO3, HI3);
    return HALVES(c[0], c[1], LO4, HI4);
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
                v16 q[CHUNKS], partial[LANES];
                for (int c = 0; c < CHUNKS; c++) q[c] = load(query + (b * num_heads + h) * HEAD_DIM + c * LANES);
                for (int i = 0; i < LANES; i++) {
                    v16 s = q[0] * load(rows[i] + offset);
                    for (int c = 1; c < CHUNKS; c++) s += q[c] * load(rows[i] + offset + c * LANES);
                    partial[i] = s;
                }
                const v16 dots = sum16(partial) * scale;
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
        v16 acc[num_heads][CHUNKS];
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
