/* The merge's elementwise pass over one block, fused: loratool.merging.kernel (optional).

   For each element of a block of a weight W (bf16 or fp32) and its ΔW block d (fp32, from one
   torch.mm of the factors), in one pass over memory:

     w  = fp32(W)                exact upcast
     r  = w + d                  one fp32 add
     o  = round(r)               round to nearest even into W's dtype: the merged value, stored
     x  = fp32(o) - w            W' - W
     y  = x - d                  W' - W - ΔW
     s1 += x², s2 += y²          the fidelity sums (fp32 per 2048 elements, fp64 across)
     b  = round(fp32(o) - d)     what unmerge computes from the merged value
     b != W                      a round-trip miss: counted, its distance in ULPs kept, and with
                                 an index buffer its position and W's bits gathered

   These are the operations of DeltaBlocks.add in delta.py, which runs them as ~13 torch calls
   over the block; the bits written and the misses are the same (IEEE single precision, no
   contraction into FMAs, no flush of subnormals: compiled with -ffp-contract=off and without
   -ffast-math); the sums are fp32 per chunk of 2048 here, per block there, so they agree to
   about 1e-6 relative. A NaN or Inf anywhere makes a sum non-finite: the caller then refuses.

   At v3 (AVX2, the widest most desktop CPUs have) two more things: the passes are written by
   hand (GCC's vectorization of the loops below spills registers there: 1.5-3x slower with the
   round trip), and ``merge_lowrank`` makes ΔW itself, a row of the block at a time in L1, from
   fp32 L and R: the sum over k in order, each product rounded and then added. MKL's rank-16
   product for a block ran at a third of the FMA peak there and wrote a block-sized ΔW to
   memory; its sums run in another order, so ΔW's last bit differs from the torch path's
   ``torch.mm`` on about half of the elements, and delta.py's ``sequential_product`` is the twin
   the tests hold it to bit for bit. Elsewhere (v4, base) the product stays torch.mm.

   Built by setuptools where a C compiler is present; without it delta.py runs the torch path. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../native.h"

typedef struct {
    double s1, s2;
    int64_t off, max_ulp;
} Sums;

static inline int32_t ulp16(uint32_t a, uint32_t b) {
    int32_t x = (int16_t)a, y = (int16_t)b;
    int32_t same = (x ^ y) >= 0;
    int32_t d = x - y;
    int32_t span = (x & 0x7FFF) + (y & 0x7FFF);
    return same ? (d < 0 ? -d : d) : span;
}

static inline int64_t ulp32(uint32_t a, uint32_t b) {
    int64_t x = (int32_t)a, y = (int32_t)b;
    int64_t same = (x ^ y) >= 0;
    int64_t d = x - y;
    int64_t span = (x & 0x7FFFFFFF) + (y & 0x7FFFFFFF);
    return same ? (d < 0 ? -d : d) : span;
}

/* The sums: fp32 over a chunk (a few dozen terms per vector lane), fp64 across chunks. */
#define CHUNK 2048

/* The loops. Each is written for a separate destination and in place (one pointer: a
   restrict-qualified pair that alias would be undefined, and an unqualified pair makes the
   compiler's overlap check fall back to scalar code), and with ``back`` receiving the bits
   unmerge would compute (for the gather pass) or without: no branch inside, so they vectorize. */
