/* The register tile of panel_gemm.c's GEMM: out[r, c] for up to MAX_ROWS rows of x and the COLS columns of one
 * panel, one sequential fused multiply-add chain over k per element. greedy_head.c recomputes single rows with the
 * same code, so a logit it recomputes has the bits panel_gemm gives it (see panel_gemm.c for the layout and the
 * measurements). */
#ifndef HFBRIDGE_PANEL_TILE_H
#define HFBRIDGE_PANEL_TILE_H
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define COLS (2 * LANES) /* output columns per panel: two vectors */
/* 2 accumulators per row + 2 panel vectors + 1 broadcast: 14 rows use 31 of 32 registers, 6 rows 15 of 16 */
#define MAX_ROWS ((VECTOR_REGISTERS - 3) / 2)
/* out[r, c] = bias[c] + sum_k x[r, k] * panel[k, c] for r < ROWS, c < cols; `ahead` (or NULL): the next panel.
 * With silu_mul the panel's two vectors are a gate and an up projection of the same LANES output columns, and
 * out[r, c] = silu(gate) * up for c < cols (cols <= LANES): the MLP's SiLU-and-mul on the tile in registers. */
#define MICRO_KERNEL(ROWS) MICRO_KERNEL_OF(ROWS, rows_##ROWS, float, load)
/* the same on panels stored in bfloat16 (W_T), widened to float as they are read (LOAD_W) */
#define MICRO_KERNEL_OF(ROWS, NAME, W_T, LOAD_W)                                                                   \
    static void NAME(const float *restrict x, int64_t k, const W_T *restrict panel,                              \
                     const float *restrict bias, float *restrict out, int64_t ldo, int64_t cols,                 \
                     const W_T *restrict ahead, int silu_mul) {                                                  \
        vf acc[ROWS][2];                                                                                             \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf){0};                                           \
        for (int64_t p = 0; p < k; p++) {                                                                          \
            if (ahead) { /* into L2 (locality 1), where the panel will be read from: L1 stays for this one */    \
                __builtin_prefetch(ahead + p * COLS, 0, 1);                                                        \
                __builtin_prefetch(ahead + p * COLS + LANES, 0, 1);                                                \
            }                                                                                                      \
            const vf w0 = LOAD_W(panel + p * COLS), w1 = LOAD_W(panel + p * COLS + LANES);                        \
            for (int r = 0; r < ROWS; r++) {                                                                       \
                const vf xr = splat(x[r * k + p]);                                                                \
                acc[r][0] += xr * w0;                                                                              \
                acc[r][1] += xr * w1;                                                                              \
            }                                                                                                      \
        }                                                                                                          \
        const vf b0 = load(bias), b1 = load(bias + LANES);                                                        \
        for (int r = 0; r < ROWS; r++) {                                                                           \
            float row[COLS];                                                                                       \
            const vf lo = acc[r][0] + b0, hi = acc[r][1] + b1;                                                    \
            if (silu_mul) { /* torch's silu: x / (1 + e^-x) */                                                   \
                const vf y = lo / (splat(1.0f) + exp_lanes(-lo)) * hi;                                            \
                memcpy(row, &y, sizeof y);                                                                         \
            } else {                                                                                               \
                memcpy(row, &lo, sizeof lo);                                                                       \
                memcpy(row + LANES, &hi, sizeof hi);                                                               \
            }                                                                                                      \
            memcpy(out + r * ldo, row, cols * sizeof(float));                                                      \
        }                                                                                                          \
    }

MICRO_KERNEL(1) MICRO_KERNEL(2) MICRO_KERNEL(3) MICRO_KERNEL(4) MICRO_KERNEL(5) MICRO_KERNEL(6) MICRO_KERNEL(7)
MICRO_KERNEL(8) MICRO_KERNEL(9) MICRO_KERNEL(10) MICRO_KERNEL(11) MICRO_KERNEL(12) MICRO_KERNEL(13) MICRO_KERNEL(14)

typedef void (*micro_kernel)(const float *, int64_t, const float *, const float *, float *, int64_t, int64_t,
                             const float *, int);
static const micro_kernel BY_ROWS[15] = { /* by row count; up to MAX_ROWS are used */
    0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8, rows_9, rows_10, rows_11, rows_12, rows_13,
    rows_14};

#endif
