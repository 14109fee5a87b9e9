/*
 * Staged rows (binary COPY rows, see cdcsync/source/tuples.py) in C, where the reader and the
 * applier spend most per row.
 *
 * stage_rows builds them from pgoutput tuples, as tuples.py's _stage_rows does (mypyc compiles
 * that one; it stays the reference, the fallback, and what names a malformed row). Compiled by
 * mypyc, each field was a slice (a new bytes object) appended to a bytearray through the generic
 * number protocol: about a fifth of the reader thread's time on a mixed backlog, where here a
 * field is one memcpy into a buffer sized once.
 *
 * latest_versions drops every version of a key but the last, before the applier sends them
 * (see cdcsync/apply/script.py, collapses). The merge used to drop them on the target: a DELETE
 * that scans the stage twice and hashes every key, a fifth of the target's merge on a backlog
 * where each transaction updates rows the one before inserted. Done here it costs about 50 ns a
 * row, with the GIL released, so the reader thread runs meanwhile; the same walk compiled by
 * mypyc held the GIL for 250 ns a row.
 *
 * Keys are compared as their staged fields (length and bytes), like the reader's count of
 * repeats (TableRows.keys), which decides whether a batch is collapsed at all. A key with a NULL
 * part matches nothing, as in SQL.
 *
 * A key the batch first inserted and last updated is kept as an insert: it was not on the source
 * before the batch, so the merge's plain INSERT takes it, where the upsert would try each such
 * row's key in the index, then insert it speculatively (a lock per row). The bench's mixed
 * backlog updates a quarter of the rows the transaction before inserted. A target that has the
 * key anyway (edited there) refuses the plain INSERT, and the merge falls back to the upsert, as
 * for any insert.
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
    Py_ssize_t op_at;     /* its operation's byte, from start; -1: not a one-byte field */
    unsigned char op;
    unsigned char first_op; /* the operation of its key's first version in the batch */
} Row;

/* The operation is the second of the staged layout's fields (tuples.py, META_COLUMNS). */
#define OP_FIELD 1

typedef struct {
    Row *rows;
    Py_ssize_t count, capacity;
    unsigned char *keys;
    Py_ssize_t keys_len, keys_capacity;
    /* Where a key field is past a row's fields (walk_chunk's -3): which, and how many it has. */
    long missing_field, row_fields;
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

/* Records the rows of one chunk; 0, -1 for a truncated row, -2 out of memory, -3 for a row
 * with fewer fields than a key field's position. */
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
        row->op_at = -1;
        row->op = 0;
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
            if (i == OP_FIELD && length == 1) {
                row->op_at = off + 4 - row->start;
                row->op = data[off + 4];
            }
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
        if (next < nfields) {
            walk->missing_field = fields[next];
            walk->row_fields = count;
            return -3;
        }
        row->first_op = row->op;
        row->key_len = walk->keys_len - row->key_at;
        if (null) {
            walk->keys_len = row->key_at;
            row->key_at = -1;
        }
        walk->count++;
    }
    return 0;
}

/* Marks in dropped[] every row whose key a later row has, and gives each kept row its key's
 * first operation; returns how many rows are dropped, or -1 (memory). */
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
                later->first_op = row->op; /* walking backwards: the earliest is set last */
                count++;
                break;
            }
            slot = (slot + 1) & (slots - 1);
        }
    }
    PyMem_RawFree(table);
    return count;
}

/* Whether a kept row is an update of a key the batch inserted first: it is staged as an insert. */
static int
inserted_first(const Row *row)
{
    return row->op == 'U' && row->first_op == 'I' && row->op_at >= 0;
}

/* Copies the kept rows of one chunk (rows first..last-1) to out; returns the bytes written, and
 * sets *changed if the copy differs from the chunk (a row dropped or staged as an insert). */
