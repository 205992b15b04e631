/* out [m, n] = x [m, k] . W^T in float32, on W [n, k] as GGUF stores a linear's weight: n rows of llama.cpp's quantized
 * blocks along k, read as they are (no dequantized copy of W is ever made); gguf_matmul_parts does it for the parts
 * of a fused projection at once. gguf_dequantize turns rows of blocks into floats (embedding rows, tests).
 * hfbridge/quantization/gguf_kernels.py calls both.
 *
 * The blocks (little-endian; d, dmin, m are float16; q is element e's quant; the K-quants have 256 elements in
 * sub-blocks of 16 or 32, each with a 4-, 6- or 8-bit scale sc, and min mn):
 *   type  elems bytes layout                                         value of element e
 *   Q4_0  32    18    d, qs[16]: e<16 low nibble of qs[e], else high  d * (q - 8)
 *   Q4_1  32    20    d, m, qs[16] as Q4_0                            d * q + m
 *   Q5_0  32    22    d, qh (u32: bit e = q's bit 4), qs[16]          d * (q - 16)
 *   Q5_1  32    24    d, m, qh, qs[16]                                d * q + m
 *   Q8_0  32    34    d, qs[32] int8                                  d * q
 *   Q2_K  256   84    scales[16] (lo 4 bits sc, hi 4 bits mn), qs[64] 2-bit, d, dmin
 *                                                                     d*sc * q - dmin*mn   (16-element sub-blocks)
 *   Q3_K  256   110   hmask[32], qs[64] 2-bit, scales[12] (16 6-bit, -32), d
 *                                                                     d*sc * (q - 4 if its hmask bit is 0)
 *   Q4_K  256   144   d, dmin, scales[12] (8 6-bit sc, 8 6-bit mn), qs[128] 4-bit
 *                                                                     d*sc * q - dmin*mn   (32-element sub-blocks)
 *   Q5_K  256   176   d, dmin, scales[12] as Q4_K, qh[32] (bit 4), qs[128]          as Q4_K
 *   Q6_K  256   210   ql[128] low 4 bits, qh[64] high 2 bits, scales[16] int8, d     d*sc * (q - 32)
 * Which byte and bits hold element e's quant is spelled out with each type below. Every product in these formulas is
 * exact in float32 (a float16 has 11 significant bits, a scale at most 7, a quant at most 6: 24 bits at most), so a
 * value's one rounding is the final add, and a fused multiply-add rounds it the same: gguf_dequantize gives gguf-py's
 * float32 values, whatever the compiler contracts.
 *
 * How gguf_matmul_parts runs: vectors run along k. Rows of x go in slices of SLICE_ROWS (a decode step: one slice);
 * per slice each thread takes groups of G weight rows (of any part).
 *   One row of x: the fused kernel dequantizes the blocks of FUSED_ROWS weight rows in registers, a block at a time,
 *   and multiplies them into one accumulator vector per row: each weight byte is read once, nothing is stored.
 *   More rows: chunk by chunk of k, the group's chunk is dequantized into a buffer that stays in L1, and a register
 *   tile of TILE_R rows of x by TILE_C weight rows walks it for every row of the slice (per vector of k: TILE_R +
 *   TILE_C loads, TILE_R x TILE_C fused multiply-adds); the accumulators of all rows x G outputs carry over to the
 *   next chunk. A 2048-row prefill reads the quantized weight once per slice (from cache) and dequantizes it again,
 *   which is cheap next to the slice's multiply-adds.
 * Each output element is LANES sequential sums over k (lane l adds the products at k = l, l + LANES, ... in order,
 * each by a fused multiply-add) then added up by one fixed halving tree (finish), in both kernels: a row's result has
 * the same bits whatever m is, wherever the row sits in the batch and whatever the thread count (batch invariance
 * holds). The bits do depend on the vector width. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 32-byte vectors on AVX-512 machines too (AVX512VL still gives them 32 registers): the byte shuffles that spread a
 * block's quants over 64-byte vectors compile to slow code, and the one-row kernel ran 3-5x slower than at 32 bytes
 * (docs/kernel-measurements.md). -DHFBRIDGE_VECTOR_BYTES still picks any width (the tests build them all). */
