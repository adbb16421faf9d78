/* Block-row copies of paged.py's CPU path in C, with streaming (non-temporal) stores.
 *
 * A part whose blocks are each one contiguous run of bytes (the block dimension first)
 * moves block by block. torch's index_select does that with memcpy per block, whose
 * ordinary stores first read every destination line into the cache; for rows of tens of
 * KiB that is below glibc's non-temporal threshold, so a store into the host pool ran
 * well below a plain memcpy of the same bytes (bench/datapath.py; README, Performance).
 * Streaming stores skip that read and bring it close to memcpy. The destination is not
 * read again soon (a slot waits for another process; a loaded block for the next forward
 * pass), so bypassing the cache costs nothing.
 *
 * copy_rows takes raw addresses: paged.py calls it only after checking ids, shapes
 * and slot sizes, exactly as for its torch ops (this module is private). It releases the
 * GIL, so lmkv.copy_threads' helpers copy in parallel. Without SSE2 (not x86-64) it is
 * memcpy per row: the same bytes, without the streaming stores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Below this, a row is copied with memcpy: streaming pays off on long runs only. */
#define STREAM_MIN 256

static void copy_one(uint8_t *d, const uint8_t *s, size_t len) {
#if defined(__SSE2__)
    if (len >= STREAM_MIN) {
        size_t head = (16 - ((uintptr_t)d & 15)) & 15;  /* streaming stores need 16-byte alignment */
        memcpy(d, s, head);
        d += head;
        s += head;
        len -= head;
        for (; len >= 64; d += 64, s += 64, len -= 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)s);
            __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
            __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
            _mm_stream_si128((__m128i *)d, a);
            _mm_stream_si128((__m128i *)(d + 16), b);
            _mm_stream_si128((__m128i *)(d + 32), c);
            _mm_stream_si128((__m128i *)(d + 48), e);
        }
    }
#endif
    memcpy(d, s, len);
}

/* copy_rows(dst, dst_stride, dst_ids, src, src_stride, src_ids, n, row): for i < n, copy
 * row bytes from src + S(i) * src_stride to dst + D(i) * dst_stride, where S(i) is
 * src_ids[i] (an int64 array at that address) or i when src_ids is 0, and D likewise. */
static PyObject *copy_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long dst, dst_ids, src, src_ids;
    Py_ssize_t dst_stride, src_stride, n, row;
    if (!PyArg_ParseTuple(args, "KnKKnKnn", &dst, &dst_stride, &dst_ids, &src, &src_stride, &src_ids, &n, &row))
        return NULL;
    if (n == 0) Py_RETURN_NONE;  /* an empty tensor's address may be 0 */
    if (n < 0 || row < 0 || dst == 0 || src == 0) {
        PyErr_SetString(PyExc_ValueError, "copy_rows: negative count or row size, or a null address");
        return NULL;
    }
    const int64_t *di = (const int64_t *)(uintptr_t)dst_ids;
    const int64_t *si = (const int64_t *)(uintptr_t)src_ids;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *d = (uint8_t *)(uintptr_t)dst + (di ? di[i] : i) * dst_stride;
        const uint8_t *s = (const uint8_t *)(uintptr_t)src + (si ? si[i] : i) * src_stride;
        copy_one(d, s, (size_t)row);
    }
#if defined(__SSE2__)
    _mm_sfence();  /* streaming stores are weakly ordered: visible before anyone is told */
#endif
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(dst, dst_stride, dst_ids, src, src_stride, src_ids, n, row): copy n rows of row "
     "bytes between raw addresses; *_ids is the address of n int64 row indices, or 0 for 0..n-1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lmkv_mp.engine._rows",
    "Block-row copies with streaming stores for paged.py's CPU path.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rows(void) { return PyModule_Create(&module); }
