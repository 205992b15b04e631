/* Float vectors of the machine's own width in plain GCC/Clang vector types (no intrinsics: any x86 or Arm build
 * compiles them), and the reduction of LANES vectors at once that both kernel files use in place of one horizontal
 * sum per dot product.
 *
 * The width follows the build's -march=native: 16 floats with AVX-512, 8 with AVX/AVX2, 4 otherwise (SSE, NEON).
 * A vector wider than the registers (16 floats on an AVX2 machine) still computes the right values, but the
 * compiler splits it into register pairs and the kernels' register tiles spill: on a 2-core Zen 3 the projections
 * ran 5-7x slower than F.linear that way. -DHFBRIDGE_VECTOR_BYTES=N picks a width by hand (the tests run every
 * width on whatever machine they are on). */
#ifndef HFBRIDGE_SIMD_H
#define HFBRIDGE_SIMD_H
#include <stdint.h>
#include <string.h>

#ifndef HFBRIDGE_VECTOR_BYTES
#if defined(__AVX512F__)
#define HFBRIDGE_VECTOR_BYTES 64
#elif defined(__AVX__)
#define HFBRIDGE_VECTOR_BYTES 32
#else
#define HFBRIDGE_VECTOR_BYTES 16
#endif
#endif

#define LANES (HFBRIDGE_VECTOR_BYTES / 4)

/* architectural vector registers: what a kernel's register tile may use */
#if defined(__AVX512F__) || defined(__aarch64__)
#define VECTOR_REGISTERS 32
#else
#define VECTOR_REGISTERS 16
#endif

typedef float vf __attribute__((vector_size(HFBRIDGE_VECTOR_BYTES)));
typedef int32_t vi __attribute__((vector_size(HFBRIDGE_VECTOR_BYTES)));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

/* LANES bfloat16 values (the high halves of float32s) widened to floats, exactly: zero-extend, shift into the top
 * half (vpmovzxwd + vpslld on x86). Weights and caches stored in bfloat16 take half the memory traffic. */
typedef uint16_t vh __attribute__((vector_size(HFBRIDGE_VECTOR_BYTES / 2)));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vi) << 16);
}

/* s in every lane: one broadcast load (vbroadcastss). Spelled out because `(vf){0} + s` costs an add besides,
 * and a loop over the lanes compiles to lane inserts. */
#if LANES == 16
#define EVERY_LANE(s) s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s
#elif LANES == 8
#define EVERY_LANE(s) s, s, s, s, s, s, s, s
#else
#define EVERY_LANE(s) s, s, s, s
#endif
static inline vf splat(float s) { return (vf){EVERY_LANE(s)}; }

/* x[0 .. LANES-1] -> one vector whose lane i is the sum of x[i]'s lanes. log2(LANES) halving steps: each adds the
 * two halves of every lane group of two vectors, so LANES reductions cost LANES - 1 vector adds. */
#define UNPAREN(...) __VA_ARGS__ /* lane lists travel in parentheses, (0, 1, 8, 9), as one macro argument */
#ifdef __clang__
#define SHUFFLE(x, y, LIST) __builtin_shufflevector(x, y, UNPAREN LIST)
#else
#define SHUFFLE(x, y, LIST) __builtin_shuffle(x, y, (vi){UNPAREN LIST})
#endif
#define HALVES(x, y, LO, HI) (SHUFFLE(x, y, LO) + SHUFFLE(x, y, HI))

/* one halving step: n vectors -> n / 2 */
#define HALVING(in, out, n, LO, HI) \
    for (int i = 0; i < (n) / 2; i++) out[i] = HALVES(in[2 * i], in[2 * i + 1], LO, HI)

#if LANES == 16
static inline vf sum_lanes(const vf *x) {
    vf a[8], b[4], c[2];
    HALVING(x, a, 16, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
            (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    HALVING(a, b, 8, (0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
            (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    HALVING(b, c, 4, (0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
            (2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    return HALVES(c[0], c[1], (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                  (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}
#elif LANES == 8
static inline vf sum_lanes(const vf *x) {
    vf a[4], b[2];
    HALVING(x, a, 8, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15));
    HALVING(a, b, 4, (0, 1, 4, 5, 8, 9, 12, 13), (2, 3, 6, 7, 10, 11, 14, 15));
    return HALVES(b[0], b[1], (0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15));
}
#elif LANES == 4
static inline vf sum_lanes(const vf *x) {
    vf a[2];
    HALVING(x, a, 4, (0, 1, 4, 5), (2, 3, 6, 7));
    return HALVES(a[0], a[1], (0, 2, 4, 6), (1, 3, 5, 7));
}
#else
#error "HFBRIDGE_VECTOR_BYTES must be 16, 32 or 64"
#endif

/* mask ? a : b, lane by lane (mask lanes all ones or all zeros, as vector comparisons give); C has no vector ?: */
static inline vf select_lanes(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* e^x in every lane, within 2 ulp over the float range; below -87.3 it gives about 1e-38 instead of 0 (softmax
 * calls it on x - max <= 0, where that is far below a float sum's last bit). Range reduction x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by Cephes' expf polynomial, 2^n put into the exponent
 * bits. n is rounded by adding 1.5 * 2^23: the float's low mantissa bits are then n itself. */
static inline vf exp_lanes(vf x) {
    const vf lo = splat(-87.33654f), hi = splat(88.37626f), magic = splat(12582912.0f);
    x = select_lanes(x < lo, lo, select_lanes(x > hi, hi, x));
    const vf t = x * splat(1.44269504088896341f) + magic, n = t - magic;
    const vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    const vf e = p * (r * r) + r + splat(1.0f);
    const vi two_n = ((vi)t - (vi)magic + 127) << 23;
    return e * (vf)two_n;
}

#endif