#if !defined(HFBRIDGE_VECTOR_BYTES) && defined(__AVX512F__)
#define HFBRIDGE_VECTOR_BYTES 32
#endif

#include "simd.h"

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

#define G 12          /* weight rows per group: a multiple of TILE_C and of FUSED_ROWS */
#define SLICE_ROWS 64 /* rows of x per pass over the weight */
#define CHUNK 256     /* elements of k per dequantized chunk: G x 256 floats, 12 KiB */
#define THREAD_WORK (1 << 17) /* multiply-adds (or values dequantized) per thread at least: below, fewer threads */

/* The register tile: TILE_R x TILE_C accumulators plus the TILE_R x and TILE_C weight vectors of a step, all in
 * registers (3 x 3: 15 of 16, 4 x 4: 24 of 32), so a step loads TILE_R + TILE_C vectors for TILE_R x TILE_C fused
 * multiply-adds. (A wider tile cannot keep both sides in registers: one side becomes a load per multiply-add, and
 * the loads, not the multiply-adds, then set the pace.) */
#if VECTOR_REGISTERS >= 32
#define TILE_R 4
#define TILE_C 4
#else
#define TILE_R 3
#define TILE_C 3
#endif

/* ---- scalars and byte vectors ---- */

#if LANES == 16
#define IOTA 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#elif LANES == 8
#define IOTA 0, 1, 2, 3, 4, 5, 6, 7
#else
#define IOTA 0, 1, 2, 3
#endif

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vi splat_i(int32_t s) { return (vi){EVERY_LANE(s)}; }
static inline vf ints_to_float(vi q) { return __builtin_convertvector(q, vf); }

/* The quants of one vector: bytes p[at .. at + LANES - 1] (at % 16 + LANES <= 16), each widened to its lane.
 * field: (byte >> shift) & (2^width - 1), for shift + width <= 8; signed_field: the byte as an int8.
 *
 * With GCC (12+: __builtin_shufflevector) the 16 bytes around them are repeated in every 16-byte segment of a vector
 * and one byte shuffle puts byte i into all four bytes of lane i (x86: vpshufb, Arm: tbl), so that a shift and a
 * mask, or one shift for a field that reaches bit 7, finish the lane: fewer operations than widening the bytes
 * across the vector's halves (vpmovzxbd ymm is two of Zen 3's vector operations). Elsewhere, or with
 * -DHFBRIDGE_NO_BYTE_SHUFFLE (the tests build it): that widening. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__has_builtin) && !defined(HFBRIDGE_NO_BYTE_SHUFFLE)
#if __has_builtin(__builtin_shufflevector)
#define BYTE_SHUFFLE 1
#endif
#endif
#ifdef BYTE_SHUFFLE
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef uint8_t vq __attribute__((vector_size(4 * LANES))); /* one vector's bytes */
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));
#define I16 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#if LANES == 16
#define REPEAT_16(q) __builtin_shufflevector(q, q, I16, I16, I16, I16)
#elif LANES == 8
#define REPEAT_16(q) __builtin_shufflevector(q, q, I16, I16)
#else
#define REPEAT_16(q) (q)
#endif

static inline vu spread(const uint8_t *p, int at) {
    v16b q;
    memcpy(&q, p + at / 16 * 16, 16);
    const vq repeated = REPEAT_16(q);
    vq pick;
    for (int i = 0; i < 4 * LANES; i++) pick[i] = (uint8_t)(i / 16 * 16 + at % 16 + i / 4);
    return (vu)__builtin_shuffle(repeated, pick);
}

static inline vi field(const uint8_t *p, int at, int shift, int width) {
    const vu lanes = spread(p, at);
    return (vi)(shift + width == 8 ? lanes >> (24 + shift) : (lanes >> shift) & ((1u << width) - 1));
}

/* field placed at bit `to` (one shift and one mask) */
static inline vi field_to(const uint8_t *p, int at, int shift, int width, int to) {
    const vu lanes = spread(p, at);
    return (vi)((shift >= to ? lanes >> (shift - to) : lanes << (to - shift)) & (((1u << width) - 1) << to));
}

static inline vi signed_field(const uint8_t *p, int at) { return (vi)spread(p, at) >> 24; }
#else
typedef uint8_t vb __attribute__((vector_size(LANES)));  /* LANES bytes */
typedef uint16_t vb16 __attribute__((vector_size(LANES))); /* the same bytes as 16-bit lanes, for shifts */