#define BF16_LOOP(SRC, DST, KEEP_BACK)                                                         \
    double s1 = 0.0, s2 = 0.0;                                                                 \
    int32_t off = 0, max_ulp = 0;                                                              \
    for (Py_ssize_t c = 0; c < n; c += CHUNK) {                                                \
        Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n;                                        \
        float c1 = 0.0f, c2 = 0.0f;                                                            \
        if (roundtrip) {                                                                       \
            _Pragma("omp simd reduction(+ : c1, c2, off) reduction(max : max_ulp)")            \
            for (Py_ssize_t i = c; i < end; i++) {                                             \
                uint32_t wb = SRC[i];                                                          \
                float w = bf16_up(wb), dd = d[i];                                              \
                uint32_t ob = bf16_down(w + dd);                                               \
                float o = bf16_up(ob);                                                         \
                float x = o - w, y = x - dd;                                                   \
                uint32_t bb = bf16_down(o - dd);                                               \
                DST[i] = (uint16_t)ob;                                                         \
                KEEP_BACK;                                                                     \
                c1 += x * x;                                                                   \
                c2 += y * y;                                                                   \
                int32_t u = ulp16(bb, wb);                                                     \
                off += bb != wb;                                                               \
                max_ulp = u > max_ulp ? u : max_ulp;                                           \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp simd reduction(+ : c1, c2)")                                          \
            for (Py_ssize_t i = c; i < end; i++) {                                             \
                float w = bf16_up(SRC[i]), dd = d[i];                                          \
                uint32_t ob = bf16_down(w + dd);                                               \
                float o = bf16_up(ob);                                                         \
                float x = o - w, y = x - dd;                                                   \
                DST[i] = (uint16_t)ob;                                                         \
                c1 += x * x;                                                                   \
                c2 += y * y;                                                                   \
            }                                                                                  \
        }                                                                                      \
        s1 += c1, s2 += c2;                                                                    \
    }                                                                                          \
    out->s1 = s1, out->s2 = s2, out->off = off, out->max_ulp = max_ulp;

#define F32_LOOP(SRC, DST, KEEP_BACK)                                                          \
    double s1 = 0.0, s2 = 0.0;                                                                 \
    int64_t off = 0, max_ulp = 0;                                                              \
    for (Py_ssize_t c = 0; c < n; c += CHUNK) {                                                \
        Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n;                                        \
        float c1 = 0.0f, c2 = 0.0f;                                                            \
        if (roundtrip) {                                                                       \
            _Pragma("omp simd reduction(+ : c1, c2, off) reduction(max : max_ulp)")            \
            for (Py_ssize_t i = c; i < end; i++) {                                             \
                float w = SRC[i], dd = d[i];                                                   \
                float o = w + dd;                                                              \
                float x = o - w, y = x - dd;                                                   \
                float bf = o - dd;                                                             \
                DST[i] = o;                                                                    \
                KEEP_BACK;                                                                     \
                c1 += x * x;                                                                   \
                c2 += y * y;                                                                   \
                uint32_t bb, wb;                                                               \
                memcpy(&bb, &bf, 4);                                                           \
                memcpy(&wb, &w, 4);                                                            \
                int64_t u = ulp32(bb, wb);                                                     \
                off += bb != wb;                                                               \
                max_ulp = u > max_ulp ? u : max_ulp;                                           \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp simd reduction(+ : c1, c2)")                                          \
            for (Py_ssize_t i = c; i < end; i++) {                                             \
                float w = SRC[i], dd = d[i];                                                   \
                float o = w + dd;                                                              \
                float x = o - w, y = x - dd;                                                   \
                DST[i] = o;                                                                    \
                c1 += x * x;                                                                   \
                c2 += y * y;                                                                   \
            }                                                                                  \
        }                                                                                      \
        s1 += c1, s2 += c2;                                                                    \
    }                                                                                          \
    out->s1 = s1, out->s2 = s2, out->off = off, out->max_ulp = max_ulp;

/* Every pass, compiled once per instruction set: target_clones would do the dispatch, but
   its clones were measured 2x slower here (GCC 12), so the table is chosen once at import. */
typedef struct {
    void (*bf16_apart)(const uint16_t *, const float *, uint16_t *, Py_ssize_t, int, Sums *);
    void (*bf16_inplace)(uint16_t *, const float *, Py_ssize_t, int, Sums *);
    void (*bf16_back)(const uint16_t *, const float *, uint16_t *, Py_ssize_t, uint16_t *,
                      Sums *);
    void (*f32_apart)(const float *, const float *, float *, Py_ssize_t, int, Sums *);
    void (*f32_inplace)(float *, const float *, Py_ssize_t, int, Sums *);
    void (*f32_back)(const float *, const float *, float *, Py_ssize_t, float *, Sums *);
} Passes;

#define PASSES(SFX, ATTR)                                                                      \
    ATTR static void bf16_apart_##SFX(const uint16_t *restrict src, const float *restrict d,  \
                                      uint16_t *restrict dst, Py_ssize_t n, int roundtrip,      \
                                      Sums *out) {                                              \
        BF16_LOOP(src, dst, (void)0)                                                            \
    }                                                                                           \
    ATTR static void bf16_inplace_##SFX(uint16_t *restrict p, const float *restrict d,         \
                                        Py_ssize_t n, int roundtrip, Sums *out) {               \
        BF16_LOOP(p, p, (void)0)                                                                \
    }                                                                                           \
    ATTR static void bf16_back_##SFX(const uint16_t *restrict src, const float *restrict d,   \
                                     uint16_t *restrict dst, Py_ssize_t n,                      \
                                     uint16_t *restrict back, Sums *out) {                      \
        const int roundtrip = 1;                                                                \
        BF16_LOOP(src, dst, back[i] = (uint16_t)bb)                                             \
    }                                                                                           \
    ATTR static void f32_apart_##SFX(const float *restrict src, const float *restrict d,      \
                                     float *restrict dst, Py_ssize_t n, int roundtrip,          \
                                     Sums *out) {                                               \
        F32_LOOP(src, dst, (void)0)                                                             \
    }                                                                                           \
    ATTR static void f32_inplace_##SFX(float *restrict p, const float *restrict d,             \
                                       Py_ssize_t n, int roundtrip, Sums *out) {                \
        F32_LOOP(p, p, (void)0)                                                                 \
    }                                                                                           \
    ATTR static void f32_back_##SFX(const float *restrict src, const float *restrict d,       \
                                    float *restrict dst, Py_ssize_t n, float *restrict back,    \
                                    Sums *out) {                                                \
        const int roundtrip = 1;                                                                \
        F32_LOOP(src, dst, back[i] = bf)                                                        \
    }                                                                                           \
    static const Passes passes_##SFX = {bf16_apart_##SFX, bf16_inplace_##SFX,                  \
                                        bf16_back_##SFX,  f32_apart_##SFX,                      \
                                        f32_inplace_##SFX, f32_back_##SFX};

