/* Decode attention over the paged KV cache on CPU, float32: one call per layer (paged_attention: scores, softmax
 * and the weighted sum of V, request by request), and the write of new K/V rows (one C call where index_copy_
 * takes several torch ops per layer).
 *
 * attention_backends/cpu_kernels.py has it built (hfbridge/native_build.py: -O3 -march=native -fopenmp, HEAD_DIM
 * fixed per build) and calls it through ctypes.
 *
 * Shapes (row-major, contiguous):
 *   query   [B, H, HEAD_DIM]            one token per request; query head h reads KV head h / (H / Hkv)
 *   cache   [N * block_size, Hkv, HEAD_DIM]   the K half or the V half of one layer's cache, slot-major
 *   tables  [B, table_width] int32      physical block ids of each request's context
 *   lens    [B] int32                   context lengths (>= 1), the new token included
 *   scores  [B, H, max_len]             scratch, max_len >= every len; entries past len[b] are not touched
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
#define PREFETCH_ROWS_AHEAD 8 /* rows of K or V asked for ahead of use */
/* A request whose V rows take at most this many bytes has them asked for during its K pass, into L2 (512 KiB or
 * more on current x86 and Arm cores), so that memory serves two streams at once and the V pass reads from L2.
 * Measured at 64 requests x 192 tokens (144 KiB of V each): 3-8% less time per layer. */
#define VALUES_DURING_KEYS_BYTES (256 << 10)

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

/* Into L2, not L1 (locality 1: prefetcht2): rows asked for ahead are more lines than L1 can have in flight, and
 * the L1 requests stall the loads of the current rows. Measured at 64 requests x 192 tokens, random blocks: the
 * K pass 0.86 -> 0.68 ms and the V pass 0.73 -> 0.59 ms per layer against prefetches into L1. */
static inline void prefetch_row(const float *row, int64_t row_floats) {
    for (int64_t byte = 0; byte < row_floats * (int64_t)sizeof(float); byte += 64)
        __builtin_prefetch((const char *)row + byte, 0, 1);
}

/* how many of the LANES positions from t on are before len */
static inline int64_t lanes_left(int64_t t, int64_t len) { return len - t < LANES ? len - t : LANES; }

/* n <= LANES floats from p, the lanes past n -inf. A whole vector is one load: a copy of a length unknown at
 * compile time is a call to memcpy, and one per vector made the softmax cost as much as the K pass. */
static inline vf load_padded(const float *p, int64_t n) {
    if (n == LANES) return load(p);
    vf v = splat(-INFINITY);
    memcpy(&v, p, n * sizeof(float));
    return v;
}

/* the first n <= LANES lanes of v to p; a whole vector as a copy of fixed size (one store, see load_padded) */
static inline void store_first(float *p, vf v, int64_t n) {
    if (n == LANES)
        memcpy(p, &v, sizeof v);
    else
        memcpy(p, &v, n * sizeof(float));
}

/* scores[h, t] = scale * query[h] . K[t of this request, KV head of h] for t < len (scores' rows are max_len
 * apart); value_cache (or NULL): V rows to ask for along with the K rows. Keys are taken LANES at a time: for each
 * head, one partial-sum vector per key (LANES independent chains of FMAs, each query chunk loaded once for all of
 * them), reduced together (sum_lanes). The group's K rows stay in L1 while its heads read them.
 * Row t + PREFETCH_ROWS_AHEAD is asked for as row t is gathered: one row at a time, as request_pv reads, where
 * asking for a whole group of rows at once measured 20-30% slower (more requests in flight than the core keeps). */
static void request_qk(const float *restrict query, const float *restrict key_cache,
                       const float *restrict value_cache, const int32_t *restrict table, int64_t len,
                       float *restrict scores, int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                       int64_t max_len, float scale) {
    const int64_t group = num_heads / num_kv_heads, row_floats = num_kv_heads * HEAD_DIM;
    slot_walk keys = walk_from(table, block_size, 0), ahead = walk_from(table, block_size, PREFETCH_ROWS_AHEAD);
    for (int64_t t0 = 0; t0 < len; t0 += LANES) {
        const int64_t n = lanes_left(t0, len);
        const float *rows[LANES];
        for (int64_t i = 0; i < LANES; i++) {
            /* a short last group repeats its first key; those lanes are not stored */
            rows[i] = i < n ? key_cache + next_slot(&keys) * row_floats : rows[0];
            if (t0 + i + PREFETCH_ROWS_AHEAD < len) {
                const int64_t at = next_slot(&ahead) * row_floats;
                prefetch_row(key_cache + at, row_floats);
                if (value_cache) prefetch_row(value_cache + at, row_floats);
            }
        }
        for (int64_t h = 0; h < num_heads; h++) {
            const float *q = query + h * HEAD_DIM;
            const int64_t head = (h / group) * HEAD_DIM;
            vf partial[LANES];
            const vf first = load(q);
            for (int i = 0; i < LANES; i++) partial[i] = first * load(rows[i] + head);
            for (int c = 1; c < CHUNKS; c++) {
                const vf chunk = load(q + c * LANES);
                for (int i = 0; i < LANES; i++) partial[i] += chunk * load(rows[i] + head + c * LANES);
            }
            store_first(scores + h * max_len + t0, sum_lanes(partial) * scale, n);
        }
    }
}

