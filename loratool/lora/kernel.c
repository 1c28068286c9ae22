/* Dropout's zeros in one pass: loratool.lora.kernel (optional; lora/layer.py ``dropped``).

   ``dropout_mask`` (layer.py) draws a mask from numpy's PCG64 seeded with a seed, 16 bits an
   element (the little-endian uint16 words of ``Generator.bytes``) against round(p·2¹⁶), and
   ``masked_fill(mask, 0)`` applies it. ``dropout`` here is that stream, the mask and the zeros
   in one pass over one or two tensors: the same PCG64 (XSL-RR 128/64) from the state numpy
   seeds, run as four interleaved streams that each jump four steps (four 128-bit multiplies in
   flight rather than one after another), a chunk of mask at a time, then each tensor copied
   with its zeros (+0, as masked_fill writes). The same bits as the numpy mask and masked_fill,
   at 0.4 ms rather than 1.4 ms for a [2048, 576] bf16 input here.

   Built by setuptools where a C compiler is present; without it layer.py runs the numpy mask. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef unsigned __int128 u128;
#define LANES 4   /* interleaved PCG64 streams */
#define CHUNK 4096 /* mask elements per round: a multiple of 4 * LANES */

static const u128 PCG_MULT = ((u128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;

static inline uint64_t pcg_output(u128 s) { /* XSL-RR: numpy's pcg64 output of a stepped state */
    uint64_t x = (uint64_t)(s >> 64) ^ (uint64_t)s;
    unsigned rot = (unsigned)(s >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
}

/* keep[i] = 0 where element i drops (its 16-bit word < thr), else 0xFF, for CHUNK elements; the
   lanes' states advance past them. Two loops: the multiplies alone, then the compares (which
   vectorize): 2.4x faster than both in one. */
static void mask_chunk(u128 *lane, u128 jump_mul, u128 jump_add, uint32_t thr, uint8_t *keep) {
    u128 l[LANES];
    uint64_t words[CHUNK / 4];
    memcpy(l, lane, sizeof l);
    for (int k0 = 0; k0 < CHUNK / 4; k0 += LANES) {
        for (int j = 0; j < LANES; j++) {
            words[k0 + j] = pcg_output(l[j]);
            l[j] = l[j] * jump_mul + jump_add;
        }
    }
    memcpy(lane, l, sizeof l);
    uint16_t w16[CHUNK]; /* the little-endian 16-bit words of the outputs, as numpy reads them */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(w16, words, sizeof w16);
#else
    for (int i = 0; i < CHUNK / 4; i++) {
        for (int w = 0; w < 4; w++) w16[4 * i + w] = (uint16_t)(words[i] >> (16 * w));
    }
#endif
    for (int i = 0; i < CHUNK; i++) keep[i] = w16[i] >= thr ? 0xFF : 0;
}

#define APPLY(T)                                                                                \
    static void apply_##T(const uint8_t *restrict keep, const T *src, T *dst, Py_ssize_t n) {     \
        for (Py_ssize_t i = 0; i < n; i++) dst[i] = src[i] & (T)(keep[i] * (T)0x0101010101010101ULL); \
    }
APPLY(uint16_t)
APPLY(uint32_t)
APPLY(uint64_t)

static void apply(const uint8_t *keep, int size, const char *src, char *dst, Py_ssize_t n) {
    if (size == 2) apply_uint16_t(keep, (const uint16_t *)src, (uint16_t *)dst, n);
    if (size == 4) apply_uint32_t(keep, (const uint32_t *)src, (uint32_t *)dst, n);
    if (size == 8) apply_uint64_t(keep, (const uint64_t *)src, (uint64_t *)dst, n);
}

static void dropout_pass(u128 state, u128 inc, uint32_t thr, int size, Py_ssize_t n, int pairs,
                         const char **src, char **dst) {
    u128 lane[LANES], jump_mul = 1, jump_add = 0;
    for (int j = 0; j < LANES; j++) { /* lane j gives outputs j, j + 4, j + 8, ... */
        state = state * PCG_MULT + inc;
        lane[j] = state;
        jump_mul *= PCG_MULT;
        jump_add = jump_add * PCG_MULT + inc;
    }
    uint8_t keep[CHUNK];
    for (Py_ssize_t at = 0; at < n; at += CHUNK) {
        Py_ssize_t k = n - at < CHUNK ? n - at : CHUNK;
        mask_chunk(lane, jump_mul, jump_add, thr, keep);
        for (int p = 0; p < pairs; p++) apply(keep, size, src[p] + at * size, dst[p] + at * size, k);
    }
}

/* dropout(state_hi, state_lo, inc_hi, inc_lo, thr, itemsize, src, dst[, src2, dst2]): dst =
   src with zeros where the mask drops (dst may be src); the PCG64 state and increment as numpy's
   ``PCG64(seed).state`` holds them, in 64-bit halves. */
static PyObject *dropout(PyObject *self, PyObject *args) {
    unsigned long long st[4];
    unsigned int thr;
    int size;
    PyObject *o[4] = {NULL, NULL, Py_None, Py_None};
    if (!PyArg_ParseTuple(args, "KKKKIiOO|OO", &st[0], &st[1], &st[2], &st[3], &thr, &size,
                          &o[0], &o[1], &o[2], &o[3]))
        return NULL;
    int pairs = o[2] == Py_None ? 1 : 2;
    Py_buffer b[4];
    int got = 0;
    const char *src[2];
    char *dst[2];
    if (size != 2 && size != 4 && size != 8) {
        PyErr_SetString(PyExc_ValueError, "dropout: elements of 2, 4 or 8 bytes");
        return NULL;
    }
    for (; got < 2 * pairs; got++) {
        if (PyObject_GetBuffer(o[got], &b[got], got % 2 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            goto done;
        }
        if (!PyBuffer_IsContiguous(&b[got], 'C') || b[got].len != b[0].len || b[got].len % size) {
            PyErr_SetString(PyExc_ValueError, "dropout: contiguous buffers of one length");
            got++;
            goto done;
        }
    }
    for (int p = 0; p < pairs; p++) {
        src[p] = b[2 * p].buf;
        dst[p] = b[2 * p + 1].buf;
        const char *s = src[p], *d = dst[p];
        if (s != d && s < d + b[0].len && d < s + b[0].len) {
            PyErr_SetString(PyExc_ValueError, "dropout: an output partly overlaps its input");
            goto done;
        }
    }
    u128 state = ((u128)st[0] << 64) | st[1], inc = ((u128)st[2] << 64) | st[3];
    Py_BEGIN_ALLOW_THREADS;
    dropout_pass(state, inc, thr, size, b[0].len / size, pairs, src, dst);
    Py_END_ALLOW_THREADS;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"dropout", dropout, METH_VARARGS,
     "dropout(state_hi, state_lo, inc_hi, inc_lo, thr, itemsize, src, dst[, src2, dst2])."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kernel", "Fused LoRA passes (see kernel.c).", -1, methods,
};

PyMODINIT_FUNC PyInit_kernel(void) { return PyModule_Create(&module); }