PER_ISA(PASSES)

#ifdef X86_TARGETS
#include <immintrin.h>

#define AVX2 __attribute__((target("arch=x86-64-v3")))

/* bf16_down on 8 lanes: round to nearest even, NaN to the quiet NaN. */
AVX2 static inline __m256i bf16_down8(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i one = _mm256_set1_epi32(1);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    r = _mm256_srli_epi32(r, 16);
    __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

/* A chunk's lanes summed: the fidelity sums into c1 and c2 (fp32), the largest distance into
   max_ulp; returns how many lanes' round trips gave W back. */
AVX2 static inline int64_t lanes(__m256 a1, __m256 a2, __m256i eq, __m256i top, float *c1,
                                 float *c2, int64_t *max_ulp) {
    float l1[8], l2[8];
    int32_t le[8], lt[8];
    _mm256_storeu_ps(l1, a1);
    _mm256_storeu_ps(l2, a2);
    _mm256_storeu_si256((__m256i *)le, eq);
    _mm256_storeu_si256((__m256i *)lt, top);
    int64_t same = 0;
    for (int k = 0; k < 8; k++) {
        *c1 += l1[k], *c2 += l2[k], same += le[k];
        *max_ulp = lt[k] > *max_ulp ? lt[k] : *max_ulp;
    }
    return same;
}

/* The bf16 pass (BF16_LOOP without ``back``) at v3, by hand: GCC's vectorization of the macro
   runs 16 lanes at a time and spills, 3x slower with ``roundtrip``. The same operations in
   the same order per element, so the same bits, misses and ULP distances; the sums are fp32
   per lane over a chunk, then fp64 (an order the contract allows). One function serves both
   ways: each group of 8 is loaded before its result is stored, so dst may be src. */
AVX2 static void bf16_pass_avx2(const uint16_t *src, const float *d, uint16_t *dst,
                                Py_ssize_t n, int roundtrip, Sums *out) {
    double s1 = 0.0, s2 = 0.0;
    int64_t off = 0, max_ulp = 0;
    const __m256i low15 = _mm256_set1_epi32(0x7FFF);
    for (Py_ssize_t c = 0; c < n; c += CHUNK) {
        Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n, i = c;
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
        __m256i eq = _mm256_setzero_si256(), top = _mm256_setzero_si256();
        for (; i + 8 <= end; i += 8) {
            __m256i wb = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
            __m256i wbits = _mm256_slli_epi32(wb, 16);
            __m256 w = _mm256_castsi256_ps(wbits), dd = _mm256_loadu_ps(d + i);
            __m256i ob = bf16_down8(_mm256_add_ps(w, dd));
            __m256 o = _mm256_castsi256_ps(_mm256_slli_epi32(ob, 16));
            __m256 x = _mm256_sub_ps(o, w), y = _mm256_sub_ps(x, dd);
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(x, x));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(y, y));
            _mm_storeu_si128((__m128i *)(dst + i),
                             _mm_packus_epi32(_mm256_castsi256_si128(ob),
                                              _mm256_extracti128_si256(ob, 1)));
            if (roundtrip) {
                __m256i bb = bf16_down8(_mm256_sub_ps(o, dd));
                eq = _mm256_sub_epi32(eq, _mm256_cmpeq_epi32(bb, wb));
                __m256i xs = _mm256_srai_epi32(_mm256_slli_epi32(bb, 16), 16);
                __m256i ys = _mm256_srai_epi32(wbits, 16);
                __m256i apart = _mm256_srai_epi32(_mm256_xor_si256(xs, ys), 31);
                __m256i dist = _mm256_abs_epi32(_mm256_sub_epi32(xs, ys));
                __m256i span = _mm256_add_epi32(_mm256_and_si256(xs, low15),
                                                _mm256_and_si256(ys, low15));
                top = _mm256_max_epi32(top, _mm256_blendv_epi8(dist, span, apart));
            }
        }
        float c1 = 0.0f, c2 = 0.0f;
        int64_t same = lanes(a1, a2, eq, top, &c1, &c2, &max_ulp);
        if (roundtrip) off += (i - c) - same;
        for (; i < end; i++) { /* the tail, as BF16_LOOP */
            uint32_t wb = src[i];
            float w = bf16_up(wb), dd = d[i];
            uint32_t ob = bf16_down(w + dd);
            float o = bf16_up(ob);
            float x = o - w, y = x - dd;
            dst[i] = (uint16_t)ob;
            c1 += x * x;
            c2 += y * y;
            if (roundtrip) {
                uint32_t bb = bf16_down(o - dd);
                int32_t u = ulp16(bb, wb);
                off += bb != wb;
                max_ulp = u > max_ulp ? u : max_ulp;
            }
        }
        s1 += c1, s2 += c2;
    }
    out->s1 = s1, out->s2 = s2, out->off = off, out->max_ulp = max_ulp;
}

