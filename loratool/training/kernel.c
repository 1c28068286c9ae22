/* Fused training passes: loratool.training.kernel (optional). SwiGLU's backward, RMSNorm, and
   the softmax of short documents' attention (below).

   SwiGLU's backward and RMSNorm take bf16 or fp32 tensors (an optional last argument, the
   itemsize: 2, the default, or 4); the attention softmax takes bf16 only (in fp32, SDPA's flash
   kernel was faster than these passes at every length measured, 100 to 512 tokens).

   SwiGLU's backward in one pass:

   For y = silu(g)·u, given dy, the saved g and u (all bf16, or all fp32), in fp32:

     σ      = 1 / (1 + e^(-g))
     du     = dy · g·σ
     dg     = dy · u · σ · (1 + g·(1 − σ))          (silu'(g) = σ·(1 + g·(1 − σ)))

   each gradient rounded once to bf16 (round to nearest even), or kept in fp32. The torch
   version in recompute.py makes ~14 passes over [tokens, intermediate] fp32 temporaries (16 ms
   a layer of SmolLM2 at 2048 tokens here); this is one pass over the arrays and σ, which
   torch's own sigmoid computes first: with the same operations in the same order (no FMA
   contraction), the gradients are the torch path's bit for bit. (A polynomial e^x here was
   1 ulp off torch's on a few elements in a million: enough to move a training run's
   trajectory.)

   Attention (attention.py, ShortAttention): for bf16 scores S = q·kᵀ of one document, [heads,
   n, n], ``attention_probs`` writes P = softmax(scale·S) over each row's causal keys (j ≤ i) in
   bf16, zero above the diagonal, for P·V; ``attention_grads`` recomputes P from S and, with
   dP = dO·Vᵀ (bf16), writes P and dS = P ⊙ (dP − Σ_j P·dP) in bf16 (over S and dP, or
   elsewhere). In fp32, one row at a time in cache: torch makes ten passes over [heads, n, n]
   fp32 temporaries for the same work and computes the masked half too. e^x is Cephes' expf
   (range reduction by ln 2 in two parts, a degree-6 polynomial: within 2 ulp), not torch's, so
   these are not the torch path's bits, but the same softmax to fp32 rounding.

   RMSNorm (recompute.py) over bf16 (or fp32) rows of d: ``rms_norm`` writes y = w ⊙ bf16(x·r)
   with r = 1/√(mean x² + ε) (Llama's casts; no rounding in fp32) and keeps r per row;
   ``rms_norm_backward`` writes ∂x = bf16((g − x̂·mean(g·x̂))·r), g = ∂y·w, x̂ = x·r, all in fp32.
   One pass per row in cache, for torch's eight over [tokens, d] fp32 temporaries; the sums run
   in another order, so the bits are not torch's (the same to fp32 rounding of a mean: in fp32,
   within a few ulps of an fp64 reference, as torch's are).

   Built by setuptools where a C compiler is present; without it the callers run the torch path. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../native.h"

/* Element access by dtype: E is bf16 (uint16_t, rounded to nearest even on the way down) or f32
   (float as it is). SwiGLU's and RMSNorm's passes are built for both, per instruction set. */
typedef uint16_t elt_bf16;
typedef float elt_f32;
#define UP_bf16(x) bf16_up(x)
#define DOWN_bf16(x) ((uint16_t)bf16_down(x))
#define UP_f32(x) (x)
#define DOWN_f32(x) (x)
#define BOTH(DEF, SFX, ATTR) DEF(SFX, ATTR, bf16) DEF(SFX, ATTR, f32)

typedef void (*Pass)(const void *, const void *, const void *, const float *, void *, void *,
                     Py_ssize_t);

#define PASS(SFX, ATTR, E)                                                                      \
    ATTR static void swiglu_##E##_##SFX(const void *dy_, const void *g_, const void *u_,        \
                                        const float *restrict s, void *dg_, void *du_,          \
                                        Py_ssize_t n) {                                         \
        const elt_##E *restrict dy = dy_, *restrict g = g_, *restrict u = u_;                   \
        elt_##E *restrict dg = dg_, *restrict du = du_;                                         \
        _Pragma("omp simd") for (Py_ssize_t i = 0; i < n; i++) {                                \
            float gf = UP_##E(dy[i]), x = UP_##E(g[i]), uf = UP_##E(u[i]), sig = s[i];          \
            du[i] = DOWN_##E(gf * (x * sig));                                                   \
            dg[i] = DOWN_##E(gf * uf * sig * (1.0f + x * (1.0f - sig)));                        \
        }                                                                                       \
    }