/* the bytes shifted as 16-bit lanes (x86 has no byte shifts: a byte-lane shift compiles to scalar code); the bits
 * that come down from the next byte are above the mask */
static inline vi field(const uint8_t *p, int at, int shift, int width) {
    vb q;
    memcpy(&q, p + at, sizeof q);
    return __builtin_convertvector((vb)((vb16)q >> shift) & (uint8_t)((1 << width) - 1), vi);
}

static inline vi field_to(const uint8_t *p, int at, int shift, int width, int to) {
    return field(p, at, shift, width) << to;
}

/* offset to unsigned, widened, offset back (GCC widens a loaded byte vector lane by lane unless a vector
 * operation comes first, and has no vector int8 widening at all) */
static inline vi signed_field(const uint8_t *p, int at) {
    vb q;
    memcpy(&q, p + at, sizeof q);
    return __builtin_convertvector(q ^ 0x80, vi) - 128;
}
#endif

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* float16 at p -> float, exactly (one instruction with F16C; a bit-level conversion where the compiler has no
 * _Float16, or with -DHFBRIDGE_NO_FLOAT16: the tests build it) */
static inline float half_at(const uint8_t *p) {
#if defined(__FLT16_MANT_DIG__) && !defined(HFBRIDGE_NO_FLOAT16)
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
#else
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    float f;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact */
        f = (float)mantissa * 0x1p-24f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exponent == 31) { /* infinity, NaN */
        bits = sign | 0x7f800000u | mantissa << 13;
    } else {
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    }
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ---- the blocks' values ----
 * Element e of a block is w = q * dl + ml (or q * dl where the type has no offset), q a small integer from the
 * block's bits (quants_<type>), dl and ml floats per 16 elements (scales_<type>, once per block):
 *   Q4_0 q = nibble, ml = -8 d     Q4_1 q = nibble, ml = m        Q5_0 q = 5 bits, ml = -16 d   Q5_1 ml = m
 *   Q8_0 q = int8                  Q2_K dl = d sc, ml = -dmin mn  Q3_K q = 3 bits, ml = -4 dl
 *   Q4_K, Q5_K dl = d sc, ml = -dmin mn (per 32)                  Q6_K q = 6 bits, ml = -32 dl
 * q * dl is exact (see the top), so the one rounding of q * dl + ml is gguf-py's one rounding of the same sum. Where
 * ml is an offset times dl the value is exact, and a zero may have the other sign than gguf-py's (d (q - 8) is -0 for
 * a negative d, q d - 8 d is +0).
 * The one definition of each layout: gguf_dequantize stores these values, the kernels multiply them into sums. */

typedef struct {
    float dl[16], ml[16]; /* per 16 elements of the block */
} block_scales;

static inline void scales_32(block_scales *s, float dl, float ml) {
    s->dl[0] = s->dl[1] = dl;
    s->ml[0] = s->ml[1] = ml;
}

/* Q4_0, Q4_1: byte j of qs holds element j (low nibble) and element j + 16 (high) */
static inline void scales_q4_0(const uint8_t *b, block_scales *s) { scales_32(s, half_at(b), -8 * half_at(b)); }
static inline vi quants_q4_0(const uint8_t *b, int e) { return field(b + 2, e % 16, e / 16 * 4, 4); }

static inline void scales_q4_1(const uint8_t *b, block_scales *s) { scales_32(s, half_at(b), half_at(b + 2)); }
static inline vi quants_q4_1(const uint8_t *b, int e) { return field(b + 4, e % 16, e / 16 * 4, 4); }

/* Q5_0, Q5_1: as Q4, and element e's fifth bit is bit e of the 32-bit qh */
static inline vi fifth_bits(const uint8_t *qh, int e) {
    return ((splat_i((int32_t)u32_at(qh)) >> ((vi){IOTA} + e)) & 1) << 4;
}

static inline void scales_q5_0(const uint8_t *b, block_scales *s) { scales_32(s, half_at(b), -16 * half_at(b)); }
static inline vi quants_q5_0(const uint8_t *b, int e) {
    return field(b + 6, e % 16, e / 16 * 4, 4) | fifth_bits(b + 2, e);
}

