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

#include "panel_tile.h"

/* rows of x per band: 384 x K floats stay in a 1 MiB L2 (the AVX-512 EPYC) for K up to about 600; on a Zen 3 with
 * 512 KiB of L2, bands of 192 or 768 rows were no faster */
#define BAND_ROWS 384

int panel_columns(void) { return COLS; }

/* The bfloat16 panels' micro-kernels: the same tile, each panel vector widened to floats as it is read */
MICRO_KERNEL_OF(1, bf16_rows_1, uint16_t, load_bf16) MICRO_KERNEL_OF(2, bf16_rows_2, uint16_t, load_bf16)
MICRO_KERNEL_OF(3, bf16_rows_3, uint16_t, load_bf16) MICRO_KERNEL_OF(4, bf16_rows_4, uint16_t, load_bf16)
MICRO_KERNEL_OF(5, bf16_rows_5, uint16_t, load_bf16) MICRO_KERNEL_OF(6, bf16_rows_6, uint16_t, load_bf16)
MICRO_KERNEL_OF(7, bf16_rows_7, uint16_t, load_bf16) MICRO_KERNEL_OF(8, bf16_rows_8, uint16_t, load_bf16)
MICRO_KERNEL_OF(9, bf16_rows_9, uint16_t, load_bf16) MICRO_KERNEL_OF(10, bf16_rows_10, uint16_t, load_bf16)
MICRO_KERNEL_OF(11, bf16_rows_11, uint16_t, load_bf16) MICRO_KERNEL_OF(12, bf16_rows_12, uint16_t, load_bf16)
MICRO_KERNEL_OF(13, bf16_rows_13, uint16_t, load_bf16) MICRO_KERNEL_OF(14, bf16_rows_14, uint16_t, load_bf16)

typedef void (*bf16_micro_kernel)(const float *, int64_t, const uint16_t *, const float *, float *, int64_t,
                                  int64_t, const uint16_t *, int);
static const bf16_micro_kernel BF16_BY_ROWS[15] = {
    0, bf16_rows_1, bf16_rows_2, bf16_rows_3, bf16_rows_4, bf16_rows_5, bf16_rows_6, bf16_rows_7, bf16_rows_8,
    bf16_rows_9, bf16_rows_10, bf16_rows_11, bf16_rows_12, bf16_rows_13, bf16_rows_14};

/* out [m, out_cols]; panels of `panel_cols` (COLS, or LANES outputs of a gate / up pair with silu_mul) columns
 * each, of W_T (float or bfloat16 bits), bias (or NULL) laid out like the panels' columns. */
#define RUN_OF(NAME, W_T, KERNELS)                                                                                 \
    static void NAME(const float *x, const W_T *panels, const float *bias, float *out, int64_t m,                 \
                     int64_t out_cols, int64_t k, int num_threads, int silu_mul) {                                \
        const int64_t panel_cols = silu_mul ? LANES : COLS;                                                        \
        const int64_t num_panels = (out_cols + panel_cols - 1) / panel_cols;                                       \
        _Pragma("omp parallel num_threads(num_threads)")                                                           \
        for (int64_t band = 0; band < m; band += BAND_ROWS) {                                                      \
            const int64_t band_rows = m - band < BAND_ROWS ? m - band : BAND_ROWS;                                 \
            _Pragma("omp for schedule(static)")                                                                    \
            for (int64_t j = 0; j < num_panels; j++) {                                                             \
                const W_T *panel = panels + j * k * COLS;                                                          \
                const int64_t cols = out_cols - j * panel_cols < panel_cols ? out_cols - j * panel_cols : panel_cols; \
                float panel_bias[COLS] = {0};                                                                      \
                if (bias) memcpy(panel_bias, bias + j * COLS, (silu_mul ? COLS : cols) * sizeof(float));           \
                for (int64_t row = band; row < band + band_rows; row += MAX_ROWS) {                                \
                    const int64_t rows = band + band_rows - row < MAX_ROWS ? band + band_rows - row : MAX_ROWS;    \
                    KERNELS[rows](x + row * k, k, panel, panel_bias, out + row * out_cols + j * panel_cols,        \
                                  out_cols, cols, row == band && j + 1 < num_panels ? panel + k * COLS : NULL,     \
                                  silu_mul);                                                                       \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

/* Whole blocks of MAX_ROWS rows first, the rest last: 16 rows run as 14 + 2, not 8 + 8. The first block reads the
 * panel from memory, and the more rows it computes meanwhile, the more of that wait it covers (a few percent
 * against near-equal blocks: docs/kernel-measurements.md). */
RUN_OF(run, float, BY_ROWS)
RUN_OF(run_bf16, uint16_t, BF16_BY_ROWS)

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

/* panel_gemm and panel_gemm_silu_mul on panels of bfloat16 weights (the same layout, 2-byte elements): x, bias and
 * out stay float32, and every product and sum is float32 as in the float32 kernels, so the result is that of the
 * float32 kernel on the widened weights, bit for bit. */
void panel_gemm_bf16(const float *x, const uint16_t *panels, const float *bias, float *out, int64_t m, int64_t n,
                     int64_t k, int num_threads) {
    run_bf16(x, panels, bias, out, m, n, k, num_threads, 0);
}

void panel_gemm_silu_mul_bf16(const float *x, const uint16_t *panels, const float *bias, float *out, int64_t m,
                              int64_t n, int64_t k, int num_threads) {
    run_bf16(x, panels, bias, out, m, n, k, num_threads, 1);
}
