/* out [M, N] = x [M, K] . weight [N, K]^T (+ bias [N]) for M = 1 or 2 rows, float32: the projections of a decode
 * step with one or two requests, where the time is reading the weight once from memory.
 *
 * native_overrides/packed_linear.py has it built (hfbridge/native_build.py) and calls it for those row counts;
 * more rows go to oneDNN. Measured on 2 EPYC cores, SmolLM2-135M's projections, one row, 30 copies of each weight
 * (so none stays in cache): 1.2-1.5x oneDNN's packed GEMM (e.g. gate_up 3072 x 576: 0.37-0.38 ms vs 0.41-0.46).
 *
 * Each tile is 16 / M weight rows against the M input rows: 16 running vector sums (one per row pair), fed 16
 * floats of K at a time, reduced together at the end (sum16), and the tile's rows are asked for ahead of use.
 * Tiles split over the threads. K must be a multiple of 16. */
#include <stdint.h>
#include <string.h>

#include "simd16.h"

#define PREFETCH_BYTES_AHEAD 1024

#define TILE(M)                                                                                                \
    static void tile_##M(const float *restrict x, const float *restrict weight, const float *restrict bias,  \
                         float *restrict out, int64_t n0, int64_t n, int64_t k) {                            \
        enum { R = LANES / M };                                                                              \
        const float *rows[R];                                                                                \
        for (int r = 0; r < R; r++) rows[r] = weight + (n0 + (n0 + r < n ? r : 0)) * k;  /* repeat, unstored */ \
        v16 acc[LANES];                                                                                      \
        for (int i = 0; i < LANES; i++) acc[i] = (v16){0};                                                   \
        for (int64_t c = 0; c < k; c += LANES) {                                                             \
            for (int r = 0; r < R; r++) __builtin_prefetch((const char *)(rows[r] + c) + PREFETCH_BYTES_AHEAD); \
            v16 xs[M];                                                                                       \
            for (int m = 0; m < M; m++) xs[m] = load(x + m * k + c);                                         \
            for (int r = 0; r < R; r++) {                                                                    \
                const v16 w = load(rows[r] + c);                                                             \
                for (int m = 0; m < M; m++) acc[r * M + m] += xs[m] * w;                                     \
            }                                                                                                \
        }                                                                                                    \
        const v16 sums = sum16(acc);                                                                         \
        for (int r = 0; r < R && n0 + r < n; r++)                                                            \
            for (int m = 0; m < M; m++) out[m * n + n0 + r] = sums[r * M + m] + (bias ? bias[n0 + r] : 0.f);  \
    }

TILE(1)
TILE(2)

void small_gemm(const float *x, const float *weight, const float *bias, float *out, int64_t m, int64_t n,
                int64_t k, int num_threads) {
    const int64_t rows_per_tile = LANES / m, tiles = (n + rows_per_tile - 1) / rows_per_tile;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        if (m == 1)
            tile_1(x, weight, bias, out, t * rows_per_tile, n, k);
        else
            tile_2(x, weight, bias, out, t * rows_per_tile, n, k);
    }
}