static inline void scales_q5_1(const uint8_t *b, block_scales *s) { scales_32(s, half_at(b), half_at(b + 2)); }
static inline vi quants_q5_1(const uint8_t *b, int e) {
    return field(b + 8, e % 16, e / 16 * 4, 4) | fifth_bits(b + 4, e);
}

static inline void scales_q8_0(const uint8_t *b, block_scales *s) { scales_32(s, half_at(b), 0); }
static inline vi quants_q8_0(const uint8_t *b, int e) { return signed_field(b + 2, e); }

/* Q2_K: element e = 128 h + 32 s + l (h < 2, s < 4, l < 32) is bits 2s..2s+1 of qs[32 h + l]; sub-block e / 16 has
 * scales[e / 16]: low 4 bits the scale, high 4 bits the min */
static inline void scales_q2_k(const uint8_t *b, block_scales *s) {
    const float d = half_at(b + 80), dmin = half_at(b + 82);
    for (int i = 0; i < 16; i++) {
        s->dl[i] = d * (float)(b[i] & 0xf);
        s->ml[i] = -(dmin * (float)(b[i] >> 4));
    }
}
static inline vi quants_q2_k(const uint8_t *b, int e) {
    return field(b + 16 + 32 * (e / 128), e % 32, e / 32 % 4 * 2, 2);
}

/* Q3_K: element e = 128 h + 32 s + l has its low 2 bits at bits 2s..2s+1 of qs[32 h + l] and bit 2 at bit e / 32 of
 * hmask[l] (clear: the quant is 4 less). Scale i < 16 of the sub-block e / 16: low 4 bits from scales[i] (i < 8) or
 * scales[i - 8] >> 4, high 2 bits at bits 2 (i / 4) of scales[8 + i % 4], minus 32. */
static inline void scales_q3_k(const uint8_t *b, block_scales *s) {
    /* four scales per 32-bit word: low 4 bits from bytes 0-3 or 4-7 of scales (low or high nibbles), high 2 bits
     * from the pair of bits of bytes 8-11 that belongs to them */
    const uint32_t lo = u32_at(b + 96), hi = u32_at(b + 100), top = u32_at(b + 104), nibbles = 0x0f0f0f0f;
    const uint32_t words[4] = {(lo & nibbles) | ((top << 4) & 0x30303030),
                               (hi & nibbles) | ((top << 2) & 0x30303030),
                               ((lo >> 4) & nibbles) | (top & 0x30303030),
                               ((hi >> 4) & nibbles) | ((top >> 2) & 0x30303030)};
    uint8_t scales[16];
    memcpy(scales, words, 16);
    const float d = half_at(b + 108);
    for (int i = 0; i < 16; i++) {
        s->dl[i] = d * (float)(scales[i] - 32);
        s->ml[i] = -4 * s->dl[i];
    }
}
static inline vi quants_q3_k(const uint8_t *b, int e) {
    return field(b + 32 + 32 * (e / 128), e % 32, e / 32 % 4 * 2, 2) | field_to(b, e % 32, e / 32, 1, 2);
}

/* Q4_K, Q5_K: 12 bytes of 6-bit scales and mins of the 8 sub-blocks of 32 (j < 4: low 6 bits of bytes j and j + 4;
 * j >= 4: the nibbles of byte j + 4 and the top 2 bits of bytes j - 4 and j). Sub-block j = 2 g + t (l < 32) is
 * nibble t of qs[32 g + l]; Q5_K adds bit j of qh[l] as bit 4. */
static inline void scales_k4(const uint8_t *b, block_scales *s) {
    const uint8_t *packed = b + 4;
    const float d = half_at(b), dmin = half_at(b + 2);
    for (int j = 0; j < 8; j++) {
        const int scale = j < 4 ? packed[j] & 63 : (packed[j + 4] & 0xf) | (packed[j - 4] >> 6) << 4;
        const int min = j < 4 ? packed[j + 4] & 63 : (packed[j + 4] >> 4) | (packed[j] >> 6) << 4;
        s->dl[2 * j] = s->dl[2 * j + 1] = d * (float)scale;
        s->ml[2 * j] = s->ml[2 * j + 1] = -(dmin * (float)min);
    }
}

