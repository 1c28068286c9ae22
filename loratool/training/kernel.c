/* SwiGLU's backward over bf16 tensors in one pass: loratool.training.kernel (optional).

   For y = silu(g)·u, given dy, the saved g and u (all bf16), in fp32:

     σ      = 1 / (1 + e^(-g))
     du     = dy · g·σ
     dg     = dy · u · σ · (1 + g·(1 − σ))          (silu'(g) = σ·(1 + g·(1 − σ)))

   each gradient rounded once to bf16 (round to nearest even). The torch version in
   recompute.py makes ~14 passes over [tokens, intermediate] fp32 temporaries (16 ms a layer of
   SmolLM2 at 2048 tokens here); this is one pass over the bf16 arrays and σ, which torch's own
   sigmoid computes first: with the same operations in the same order (no FMA contraction), the
   gradients are the torch path's bit for bit. (A polynomial e^x here was 1 ulp off torch's on a
   few elements in a million: enough to move a training run's trajectory.)

   Built by setuptools where a C compiler is present; without it recompute.py runs the torch path. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../native.h"

#define SWIGLU_LOOP                                                                             \
    _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                    \
        float gf = bf16_up(dy[i]), x = bf16_up(g[i]), uf = bf16_up(u[i]), sig = s[i];           \
        du[i] = (uint16_t)bf16_down(gf * (x * sig));                                            \
        dg[i] = (uint16_t)bf16_down(gf * uf * sig * (1.0f + x * (1.0f - sig)));                 \
    }

typedef void (*Pass)(const uint16_t *, const uint16_t *, const uint16_t *, const float *,
                     uint16_t *, uint16_t *, Py_ssize_t);

#define PASS(SFX, ATTR)                                                                         \
    ATTR static void swiglu_##SFX(const uint16_t *restrict dy, const uint16_t *restrict g,      \
                                  const uint16_t *restrict u, const float *restrict s,          \
                                  uint16_t *restrict dg, uint16_t *restrict du, Py_ssize_t n) { \
        SWIGLU_LOOP                                                                             \
    }

PASS(base, )
#ifdef X86_TARGETS
PASS(v3, __attribute__((target("arch=x86-64-v3"))))
PASS(v4, __attribute__((target("arch=x86-64-v4"))))
#endif

static Pass P;
static const char *ISA;

static void pick(void) {
    int level = isa_level(getenv("LORATOOL_TRAIN_KERNEL"));
    P = swiglu_base, ISA = "base";
#ifdef X86_TARGETS
    if (level == 4) P = swiglu_v4, ISA = "v4";
    if (level == 3) P = swiglu_v3, ISA = "v3";
#endif
}

/* swiglu_backward(grad, gate, up, sig, grad_gate, grad_up): bf16 buffers of one length but sig,
   σ(gate) in fp32 (torch's own sigmoid, so the bits are the torch path's); the last two written
   (neither may overlap another). */
static PyObject *swiglu_backward(PyObject *self, PyObject *args) {
    PyObject *o[6];
    if (!PyArg_ParseTuple(args, "OOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5])) return NULL;
    Py_buffer b[6];
    int got = 0;
    for (; got < 6; got++) {
        if (PyObject_GetBuffer(o[got], &b[got], got >= 4 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            goto done;
        }
        Py_ssize_t want = got == 3 ? 2 * b[0].len : b[0].len;
        if (!PyBuffer_IsContiguous(&b[got], 'C') || b[got].len != want || b[got].len % 2) {
            PyErr_SetString(PyExc_ValueError, "swiglu_backward: buffers of one length (sig fp32)");
            got++;
            goto done;
        }
    }
    for (int w = 4; w < 6; w++) {
        for (int r = 0; r < 6; r++) {
            const char *x = b[w].buf, *y = b[r].buf;
            if (r != w && x < y + b[r].len && y < x + b[w].len) {
                PyErr_SetString(PyExc_ValueError, "swiglu_backward: an output overlaps");
                goto done;
            }
        }
    }
    Py_BEGIN_ALLOW_THREADS;
    P(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[0].len / 2);
    Py_END_ALLOW_THREADS;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"swiglu_backward", swiglu_backward, METH_VARARGS,
     "swiglu_backward(grad, gate, up, sig, grad_gate, grad_up): SwiGLU's gradients, one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kernel", "Fused training passes (see kernel.c).", -1, methods,
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
