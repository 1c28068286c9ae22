/* The x86-64 level the compiled passes (merging/kernel.c, training/kernel.c) run at. */
#ifndef LORATOOL_ISA_H
#define LORATOOL_ISA_H

#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define X86_TARGETS /* "arch=x86-64-v3/v4" targets: GCC 11 and later */
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

#endif
