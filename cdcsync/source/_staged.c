/*
 * Staged rows (binary COPY rows, see cdcsync/source/tuples.py) with every version of a key but
 * the last dropped, before the applier sends them (see cdcsync/apply/script.py, collapses).
 *
 * The merge used to drop them on the target: a DELETE that scans the stage twice and hashes every
 * key, a fifth of the target's merge on a backlog where each transaction updates rows the one
 * before inserted. Done here it costs about 50 ns a row, with the GIL released, so the reader
 * thread runs meanwhile; the same walk compiled by mypyc held the GIL for 250 ns a row.
 *
 * Keys are compared as their staged fields (length and bytes), like the reader's count of
 * repeats (TableRows.keys), which decides whether a batch is collapsed at all. A key with a NULL
 * part matches nothing, as in SQL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    Py_ssize_t start;     /* the row's first byte in its chunk */
    Py_ssize_t key_at;    /* its key's fields, side by side, in the key arena; -1: a NULL part */
    Py_ssize_t key_len;
    uint64_t hash;
} Row;

typedef struct {
    Row *rows;
    Py_ssize_t count, capacity;
    unsigned char *keys;
    Py_ssize_t keys_len, keys_capacity;
} Walk;

static int
grow(void **buffer, Py_ssize_t *capacity, Py_ssize_t needed, size_t item)
{
    if (needed <= *capacity)
        return 0;
    Py_ssize_t wanted = *capacity ? *capacity : 1024;
    while (wanted < needed)
        wanted *= 2;
    void *bigger = PyMem_RawRealloc(*buffer, (size_t)wanted * item);
    if (bigger == NULL)
        return -1;
    *buffer = bigger;
    *capacity = wanted;
    return 0;
}

