/* Greedy tokens straight from the LM head, for float32 hidden rows x [m, k] and a head W [V, k] laid out for
 * panel_gemm: tokens[r] is the first index of the largest logit that panel_gemm would compute for row r (the token
 * greedy sampling takes from its output), found without computing most logits in float32.
 *
 *   1. A screen in bfloat16: S = bf16(x) . bf16(W)^T with AVX512-BF16's dot product (two products a lane per
 *      instruction: twice the float32 rate on half the weight bytes).
 *   2. A bound on the screen's distance from the float32 logits L: |S[v] - L[v]| <= E[v] = c ||x|| ||W[v]||
 *      (bound_scale below). So the token t of the largest L has S[t] + E[t] >= max_u (S[u] - E[u]), and a column
 *      that fails this test has an L below L[t]: it can neither be the argmax nor tie with it.
 *   3. The panels (COLS columns each) that hold a column passing the test are recomputed in float32 by
 *      panel_gemm's own tile (panel_tile.h), so each logit recomputed has panel_gemm's bits, and the first
 *      largest of them is the token. Panels go in order and columns in order, so a tie goes to the first index.
 *
 * A row gets -1 where the bound cannot hold (a non-finite value in x or in its screen): the caller computes its
 * logits in full. Builds without AVX512-BF16 export greedy_head_available() == 0 and nothing runs here.
 *
 * Layouts: panels [P, k, COLS] float32 (panel_gemm.c), bf16_panels [P, k / 2, COLS, 2] (bfloat16 bits: the two
 * weights of a k pair side by side, as the dot product pairs them), norms [V] (each ||W[v]||_2, rounded up),
 * screen [m, P * COLS] scratch. k is even. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel_tile.h"

#if defined(__AVX512BF16__) && LANES == 16
#include <immintrin.h>
#define SCREEN 1
#endif

int greedy_head_available(void) {
#ifdef SCREEN
    return 1;
#else
    return 0;
#endif
}

#ifdef SCREEN
/* The bound's factor c, for k-long dot products, from three error sources (u = 2^-8, bfloat16's unit roundoff;
 * f = 2^-24, float32's):
 *   - rounding x and W to bfloat16: each product x_i W_i moves by at most (2u + u^2) |x_i W_i|; the products of
 *     two bfloat16 values are exact in float32;
 *   - the screen's float32 sums: at most 2k roundings (two adds a lane per instruction), each within one ulp
 *     (2f) of the sum of |products|, whatever rounding the hardware applies: 4k f sum |x_i W_i|;
 *   - panel_gemm's own fused multiply-add chain: k roundings, k f sum |x_i W_i|.
 * sum |x_i W_i| <= ||x|| ||W[v]|| (Cauchy-Schwarz). c = 2u + u^2 + 8k f covers these with room, and 1% more covers
 * the rounding of the bound and of the test themselves (their part relative to the logits: pick's slack). Flushed denormals
 * (the dot product runs with DAZ and FTZ) move a sum by at most 2k 2^-126 |W|max, far under that slack. */
static float bound_scale(int64_t k, double norm) {
    const double u = 0x1p-8, f = 0x1p-24;
    return (float)((2 * u + u * u + 8.0 * (double)k * f) * 1.01 * norm);
}

/* float -> bfloat16 bits, rounded to nearest, ties to even (finite values; one beyond bfloat16's range becomes
 * infinity, which the screen's finiteness check then sends to the full head) */
static inline uint32_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

/* screen[r, 0 .. COLS-1] for ROWS rows of x (xb: bfloat16 pairs, [ROWS, pairs] 32-bit words) on one panel;
 * meanwhile the `lines` 64-byte lines from `ahead` on (a share of the next panel) are asked for into L2 */
