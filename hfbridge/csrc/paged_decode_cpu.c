/* Decode attention over the paged KV cache on CPU, float32 or bfloat16 caches: one call per layer (paged_attention: one pass over each
 * request's context, scores, softmax and the weighted sum of V together), and the write of new K/V rows (one C call
 * where index_copy_ takes several torch ops per layer).
 *
 * attention_backends/cpu_kernels.py has it built (hfbridge/native_build.py: -O3 -march=native -fopenmp, HEAD_DIM
 * fixed per build) and calls it through ctypes.
 *
 * Shapes (row-major, contiguous):
 *   query   [B, H, HEAD_DIM]            one token per request; query head h reads KV head h / (H / Hkv)
 *   cache   [N * block_size, Hkv, HEAD_DIM]   the K half or the V half of one layer's cache, slot-major
 *   tables  [B, table_width] int32      physical block ids of each request's context
 *   lens    [B] int32                   context lengths (>= 1), the new token included
 *   out     [B, H, HEAD_DIM]
 *
 * Why it is shaped so: the cache is far larger than the caches of the CPU, so time is memory traffic, and the
 * arithmetic must hide under it. Each request is one work item that walks its context LANES rows at a time, each row
 * read whole (Hkv * HEAD_DIM floats, all KV heads): the group's scores (LANES keys' dot products reduced together,
 * sum_lanes in simd.h, instead of one horizontal sum per key), then at once their share of the output, with the
 * softmax kept running (flash-decoding: a running max, and the sums rescaled when it rises). Meanwhile the next
 * group's K rows are asked for during the scores and its V rows during the weighted sum (__builtin_prefetch: the
 * hardware prefetcher alone does not follow a block table), spread over the heads' work so that the requests in
 * flight stay within what a core keeps. Against a K pass over the whole context, then softmax, then a V pass, this
 * takes under three quarters of the time, close to what reading the same bytes alone takes (figures:
 * docs/kernel-measurements.md). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#ifndef HEAD_DIM
#error "build with -DHEAD_DIM=<multiple of 16>"
#endif
/* -DKV_BF16: the cache and the new K/V rows are bfloat16 (half the bytes to read), widened to float32 as they
 * are read; the query and the output stay float32. */
#ifdef KV_BF16
typedef uint16_t kv_t;
#define load_kv load_bf16
#else
typedef float kv_t;
#define load_kv load
#endif
#define CHUNKS (HEAD_DIM / LANES)
/* A request's context slot by slot, in order, with no division per row (the block size is not known when the
 * kernel is compiled, and a 64-bit division costs tens of cycles: one per row was a visible share of the K pass). */
typedef struct {
    const int32_t *table;
    int64_t block_size, block, offset;
} slot_walk;

static inline slot_walk walk_from(const int32_t *table, int64_t block_size, int64_t t) {
    return (slot_walk){table, block_size, t / block_size, t % block_size};
}

/* the slot of the walk's position; the walk moves one position on */
static inline int64_t next_slot(slot_walk *walk) {
    const int64_t slot = (int64_t)walk->table[walk->block] * walk->block_size + walk->offset;
    if (++walk->offset == walk->block_size) {
        walk->offset = 0;
        walk->block++;
    }
    return slot;
}

/* Lines asked for ahead go into L2, not L1 (locality 1: prefetcht2): a group's rows are more lines than L1 can
 * have in flight, and L1 requests stall the loads of the current rows (prefetcht0 and prefetcht1 measured slower:
 * docs/kernel-measurements.md).
 *
 * A cursor over the lines of the next group's rows, row by row, so that each head can ask for its share. */
typedef struct {
    const char *rows[LANES];
    int64_t row, line, row_lines;
} line_cursor;

static inline void prefetch_lines(line_cursor *cursor, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        __builtin_prefetch(cursor->rows[cursor->row] + cursor->line * 64, 0, 1);
        if (++cursor->line == cursor->row_lines) {
            cursor->line = 0;
            cursor->row++;
        }
    }
}

