/* out[r] = argmax over row r of x [m, n] float32, with torch.argmax's answer: the first index of the largest value,
 * and the first NaN where a row has one (NaN counts as larger than everything).
 *
 * Greedy sampling takes it over the LM head's logits every step (64 rows x 49152 for SmolLM2 at 64 requests), where
 * torch's CPU argmax walks each row one element at a time (docs/kernel-measurements.md). Here each row is one pass of
 * vector compares: every lane keeps its running maximum and the first index it was met at (a strictly larger value
 * replaces it, an equal one does not), and the lanes are merged at the end, the smallest index winning a tie. */
#include <math.h>
#include <stdint.h>

#include "simd.h"

static int64_t first_nan(const float *row, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        if (isnan(row[j])) return j;
    return -1;
}

static int64_t argmax_row(const float *restrict row, int64_t n) {
    vf best = splat(-INFINITY);
    vi best_at = {0}, at;
    for (int i = 0; i < LANES; i++) at[i] = i;
    vi nan_seen = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        const vf v = load(row + j);
        nan_seen |= v != v;
        const vi larger = v > best;
        best = select_lanes(larger, v, best);
        best_at = (larger & at) | (~larger & best_at);
        at += LANES;
    }
    float top = best[0];
    int64_t top_at = best_at[0];
    for (int i = 1; i < LANES; i++)
        if (best[i] > top || (best[i] == top && best_at[i] < top_at)) {
            top = best[i];
            top_at = best_at[i];
        }
    for (; j < n; j++) { /* the tail: later than every vector element, so only a larger value wins */
        if (isnan(row[j])) return first_nan(row, n);
        if (row[j] > top) {
            top = row[j];
            top_at = j;
        }
    }
    for (int i = 0; i < LANES; i++)
        if (nan_seen[i]) return first_nan(row, n);
    return top_at;
}

void row_argmax(const float *x, int64_t m, int64_t n, int64_t *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < m; r++) out[r] = argmax_row(x + r * n, n);
}