/* The fp32 pass the same way (F32_LOOP without ``back``). A same-sign ULP distance fits 31
   bits; a group of 8 where a value crossed zero (rare) takes its distances in scalar code. */
AVX2 static void f32_pass_avx2(const float *src, const float *d, float *dst, Py_ssize_t n,
                               int roundtrip, Sums *out) {
    double s1 = 0.0, s2 = 0.0;
    int64_t off = 0, max_ulp = 0;
    for (Py_ssize_t c = 0; c < n; c += CHUNK) {
        Py_ssize_t end = c + CHUNK < n ? c + CHUNK : n, i = c;
        __m256 a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
        __m256i eq = _mm256_setzero_si256(), top = _mm256_setzero_si256();
        for (; i + 8 <= end; i += 8) {
            __m256 w = _mm256_loadu_ps(src + i), dd = _mm256_loadu_ps(d + i);
            __m256 o = _mm256_add_ps(w, dd);
            __m256 x = _mm256_sub_ps(o, w), y = _mm256_sub_ps(x, dd);
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(x, x));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(y, y));
            _mm256_storeu_ps(dst + i, o);
            if (roundtrip) {
                __m256i bb = _mm256_castps_si256(_mm256_sub_ps(o, dd));
                __m256i wb = _mm256_castps_si256(w);
                eq = _mm256_sub_epi32(eq, _mm256_cmpeq_epi32(bb, wb));
                __m256i signs = _mm256_srai_epi32(_mm256_xor_si256(bb, wb), 31);
                int apart = _mm256_movemask_ps(_mm256_castsi256_ps(signs));
                __m256i dist = _mm256_abs_epi32(_mm256_sub_epi32(bb, wb));
                top = _mm256_max_epi32(top, _mm256_andnot_si256(signs, dist));
                if (apart) {
                    uint32_t lb[8], lw[8];
                    _mm256_storeu_si256((__m256i *)lb, bb);
                    _mm256_storeu_si256((__m256i *)lw, wb);
                    for (int k = 0; k < 8; k++) {
                        int64_t u = ulp32(lb[k], lw[k]);
                        max_ulp = u > max_ulp ? u : max_ulp;
                    }
                }
            }
        }
        float c1 = 0.0f, c2 = 0.0f;
        int64_t same = lanes(a1, a2, eq, top, &c1, &c2, &max_ulp);
        if (roundtrip) off += (i - c) - same;
        for (; i < end; i++) { /* the tail, as F32_LOOP */
            float w = src[i], dd = d[i];
            float o = w + dd;
            float x = o - w, y = x - dd;
            float bf = o - dd;
            dst[i] = o;
            c1 += x * x;
            c2 += y * y;
            if (roundtrip) {
                uint32_t bb, wb;
                memcpy(&bb, &bf, 4);
                memcpy(&wb, &w, 4);
                int64_t u = ulp32(bb, wb);
                off += bb != wb;
                max_ulp = u > max_ulp ? u : max_ulp;
            }
        }
        s1 += c1, s2 += c2;
    }
    out->s1 = s1, out->s2 = s2, out->off = off, out->max_ulp = max_ulp;
}