static uint32_t
be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t
fnv1a(const unsigned char *p, Py_ssize_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

/* Records the rows of one chunk; 0, -1 for a truncated row, -2 out of memory. */
static int
walk_chunk(Walk *walk, const unsigned char *data, Py_ssize_t size, const long *fields,
           Py_ssize_t nfields)
{
    Py_ssize_t off = 0;
    while (off < size) {
        if (grow((void **)&walk->rows, &walk->capacity, walk->count + 1, sizeof(Row)) < 0)
            return -2;
        Row *row = &walk->rows[walk->count];
        row->start = off;
        row->key_at = walk->keys_len;
        if (off + 2 > size)
            return -1;
        long count = (long)data[off] << 8 | data[off + 1];
        off += 2;
        Py_ssize_t next = 0;
        int null = 0;
        for (long i = 0; i < count; i++) {
            if (off + 4 > size)
                return -1;
            uint32_t length = be32(data + off);
            Py_ssize_t field_size = length == 0xFFFFFFFFu ? 4 : 4 + (Py_ssize_t)length;
            if (off + field_size > size)
                return -1;
            if (next < nfields && fields[next] == i) {
                next++;
                if (length == 0xFFFFFFFFu) {
                    null = 1;
                } else {
                    if (grow((void **)&walk->keys, &walk->keys_capacity,
                             walk->keys_len + field_size, 1) < 0)
                        return -2;
                    memcpy(walk->keys + walk->keys_len, data + off, (size_t)field_size);
                    walk->keys_len += field_size;
                }
            }
            off += field_size;
        }
        if (next < nfields)
            return -1;
        row->key_len = walk->keys_len - row->key_at;
        if (null) {
            walk->keys_len = row->key_at;
            row->key_at = -1;
        }
        walk->count++;
    }
    return 0;
}

/* Marks in dropped[] every row whose key a later row has; returns how many, or -1 (memory). */
static Py_ssize_t
mark_earlier_versions(Walk *walk, unsigned char *dropped)
{
    Py_ssize_t slots = 16;
    while (slots < 2 * walk->count)
        slots *= 2;
    Py_ssize_t *table = PyMem_RawCalloc((size_t)slots, sizeof(Py_ssize_t));
    if (table == NULL)
        return -1;
    for (Py_ssize_t r = 0; r < walk->count; r++) {
        Row *row = &walk->rows[r];
        if (row->key_at >= 0)
            row->hash = fnv1a(walk->keys + row->key_at, row->key_len);
    }
    Py_ssize_t count = 0;
    for (Py_ssize_t r = walk->count - 1; r >= 0; r--) {
        Row *row = &walk->rows[r];
        if (row->key_at < 0)
            continue;
        Py_ssize_t slot = (Py_ssize_t)(row->hash & (uint64_t)(slots - 1));
        for (;;) {
            Py_ssize_t held = table[slot];
            if (held == 0) {
                table[slot] = r + 1;
                break;
            }
            Row *later = &walk->rows[held - 1];
            if (later->hash == row->hash && later->key_len == row->key_len
                && memcmp(walk->keys + later->key_at, walk->keys + row->key_at,
                          (size_t)row->key_len) == 0) {
                dropped[r] = 1;
                count++;
                break;
            }
            slot = (slot + 1) & (slots - 1);
        }
    }
    PyMem_RawFree(table);
    return count;
}

/* Copies the kept rows of one chunk (rows first..last-1) to out; returns the bytes written. */
static Py_ssize_t
copy_kept(const Walk *walk, const unsigned char *dropped, Py_ssize_t first, Py_ssize_t last,
          const char *data, Py_ssize_t size, char *out)
{
    Py_ssize_t written = 0;
    for (Py_ssize_t r = first; r < last; r++) {
        if (dropped[r])
            continue;
        Py_ssize_t end = r + 1 < last ? walk->rows[r + 1].start : size;
        Py_ssize_t length = end - walk->rows[r].start;
        if (out != NULL)
            memcpy(out + written, data + walk->rows[r].start, (size_t)length);
        written += length;
    }
    return written;
}

static PyObject *
latest_versions(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "latest_versions(chunks, key_fields)");
        return NULL;
    }
    /* A tuple of its own: the bytes stay referenced while the GIL is released. */
    PyObject *chunks = PySequence_Tuple(args[0]);
    if (chunks == NULL)
        return NULL;
    PyObject *key_fields = PySequence_Fast(args[1], "key_fields must be a sequence of ints");
    if (key_fields == NULL) {
        Py_DECREF(chunks);
        return NULL;
    }
    PyObject *result = NULL;
    Walk walk = {0};
    unsigned char *dropped = NULL;
    Py_ssize_t *bounds = NULL;
    Py_ssize_t nchunks = PySequence_Fast_GET_SIZE(chunks);
    Py_ssize_t nfields = PySequence_Fast_GET_SIZE(key_fields);
    long *fields = PyMem_RawMalloc((size_t)(nfields ? nfields : 1) * sizeof(long));
    bounds = PyMem_RawMalloc((size_t)(nchunks + 1) * sizeof(Py_ssize_t));
    if (fields == NULL || bounds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (nfields == 0) {
        PyErr_SetString(PyExc_ValueError, "key_fields is empty");
        goto done;
    }
    for (Py_ssize_t i = 0; i < nfields; i++) {
        fields[i] = PyLong_AsLong(PySequence_Fast_GET_ITEM(key_fields, i));
        if (fields[i] == -1 && PyErr_Occurred())
            goto done;
        if (fields[i] < 0 || (i > 0 && fields[i] <= fields[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "key_fields must ascend from 0");
            goto done;
        }
    }
    for (Py_ssize_t c = 0; c < nchunks; c++) {
        if (!PyBytes_Check(PySequence_Fast_GET_ITEM(chunks, c))) {
            PyErr_SetString(PyExc_TypeError, "chunks must be a sequence of bytes");
            goto done;
        }
    }

    int failed = 0;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c < nchunks && !failed; c++) {
        PyObject *chunk = PySequence_Fast_GET_ITEM(chunks, c);
        bounds[c] = walk.count;
        failed = walk_chunk(&walk, (const unsigned char *)PyBytes_AS_STRING(chunk),
                            PyBytes_GET_SIZE(chunk), fields, nfields);
    }
    bounds[nchunks] = walk.count;
    if (!failed) {
        dropped = PyMem_RawCalloc((size_t)(walk.count ? walk.count : 1), 1);
        count = dropped == NULL ? -1 : mark_earlier_versions(&walk, dropped);
        failed = count < 0 ? -2 : 0;
    }
    Py_END_ALLOW_THREADS
    if (failed == -1) {
        PyErr_SetString(PyExc_ValueError, "truncated staged row");
        goto done;
    }
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    if (count == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = PyList_New(nchunks);
    if (result == NULL)
        goto done;
    for (Py_ssize_t c = 0; c < nchunks; c++) {
        PyObject *chunk = PySequence_Fast_GET_ITEM(chunks, c);
        Py_ssize_t size = PyBytes_GET_SIZE(chunk);
        Py_ssize_t kept = copy_kept(&walk, dropped, bounds[c], bounds[c + 1],
                                    PyBytes_AS_STRING(chunk), size, NULL);
        PyObject *out;
        if (kept == size) {
            out = Py_NewRef(chunk);
        } else {
            out = PyBytes_FromStringAndSize(NULL, kept);
            if (out == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            copy_kept(&walk, dropped, bounds[c], bounds[c + 1], PyBytes_AS_STRING(chunk), size,
                      PyBytes_AS_STRING(out));
        }
        PyList_SET_ITEM(result, c, out);
    }

done:
    PyMem_RawFree(fields);
    PyMem_RawFree(bounds);
    PyMem_RawFree(dropped);
    PyMem_RawFree(walk.rows);
    PyMem_RawFree(walk.keys);
    Py_DECREF(chunks);
    Py_DECREF(key_fields);
    return result;
}

static PyMethodDef methods[] = {
    {"latest_versions", (PyCFunction)(void (*)(void))latest_versions, METH_FASTCALL,
     "latest_versions(chunks, key_fields) -> list of bytes, or None when no key repeats"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_staged", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__staged(void)
{
    return PyModule_Create(&module);
}
