/* What the compiled passes (merging/kernel.c, training/kernel.c) share: the x86-64 level they
   run at, and bf16 <-> fp32 as torch converts (the C side of loratool/native.py). */
#ifndef LORATOOL_NATIVE_H
#define LORATOOL_NATIVE_H

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define X86_TARGETS /* "arch=x86-64-v3/v4" targets: GCC 11 and later */
#endif

/* DEF(suffix, attribute) once per level a pass is built for: base, then v3 and v4 where GCC can
   target them (``isa_level`` below picks one at import). */
#ifdef X86_TARGETS
#define PER_ISA(DEF)                                                                            \
    DEF(base, )                                                                                 \
    DEF(v3, __attribute__((target("arch=x86-64-v3"))))                                          \
    DEF(v4, __attribute__((target("arch=x86-64-v4"))))
#else
#define PER_ISA(DEF) DEF(base, )
#endif

/* 4 (AVX-512), 3 (AVX2 + FMA) or 0: the widest this CPU has, or a narrower one that ``want``
   names ("base", "v3": the tests run every level the machine can). */
static int isa_level(const char *want) {
    if (want && strcmp(want, "base") == 0) return 0;
#ifdef X86_TARGETS
    __builtin_cpu_init();
    int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (v4 && !(want && strcmp(want, "v3") == 0)) return 4;
    if (v3) return 3;
#endif
    return 0;
}

/* bf16 bits (in a 32-bit lane) to fp32: exact. */
static inline float bf16_up(uint32_t h) {
    uint32_t u = h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* c10::BFloat16's round_to_nearest_even (NaN becomes the quiet NaN 0x7FC0), in 32-bit lanes
   (16-bit ones vectorize worse). */
static inline uint32_t bf16_down(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded;
}

#endif