#define SCREEN_KERNEL(ROWS)                                                                                       \
    static void screen_##ROWS(const uint32_t *restrict xb, int64_t pairs, const uint16_t *restrict panel,        \
                              float *restrict out, int64_t ldo, const char *restrict ahead, int64_t lines) {   \
        __m512 acc[ROWS][2];                                                                                       \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                             \
        for (int64_t p = 0; p < pairs; p++) {                                                                    \
            if (2 * p < lines) __builtin_prefetch(ahead + 2 * p * 64, 0, 1);                                     \
            if (2 * p + 1 < lines) __builtin_prefetch(ahead + (2 * p + 1) * 64, 0, 1);                           \
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * COLS);                             \
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * COLS + COLS);                      \
            for (int r = 0; r < ROWS; r++) {                                                                     \
                const __m512bh xr = (__m512bh)_mm512_set1_epi32((int32_t)xb[r * pairs + p]);                    \
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xr);                                                 \
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xr);                                                 \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < ROWS; r++) {                                                                         \
            _mm512_storeu_ps(out + r * ldo, acc[r][0]);                                                          \
            _mm512_storeu_ps(out + r * ldo + LANES, acc[r][1]);                                                  \
        }                                                                                                        \
    }

SCREEN_KERNEL(1) SCREEN_KERNEL(2) SCREEN_KERNEL(3) SCREEN_KERNEL(4) SCREEN_KERNEL(5) SCREEN_KERNEL(6)
SCREEN_KERNEL(7) SCREEN_KERNEL(8) SCREEN_KERNEL(9) SCREEN_KERNEL(10) SCREEN_KERNEL(11) SCREEN_KERNEL(12)
SCREEN_KERNEL(13) SCREEN_KERNEL(14)

typedef void (*screen_kernel)(const uint32_t *, int64_t, const uint16_t *, float *, int64_t, const char *, int64_t);
static const screen_kernel SCREEN_BY_ROWS[15] = {
    0, screen_1, screen_2, screen_3, screen_4, screen_5, screen_6, screen_7, screen_8, screen_9, screen_10,
    screen_11, screen_12, screen_13, screen_14};

