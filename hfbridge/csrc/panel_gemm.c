/* out [M, N] = x [M, K] . W^T (+ bias [N]), float32, on W laid out once in panels of COLS output columns:
 *   panels [ceil(N / COLS), K, COLS]   panels[j, k, c] = W[COLS j + c, k]  (columns past N are zeros)
 * COLS is two vectors of the build's width (simd.h): 32 with AVX-512, 16 with AVX2, 8 with SSE or NEON; Python
 * asks panel_columns(). native_overrides/packed_linear.py lays the weight out and calls this for every row count,
 * from a one-request decode step to a 2048-token prefill.
 *
 * How it runs: each thread takes whole panels. For up to MAX_ROWS rows of x at a time the micro-kernel holds a
 * [rows, COLS] tile of the output in registers (rows x 2 vectors) and walks K once: per k, two vector loads of the
 * panel, one broadcast of x per row, two fused multiply-adds per row. MAX_ROWS fills the vector registers: 14 rows
 * (28 accumulators) of the 32 of AVX-512, 6 rows (12) of the 16 of AVX2, the BLIS-style 6 x 16 tile. The panel
 * (K x COLS floats) stays in the core's L2 while every row block passes over it; the next panel is asked for
 * (prefetch into L2) during the first block, so the weight streams from memory under the arithmetic. Rows come in
 * bands of BAND_ROWS so that a band of x stays in L2 as well.
 *
 * Each output element is one sequential sum over k, whatever M is or which block its row falls in: a row gets
 * the same bits alone or in any batch (batch invariance).
 *
 * panel_gemm_silu_mul is the same loop for the MLP's gate_up projection on panels that pair LANES gate rows with the
 * same LANES up rows: the tile's two vectors per row are a gate and its up, and the epilogue writes silu(gate) * up.
 *
 * Measured on the 2-core AVX-512 EPYC against oneDNN's packed GEMM (torch.ops.mkldnn._linear_pointwise), SmolLM2-135M's
 * four projections, 30 copies each so the weights come from memory, ms per decoder step:
 *   1 row 19.0 vs 28.8 (oneDNN's time there is the earlier small-GEMM kernel's), 4 rows 21.7 vs 27.5,
 *   16 rows 33.6 vs 42.3, 64 rows 90.2 vs 94.5, 2048 rows 2833 vs 2767 (within 3%). */
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define COLS (2 * LANES) /* output columns per panel: two vectors */
/* 2 accumulators per row + 2 panel vectors + 1 broadcast: 14 rows use 31 of 32 registers, 6 rows 15 of 16 */
#define MAX_ROWS ((VECTOR_REGISTERS - 3) / 2)
/* rows of x per band: 384 x K floats stay in a 1 MiB L2 (the AVX-512 EPYC) for K up to about 600; on a Zen 3 with
 * 512 KiB of L2, bands of 192 or 768 rows were no faster */
#define BAND_ROWS 384

int panel_columns(void) { return COLS; }

/* out[r, c] = bias[c] + sum_k x[r, k] * panel[k, c] for r < ROWS, c < cols; `ahead` (or NULL): the next panel.
 * With silu_mul the panel's two vectors are a gate and an up projection of the same LANES output columns, and
 * out[r, c] = silu(gate) * up for c < cols (cols <= LANES): the MLP's SiLU-and-mul on the tile in registers. */
#define MICRO_KERNEL(ROWS)                                                                                         \
    static void rows_##ROWS(const float *restrict x, int64_t k, const float *restrict panel,                     \
                            const float *restrict bias, float *restrict out, int64_t ldo, int64_t cols,          \
                            const float *restrict ahead, int silu_mul) {                                        \
        vf acc[ROWS][2];                                                                                             \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf){0};                                           \
        for (int64_t p = 0; p < k; p++) {                                                                          \
            if (ahead) { /* into L2 (locality 1), where the panel will be read from: L1 stays for this one */    \
                __builtin_prefetch(ahead + p * COLS, 0, 1);                                                        \
                __builtin_prefetch(ahead + p * COLS + LANES, 0, 1);                                                \
            }                                                                                                      \
            const vf w0 = load(panel + p * COLS), w1 = load(panel + p * COLS + LANES);                            \
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

/* out [m, out_cols]; panels of `panel_cols` (COLS, or LANES outputs of a gate / up pair with silu_mul) columns
 * each, bias (or NULL) laid out like the panels' columns. */
static void run(const float *x, const float *panels, const float *bias, float *out, int64_t m, int64_t out_cols,
                int64_t k, int num_threads, int silu_mul) {
    const int64_t panel_cols = silu_mul ? LANES : COLS;
    const int64_t num_panels = (out_cols + panel_cols - 1) / panel_cols;
#pragma omp parallel num_threads(num_threads)
    for (int64_t band = 0; band < m; band += BAND_ROWS) {
        const int64_t band_rows = m - band < BAND_ROWS ? m - band : BAND_ROWS;
        /* whole blocks of MAX_ROWS first, the rest last: 16 rows run as 14 + 2, not 8 + 8. The first block reads the
         * panel from memory, and the more rows it computes meanwhile, the more of that wait it covers. Measured on
         * the 2-core AVX-512 EPYC (30 layers' projections, weights from memory, two runs): 16 rows 20.0-22.2 against
         * 21.9-23.8 ms, 64 rows 68-73 against 71-77, 2048 rows 2167-2239 against 2197-2303 (near-equal blocks). */
#pragma omp for schedule(static)
        for (int64_t j = 0; j < num_panels; j++) {
            const float *panel = panels + j * k * COLS;
            const int64_t cols = out_cols - j * panel_cols < panel_cols ? out_cols - j * panel_cols : panel_cols;
            float panel_bias[COLS] = {0};
            if (bias) memcpy(panel_bias, bias + j * COLS, (silu_mul ? COLS : cols) * sizeof(float));
            for (int64_t row = band; row < band + band_rows; row += MAX_ROWS) {
                const int64_t rows = band + band_rows - row < MAX_ROWS ? band + band_rows - row : MAX_ROWS;
                BY_ROWS[rows](x + row * k, k, panel, panel_bias, out + row * out_cols + j * panel_cols, out_cols, cols,
                              row == band && j + 1 < num_panels ? panel + k * COLS : NULL, silu_mul);
            }
        }
    }
}

void panel_gemm(const float *x, const float *panels, const float *bias, float *out, int64_t m, int64_t n,
                int64_t k, int num_threads) {
    run(x, panels, bias, out, m, n, k, num_threads, 0);
}

/* out [m, n] = silu(x . Wg^T + bg) * (x . Wu^T + bu) for a gate and an up weight of n rows each, on panels whose
 * columns are LANES gate rows then the same LANES up rows (zeros past n), bias (or NULL) laid out the same way. The
 * MLP's gate_up projection and SiLU-and-mul in one pass: the [m, 2n] projection is never written out. */
void panel_gemm_silu_mul(const float *x, const float *panels, const float *bias, float *out, int64_t m, int64_t n,
                         int64_t k, int num_threads) {
    run(x, panels, bias, out, m, n, k, num_threads, 1);
}