#define PASSES(SFX, ATTR) BOTH(PASS, SFX, ATTR)

PER_ISA(PASSES)

/* -- attention ------------------------------------------------------------------------------ */

#define ATT_MAX 4096 /* the longest document (row) the passes take */

/* e^x for x ≤ 0 (Cephes expf; below -87.3 the result is 0): vectorizes, no libm call. */
static inline float exp_le0(float x) {
    int small = x < -87.3f;
    x = small ? -87.3f : x;
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, 4);
    return small ? 0.0f : y * two_k;
}

/* row[j] = softmax(scale·s[j]) for j < len, in fp32. */
#define SOFTMAX_ROW(s, len, scale, row)                                                         \
    do {                                                                                        \
        float m = -INFINITY, sum = 0.0f;                                                        \
        _Pragma("omp simd reduction(max : m)") for (Py_ssize_t j = 0; j < len; j++) {           \
            float v = scale * bf16_up(s[j]);                                                    \
            row[j] = v;                                                                         \
            m = v > m ? v : m;                                                                  \
        }                                                                                       \
        _Pragma("omp simd reduction(+ : sum)") for (Py_ssize_t j = 0; j < len; j++) {           \
            float e = exp_le0(row[j] - m);                                                      \
            row[j] = e;                                                                         \
            sum += e;                                                                           \
        }                                                                                       \
        float inv = 1.0f / sum;                                                                 \
        _Pragma("omp simd") for (Py_ssize_t j = 0; j < len; j++) row[j] *= inv;                 \
    } while (0)

typedef void (*AttFwd)(const uint16_t *, uint16_t *, Py_ssize_t, Py_ssize_t, float);
typedef void (*AttBwd)(const uint16_t *, const uint16_t *, uint16_t *, uint16_t *, Py_ssize_t,
                       Py_ssize_t, float);

#define ATT(SFX, ATTR)                                                                          \
    ATTR static void att_probs_##SFX(const uint16_t *scores, uint16_t *probs, Py_ssize_t rows,  \
                                     Py_ssize_t n, float scale) {                               \
        float row[ATT_MAX];                                                                     \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                 \
            const uint16_t *s = scores + r * n;                                                 \
            uint16_t *o = probs + r * n;                                                        \
            Py_ssize_t len = r % n + 1;                                                         \
            SOFTMAX_ROW(s, len, scale, row);                                                    \
            _Pragma("omp simd") for (Py_ssize_t j = 0; j < len; j++) o[j] =                     \
                (uint16_t)bf16_down(row[j]);                                                    \
            for (Py_ssize_t j = len; j < n; j++) o[j] = 0;                                      \
        }                                                                                       \
    }                                                                                           \
    ATTR static void att_grads_##SFX(const uint16_t *scores, const uint16_t *dp,               \
                                     uint16_t *probs, uint16_t *ds, Py_ssize_t rows,            \
                                     Py_ssize_t n, float scale) {                               \
        float row[ATT_MAX];                                                                     \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                 \
            const uint16_t *s = scores + r * n, *g = dp + r * n;                                \
            uint16_t *o = probs + r * n, *d = ds + r * n;                                       \
            Py_ssize_t len = r % n + 1;                                                         \
            SOFTMAX_ROW(s, len, scale, row);                                                    \
            float dot = 0.0f;                                                                   \
            _Pragma("omp simd reduction(+ : dot)") for (Py_ssize_t j = 0; j < len; j++) dot +=  \
                row[j] * bf16_up(g[j]);                                                         \
            _Pragma("omp simd") for (Py_ssize_t j = 0; j < len; j++) {                          \
                float gj = bf16_up(g[j]);                                                       \
                o[j] = (uint16_t)bf16_down(row[j]);                                             \
                d[j] = (uint16_t)bf16_down(row[j] * (gj - dot));                                \
            }                                                                                   \
            for (Py_ssize_t j = len; j < n; j++) o[j] = 0, d[j] = 0;                            \
        }                                                                                       \
    }