/* Steps 2 and 3 for one row: its token, or -1. The passes over the screen row are AVX-512 (the build has it). */
static int64_t pick(const float *restrict x, int64_t k, const float *restrict screen, float scale,
                    const float *restrict panels, const float *restrict norms, int64_t vocab,
                    unsigned char *restrict marked) {
    if (!isfinite(scale)) return -1;
    const int64_t num_panels = (vocab + COLS - 1) / COLS;
    const __m512 scales = _mm512_set1_ps(scale);
    __m512 lowest = _mm512_set1_ps(-INFINITY);
    __mmask16 not_finite = 0;
    for (int64_t v = 0; v < vocab; v += LANES) { /* max_u S[u] - E[u], and whether any S[u] is not finite */
        const __mmask16 in = vocab - v >= LANES ? 0xFFFF : (__mmask16)((1u << (vocab - v)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(in, screen + v), n = _mm512_maskz_loadu_ps(in, norms + v);
        not_finite |= _mm512_mask_cmp_ps_mask(in, _mm512_sub_ps(s, s), _mm512_setzero_ps(), _CMP_NEQ_UQ);
        lowest = _mm512_mask_max_ps(lowest, in, lowest, _mm512_fnmadd_ps(scales, n, s));
    }
    const float lower = _mm512_reduce_max_ps(lowest);
    if (not_finite || !isfinite(lower)) return -1;
    /* S[v] + E[v] + SLACK >= lower, SLACK = 2^-20 (|S[v]| + |lower| + 1): room for the rounding of these sums */
    const __m512 bar = _mm512_set1_ps(lower), slack = _mm512_set1_ps(fabsf(lower) + 1.0f);
    const __m512 tiny = _mm512_set1_ps(0x1p-20f);
    memset(marked, 0, num_panels);
    for (int64_t v = 0; v < vocab; v += LANES) { /* LANES divides COLS: one vector is in one panel */
        const __mmask16 in = vocab - v >= LANES ? 0xFFFF : (__mmask16)((1u << (vocab - v)) - 1);
        const __m512 s = _mm512_maskz_loadu_ps(in, screen + v), n = _mm512_maskz_loadu_ps(in, norms + v);
        const __m512 top = _mm512_add_ps(_mm512_fmadd_ps(scales, n, s),
                                         _mm512_mul_ps(tiny, _mm512_add_ps(_mm512_abs_ps(s), slack)));
        if (_mm512_mask_cmp_ps_mask(in, top, bar, _CMP_GE_OQ)) marked[v / COLS] = 1;
    }
    static const float zero_bias[COLS];
    float best = -INFINITY, logits[COLS];
    int64_t best_at = -1;
    for (int64_t j = 0; j < num_panels; j++) {
        if (!marked[j]) continue;
        const int64_t cols = vocab - j * COLS < COLS ? vocab - j * COLS : COLS;
        BY_ROWS[1](x, k, panels + j * k * COLS, zero_bias, logits, COLS, cols, NULL, 0);
        for (int64_t c = 0; c < cols; c++)
            if (logits[c] > best) {
                best = logits[c];
                best_at = j * COLS + c;
            }
    }
    return isfinite(best) ? best_at : -1;
}
#endif

void greedy_head(const float *x, int64_t m, int64_t k, const uint16_t *bf16_panels, const float *panels,
                 const float *norms, int64_t vocab, float *screen, int64_t *tokens, int num_threads) {
#ifdef SCREEN
    const int64_t pairs = k / 2, num_panels = (vocab + COLS - 1) / COLS, width = num_panels * COLS;
    uint32_t *xb = malloc((size_t)(m * pairs) * sizeof *xb);
    float *scale = malloc((size_t)m * sizeof *scale);
    if (xb == NULL || scale == NULL) { /* out of memory: every row is left to the caller's full head */
        free(xb);
        free(scale);
        for (int64_t r = 0; r < m; r++) tokens[r] = -1;
        return;
    }
    for (int64_t r = 0; r < m; r++) { /* bfloat16 pairs of the row, and its bound's scale (NaN if not finite) */
        const float *row = x + r * k;
        double squares = 0.0;
        int finite = 1;
        for (int64_t i = 0; i < k; i++) {
            finite &= isfinite(row[i]);
            squares += (double)row[i] * row[i];
        }
        for (int64_t p = 0; p < pairs; p++)
            xb[r * pairs + p] = to_bf16(row[2 * p]) | to_bf16(row[2 * p + 1]) << 16;
        scale[r] = finite ? bound_scale(k, sqrt(squares)) : NAN;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t j = 0; j < num_panels; j++) { /* the screen: whole panels per thread, as panel_gemm */
            const uint16_t *panel = bf16_panels + j * pairs * 2 * COLS;
            /* the next panel is asked for into L2 a share per row block, over the whole of this panel's time */
            const char *next = (const char *)(panel + pairs * 2 * COLS);
            const int64_t lines = j + 1 < num_panels ? pairs * 2 * COLS * 2 / 64 : 0;
            const int64_t blocks = (m + MAX_ROWS - 1) / MAX_ROWS;
            for (int64_t block = 0; block < blocks; block++) {
                const int64_t row = block * MAX_ROWS, rows = m - row < MAX_ROWS ? m - row : MAX_ROWS;
                const int64_t first = lines * block / blocks, last = lines * (block + 1) / blocks;
                SCREEN_BY_ROWS[rows](xb + row * pairs, pairs, panel, screen + row * width + j * COLS, width,
                                     next + first * 64, last - first);
            }
        }
        unsigned char *marked = malloc((size_t)num_panels);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < m; r++) /* without its scratch, a thread leaves its rows to the full head */
            tokens[r] = marked == NULL ? -1 : pick(x + r * k, k, screen + r * width, scale[r], panels, norms, vocab,
                                                   marked);
        free(marked);
    }
    free(xb);
    free(scale);
#else
    (void)x, (void)k, (void)bf16_panels, (void)panels, (void)norms, (void)vocab, (void)screen, (void)num_threads;
    for (int64_t r = 0; r < m; r++) tokens[r] = -1;
#endif
}
