/* Exact per-image pixel moments for ``alexnet-prep pca-stats``, in one fused pass over the pixels.

   accumulate(image, row_len, pixel_acc, col_acc)

   ``image``     uint8, C-contiguous, interleaved R G B R G B ..., a whole number of rows of
                 ``row_len`` values (``row_len`` = width * 3);
   ``pixel_acc`` uint16, same length as ``image``: every value is added to its slot (the per-pixel
                 sum behind the mean image);
   ``col_acc``   uint32, 3 * row_len: for each column j of a row, summed down the rows,
                 [0] v[j] * v[j], [1] v[j] * v[j+1], [2] v[j] * v[j+2] (0 where j+1 or j+2 is past
                 the row's end). With j = 3p + c: [0] at c = 0, 1, 2 holds R*R, G*G, B*B; [1] at c = 0
                 and 1 holds R*G and G*B; [2] at c = 0 holds R*B. The other columns mix two pixels
                 and are never read.

   All arithmetic is in unsigned integers, so the result is exact whatever the order. The caller
   keeps the accumulators from overflowing: pixel_acc takes at most 257 images (257 * 255 < 2**16)
   and col_acc at most 66,051 rows (66,051 * 255**2 < 2**32) before it is flushed into wider
   integers. The reference implementation is the numpy code in ``pca_stats.py``; the tests compare
   the two. The loops are written so that the compiler vectorises them (contiguous, no branches);
   on x86-64 an AVX2 clone is chosen at load time where the CPU has it. The GIL is released.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void accumulate_rows(const uint8_t *restrict image, Py_ssize_t rows, Py_ssize_t row_len,
                            uint16_t *restrict pixel_acc, uint32_t *restrict sq,
                            uint32_t *restrict p1, uint32_t *restrict p2) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const uint8_t *restrict v = image + r * row_len;
        uint16_t *restrict acc = pixel_acc + r * row_len;
        for (Py_ssize_t j = 0; j < row_len; j++) {
            acc[j] = (uint16_t)(acc[j] + v[j]);
            sq[j] += (uint16_t)(v[j] * v[j]);  /* at most 255 * 255 = 65025: exact in 16 bits */
        }
        for (Py_ssize_t j = 0; j + 1 < row_len; j++) {
            p1[j] += (uint16_t)(v[j] * v[j + 1]);
        }
        for (Py_ssize_t j = 0; j + 2 < row_len; j++) {
            p2[j] += (uint16_t)(v[j] * v[j + 2]);
        }
    }
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name, Py_ssize_t itemsize) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte items, got %zd", name, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *accumulate(PyObject *self, PyObject *args) {
    PyObject *image_obj, *pixel_obj, *col_obj;
    Py_ssize_t row_len;
    if (!PyArg_ParseTuple(args, "OnOO:accumulate", &image_obj, &row_len, &pixel_obj, &col_obj)) {
        return NULL;
    }
    Py_buffer image, pixel, col;
    if (get_buffer(image_obj, &image, 0, "image", 1) < 0) {
        return NULL;
    }
    if (get_buffer(pixel_obj, &pixel, 1, "pixel_acc", 2) < 0) {
        PyBuffer_Release(&image);
        return NULL;
    }
    if (get_buffer(col_obj, &col, 1, "col_acc", 4) < 0) {
        PyBuffer_Release(&image);
        PyBuffer_Release(&pixel);
        return NULL;
    }
    Py_ssize_t n = image.len;
    PyObject *result = NULL;
    if (row_len <= 0 || n % row_len != 0) {
        PyErr_Format(PyExc_ValueError, "image: %zd values are not whole rows of %zd", n, row_len);
    } else if (pixel.len / 2 != n) {
        PyErr_Format(PyExc_ValueError, "pixel_acc: %zd slots for %zd values", pixel.len / 2, n);
    } else if (col.len / 4 != 3 * row_len) {
        PyErr_Format(PyExc_ValueError, "col_acc: %zd slots, expected 3 * %zd", col.len / 4, row_len);
    } else {
        uint32_t *c = (uint32_t *)col.buf;
        Py_BEGIN_ALLOW_THREADS
        accumulate_rows((const uint8_t *)image.buf, n / row_len, row_len, (uint16_t *)pixel.buf, c,
                        c + row_len, c + 2 * row_len);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&image);
    PyBuffer_Release(&pixel);
    PyBuffer_Release(&col);
    return result;
}

static PyMethodDef methods[] = {
    {"accumulate", accumulate, METH_VARARGS,
     "accumulate(image, row_len, pixel_acc, col_acc): add one uint8 image's values to pixel_acc "
     "(uint16) and its per-column squares and neighbour products to col_acc (uint32, 3 x row_len)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_moments", "Exact fused pixel moments for pca-stats (see _moments.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