static inline void scales_q4_k(const uint8_t *b, block_scales *s) { scales_k4(b, s); }
static inline vi quants_q4_k(const uint8_t *b, int e) { return field(b + 16 + e / 64 * 32, e % 32, e / 32 % 2 * 4, 4); }

static inline void scales_q5_k(const uint8_t *b, block_scales *s) { scales_k4(b, s); }
static inline vi quants_q5_k(const uint8_t *b, int e) {
    return field(b + 48 + e / 64 * 32, e % 32, e / 32 % 2 * 4, 4) | field_to(b + 16, e % 32, e / 32, 1, 4);
}

/* Q6_K: element e = 128 h + 32 s + l: low 4 bits are nibble s / 2 of ql[64 h + 32 (s % 2) + l], high 2 bits are bits
 * 2s..2s+1 of qh[32 h + l]; sub-block e / 16 has the int8 scales[e / 16] */
static inline void scales_q6_k(const uint8_t *b, block_scales *s) {
    const float d = half_at(b + 208);
    for (int i = 0; i < 16; i++) {
        s->dl[i] = d * (float)(int8_t)b[192 + i];
        s->ml[i] = -32 * s->dl[i];
    }
}
static inline vi quants_q6_k(const uint8_t *b, int e) {
    const int h = e / 128, sub = e / 32 % 4, l = e % 32;
    return field(b + 64 * h + 32 * (sub % 2), l, 4 * (sub / 2), 4) | field_to(b + 128 + 32 * h, l, 2 * sub, 2, 4);
}

/* ---- per type: the dequantizer, and the kernel of one row of x that dequantizes in registers ---- */

#define CHUNK_VECTORS (32 / LANES)

/* fused: acc[r] = lane-wise x . (row r of W) over `blocks` blocks, for r < FUSED_ROWS (rows[r]: the row's blocks):
 * the same sums as a register tile over the dequantized rows (32 elements at a time, in order), without storing
 * them. FUSED_ROWS accumulator chains hide the FMA latency; x is read from L1 by each row. The bytes `ahead` of each
 * row's block (the next FUSED_ROWS rows') are asked for meanwhile: rows of a few hundred bytes are too short for the
 * hardware's stream prefetcher. */
#define FUSED_ROWS 4
/* between a K-quant's chunks: the compiler may not keep what it loaded for one chunk for the next ones (with 8 chunks
 * unrolled it keeps too much, and spills it) */
#define NOT_ACROSS() __asm__ volatile("" ::: "memory")

