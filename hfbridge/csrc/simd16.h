/* 16-float vectors in plain GCC/Clang vector types (no intrinsics: any x86 or Arm build compiles them), and the
 * reduction of 16 vectors at once that both kernel files use in place of one horizontal sum per dot product. */
#ifndef HFBRIDGE_SIMD16_H
#define HFBRIDGE_SIMD16_H
#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline v16 load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);  /* unaligned load */
    return v;
}

/* x[0..15] -> one vector whose lane i is the sum of x[i]'s 16 lanes. Four halving steps: each adds the two
 * halves of every lane group of two vectors, so 16 reductions cost 15 vector adds and 30 shuffles. */
#ifdef __clang__
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, (i16){__VA_ARGS__})
#endif
#define HALVES(x, y, LO, HI) (SHUFFLE(x, y, LO) + SHUFFLE(x, y, HI))
#define LO1 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI1 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO2 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI2 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO3 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI3 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LO4 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define HI4 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31

static inline v16 sum16(const v16 *x) {
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = HALVES(x[2 * i], x[2 * i + 1], LO1, HI1);
    for (int i = 0; i < 4; i++) b[i] = HALVES(a[2 * i], a[2 * i + 1], LO2, HI2);
    for (int i = 0; i < 2; i++) c[i] = HALVES(b[2 * i], b[2 * i + 1], LO3, HI3);
    return HALVES(c[0], c[1], LO4, HI4);
}

#endif