AVX2 static void f32_inplace_avx2(float *p, const float *d, Py_ssize_t n, int roundtrip,
                                  Sums *out) {
    f32_pass_avx2(p, d, p, n, roundtrip, out);
}

/* Two rows' ΔW over the column groups [g0, g0 + ng) of 32: for the row of L at l,
   t0[32·(g − g0) + j] = Σ_k l[k]·R[k][32·g + j], the sum in k order from k = 0, each product
   rounded to fp32 and then added (no FMA): what r torch calls ``acc = l0 * R0; acc = acc + lk *
   Rk`` give; the same from m into t1 (m may be l, for a block's odd last row). R comes packed by
   group ([groups][r][32], zero-padded: ``pack_right`` in delta.py), so each step of k reads 128
   contiguous bytes (rows of R a power of two apart alias in L1: 2x slower unpacked). Each load
   of R serves both rows, and eight chains of adds overlap their latency. */
AVX2 static void rows2_product_avx2(const float *l, const float *m, const float *packed,
                                    Py_ssize_t r, Py_ssize_t g0, Py_ssize_t ng, float *t0,
                                    float *t1) {
    for (Py_ssize_t g = 0; g < ng; g++) {
        const float *q = packed + (g0 + g) * r * 32;
        __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8);
        __m256 q2 = _mm256_loadu_ps(q + 16), q3 = _mm256_loadu_ps(q + 24);
        __m256 lk = _mm256_broadcast_ss(l), mk = _mm256_broadcast_ss(m);
        __m256 a0 = _mm256_mul_ps(lk, q0), a1 = _mm256_mul_ps(lk, q1);
        __m256 a2 = _mm256_mul_ps(lk, q2), a3 = _mm256_mul_ps(lk, q3);
        __m256 b0 = _mm256_mul_ps(mk, q0), b1 = _mm256_mul_ps(mk, q1);
        __m256 b2 = _mm256_mul_ps(mk, q2), b3 = _mm256_mul_ps(mk, q3);
        for (Py_ssize_t k = 1; k < r; k++) {
            const float *qk = q + k * 32;
            lk = _mm256_broadcast_ss(l + k), mk = _mm256_broadcast_ss(m + k);
            q0 = _mm256_loadu_ps(qk), q1 = _mm256_loadu_ps(qk + 8);
            q2 = _mm256_loadu_ps(qk + 16), q3 = _mm256_loadu_ps(qk + 24);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(lk, q0));
            b0 = _mm256_add_ps(b0, _mm256_mul_ps(mk, q0));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(lk, q1));
            b1 = _mm256_add_ps(b1, _mm256_mul_ps(mk, q1));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(lk, q2));
            b2 = _mm256_add_ps(b2, _mm256_mul_ps(mk, q2));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(lk, q3));
            b3 = _mm256_add_ps(b3, _mm256_mul_ps(mk, q3));
        }
        float *u = t0 + g * 32, *v = t1 + g * 32;
        _mm256_storeu_ps(u, a0), _mm256_storeu_ps(u + 8, a1);
        _mm256_storeu_ps(u + 16, a2), _mm256_storeu_ps(u + 24, a3);
        _mm256_storeu_ps(v, b0), _mm256_storeu_ps(v + 8, b1);
        _mm256_storeu_ps(v + 16, b2), _mm256_storeu_ps(v + 24, b3);
    }
}

/* Columns per tile of the fused product: R's tile (r × TILE fp32) stays in L1/L2 while every
   row of the block passes over it, and ΔW never leaves L1. */
