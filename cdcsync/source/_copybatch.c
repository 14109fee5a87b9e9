/*
 * Every CopyData message libpq holds, taken in one call (see cdcsync/source/replication.py).
 *
 * psycopg reads one message per call of get_copy_data and builds a buffer object, a memoryview
 * and a tuple for it before the reader copies the bytes out: about 1.2 us a message, a fifth of
 * the daemon's CPU while it drains a backlog of small rows. Here the loop over libpq's
 * PQgetCopyData runs in C and each message costs one bytes object.
 *
 * The functions are looked up in the libpq psycopg itself has loaded (bind() refuses to load
 * one), so the PGconn psycopg opened is only ever handed to the library that allocated it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>

typedef int (*get_copy_data_fn)(void *conn, char **buffer, int async);
typedef void (*freemem_fn)(void *ptr);

static get_copy_data_fn get_copy_data = NULL;
static freemem_fn freemem = NULL;

static PyObject *
bind(PyObject *module, PyObject *path_arg)
{
    PyObject *encoded = NULL;
    if (!PyUnicode_FSConverter(path_arg, &encoded))
        return NULL;
    const char *path = PyBytes_AS_STRING(encoded);
    /* RTLD_NOLOAD: a handle on the library already in the process, never a second copy. */
    void *library = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (library == NULL) {
        PyErr_Format(PyExc_OSError, "%s is not loaded in this process", path);
        Py_DECREF(encoded);
        return NULL;
    }
    get_copy_data_fn found_get = (get_copy_data_fn)dlsym(library, "PQgetCopyData");
    freemem_fn found_free = (freemem_fn)dlsym(library, "PQfreemem");
    if (found_get == NULL || found_free == NULL) {
        PyErr_Format(PyExc_OSError, "%s has no PQgetCopyData or PQfreemem", path);
        Py_DECREF(encoded);
        return NULL;
    }
    get_copy_data = found_get;
    freemem = found_free;
    Py_DECREF(encoded);
    Py_RETURN_NONE;
}

static PyObject *
take(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "take(pgconn_ptr, limit)");
        return NULL;
    }
    if (get_copy_data == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() has not found libpq");
        return NULL;
    }
    void *conn = PyLong_AsVoidPtr(args[0]);
    if (conn == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the connection is closed");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *messages = PyList_New(0);
    if (messages == NULL)
        return NULL;
    /* What the last PQgetCopyData returned: 0 nothing more buffered, -1 the COPY ended, -2 an
     * error (in PQerrorMessage), a size when the limit stopped the loop. */
    int status = 0;
    while (PyList_GET_SIZE(messages) < limit) {
        char *buffer = NULL;
        status = get_copy_data(conn, &buffer, 1);
        if (status <= 0)
            break;
        PyObject *message = PyBytes_FromStringAndSize(buffer, status);
        freemem(buffer);
        if (message == NULL || PyList_Append(messages, message) < 0) {
            Py_XDECREF(message);
            Py_DECREF(messages);
            return NULL;
        }
        Py_DECREF(message);
    }
    return Py_BuildValue("(Ni)", messages, status);
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)bind, METH_O,
     "bind(path): use the PQgetCopyData of the libpq already loaded from path."},
    {"take", (PyCFunction)(void (*)(void))take, METH_FASTCALL,
     "take(pgconn_ptr, limit) -> (messages, status): up to limit buffered CopyData messages."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copybatch", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__copybatch(void)
{
    return PyModule_Create(&module);
}