/* scores[h, :len] -> softmax over them, in place, for every head: e^(s - max) / sum. Whole vectors: a short tail
 * is padded with -inf (then e^ gives about 1e-38, below the sum's last bit) and not stored. */
static void request_softmax(float *restrict scores, int64_t len, int64_t num_heads, int64_t max_len) {
    for (int64_t h = 0; h < num_heads; h++) {
        float *row = scores + h * max_len;
        vf top = splat(-INFINITY);
        for (int64_t t = 0; t < len; t += LANES) {
            const vf v = load_padded(row + t, lanes_left(t, len));
            top = select_lanes(v > top, v, top);
        }
        float peak = top[0];
        for (int i = 1; i < LANES; i++) peak = top[i] > peak ? top[i] : peak;
        vf total = splat(0.0f);
        for (int64_t t = 0; t < len; t += LANES) {
            const int64_t n = lanes_left(t, len);
            const vf e = exp_lanes(load_padded(row + t, n) - peak);
            total += e;
            store_first(row + t, e, n);
        }
        float sum = 0.0f;
        for (int i = 0; i < LANES; i++) sum += total[i];
        const float inverse = 1.0f / sum;
        for (int64_t t = 0; t < len; t++) row[t] *= inverse;
    }
}

/* out[h] = sum over t < len of probs[h, t] * V[t of this request, KV head of h], block by block: within a block
 * (in L1 once its first head has read it), each head keeps its sums in registers over the block's rows and reads
 * its probabilities in order. prefetch: ask for the rows ahead (when the K pass has not). */
static void request_pv(const float *restrict probs, const float *restrict value_cache,
                       const int32_t *restrict table, int64_t len, float *restrict out, int64_t num_heads,
                       int64_t num_kv_heads, int64_t block_size, int64_t max_len, int prefetch) {
    const int64_t group = num_heads / num_kv_heads, row_floats = num_kv_heads * HEAD_DIM;
    vf sums[num_heads][CHUNKS];
    memset(sums, 0, sizeof sums);
    slot_walk ahead = walk_from(table, block_size, PREFETCH_ROWS_AHEAD);
    for (int64_t start = 0; start < len; start += block_size) {
        const float *block = value_cache + (int64_t)table[start / block_size] * block_size * row_floats;
        const int64_t rows = len - start < block_size ? len - start : block_size;
        for (int64_t t = start; prefetch && t < start + rows && t + PREFETCH_ROWS_AHEAD < len; t++)
            prefetch_row(value_cache + next_slot(&ahead) * row_floats, row_floats);
        for (int64_t h = 0; h < num_heads; h++) {
            const float *p = probs + h * max_len + start, *v = block + (h / group) * HEAD_DIM;
            vf acc[CHUNKS];
            memcpy(acc, sums[h], sizeof acc);
            for (int64_t r = 0; r < rows; r++) {
                const vf w = splat(p[r]);
                for (int c = 0; c < CHUNKS; c++) acc[c] += w * load(v + r * row_floats + c * LANES);
            }
            memcpy(sums[h], acc, sizeof acc);
        }
    }
    memcpy(out, sums, sizeof sums);
}

/* out[b, h] = softmax_t(scale * query[b, h] . K[t]) . V[t] over t < lens[b], for every request b: one request per
 * work item, its scores ([H, max_len] of `scores`, only :len used) written and read back by the same thread while
 * they are in its caches, so one call per layer and no pass over the scores in between. */
void paged_attention(const float *restrict query, const float *restrict key_cache,
                     const float *restrict value_cache, const int32_t *restrict tables, int64_t table_width,
                     const int32_t *restrict lens, float *restrict scores, float *restrict out, int64_t batch,
                     int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t max_len, float scale,
                     int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < batch; b++) {
        const int32_t *table = tables + b * table_width;
        float *request_scores = scores + b * num_heads * max_len;
        const int64_t value_bytes = lens[b] * num_kv_heads * HEAD_DIM * (int64_t)sizeof(float);
        const int values_during_keys = value_bytes <= VALUES_DURING_KEYS_BYTES;
        request_qk(query + b * num_heads * HEAD_DIM, key_cache, values_during_keys ? value_cache : NULL, table,
                   lens[b], request_scores, num_heads, num_kv_heads, block_size, max_len, scale);
        request_softmax(request_scores, lens[b], num_heads, max_len);
        request_pv(request_scores, value_cache, table, lens[b], out + b * num_heads * HEAD_DIM, num_heads,
                   num_kv_heads, block_size, max_len, !values_during_keys);
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