/* how many of the LANES positions from t on are before len */
static inline int64_t lanes_left(int64_t t, int64_t len) { return len - t < LANES ? len - t : LANES; }

/* the largest lane of v: log2(LANES) halving steps, as sum_lanes does for sums */
static inline vf max_of(vf a, vf b) { return select_lanes(a > b, a, b); }

static inline float max_lane(vf v) {
#if LANES == 16
    v = max_of(v, SHUFFLE(v, v, (8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)));
    v = max_of(v, SHUFFLE(v, v, (4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)));
    v = max_of(v, SHUFFLE(v, v, (2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)));
    v = max_of(v, SHUFFLE(v, v, (1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14)));
#elif LANES == 8
    v = max_of(v, SHUFFLE(v, v, (4, 5, 6, 7, 0, 1, 2, 3)));
    v = max_of(v, SHUFFLE(v, v, (2, 3, 0, 1, 6, 7, 4, 5)));
    v = max_of(v, SHUFFLE(v, v, (1, 0, 3, 2, 5, 4, 7, 6)));
#else
    v = max_of(v, SHUFFLE(v, v, (2, 3, 0, 1)));
    v = max_of(v, SHUFFLE(v, v, (1, 0, 3, 2)));
#endif
    return v[0];
}

/* The running softmax of one query head: top is the largest score so far, total[i] the sum of e^(s - top) over the
 * keys seen in lane i, sums[c] the matching sum of e^(s - top) * V (chunk c of the head's output). */
typedef struct {
    float top;
    vf total, sums[CHUNKS];
} running_head;

/* out[h] = softmax_t(scale * query[h] . K[t]) . V[t] over t < len, for one request: LANES rows at a time (a short
 * last group repeats its first row in the missing lanes, whose scores become -inf). */