PER_ISA(ATT)

/* -- RMSNorm --------------------------------------------------------------------------------- */

typedef void (*NormFwd)(const void *, const void *, void *, float *, Py_ssize_t, Py_ssize_t,
                        float);
typedef void (*NormBwd)(const void *, const void *, const float *, const void *, void *,
                        Py_ssize_t, Py_ssize_t);

#define NORM(SFX, ATTR, E)                                                                      \
    ATTR static void norm_fwd_##E##_##SFX(const void *x_, const void *w_, void *y_, float *rstd, \
                                          Py_ssize_t rows, Py_ssize_t d, float eps) {           \
        const elt_##E *x = x_, *w = w_;                                                         \
        elt_##E *y = y_;                                                                        \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                 \
            const elt_##E *xr = x + r * d;                                                      \
            elt_##E *yr = y + r * d;                                                            \
            float ss = 0.0f;                                                                    \
            _Pragma("omp simd reduction(+ : ss)") for (Py_ssize_t j = 0; j < d; j++) {          \
                float v = UP_##E(xr[j]);                                                        \
                ss += v * v;                                                                    \
            }                                                                                   \
            float rs = 1.0f / sqrtf(ss / (float)d + eps);                                       \
            rstd[r] = rs;                                                                       \
            _Pragma("omp simd") for (Py_ssize_t j = 0; j < d; j++) {                            \
                float h = UP_##E(DOWN_##E(UP_##E(xr[j]) * rs));                                 \
                yr[j] = DOWN_##E(UP_##E(w[j]) * h);                                             \
            }                                                                                   \
        }                                                                                       \
    }                                                                                           \
    ATTR static void norm_bwd_##E##_##SFX(const void *x_, const void *w_, const float *rstd,    \
                                          const void *gy_, void *gx_, Py_ssize_t rows,          \
                                          Py_ssize_t d) {                                       \
        const elt_##E *x = x_, *w = w_, *gy = gy_;                                              \
        elt_##E *gx = gx_;                                                                      \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                 \
            const elt_##E *xr = x + r * d, *gr = gy + r * d;                                    \
            elt_##E *o = gx + r * d;                                                            \
            float rs = rstd[r], dot = 0.0f;                                                     \
            _Pragma("omp simd reduction(+ : dot)") for (Py_ssize_t j = 0; j < d; j++) {         \
                dot += (UP_##E(gr[j]) * UP_##E(w[j])) * (UP_##E(xr[j]) * rs);                   \
            }                                                                                   \
            float mean = dot / (float)d;                                                        \
            _Pragma("omp simd") for (Py_ssize_t j = 0; j < d; j++) {                            \
                float g = UP_##E(gr[j]) * UP_##E(w[j]), xh = UP_##E(xr[j]) * rs;                \
                o[j] = DOWN_##E((g - xh * mean) * rs);                                          \
            }                                                                                   \
        }                                                                                       \
    }
#define NORMS(SFX, ATTR) BOTH(NORM, SFX, ATTR)

PER_ISA(NORMS)

/* Per dtype: [0] bf16, [1] fp32 (DT below). */
static Pass P[2];
static NormFwd NORM_F[2];
static NormBwd NORM_B[2];
static AttFwd PROBS; /* bf16 only: in fp32 SDPA's flash kernel was faster at every length */
static AttBwd GRADS;
static const char *ISA;

#define SET(SFX)                                                                                \
    do {                                                                                        \
        P[0] = swiglu_bf16_##SFX, P[1] = swiglu_f32_##SFX;                                      \
        PROBS = att_probs_##SFX, GRADS = att_grads_##SFX;                                       \
        NORM_F[0] = norm_fwd_bf16_##SFX, NORM_F[1] = norm_fwd_f32_##SFX;                        \
        NORM_B[0] = norm_bwd_bf16_##SFX, NORM_B[1] = norm_bwd_f32_##SFX;                        \
        ISA = #SFX;                                                                             \
    } while (0)

static void pick(void) {
    int level = isa_level(getenv("LORATOOL_TRAIN_KERNEL"));
    SET(base);
#ifdef X86_TARGETS
    if (level == 4) SET(v4);
    if (level == 3) SET(v3);
#endif
}

