/* The argument layer of the C entry points (mixllm._C, mixllm._cuda): each entry point declares its
 * arguments once, in a mix_sig table (name, kind, dtype / ndim / range constraints, output or not),
 * and the layer does the rest in one place:
 *   - parsing positional and keyword arguments (METH_FASTCALL | METH_KEYWORDS), with messages that
 *     name the argument;
 *   - taking the array arguments through the DLPack bridge (dtype, ndim, device, writability,
 *     stream), bounded by MIX_CALL_MAX_ARRAYS, and releasing them exactly once;
 *   - scratch memory and object references that live as long as the call;
 *   - mapping the core's negative return codes to Python exceptions (mix_sig.errors);
 *   - the docstring with a text signature, and the table as Python data (`__signatures__`), which
 *     the fuzz targets (fuzz/targets.py) read.
 *
 * Shape of an entry point:
 *     static const mix_arg A_pack_int4[] = {
 *         MIX_IN("q", MIX_DT(MIX_U8), 2),
 *         MIX_OUT("out", MIX_DT(MIX_U8), 2),
 *     };
 *     MIX_SIG(pack_int4, "Pack 4-bit codes two per byte.", NULL);
 *     static PyObject *py_pack_int4(PyObject *self, PyObject *const *args, Py_ssize_t n, PyObject *kw) {
 *         mix_call c;
 *         if (mix_call_begin(&c, &S_pack_int4, args, n, kw) < 0) return NULL;
 *         mix_array *q = mix_arr(&c, 0), *out = mix_arr(&c, 1);
 *         if (mix_check_shape2(out, ...) < 0) return mix_call_fail(&c);
 *         ...
 *         return mix_call_finish(&c, rc);
 *     }
 * After a successful mix_call_begin every exit goes through mix_call_fail / mix_raise /
 * mix_call_finish, which release everything the call holds. */
#ifndef MIXLLM_ARGS_H
#define MIXLLM_ARGS_H
#include "dlpack_bridge.h" /* first: it includes Python.h */

#define MIX_CALL_MAX_ARGS    16 /* declared arguments of one entry point */
#define MIX_CALL_MAX_ARRAYS  24 /* arrays one call may hold, nested ones (parts, specs) included */
#define MIX_CALL_MAX_SCRATCH 4  /* mix_call_alloc blocks of one call */
#define MIX_CALL_MAX_KEEP    4  /* mix_call_keep references of one call */

typedef enum {
    MIX_ARG_ARRAY,  /* a DLPack array, taken by mix_call_begin unless MIX_ARG_LATE */
    MIX_ARG_INT,    /* a Python int (__index__), stored as long long, range-checked against lo..hi */
    MIX_ARG_FLOAT,  /* a Python float (or anything with __float__), stored as double */
    MIX_ARG_BOOL,   /* any object, by its truth value */
    MIX_ARG_OBJECT, /* any object, interpreted by the entry point (lists of parts, weight specs) */
    MIX_ARG_STR,    /* a str without NUL characters (fields of a tuple: mix_unpack) */
} mix_arg_kind;

enum {
    MIX_ARG_OUTPUT = 1 << 0,  /* array written by the call: must be writable */
    MIX_ARG_NONE_OK = 1 << 1, /* None is accepted (arrays: mix_arr() gives NULL; scalars: mix_is_none) */
    MIX_ARG_DEFAULT = 1 << 2, /* may be omitted (arrays and objects: as None; scalars: as `dflt`) */
    MIX_ARG_LATE = 1 << 3,    /* array taken by the entry point itself (mix_call_take), e.g. when its
                                 dtype or its presence depends on another argument */
};

typedef struct {
    const char *name;
    mix_arg_kind kind;
    unsigned flags;
    unsigned dtypes;       /* arrays: MIX_DT() mask of accepted dtypes */
    int ndim;              /* arrays: required number of dimensions (-1: any) */
    long long lo, hi;      /* ints: accepted range (inclusive) */
    double dflt;           /* scalars with MIX_ARG_DEFAULT: the default */
    const char *range_msg; /* ints: what to say when out of range ("expected a positive integer") */
} mix_arg;