#define TILE 512

/* W + L·R for a block of rows, the product fused into the pass (merge_lowrank below). */
AVX2 static void lowrank_avx2(const char *src, const float *left, const float *packed, char *dst,
                              Py_ssize_t rows, Py_ssize_t r, Py_ssize_t cols, int itemsize,
                              int roundtrip, Sums *out) {
    float tmp[2][TILE];
    Sums all = {0.0, 0.0, 0, 0}, one;
    for (Py_ssize_t j0 = 0; j0 < cols; j0 += TILE) {
        Py_ssize_t jn = cols - j0 < TILE ? cols - j0 : TILE, g0 = j0 / 32, ng = (jn + 31) / 32;
        for (Py_ssize_t i = 0; i < rows; i += 2) {
            int two = i + 1 < rows;
            const float *l = left + i * r;
            rows2_product_avx2(l, two ? l + r : l, packed, r, g0, ng, tmp[0], tmp[1]);
            for (int h = 0; h <= two; h++) {
                Py_ssize_t at = ((i + h) * cols + j0) * itemsize;
                if (itemsize == 2) {
                    bf16_pass_avx2((const uint16_t *)(src + at), tmp[h], (uint16_t *)(dst + at),
                                   jn, roundtrip, &one);
                } else {
                    f32_pass_avx2((const float *)(src + at), tmp[h], (float *)(dst + at), jn,
                                  roundtrip, &one);
                }
                all.s1 += one.s1, all.s2 += one.s2, all.off += one.off;
                all.max_ulp = one.max_ulp > all.max_ulp ? one.max_ulp : all.max_ulp;
            }
        }
    }
    *out = all;
}

AVX2 static void bf16_inplace_avx2(uint16_t *p, const float *d, Py_ssize_t n, int roundtrip,
                                   Sums *out) {
    bf16_pass_avx2(p, d, p, n, roundtrip, out);
}
#endif

static const Passes *P;
static const char *ISA;
/* The fused product and pass (v3 only: at v4 MKL's product runs near the FMA peak, and plain
   code would be slower than it), or NULL. */
static void (*LOWRANK)(const char *, const float *, const float *, char *, Py_ssize_t,
                       Py_ssize_t, Py_ssize_t, int, int, Sums *);

/* The widest set the CPU has, or a narrower one named by LORATOOL_MERGE_KERNEL (the tests run
   every set this machine can). */
static void pick(void) {
    int level = isa_level(getenv("LORATOOL_MERGE_KERNEL"));
    P = &passes_base, ISA = "base";
#ifdef X86_TARGETS
    if (level == 4) P = &passes_v4, ISA = "v4";
    if (level == 3) { /* v3's table with the hand-written bf16 and fp32 passes */
        static Passes v3;
        v3 = passes_v3;
        v3.bf16_apart = bf16_pass_avx2, v3.bf16_inplace = bf16_inplace_avx2;
        v3.f32_apart = f32_pass_avx2, v3.f32_inplace = f32_inplace_avx2;
        P = &v3, ISA = "v3", LOWRANK = lowrank_avx2;
    }
#endif
}

/* Positions where back differs from the original bits, and those bits. */
#define GATHER(T)                                                                               \
    const T *o = (const T *)orig, *b = (const T *)back;                                       \
    T *v = (T *)values;                                                                         \
    Py_ssize_t k = 0;                                                                           \
    for (Py_ssize_t i = 0; i < n; i++) {                                                        \
        if (o[i] != b[i]) {                                                                     \
            index[k] = (int64_t)(start + i);                                                    \
            v[k++] = o[i];                                                                      \
        }                                                                                       \
    }                                                                                           \
    return k;

static Py_ssize_t gather16(const char *orig, const char *back, Py_ssize_t n, Py_ssize_t start,
                           int64_t *index, char *values) {
    GATHER(uint16_t)
}

static Py_ssize_t gather32(const char *orig, const char *back, Py_ssize_t n, Py_ssize_t start,
                           int64_t *index, char *values) {
    GATHER(uint32_t)
}

static int get(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE)) < 0) {
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: not a contiguous buffer", what);
        return -1;
    }
    return 0;
}