static Py_ssize_t
copy_kept(const Walk *walk, const unsigned char *dropped, Py_ssize_t first, Py_ssize_t last,
          const char *data, Py_ssize_t size, char *out, int *changed)
{
    Py_ssize_t written = 0;
    for (Py_ssize_t r = first; r < last; r++) {
        const Row *row = &walk->rows[r];
        if (dropped[r]) {
            *changed = 1;
            continue;
        }
        Py_ssize_t end = r + 1 < last ? walk->rows[r + 1].start : size;
        Py_ssize_t length = end - row->start;
        int as_insert = inserted_first(row);
        *changed |= as_insert;
        if (out != NULL) {
            memcpy(out + written, data + row->start, (size_t)length);
            if (as_insert)
                out[written + row->op_at] = 'I';
        }
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
    if (failed == -3) {
        PyErr_Format(PyExc_ValueError, "key field %ld is past the %ld fields of a staged row",
                     walk.missing_field, walk.row_fields);
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
        int changed = 0;
        Py_ssize_t kept = copy_kept(&walk, dropped, bounds[c], bounds[c + 1],
                                    PyBytes_AS_STRING(chunk), size, NULL, &changed);
        PyObject *out;
        if (!changed) {
            out = Py_NewRef(chunk);
        } else {
            out = PyBytes_FromStringAndSize(NULL, kept);
            if (out == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            copy_kept(&walk, dropped, bounds[c], bounds[c + 1], PyBytes_AS_STRING(chunk), size,
                      PyBytes_AS_STRING(out), &changed);
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

/* The staged layout's fixed part of a row: the field count, then the sequence number, operation,
 * commit LSN and commit time fields, then the mask field's length (tuples.py, META_COLUMNS). */
#define META_SIZE 47

typedef struct {
    const unsigned char *data;
    Py_ssize_t size, start;
    unsigned char op;
    uint64_t seq, lsn, commit_time;
} Pending;

static void
put16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void
put32(unsigned char *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static void
put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

/* The size of the staged rows of rows[], or -1 for a row that is not a well-formed tuple of
 * width columns: the output is allocated once, at its size, and written without checks. */
static Py_ssize_t
measure_staged(const Pending *rows, Py_ssize_t count, long width)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t r = 0; r < count; r++) {
        const unsigned char *p = rows[r].data;
        Py_ssize_t size = rows[r].size, off = rows[r].start;
        if (off < 0 || off + 2 > size || ((long)p[off] << 8 | p[off + 1]) != width)
            return -1;
        off += 2;
        total += META_SIZE + width;
        for (long i = 0; i < width; i++) {
            if (off >= size)
                return -1;
            unsigned char kind = p[off];
            if (kind == 't' || kind == 'b') {
                if (off + 5 > size)
                    return -1;
                Py_ssize_t field = 4 + (Py_ssize_t)be32(p + off + 1);
                if (field > size - off - 1)
                    return -1;
                total += field;
                off += 1 + field;
            } else if (kind == 'n' || kind == 'u') {
                total += 4;
                off += 1;
            } else {
                return -1;
            }
        }
    }
    return total;
}

/* Writes the staged rows of rows[], which measure_staged found well-formed, to out. Sets
 * unchanged[i] where a row left column i's TOASTed value unchanged. */
static void
write_staged(const Pending *rows, Py_ssize_t count, long width, unsigned char *out,
             unsigned char *unchanged)
{
    unsigned char *w = out;
    for (Py_ssize_t r = 0; r < count; r++) {
        const unsigned char *p = rows[r].data;
        Py_ssize_t off = rows[r].start + 2;
        put16(w, (uint16_t)(width + 5));
        put32(w + 2, 8);
        put64(w + 6, rows[r].seq);
        put32(w + 14, 1);
        w[18] = rows[r].op;
        put32(w + 19, 8);
        put64(w + 23, rows[r].lsn);
        put32(w + 31, 8);
        put64(w + 35, rows[r].commit_time);
        put32(w + 43, (uint32_t)width);
        unsigned char *mask = w + META_SIZE;
        memset(mask, '0', (size_t)width);
        w = mask + width;
        for (long i = 0; i < width; i++) {
            unsigned char kind = p[off];
            if (kind == 't' || kind == 'b') {
                Py_ssize_t field = 4 + (Py_ssize_t)be32(p + off + 1);
                memcpy(w, p + off + 1, (size_t)field);
                w += field;
                off += 1 + field;
            } else {
                memset(w, 0xFF, 4);
                w += 4;
                off += 1;
                if (kind == 'u') {
                    mask[i] = '1';
                    unchanged[i] = 1;
                }
            }
        }
    }
}

/* The union of the rows' masks as tuples.py has it: an int, bit i for column i. */
static PyObject *
mask_int(const unsigned char *unchanged, long width)
{
    if (memchr(unchanged, 1, (size_t)width) == NULL)
        return PyLong_FromLong(0);
    Py_ssize_t size = (width + 7) / 8;
    unsigned char *bits = PyMem_Calloc((size_t)(size ? size : 1), 1);
    if (bits == NULL)
        return PyErr_NoMemory();
    for (long i = 0; i < width; i++)
        if (unchanged[i])
            bits[i / 8] |= (unsigned char)(1 << (i % 8));
    PyObject *result = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "y#s",
                                           (const char *)bits, size, "little");
    PyMem_Free(bits);
    return result;
}

/* The GIL stays held: a call stages one chunk of one table's rows (one transaction's, at most
 * 5,000), microseconds to a fraction of a millisecond of work, and a thread that took the GIL
 * meanwhile could keep the reader waiting for up to the interpreter's switch interval. */
static PyObject *
stage_rows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stage_rows(rows, width) takes two arguments");
        return NULL;
    }
    long width = PyLong_AsLong(args[1]);
    if (width == -1 && PyErr_Occurred())
        return NULL;
    if (width < 0 || width > 0xFFFF - 5) {
        PyErr_SetString(PyExc_ValueError, "width must be between 0 and 65530");
        return NULL;
    }
    PyObject *rows = PySequence_Fast(args[0], "rows must be a sequence");
    if (rows == NULL)
        return NULL;
    PyObject *result = NULL, *out = NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(rows);
    Pending *pending = PyMem_Malloc((size_t)(count ? count : 1) * sizeof(Pending));
    unsigned char *unchanged = PyMem_Calloc((size_t)(width ? width : 1), 1);
    if (pending == NULL || unchanged == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *item = PySequence_Fast_GET_ITEM(rows, r);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 6
                || !PyBytes_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError,
                            "each row must be (payload, start, op, seq, lsn, commit_time)");
            goto done;
        }
        PyObject *payload = PyTuple_GET_ITEM(item, 0);
        Pending *row = &pending[r];
        row->data = (const unsigned char *)PyBytes_AS_STRING(payload);
        row->size = PyBytes_GET_SIZE(payload);
        row->start = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        long op = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
        row->seq = (uint64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(item, 3));
        row->lsn = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 4));
        row->commit_time = (uint64_t)PyLong_AsLongLong(PyTuple_GET_ITEM(item, 5));
        if (PyErr_Occurred())
            goto done;
        if (op < 0 || op > 255) {
            PyErr_SetString(PyExc_ValueError, "op must be a byte");
            goto done;
        }
        row->op = (unsigned char)op;
    }
    Py_ssize_t size = measure_staged(pending, count, width);
    if (size < 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        goto done;
    write_staged(pending, count, width, (unsigned char *)PyBytes_AS_STRING(out), unchanged);
    PyObject *mask = mask_int(unchanged, width);
    if (mask != NULL)
        result = PyTuple_Pack(2, out, mask);
    Py_XDECREF(mask);

done:
    Py_XDECREF(out);
    PyMem_Free(pending);
    PyMem_Free(unchanged);
    Py_DECREF(rows);
    return result;
}

static PyMethodDef methods[] = {
    {"latest_versions", (PyCFunction)(void (*)(void))latest_versions, METH_FASTCALL,
     "latest_versions(chunks, key_fields) -> list of bytes, or None when no key repeats"},
    {"stage_rows", (PyCFunction)(void (*)(void))stage_rows, METH_FASTCALL,
     "stage_rows(rows, width) -> (staged rows, unchanged mask), or None for a malformed row"},
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