#define TYPE_KERNELS(NAME, BLOCK, BYTES, OFFSET)                                                                   \
    static inline void chunk_##NAME(const uint8_t *b, const block_scales *s, int j, vf *w) {                      \
        for (int v = 0; v < CHUNK_VECTORS; v++) {                                                                  \
            const int e = 32 * j + v * LANES;                                                                      \
            const vf q = ints_to_float(quants_##NAME(b, e));                                                      \
            w[v] = OFFSET ? q * splat(s->dl[e / 16]) + splat(s->ml[e / 16]) : q * splat(s->dl[e / 16]);          \
        }                                                                                                          \
    }                                                                                                              \
    static void dequantize_##NAME(const uint8_t *row, int64_t blocks, float *dst) {                                \
        for (int64_t i = 0; i < blocks; i++, row += BYTES, dst += BLOCK) {                                         \
            block_scales s;                                                                                        \
            scales_##NAME(row, &s);                                                                                \
            _Pragma("GCC unroll 8") for (int j = 0; j < BLOCK / 32; j++) {                                        \
                vf w[CHUNK_VECTORS];                                                                               \
                chunk_##NAME(row, &s, j, w);                                                                       \
                for (int v = 0; v < CHUNK_VECTORS; v++) store(dst + 32 * j + v * LANES, w[v]);                    \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    static void fused_##NAME(const float *restrict x, const uint8_t *const *rows, int64_t blocks, vf *acc,        \
                             int64_t ahead) {                                                                      \
        vf a[FUSED_ROWS] = {0};                                                                                    \
        for (int64_t i = 0; i < blocks; i++) {                                                                     \
            block_scales s[FUSED_ROWS];                                                                            \
            for (int r = 0; r < FUSED_ROWS; r++) {                                                                 \
                for (int o = 0; o < BYTES; o += 64) __builtin_prefetch(rows[r] + i * BYTES + ahead + o);          \
                scales_##NAME(rows[r] + i * BYTES, &s[r]);                                                         \
            }                                                                                                      \
            _Pragma("GCC unroll 8") for (int j = 0; j < BLOCK / 32; j++) {                                        \
                for (int r = 0; r < FUSED_ROWS; r++) {                                                             \
                    vf w[CHUNK_VECTORS];                                                                           \
                    chunk_##NAME(rows[r] + i * BYTES, &s[r], j, w);                                                \
                    for (int v = 0; v < CHUNK_VECTORS; v++)                                                        \
                        a[r] += load(x + i * BLOCK + 32 * j + v * LANES) * w[v];                                   \
                }                                                                                                  \
                if (BLOCK > 32) NOT_ACROSS();                                                                      \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < FUSED_ROWS; r++) acc[r] = a[r];                                                       \
    }

TYPE_KERNELS(q4_0, 32, 18, 1) TYPE_KERNELS(q4_1, 32, 20, 1) TYPE_KERNELS(q5_0, 32, 22, 1)
TYPE_KERNELS(q5_1, 32, 24, 1) TYPE_KERNELS(q8_0, 32, 34, 0) TYPE_KERNELS(q2_k, 256, 84, 1)
TYPE_KERNELS(q3_k, 256, 110, 1) TYPE_KERNELS(q4_k, 256, 144, 1) TYPE_KERNELS(q5_k, 256, 176, 1)
TYPE_KERNELS(q6_k, 256, 210, 1)

typedef struct {
    int block, bytes; /* elements and bytes per block */
    void (*dequantize)(const uint8_t *row, int64_t blocks, float *dst);
    void (*fused)(const float *x, const uint8_t *const *rows, int64_t blocks, vf *acc, int64_t ahead);
} quant_type;

#define TYPE(NAME, BLOCK, BYTES) *t = (quant_type){BLOCK, BYTES, dequantize_##NAME, fused_##NAME}; return 1

static int find_type(int qtype, quant_type *t) {
    switch (qtype) {
    case Q4_0: TYPE(q4_0, 32, 18);
    case Q4_1: TYPE(q4_1, 32, 20);
    case Q5_0: TYPE(q5_0, 32, 22);
    case Q5_1: TYPE(q5_1, 32, 24);
    case Q8_0: TYPE(q8_0, 32, 34);
    case Q2_K: TYPE(q2_k, 256, 84);
    case Q3_K: TYPE(q3_k, 256, 110);
    case Q4_K: TYPE(q4_k, 256, 144);
    case Q5_K: TYPE(q5_k, 256, 176);
    case Q6_K: TYPE(q6_k, 256, 210);
    default: return 0;
    }
}

/* num_threads, or fewer where each would get less than THREAD_WORK: starting and joining threads costs
 * microseconds, as much as a small matmul (SmolLM2's k and v projections in a decode step) */
static int threads_for(int64_t work, int num_threads) {
    const int64_t most = work / THREAD_WORK + 1;
    return num_threads < 1 ? 1 : num_threads < most ? num_threads : (int)most;
}

int gguf_supported(int qtype) {
    quant_type t;
    return find_type(qtype, &t);
}

void gguf_dequantize(int qtype, const uint8_t *src, float *dst, int64_t rows, int64_t k, int num_threads) {
    quant_type t;
    if (!find_type(qtype, &t)) return;
    const int64_t row_bytes = k / t.block * t.bytes;
#pragma omp parallel for num_threads(threads_for(rows * k, num_threads)) schedule(static)
    for (int64_t r = 0; r < rows; r++) t.dequantize(src + r * row_bytes, k / t.block, dst + r * k);
}

/* ---- the register tiles ---- */

/* x86's multiply-adds take one operand from memory, and GCC then loads a vector that R multiply-adds share R
 * times rather than once: this empty statement makes it load the vector into a register (elsewhere, and for vectors
 * wider than the registers: nothing). */
#if defined(__x86_64__) && (HFBRIDGE_VECTOR_BYTES == 16 || (HFBRIDGE_VECTOR_BYTES == 32 && defined(__AVX__)) || \
                            (HFBRIDGE_VECTOR_BYTES == 64 && defined(__AVX512F__)))
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

/* acc[r * G + c] (+)= lane-wise x[r, :] * w[c, :] over `steps` vectors, for r < R, c < C: x rows `ldx` floats apart,
 * weight rows `ldw` apart. Starts from zeros when `first`, else from acc. */
#define TILE(NAME, R, C)                                                                                          \
    static void NAME(const float *restrict x, int64_t ldx, const float *restrict w, int64_t ldw, int64_t steps,    \
                     vf *restrict acc, int first) {                                                                \
        vf a[R][C];                                                                                                \
        for (int r = 0; r < R; r++)                                                                                \
            for (int c = 0; c < C; c++) a[r][c] = first ? (vf){0} : acc[r * G + c];                             \
        for (int64_t s = 0; s < steps; s++) {                                                                      \
            vf xr[R], wc[C];                                                                                       \
            for (int r = 0; r < R; r++) {                                                                          \
                xr[r] = load(x + r * ldx + s * LANES);                                                            \
                IN_REGISTER(xr[r]);                                                                                \
            }                                                                                                      \
            for (int c = 0; c < C; c++) {                                                                          \
                wc[c] = load(w + c * ldw + s * LANES);                                                            \
                IN_REGISTER(wc[c]);                                                                                \
            }                                                                                                      \
            for (int c = 0; c < C; c++)                                                                            \
                for (int r = 0; r < R; r++) a[r][c] += xr[r] * wc[c];                                             \
        }                                                                                                          \
        for (int r = 0; r < R; r++)                                                                                \
            for (int c = 0; c < C; c++) acc[r * G + c] = a[r][c];                                                 \
    }

TILE(tile_rows_1, 1, TILE_C)
TILE(tile_rows_2, 2, TILE_C)
TILE(tile_rows_3, 3, TILE_C)
#if TILE_R > 3
TILE(tile_rows_4, 4, TILE_C)
#endif

/* rows (1 .. TILE_R) rows of x against the G weight rows of a group, TILE_C rows at a time */
static void tile(int rows, const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t steps, vf *acc,
                 int first) {
    for (int c = 0; c < G; c += TILE_C) {
        const float *wc = w + c * ldw;
        switch (rows) {
        case 1: tile_rows_1(x, ldx, wc, ldw, steps, acc + c, first); break;
        case 2: tile_rows_2(x, ldx, wc, ldw, steps, acc + c, first); break;
#if TILE_R > 3
        case 3: tile_rows_3(x, ldx, wc, ldw, steps, acc + c, first); break;
        default: tile_rows_4(x, ldx, wc, ldw, steps, acc + c, first);
#else
        default: tile_rows_3(x, ldx, wc, ldw, steps, acc + c, first);
#endif
        }
    }
}

/* out[r, c] = the sum of acc[r * G + c]'s lanes for r < rows, c < cols, LANES at a time by simd.h's sum_lanes: lane i
 * of its result adds x[i]'s lanes by one fixed halving tree (lane j and j + LANES/2, then j and j + LANES/4, ...),
 * whatever the other vectors are */
static void finish(const vf *acc, int64_t rows, int64_t cols, float *out, int64_t ldo) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c += LANES) {
            vf group[LANES];
            for (int i = 0; i < LANES; i++) group[i] = c + i < G ? acc[r * G + c + i] : (vf){0};
            const vf sums = sum_lanes(group);
            memcpy(out + r * ldo + c, &sums, (cols - c < LANES ? cols - c : LANES) * sizeof(float));
        }
}

