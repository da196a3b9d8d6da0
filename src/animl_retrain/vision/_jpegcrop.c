/* Partial JPEG decoding for the crop stage: decode only the rows and columns a frame's crops need.
 *
 * decode(data, scale, x0, y0, x1, y1, whole) -> (pixels, left, top, width, height) or None
 *
 * Decodes the baseline YCbCr or greyscale JPEG in `data` at 1/`scale` (1, 2, 4 or 8: the same DCT scaling
 * Pillow's draft() asks libjpeg for, with libjpeg's default IDCT and fancy upsampling, as Pillow uses them),
 * and returns the RGB rows top..top+height and columns left..left+width of the scaled image: the region
 * x0..x1, y0..y1 grown by MARGIN pixels on every side (fancy upsampling reads one neighbouring chroma sample,
 * which a cut exactly at the region's edge would lack: measured, without a margin edge pixels differ from a
 * whole decode) and widened on the left to an iMCU boundary by jpeg_crop_scanline(). Rows above are skipped
 * without IDCT or colour conversion (jpeg_skip_scanlines); rows below are not decoded at all, unless `whole`
 * asks for the rest of the entropy-coded data to be read to its end marker (the caller's proof that a file
 * without the end marker as its last bytes is not truncated).
 *
 * None means "not for this path": progressive or multi-scan files, other colour spaces, and any libjpeg error
 * or warning (corrupt data). The caller then decodes with Pillow, whose checks and messages stay the rule.
 *
 * resize(pixels, width, height, left, top, right, bottom, size) -> bytes
 *
 * Cuts left..right, top..bottom out of the `width` x `height` RGB image `pixels` (zeros outside it, as Pillow's
 * crop() gives) and resizes it to `size` x `size` with exactly the arithmetic of Pillow's
 * resize(..., Image.BILINEAR): the same double-precision filter weights (an antialiased triangle, support scaled
 * by the reduction), rounded to 22-bit fixed point the same way, a horizontal then a vertical pass, each rounded
 * and clipped to 8 bits. Only the loops differ: each pass runs over whole rows with contiguous inner loops (the
 * horizontal one on a transposed copy) that the compiler vectorises, where Pillow's inner loop runs over the few
 * taps of one pixel at a time; measured ~3x faster on the crop stage's 224-448 px squares.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MARGIN 2

struct guard {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct guard *)cinfo->err)->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) { /* a warning: corrupt or truncated data. Leave the file to Pillow. */
        longjmp(((struct guard *)cinfo->err)->escape, 1);
    }
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int scale, x0, y0, x1, y1, whole;
    if (!PyArg_ParseTuple(args, "y*iiiiip", &data, &scale, &x0, &y0, &x1, &y1, &whole)) {
        return NULL;
    }
    if ((scale != 1 && scale != 2 && scale != 4 && scale != 8) || x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "decode: scale must be 1, 2, 4 or 8 and the region non-empty");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    struct guard err;
    PyObject *volatile out = NULL;
    PyThreadState *volatile thread = NULL; /* set while libjpeg runs without the GIL */
    unsigned char *volatile scratch = NULL;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    jpeg_create_decompress(&cinfo);
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        free(scratch);
        if (thread != NULL) {
            PyEval_RestoreThread(thread);
        }
        Py_XDECREF(out);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (jpeg_has_multiple_scans(&cinfo) ||
        !(cinfo.jpeg_color_space == JCS_YCbCr && cinfo.num_components == 3) &&
            !(cinfo.jpeg_color_space == JCS_GRAYSCALE && cinfo.num_components == 1)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    jpeg_start_decompress(&cinfo);
    if ((JDIMENSION)x1 > cinfo.output_width || (JDIMENSION)y1 > cinfo.output_height) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "decode: region beyond the %ux%u scaled image", cinfo.output_width,
                     cinfo.output_height);
        return NULL;
    }
    x0 = x0 > MARGIN ? x0 - MARGIN : 0;
    y0 = y0 > MARGIN ? y0 - MARGIN : 0;
    x1 = (JDIMENSION)x1 + MARGIN < cinfo.output_width ? x1 + MARGIN : (int)cinfo.output_width;
    y1 = (JDIMENSION)y1 + MARGIN < cinfo.output_height ? y1 + MARGIN : (int)cinfo.output_height;
    JDIMENSION left = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
    jpeg_crop_scanline(&cinfo, &left, &width); /* widens x0..x1 to iMCU boundaries; still covers it */
    Py_ssize_t stride = (Py_ssize_t)width * 3, rows = y1 - y0;
    out = PyBytes_FromStringAndSize(NULL, stride * rows);
    if (out == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *pixels = (unsigned char *)PyBytes_AS_STRING(out);
    thread = PyEval_SaveThread(); /* the error path above takes the GIL back */
    if (y0 > 0) {
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    }
    while (cinfo.output_scanline < (JDIMENSION)y1) {
        JSAMPROW row = pixels + (Py_ssize_t)(cinfo.output_scanline - (JDIMENSION)y0) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    if (whole) {
        /* Skipping to the very end decodes nothing; skip to the last row and read it, so that the entropy-coded
           data is read to its end and a truncated file raises its warning. */
        if (cinfo.output_scanline + 1 < cinfo.output_height) {
            jpeg_skip_scanlines(&cinfo, cinfo.output_height - cinfo.output_scanline - 1);
        }
        if (cinfo.output_scanline < cinfo.output_height) {
            scratch = malloc((size_t)stride); /* if NULL, finish_decompress fails: Pillow takes over */
            JSAMPROW row = scratch;
            if (scratch != NULL) {
                jpeg_read_scanlines(&cinfo, &row, 1);
            }
        }
        jpeg_finish_decompress(&cinfo);
    } else {
        jpeg_abort_decompress(&cinfo); /* the rows below the region are never needed */
    }
    jpeg_destroy_decompress(&cinfo);
    PyEval_RestoreThread(thread);
    free(scratch);
    PyBuffer_Release(&data);
    return Py_BuildValue("(Niiii)", out, (int)left, y0, (int)width, y1 - y0);
}


#define PRECISION_BITS 22 /* Pillow's: 32 - 8 - 2 */

/* The filter weights of one axis: for output sample i, n[i] taps from input first[i], in fixed point; NULL if
   out of memory. Pillow's precompute_coeffs() and normalize_coeffs_8bpc() for its bilinear filter, box 0..in. */
static int32_t *weights(int in, int out, int *ksize, int *first, int *n) {
    double scale = (double)(float)in / out, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    int k = (int)ceil(support) * 2 + 1;
    int32_t *kk = calloc((size_t)out * k, sizeof(int32_t));
    double *w = malloc((size_t)k * sizeof(double));
    if (kk == NULL || w == NULL) {
        free(kk);
        free(w);
        return NULL;
    }
    for (int i = 0; i < out; i++) {
        double center = 0.0f + (i + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = (hi > in ? in : hi) - lo;
        for (int x = 0; x < hi; x++) {
            double t = (x + lo - center + 0.5) * ss;
            t = t < 0.0 ? -t : t;
            w[x] = t < 1.0 ? 1.0 - t : 0.0;
            ww += w[x];
        }
        for (int x = 0; x < hi; x++) {
            double v = ww != 0.0 ? w[x] / ww : w[x];
            kk[i * k + x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS)) : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
        }
        first[i] = lo;
        n[i] = hi;
    }
    free(w);
    *ksize = k;
    return kk;
}

static inline uint8_t clip8(int32_t v) {
    v >>= PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* dst row i (len values) = clip8(sum over taps t of src row first[i] + t * kk[i * ksize + t]), rows `len` apart. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default"))) /* 8 int32 lanes where the CPU has them */
#else
#define VECTOR_CLONES
#endif

VECTOR_CLONES static void pass_rows(const uint8_t *src, uint8_t *dst, int rows, int len, const int32_t *kk, int ksize,
                      const int *first, const int *n, int32_t *acc) {
    for (int i = 0; i < rows; i++) {
        for (int x = 0; x < len; x++) {
            acc[x] = 1 << (PRECISION_BITS - 1);
        }
        for (int t = 0; t < n[i]; t++) {
            const uint8_t *row = src + (size_t)(first[i] + t) * len;
            int32_t k = kk[i * ksize + t];
            for (int x = 0; x < len; x++) {
                acc[x] += row[x] * k;
            }
        }
        uint8_t *out = dst + (size_t)i * len;
        for (int x = 0; x < len; x++) {
            out[x] = clip8(acc[x]);
        }
    }
}

/* dst (w rows of h pixels) = the transpose of src (h rows of w RGB pixels). */
static void transpose(const uint8_t *src, uint8_t *dst, int w, int h) {
    for (int y = 0; y < h; y++) {
        const uint8_t *s = src + (size_t)y * w * 3;
        for (int x = 0; x < w; x++) {
            uint8_t *d = dst + ((size_t)x * h + y) * 3;
            d[0] = s[x * 3];
            d[1] = s[x * 3 + 1];
            d[2] = s[x * 3 + 2];
        }
    }
}

static PyObject *resize(PyObject *self, PyObject *args) {
    Py_buffer data;
    int width, height, left, top, right, bottom, size;
    if (!PyArg_ParseTuple(args, "y*iiiiiii", &data, &width, &height, &left, &top, &right, &bottom, &size)) {
        return NULL;
    }
    if (width <= 0 || height <= 0 || data.len != (Py_ssize_t)width * height * 3 || right <= left || bottom <= top ||
        size <= 0 || right - left > 65536 || bottom - top > 65536) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "resize: pixels must be width*height*3 bytes, the box non-empty");
        return NULL;
    }
    int w = right - left, h = bottom - top;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size * size * 3);
    if (out == NULL) {
        PyBuffer_Release(&data);
        return NULL;
    }
    uint8_t *result = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *pixels = data.buf;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS;
    /* the box's pixels, zero outside the image (Pillow's crop) */
    uint8_t *box = calloc((size_t)w * h, 3);
    int x0 = left < 0 ? 0 : left, x1 = right > width ? width : right;
    if (box != NULL && x1 > x0) {
        for (int y = top < 0 ? 0 : top; y < bottom && y < height; y++) {
            memcpy(box + ((size_t)(y - top) * w + (x0 - left)) * 3, pixels + ((size_t)y * width + x0) * 3,
                   (size_t)(x1 - x0) * 3);
        }
    }
    int kx = 0, ky = 0, longest = (w > h ? w : h) > size ? (w > h ? w : h) : size;
    int *bounds = malloc(sizeof(int) * 4 * (size_t)size);
    int32_t *acc = malloc(sizeof(int32_t) * 3 * (size_t)longest);
    int32_t *kkx = w != size ? weights(w, size, &kx, bounds, bounds + size) : NULL;
    int32_t *kky = h != size ? weights(h, size, &ky, bounds + 2 * size, bounds + 3 * size) : NULL;
    uint8_t *t1 = malloc((size_t)3 * h * (w > size ? w : size)), *t2 = malloc((size_t)3 * size * h);
    if (box == NULL || bounds == NULL || acc == NULL || (w != size && kkx == NULL) || (h != size && kky == NULL) ||
        t1 == NULL || t2 == NULL) {
        ok = 0;
    } else {
        const uint8_t *rows = box; /* h rows of `size` or w pixels */
        if (w != size) {           /* horizontal pass: on the transpose, then back */
            transpose(box, t1, w, h);
            pass_rows(t1, t2, size, h * 3, kkx, kx, bounds, bounds + size, acc);
            transpose(t2, t1, h, size);
            rows = t1;
        }
        if (h != size) {
            pass_rows(rows, result, size, size * 3, kky, ky, bounds + 2 * size, bounds + 3 * size, acc);
        } else {
            memcpy(result, rows, (size_t)size * size * 3);
        }
    }
    free(box);
    free(bounds);
    free(acc);
    free(kkx);
    free(kky);
    free(t1);
    free(t2);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&data);
    if (!ok) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    return out;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "decode(data, scale, x0, y0, x1, y1, whole) -> (rgb bytes, left, top, width, height) or None"},
    {"resize", resize, METH_VARARGS, "resize(pixels, width, height, left, top, right, bottom, size) -> rgb bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
