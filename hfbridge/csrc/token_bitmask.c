/* Structured outputs' mask: logits[row_index[r]][t] = -inf wherever bit t of bits[r] is 0 (the grammar forbids
 * token t), and for every t past the words' 32 * words tokens (a head wider than the grammar's vocabulary).
 *
 * bits [rows, words] int32 as xgrammar fills them: bit j of word w is token 32 * w + j. A JSON grammar allows few
 * tokens between values and most inside strings, so a word of all ones (nothing to mask) is skipped whole, and
 * the rows, independent of each other, are spread over the threads. Only the masked floats are written. */
#include <math.h>
#include <stdint.h>

static const uint32_t LANE_BIT[32] = {
    1u << 0, 1u << 1, 1u << 2, 1u << 3, 1u << 4, 1u << 5, 1u << 6, 1u << 7, 1u << 8, 1u << 9, 1u << 10,
    1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15, 1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20,
    1u << 21, 1u << 22, 1u << 23, 1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31,
};

void apply_token_bitmask(float *logits, const int64_t *row_index, const int32_t *bits, int64_t rows, int64_t vocab,
                         int64_t words, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + row_index[r] * vocab;
        const uint32_t *mask = (const uint32_t *)(bits + r * words);
        const int64_t covered = words * 32 < vocab ? words * 32 : vocab;
        const int64_t whole = covered / 32;  // words whose 32 tokens are all in the row
        for (int64_t w = 0; w < whole; w++) {
            const uint32_t word = mask[w];
            if (word == 0xFFFFFFFFu) continue;
            float *chunk = row + w * 32;
            for (int j = 0; j < 32; j++)  // branch-free: a test against the lanes' bits, then a blend
                chunk[j] = word & LANE_BIT[j] ? chunk[j] : -INFINITY;
        }
        for (int64_t t = whole * 32; t < covered; t++)
            if (!((mask[whole] >> (t - whole * 32)) & 1u)) row[t] = -INFINITY;
        for (int64_t t = covered; t < vocab; t++) row[t] = -INFINITY;
    }
}