/* weight rows [row0, row0 + G) of W, elements [k0, k0 + len) -> buf [G, CHUNK] (rows past n: zeros) */
static void dequantize_group(const quant_type *t, const uint8_t *w, int64_t row_bytes, int64_t n, int64_t row0,
                             int64_t k0, int64_t len, float *buf) {
    for (int64_t c = 0; c < G; c++) {
        if (row0 + c < n) t->dequantize(w + (row0 + c) * row_bytes + k0 / t->block * t->bytes, len / t->block,
                                        buf + c * CHUNK);
        else memset(buf + c * CHUNK, 0, len * sizeof(float));
    }
}

/* One part of a projection: n weight rows of one type, written to output columns [col, col + n) */
typedef struct {
    quant_type t;
    const uint8_t *w;
    int64_t n, col, row_bytes, groups;
} part;

/* Group g of part p (G weight rows) against x rows [0, m) for m <= SLICE_ROWS. One row of x: the fused kernel.
 * More: chunk by chunk of k, the group's chunk dequantized into buf and every row of x against it, the sums of all
 * m x G outputs carried in acc from chunk to chunk. */
static void group(const part *p, int64_t g, const float *x, float *out, int64_t m, int64_t k, int64_t ldo) {
    const quant_type *t = &p->t;
    const uint8_t *w = p->w;
    const int64_t n = p->n, row_bytes = p->row_bytes;
    vf acc[SLICE_ROWS * G];
    const int64_t cols = n - g * G < G ? n - g * G : G;
    if (m == 1) { /* FUSED_ROWS weight rows at a time (rows past n: the last row again, not written) */
        for (int64_t c = 0; c < G; c += FUSED_ROWS) {
            const uint8_t *rows[FUSED_ROWS];
            for (int r = 0; r < FUSED_ROWS; r++) rows[r] = w + (c + r < cols ? g * G + c + r : n - 1) * row_bytes;
            t->fused(x, rows, k / t->block, acc + c, FUSED_ROWS * row_bytes);
        }
    } else {
        float buf[G * CHUNK] __attribute__((aligned(64)));
        for (int64_t k0 = 0; k0 < k; k0 += CHUNK) {
            const int64_t len = k - k0 < CHUNK ? k - k0 : CHUNK;
            dequantize_group(t, w, row_bytes, n, g * G, k0, len, buf);
            for (int64_t r = 0; r < m; r += TILE_R) {
                const int rows = m - r < TILE_R ? (int)(m - r) : TILE_R;
                tile(rows, x + r * k + k0, k, buf, CHUNK, len / LANES, acc + r * G, k0 == 0);
            }
        }
    }
    finish(acc, m, cols, out + p->col + g * G, ldo);
}

