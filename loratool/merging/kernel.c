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

static const Passes *P;
static const char *ISA;

/* The widest set the CPU has, or a narrower one named by LORATOOL_MERGE_KERNEL (the tests run
   every set this machine can). */
static void pick(void) {
    int level = isa_level(getenv("LORATOOL_MERGE_KERNEL"));
    P = &passes_base, ISA = "base";
#ifdef X86_TARGETS
    if (level == 4) P = &passes_v4, ISA = "v4";
    if (level == 3) P = &passes_v3, ISA = "v3";
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
    const char *sb = src.buf, *db = dst.buf;
    if (sb != db && sb < db + dst.len && db < sb + src.len) {
        PyErr_SetString(PyExc_ValueError, "merge_block: src and dst overlap without being one");
        goto fail_all;
    }
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

static PyMethodDef methods[] = {
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
    if (m && PyModule_AddStringConstant(m, "isa", ISA) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