static void request_attention(const float *restrict query, const kv_t *restrict key_cache,
                              const kv_t *restrict value_cache, const int32_t *restrict table, int64_t len,
                              float *restrict out, int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                              float scale) {
    const int64_t group = num_heads / num_kv_heads, row_floats = num_kv_heads * HEAD_DIM;
    const int64_t row_lines = (row_floats * (int64_t)sizeof(kv_t) + 63) / 64;
    running_head heads[num_heads];
    for (int64_t h = 0; h < num_heads; h++) {
        heads[h].top = -INFINITY;
        heads[h].total = splat(0.0f);
        for (int c = 0; c < CHUNKS; c++) heads[h].sums[c] = splat(0.0f);
    }
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    slot_walk walk = walk_from(table, block_size, 0);
    int64_t slots[LANES], next_slots[LANES], n = lanes_left(0, len);
    for (int64_t i = 0; i < n; i++) slots[i] = next_slot(&walk);
    for (int64_t t0 = 0; t0 < len; t0 += LANES) {
        const int64_t next_n = t0 + LANES < len ? lanes_left(t0 + LANES, len) : 0;
        const kv_t *keys[LANES], *values[LANES];
        line_cursor next_keys = {.row_lines = row_lines}, next_values = {.row_lines = row_lines};
        for (int64_t i = 0; i < LANES; i++) {
            keys[i] = key_cache + slots[i < n ? i : 0] * row_floats;
            values[i] = value_cache + slots[i < n ? i : 0] * row_floats;
        }
        for (int64_t i = 0; i < next_n; i++) {
            next_slots[i] = next_slot(&walk);
            next_keys.rows[i] = (const char *)(key_cache + next_slots[i] * row_floats);
            next_values.rows[i] = (const char *)(value_cache + next_slots[i] * row_floats);
        }
        const int64_t ahead = next_n * row_lines; /* lines to ask for, a share of them per head */
        float probs[num_heads][LANES];
        for (int64_t h = 0; h < num_heads; h++) {
            prefetch_lines(&next_keys, ahead * (h + 1) / num_heads - ahead * h / num_heads);
            /* the group's scores: one partial-sum vector per key (LANES independent chains of FMAs, each query
             * chunk loaded once for all of them), reduced together */
            const float *q = query + h * HEAD_DIM;
            const int64_t head = (h / group) * HEAD_DIM;
            vf partial[LANES];
            const vf first = load(q);
            for (int i = 0; i < LANES; i++) partial[i] = first * load_kv(keys[i] + head);
            for (int c = 1; c < CHUNKS; c++) {
                const vf chunk = load(q + c * LANES);
                for (int i = 0; i < LANES; i++) partial[i] += chunk * load_kv(keys[i] + head + c * LANES);
            }
            vf scores = sum_lanes(partial) * scale;
            if (n < LANES) scores = select_lanes(lane < (int32_t)n, scores, splat(-INFINITY));
            /* the running softmax: a new top rescales what was summed under the old one (e^-inf: 0, as 1e-38) */
            running_head *run = &heads[h];
            const float peak = max_lane(scores);
            if (peak > run->top) {
                const vf rescale = exp_lanes(splat(run->top - peak));
                run->total *= rescale;
                for (int c = 0; c < CHUNKS; c++) run->sums[c] *= rescale;
                run->top = peak;
            }
            const vf weights = exp_lanes(scores - run->top);
            run->total += weights;
            memcpy(probs[h], &weights, sizeof weights);
        }
        for (int64_t h = 0; h < num_heads; h++) {
            prefetch_lines(&next_values, ahead * (h + 1) / num_heads - ahead * h / num_heads);
            const int64_t head = (h / group) * HEAD_DIM;
            vf sums[CHUNKS]; /* in registers over the group's rows */
            memcpy(sums, heads[h].sums, sizeof sums);
            for (int64_t r = 0; r < n; r++) {
                const vf w = splat(probs[h][r]);
                for (int c = 0; c < CHUNKS; c++) sums[c] += w * load_kv(values[r] + head + c * LANES);
            }
            memcpy(heads[h].sums, sums, sizeof sums);
        }
        memcpy(slots, next_slots, sizeof slots);
        n = next_n;
    }
    for (int64_t h = 0; h < num_heads; h++) {
        float total = 0.0f;
        for (int i = 0; i < LANES; i++) total += heads[h].total[i];
        const vf inverse = splat(1.0f / total);
        for (int c = 0; c < CHUNKS; c++) {
            const vf o = heads[h].sums[c] * inverse;
            memcpy(out + h * HEAD_DIM + c * LANES, &o, sizeof o);
        }
    }
}

/* out[b] for every request b, one request per work item */
void paged_attention(const float *restrict query, const kv_t *restrict key_cache,
                     const kv_t *restrict value_cache, const int32_t *restrict tables, int64_t table_width,
                     const int32_t *restrict lens, float *restrict out, int64_t batch, int64_t num_heads,
                     int64_t num_kv_heads, int64_t block_size, float scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; b++)
        request_attention(query + b * num_heads * HEAD_DIM, key_cache, value_cache, tables + b * table_width,
                          lens[b], out + b * num_heads * HEAD_DIM, num_heads, num_kv_heads, block_size, scale);
}

/* key_cache / value_cache rows [slot] = key / value [t] for t < num_tokens with slots[t] >= 0 (-1: not stored).
 * Token t's row starts at key + t * key_stride (the K of a fused qkv output is a strided view). Returns the first
 * slot past num_slots, writing nothing, if there is one; else -1. */
int64_t write_kv(const kv_t *restrict key, int64_t key_stride, const kv_t *restrict value, int64_t value_stride,
                 kv_t *restrict key_cache, kv_t *restrict value_cache, const int64_t *restrict slots,
                 int64_t num_tokens, int64_t row_floats, int64_t num_slots) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (slots[t] >= num_slots) return slots[t];
    for (int64_t t = 0; t < num_tokens; t++) {
        if (slots[t] < 0) continue;
        memcpy(key_cache + slots[t] * row_floats, key + t * key_stride, row_floats * sizeof(kv_t));
        memcpy(value_cache + slots[t] * row_floats, value + t * value_stride, row_floats * sizeof(kv_t));
    }
    return -1;
}