/* Whether dst overlaps src without being it (an error is set): in place is one buffer. */
static int overlap(const Py_buffer *src, const Py_buffer *dst, const char *fn) {
    const char *sb = src->buf, *db = dst->buf;
    if (sb != db && sb < db + dst->len && db < sb + src->len) {
        PyErr_Format(PyExc_ValueError, "%s: src and dst overlap without being one", fn);
        return 1;
    }
    return 0;
}

/* merge_block(src, delta, dst, itemsize, roundtrip, index=None, values=None, start=0,
               scratch=None) -> (s1, s2, off, max_ulp, gathered)

   src, dst: the block's bytes in and out (bf16 when itemsize is 2, fp32 when 4; may be one
   buffer); delta: the fp32 ΔW block; index (int64) and values (W's dtype), each with room for
   every element, receive the misses when given (their number is ``gathered``, equal to off;
   their indices count from ``start``), which needs ``scratch``: twice the block's bytes. */
static PyObject *merge_block(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"src",    "delta",   "dst",   "itemsize", "roundtrip",
                            "index",  "values",  "start", "scratch",  NULL};
    PyObject *src_o, *d_o, *dst_o, *idx_o = Py_None, *val_o = Py_None, *tmp_o = Py_None;
    int itemsize, roundtrip;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOip|OOnO", names, &src_o, &d_o, &dst_o,
                                     &itemsize, &roundtrip, &idx_o, &val_o, &start, &tmp_o)) {
        return NULL;
    }
    if (itemsize != 2 && itemsize != 4) {
        PyErr_SetString(PyExc_ValueError, "itemsize must be 2 (bf16) or 4 (fp32)");
        return NULL;
    }
    Py_buffer src, d, dst, idx = {0}, val = {0}, tmp = {0};
    int have_idx = idx_o != Py_None;
    if (have_idx && (!roundtrip || val_o == Py_None || tmp_o == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "merge_block: index needs roundtrip, values, scratch");
        return NULL;
    }
    if (get(src_o, &src, 0, "src") < 0) return NULL;
    if (get(d_o, &d, 0, "delta") < 0) goto fail_src;
    if (get(dst_o, &dst, 1, "dst") < 0) goto fail_d;
    if (have_idx) {
        if (get(idx_o, &idx, 1, "index") < 0) goto fail_dst;
        if (get(val_o, &val, 1, "values") < 0) goto fail_idx;
        if (get(tmp_o, &tmp, 1, "scratch") < 0) goto fail_val;
    }
    Py_ssize_t n = src.len / itemsize;
    if (src.len % itemsize || dst.len != src.len || d.len != n * 4 ||
        (have_idx && (idx.len < n * 8 || val.len < n * itemsize || tmp.len < 2 * src.len))) {
        PyErr_SetString(PyExc_ValueError, "merge_block: buffer sizes do not match");
        goto fail_all;
    }
    if (overlap(&src, &dst, "merge_block")) goto fail_all;
    Sums s;
    Py_ssize_t gathered = 0;
    Py_BEGIN_ALLOW_THREADS;
    char *keep = NULL, *back = NULL;
    if (have_idx) { /* the original bits (an in-place pass overwrites them) and unmerge's */
        keep = tmp.buf;
        back = keep + src.len;
        memcpy(keep, src.buf, (size_t)src.len);
    }
    {
        int same = src.buf == dst.buf;
        if (back) { /* gathering: the pass reads the kept original, whatever dst is */
            if (itemsize == 2) {
                P->bf16_back((uint16_t *)keep, d.buf, dst.buf, n, (uint16_t *)back, &s);
            } else {
                P->f32_back((float *)keep, d.buf, dst.buf, n, (float *)back, &s);
            }
            if (s.off && itemsize == 2) {
                gathered = gather16(keep, back, n, start, idx.buf, val.buf);
            } else if (s.off) {
                gathered = gather32(keep, back, n, start, idx.buf, val.buf);
            }
        } else if (itemsize == 2 && same) {
            P->bf16_inplace(dst.buf, d.buf, n, roundtrip, &s);
        } else if (itemsize == 2) {
            P->bf16_apart(src.buf, d.buf, dst.buf, n, roundtrip, &s);
        } else if (same) {
            P->f32_inplace(dst.buf, d.buf, n, roundtrip, &s);
        } else {
            P->f32_apart(src.buf, d.buf, dst.buf, n, roundtrip, &s);
        }
    }
    Py_END_ALLOW_THREADS;
    if (have_idx) {
        PyBuffer_Release(&tmp);
        PyBuffer_Release(&val);
        PyBuffer_Release(&idx);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&d);
    PyBuffer_Release(&src);
    return Py_BuildValue("ddLLn", s.s1, s.s2, (long long)s.off, (long long)s.max_ulp, gathered);