/* Negative return codes of the core and the exceptions they become. Code -2 is out of memory
 * everywhere unless a table says otherwise. */
typedef enum { MIX_EXC_VALUE, MIX_EXC_MEMORY, MIX_EXC_RUNTIME } mix_exc;
typedef struct {
    int code;
    mix_exc exc;
    const char *message; /* starts with the argument it is about */
} mix_err;

struct mix_call;
typedef struct {
    const char *name;    /* the entry point's Python name */
    const char *summary; /* one line for the docstring */
    const mix_arg *args;
    int nargs;
    const mix_err *errors; /* terminated by {0, 0, NULL}; NULL: only -2 (memory) is known */
    int device;            /* MIX_ON_CPU or MIX_ON_CUDA: where the arrays must live */
    int stream_arg;        /* CUDA: index of the int argument holding the caller's stream, or -1 */
    /* Checks between scalars (e.g. bits against symmetric), run after the scalars converted and
     * before any array is taken; NULL if none. -1 with an exception set. */
    int (*precheck)(const struct mix_call *c);
} mix_sig;

/* Declaration helpers for mix_arg tables. */
#define MIX_IN(nm, dt, nd) {.name = (nm), .kind = MIX_ARG_ARRAY, .dtypes = (dt), .ndim = (nd)}
#define MIX_IN_OPT(nm, dt, nd) \
    {.name = (nm), .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_NONE_OK, .dtypes = (dt), .ndim = (nd)}
#define MIX_OUT(nm, dt, nd) {.name = (nm), .kind = MIX_ARG_ARRAY, .flags = MIX_ARG_OUTPUT, .dtypes = (dt), .ndim = (nd)}
#define MIX_INT(nm, l, h, msg) {.name = (nm), .kind = MIX_ARG_INT, .lo = (l), .hi = (h), .range_msg = (msg)}
#define MIX_FLOAT(nm)          {.name = (nm), .kind = MIX_ARG_FLOAT}
#define MIX_BOOL(nm)           {.name = (nm), .kind = MIX_ARG_BOOL}
#define MIX_OBJ(nm)            {.name = (nm), .kind = MIX_ARG_OBJECT}
#define MIX_GROUP_SIZE         MIX_INT("group_size", 1, LLONG_MAX, "expected a positive integer")
#define MIX_NARGS(a)           ((int)(sizeof(a) / sizeof((a)[0])))
/* MIX_SIG(x, summary, errors, precheck): the CPU table S_x of entry point x, arguments in A_x. */
#define MIX_SIG(x, summ, errs, pre) \
    static const mix_sig S_##x = {#x, (summ), A_##x, MIX_NARGS(A_##x), (errs), MIX_ON_CPU, -1, (pre)}
/* The same for a CUDA entry point: arrays must be CUDA arrays on one device, and the int argument at
 * index `stream` holds the caller's stream, passed to every producer's __dlpack__(stream=...). */
#define MIX_SIG_CUDA(x, summ, errs, pre, stream) \
    static const mix_sig S_##x = {#x, (summ), A_##x, MIX_NARGS(A_##x), (errs), MIX_ON_CUDA, (stream), (pre)}

typedef struct mix_call {
    const mix_sig *sig;
    PyObject *obj[MIX_CALL_MAX_ARGS];  /* the objects passed (borrowed), NULL when omitted */
    long long i[MIX_CALL_MAX_ARGS];    /* ints and bools */
    double f[MIX_CALL_MAX_ARGS];       /* floats */
    mix_array *arr[MIX_CALL_MAX_ARGS]; /* taken arrays, NULL for None / not taken */
    mix_array held[MIX_CALL_MAX_ARRAYS];
    int nheld;
    void *scratch[MIX_CALL_MAX_SCRATCH];
    int nscratch;
    PyObject *keep[MIX_CALL_MAX_KEEP];
    int nkeep;
} mix_call;