/* x rows [0, m), m <= SLICE_ROWS, against every part: the threads share out the groups of all the parts at once */
static void slice(const part *parts, int num_parts, int64_t groups, const float *x, float *out, int64_t m,
                  int64_t work, int64_t k, int64_t ldo, int num_threads) {
#pragma omp parallel for num_threads(threads_for(work, num_threads)) schedule(static)
    for (int64_t i = 0; i < groups; i++) {
        int p = 0;
        int64_t g = i;
        while (g >= parts[p].groups) g -= parts[p++].groups;
        group(&parts[p], g, x, out, m, k, ldo);
    }
}

/* out [m, n_0 + n_1 + ...] (rows ldo apart) = x [m, k] . [W_0; W_1; ...]^T: a fused projection (q, k and v; gate
 * and up) whose parts may each have their own type, in one call, so that the threads split all its rows between
 * them (SmolLM2's k and v alone are too small for two). Each output has the same bits as with its part alone.
 * Returns 0 (nothing written) where a type has no kernel or a size is not positive. */
int gguf_matmul_parts(int num_parts, const int *qtypes, const uint8_t *const *ws, const int64_t *ns, const float *x,
                      float *out, int64_t m, int64_t k, int64_t ldo, int num_threads) {
    enum { MAX_PARTS = 8 };
    part parts[MAX_PARTS];
    int64_t groups = 0, col = 0;
    if (num_parts < 1 || num_parts > MAX_PARTS || k <= 0) return 0;
    for (int p = 0; p < num_parts; p++) {
        if (!find_type(qtypes[p], &parts[p].t) || ns[p] <= 0) return 0;
        parts[p].w = ws[p];
        parts[p].n = ns[p];
        parts[p].col = col;
        parts[p].row_bytes = k / parts[p].t.block * parts[p].t.bytes;
        parts[p].groups = (ns[p] + G - 1) / G;
        groups += parts[p].groups;
        col += ns[p];
    }
    for (int64_t r = 0; r < m; r += SLICE_ROWS) {
        const int64_t rows = m - r < SLICE_ROWS ? m - r : SLICE_ROWS;
        slice(parts, num_parts, groups, x + r * k, out + r * ldo, rows, rows * col * k, k, ldo, num_threads);
    }
    return 1;
}