fail_all:
    if (have_idx) PyBuffer_Release(&tmp);
fail_val:
    if (have_idx) PyBuffer_Release(&val);
fail_idx:
    if (have_idx) PyBuffer_Release(&idx);
fail_dst:
    PyBuffer_Release(&dst);
fail_d:
    PyBuffer_Release(&d);
fail_src:
    PyBuffer_Release(&src);
    return NULL;
}

/* merge_lowrank(src, left, packed, dst, itemsize, rank, cols, roundtrip)
       -> (s1, s2, off, max_ulp)

   merge_block's pass (without gathering) with ΔW = L·R made in the pass: left the block's rows
   of L [rows, rank] and packed R [rank, cols] as pack_right lays it out ([⌈cols/32⌉, rank, 32],
   zero-padded), both fp32; the product as rows2_product_avx2 sums it. Only where
   ``fuses_product`` is true (v3). */
static PyObject *merge_lowrank(PyObject *self, PyObject *args) {
    PyObject *src_o, *l_o, *r_o, *dst_o;
    int itemsize, roundtrip;
    Py_ssize_t rank, cols;
    if (!PyArg_ParseTuple(args, "OOOOinnp", &src_o, &l_o, &r_o, &dst_o, &itemsize, &rank, &cols,
                          &roundtrip)) {
        return NULL;
    }
    if (!LOWRANK) {
        PyErr_SetString(PyExc_RuntimeError, "merge_lowrank: not at this instruction set");
        return NULL;
    }
    if ((itemsize != 2 && itemsize != 4) || rank < 1 || cols < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "itemsize must be 2 (bf16) or 4 (fp32), rank and cols >= 1");
        return NULL;
    }
    Py_buffer src, l, r, dst;
    if (get(src_o, &src, 0, "src") < 0) return NULL;
    if (get(l_o, &l, 0, "left") < 0) goto fail_src;
    if (get(r_o, &r, 0, "right") < 0) goto fail_l;
    if (get(dst_o, &dst, 1, "dst") < 0) goto fail_r;
    Py_ssize_t rows = l.len / (4 * rank);
    if (l.len % (4 * rank) || r.len != (cols + 31) / 32 * 32 * rank * 4 ||
        src.len != rows * cols * itemsize || dst.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "merge_lowrank: buffer sizes do not match");
        goto fail_all;
    }
    if (overlap(&src, &dst, "merge_lowrank")) goto fail_all;
    Sums s = {0.0, 0.0, 0, 0};
    Py_BEGIN_ALLOW_THREADS;
    LOWRANK(src.buf, l.buf, r.buf, dst.buf, rows, rank, cols, itemsize, roundtrip, &s);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&dst);
    PyBuffer_Release(&r);
    PyBuffer_Release(&l);
    PyBuffer_Release(&src);
    return Py_BuildValue("ddLL", s.s1, s.s2, (long long)s.off, (long long)s.max_ulp);
fail_all:
    PyBuffer_Release(&dst);
fail_r:
    PyBuffer_Release(&r);
fail_l:
    PyBuffer_Release(&l);
fail_src:
    PyBuffer_Release(&src);
    return NULL;
}

static PyMethodDef methods[] = {
    {"merge_lowrank", (PyCFunction)merge_lowrank, METH_VARARGS,
     "merge_lowrank(src, left, packed, dst, itemsize, rank, cols, roundtrip)\n"
     "-> (s1, s2, off, max_ulp): merge_block with ΔW = L·R made in the pass."},
    {"merge_block", (PyCFunction)(void (*)(void))merge_block, METH_VARARGS | METH_KEYWORDS,
     "merge_block(src, delta, dst, itemsize, roundtrip, index=None, values=None, start=0,\n"
     "            scratch=None)\n"
     "-> (s1, s2, off, max_ulp, gathered): one fused pass of the merge over a block."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kernel", "The merge's fused elementwise pass (see kernel.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit_kernel(void) {
    pick();
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddStringConstant(m, "isa", ISA) < 0 ||
              PyModule_AddObjectRef(m, "fuses_product", LOWRANK ? Py_True : Py_False) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