/* Parse (args, nargs, kwnames) of a METH_FASTCALL | METH_KEYWORDS call against sig, check the
 * scalars and take every array not marked MIX_ARG_LATE, in table order. 0, or -1 with an
 * exception set and nothing held. */
int mix_call_begin(mix_call *c, const mix_sig *sig, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames);

/* Accessors by argument index (the position in the table). */
static inline mix_array *mix_arr(mix_call *c, int i) { return c->arr[i]; }
static inline long long mix_int(const mix_call *c, int i) { return c->i[i]; }
static inline double mix_float(const mix_call *c, int i) { return c->f[i]; }
static inline PyObject *mix_obj(const mix_call *c, int i) { return c->obj[i] ? c->obj[i] : Py_None; }
static inline int mix_is_none(const mix_call *c, int i) { return !c->obj[i] || c->obj[i] == Py_None; }

/* Take a MIX_ARG_LATE array argument now; dtypes 0 keeps the table's mask, otherwise it narrows
 * it (e.g. int8 for a symmetric weight). NULL with an exception set (None: only if NONE_OK,
 * then NULL without exception: check mix_is_none first). */
mix_array *mix_call_take(mix_call *c, int i, unsigned dtypes);
/* Take an array that is not an argument of its own (an element of a list or tuple argument). */
mix_array *mix_call_take_nested(mix_call *c, PyObject *obj, const char *name, unsigned dtypes, int ndim, int output);

/* Memory and references that live until the call ends. */
void *mix_call_alloc(mix_call *c, size_t bytes);
int mix_call_keep(mix_call *c, PyObject *obj); /* steals obj; -1 (and obj released) when full */

/* Ends of a call: release everything. fail: an exception is already set (returns NULL);
 * raise: set one (returns NULL); finish: rc 0 -> None, negative -> the sig's error for rc. */
PyObject *mix_call_fail(mix_call *c);
PyObject *mix_raise(mix_call *c, PyObject *exc, const char *fmt, ...);
PyObject *mix_call_finish(mix_call *c, int rc);
void mix_call_release(mix_call *c);

/* Shape checks that raise ValueError naming the array. */
int mix_check_shape2(const mix_array *a, int64_t rows, int64_t cols);
/* The dtype check of the bridge for an array already taken (message "name: expected dtype ..."). */
int mix_check_dtype(const mix_array *a, unsigned dtypes);

/* A tuple argument (a record such as a weight spec or one part of a weight), declared like the
 * arguments: exactly n items, converted by `fields` (INT within lo..hi, STR, OBJECT). 0, or -1 with
 * TypeError(`what`), which should say what the record looks like. */
typedef struct {
    PyObject *obj;   /* the item (borrowed from the tuple) */
    long long i;     /* INT */
    const char *str; /* STR: UTF-8, valid while the tuple lives */
} mix_field;
int mix_unpack(PyObject *tuple, const mix_arg *fields, int n, mix_field *out, const char *what);

/* Module assembly: one entry per entry point. mix_module_methods fills `out` (n + 1 slots, the last
 * the sentinel) with METH_FASTCALL | METH_KEYWORDS methods whose docstrings carry a text signature;
 * mix_module_add_signatures sets the module's `__signatures__`:
 *   {entry point: [(name, kind, {constraint: value}), ...]}  with kind one of "array", "int",
 *   "float", "bool", "object" and constraints among dtypes, ndim, output, none_ok, default, min, max. */
typedef PyObject *(*mix_fastcall)(PyObject *, PyObject *const *, Py_ssize_t, PyObject *);
typedef struct {
    const mix_sig *sig;
    mix_fastcall fn;
} mix_entry;
int mix_module_methods(const mix_entry *entries, int n, PyMethodDef *out);
int mix_module_add_signatures(PyObject *module, const mix_entry *entries, int n);
#endif
