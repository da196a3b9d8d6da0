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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <jpeglib.h>

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

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "decode(data, scale, x0, y0, x1, y1, whole) -> (rgb bytes, left, top, width, height) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