/* The element size every pass takes as its last, optional argument: 2 (bf16, the default) or 4
   (fp32); the index into the tables above, or -1 with ValueError set. */
static int DT(int itemsize, const char *what) {
    if (itemsize == 2 || itemsize == 4) return itemsize / 4;
    PyErr_Format(PyExc_ValueError, "%s: itemsize is 2 (bf16) or 4 (fp32), not %d", what,
                 itemsize);
    return -1;
}

/* swiglu_backward(grad, gate, up, sig, grad_gate, grad_up): bf16 buffers of one length but sig,
   σ(gate) in fp32 (torch's own sigmoid, so the bits are the torch path's); the last two written
   (neither may overlap another). */
static PyObject *swiglu_backward(PyObject *self, PyObject *args) {
    PyObject *o[6];
    int itemsize = 2, dt;
    if (!PyArg_ParseTuple(args, "OOOOOO|i", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &itemsize))
        return NULL;
    if ((dt = DT(itemsize, "swiglu_backward")) < 0) return NULL;
    Py_buffer b[6];
    int got = 0;
    for (; got < 6; got++) {
        if (PyObject_GetBuffer(o[got], &b[got], got >= 4 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
            goto done;
        }
        Py_ssize_t want = got == 3 ? b[0].len / itemsize * 4 : b[0].len;
        if (!PyBuffer_IsContiguous(&b[got], 'C') || b[got].len != want || b[0].len % itemsize) {
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
    P[dt](b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[0].len / itemsize);
    Py_END_ALLOW_THREADS;
done:
    for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* attention_probs(scores, probs, n, scale) and attention_grads(scores, dp, probs, ds, n, scale):
   bf16 buffers of whole [rows, n] blocks (rows: heads × n), one length; an output may be the
   input at its place (probs over scores, ds over dp), or apart from every other. */
static int att_buffers(PyObject **o, int count, int first_out, Py_buffer *b, Py_ssize_t n,
                       const char *what) {
    int got = 0;
    for (; got < count; got++) {
        if (PyObject_GetBuffer(o[got], &b[got], got >= first_out ? PyBUF_WRITABLE : PyBUF_SIMPLE) <
            0) {
            break;
        }
        Py_ssize_t len = b[got].len;
        if (!PyBuffer_IsContiguous(&b[got], 'C') || len != b[0].len || n < 1 || n > ATT_MAX ||
            len % (2 * n * n)) {
            PyErr_Format(PyExc_ValueError, "%s: bf16 buffers of [k, n, n], n in 1..%d", what,
                         ATT_MAX);
            got++;
            break;
        }
    }
    if (got == count) {
        for (int w = first_out; w < count && !PyErr_Occurred(); w++) {
            for (int r = 0; r < count; r++) {
                const char *x = b[w].buf, *y = b[r].buf;
                int own = r == w || (x == y && r == w - (count - first_out));
                if (!own && x < y + b[r].len && y < x + b[w].len) {
                    PyErr_Format(PyExc_ValueError, "%s: an output overlaps another buffer", what);
                }
            }
        }
    }
    if (PyErr_Occurred()) {
        for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
        return -1;
    }
    return 0;
}

static PyObject *attention_probs(PyObject *self, PyObject *args) {
    PyObject *o[2];
    Py_ssize_t n;
    float scale;
    if (!PyArg_ParseTuple(args, "OOnf", &o[0], &o[1], &n, &scale)) return NULL;
    Py_buffer b[2];
    if (att_buffers(o, 2, 1, b, n, "attention_probs") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    PROBS(b[0].buf, b[1].buf, b[0].len / (2 * n), n, scale);
    Py_END_ALLOW_THREADS;
    for (int i = 0; i < 2; i++) PyBuffer_Release(&b[i]);
    Py_RETURN_NONE;
}

static PyObject *attention_grads(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Py_ssize_t n;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOnf", &o[0], &o[1], &o[2], &o[3], &n, &scale)) return NULL;
    Py_buffer b[4];
    if (att_buffers(o, 4, 2, b, n, "attention_grads") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    GRADS(b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[0].len / (2 * n), n, scale);
    Py_END_ALLOW_THREADS;
    for (int i = 0; i < 4; i++) PyBuffer_Release(&b[i]);
    Py_RETURN_NONE;
}

/* rms_norm(x, w, y, rstd, d, eps) and rms_norm_backward(x, w, rstd, grad_y, grad_x, d): bf16
   x, y, grad_y, grad_x of [rows, d] (one length), w bf16 [d], rstd fp32 [rows]; outputs apart
   from every other buffer. */
static int norm_buffers(PyObject **o, int count, const int *kind, int first_out, Py_buffer *b,
                        Py_ssize_t d, int itemsize, const char *what) {
    int got = 0;
    Py_ssize_t rows = -1;
    for (; got < count; got++) {
        if (PyObject_GetBuffer(o[got], &b[got], got >= first_out ? PyBUF_WRITABLE : PyBUF_SIMPLE) <
            0) {
            break;
        }
        Py_ssize_t len = b[got].len;
        if (rows < 0 && kind[got] == 0 && d > 0) rows = len / (itemsize * d);
        Py_ssize_t want = kind[got] == 0   ? itemsize * d * rows
                          : kind[got] == 1 ? itemsize * d
                                           : 4 * rows;
        if (!PyBuffer_IsContiguous(&b[got], 'C') || d < 1 || len != want) {
            PyErr_Format(PyExc_ValueError,
                         "%s: [rows, d] and a weight [d] of one dtype, fp32 [rows]", what);
            got++;
            break;
        }
    }
    for (int w = first_out; got == count && w < count && !PyErr_Occurred(); w++) {
        for (int r = 0; r < count; r++) {
            const char *x = b[w].buf, *y = b[r].buf;
            if (r != w && x < y + b[r].len && y < x + b[w].len) {
                PyErr_Format(PyExc_ValueError, "%s: an output overlaps another buffer", what);
            }
        }
    }
    if (PyErr_Occurred()) {
        for (int i = 0; i < got; i++) PyBuffer_Release(&b[i]);
        return -1;
    }
    return 0;
}

static PyObject *rms_norm(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Py_ssize_t d;
    float eps;
    int itemsize = 2, dt;
    if (!PyArg_ParseTuple(args, "OOOOnf|i", &o[0], &o[1], &o[2], &o[3], &d, &eps, &itemsize))
        return NULL;
    if ((dt = DT(itemsize, "rms_norm")) < 0) return NULL;
    static const int kind[4] = {0, 1, 0, 2};
    Py_buffer b[4];
    if (norm_buffers(o, 4, kind, 2, b, d, itemsize, "rms_norm") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    NORM_F[dt](b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[0].len / (itemsize * d), d, eps);
    Py_END_ALLOW_THREADS;
    for (int i = 0; i < 4; i++) PyBuffer_Release(&b[i]);
    Py_RETURN_NONE;
}

static PyObject *rms_norm_backward(PyObject *self, PyObject *args) {
    PyObject *o[5];
    Py_ssize_t d;
    int itemsize = 2, dt;
    if (!PyArg_ParseTuple(args, "OOOOOn|i", &o[0], &o[1], &o[2], &o[3], &o[4], &d, &itemsize))
        return NULL;
    if ((dt = DT(itemsize, "rms_norm_backward")) < 0) return NULL;
    static const int kind[5] = {0, 1, 2, 0, 0};
    Py_buffer b[5];
    if (norm_buffers(o, 5, kind, 4, b, d, itemsize, "rms_norm_backward") < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    NORM_B[dt](b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[0].len / (itemsize * d), d);
    Py_END_ALLOW_THREADS;
    for (int i = 0; i < 5; i++) PyBuffer_Release(&b[i]);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rms_norm", rms_norm, METH_VARARGS,
     "rms_norm(x, w, y, rstd, d, eps): y = w * bf16(x / rms(x)), rstd = 1 / rms per row."},
    {"rms_norm_backward", rms_norm_backward, METH_VARARGS,
     "rms_norm_backward(x, w, rstd, grad_y, grad_x, d): RMSNorm's input gradient."},
    {"attention_probs", attention_probs, METH_VARARGS,
     "attention_probs(scores, probs, n, scale): causal softmax rows of bf16 scores."},
    {"attention_grads", attention_grads, METH_VARARGS,
     "attention_grads(scores, dp, probs, ds, n, scale): P and softmax's backward dS."},
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
