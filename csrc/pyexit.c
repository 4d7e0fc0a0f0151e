/*
 * The C run loop's Python side: RunLoop.run() enters the loop through run_handlers() (a function
 * of the CPython C API that this file adds to pykvm._native), and the loop calls an exit handler
 * of RunLoop.on() from pykvm_py_call() with the GIL taken back only for that call.
 *
 * Why not a cffi callback: an `extern "Python"` callback converts its arguments through cffi's
 * generic machinery and runs a Python dispatcher before the handler, which on a host that flushes
 * the branch predictors on every VM exit (IBPB) cost about 2x raw KVM_RUN per exit. Here the only
 * Python code an exit runs is the user's handler: the handler and the reusable exit object are
 * found and filled in C (see docs/cost-curves.md and `pykvm bench`).
 *
 * Only the limited API (stable ABI, Python 3.9) is used: the module stays abi3.
 */
#define Py_LIMITED_API 0x03090000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stddef.h>
#include <string.h>
#include <linux/kvm.h>

#include "pykvm_native.h"

/* The state of one vCPU that its exits check (pykvm._native.RunState, held by a Vcpu as `_rs`):
 * `seq` counts KVM_RUNs (an exit handed out at another seq is stale), `closing` is set when the
 * vCPU starts closing; `run`/`run_size` (read-only, given at creation): the vCPU's kvm_run
 * mapping, which stays mapped while the Vcpu lives. Plain C fields, so the loop and the exit
 * fast paths below read them without Python. */
typedef struct {
    PyObject_HEAD
    unsigned long long seq;
    unsigned long long run;
    unsigned int run_size;
    char closing;
} RunState;

/* The fields of an exit that the C loop fills for a handler (pykvm._native.ExitState, the base of
 * pykvm.exits.Exit): `_rs` (its vCPU's RunState), `_seq` (the seq it belongs to), `_decoded`
 * (True: `_info`, `_a`, `_b` hold the exit's fields as py_exit() in runloop.c decoded them;
 * False: read kvm_run); `fast` (C only): the decoded fields are in range, so `_value` and
 * `_respond` may serve the exit without Python while it is current. */
typedef struct {
    PyObject_HEAD
    PyObject *rs;
    unsigned long long seq;
    unsigned long long a;
    unsigned long long b;
    unsigned int info;
    unsigned int reason;
    char decoded;
    char fast;
} ExitState;

static PyTypeObject *RunState_Type, *ExitState_Type;

/* What one run_handlers() call lends the loop (borrowed: its arguments outlive the call). */
struct py_ctx {
    PyThreadState *tstate;  /* the caller's, saved while the GIL is released */
    int holding;            /* the GIL is kept across KVM_RUN (see alone()) */
    PyObject *handlers;     /* list of 64: exit reason -> handler(exit), or None */
    PyObject *exits;        /* list of 64: exit reason -> the reusable exit object, or None */
    PyObject *vcpu;         /* the Vcpu, for new_exit() */
    RunState *rs;           /* the Vcpu's RunState */
    PyObject *loop;         /* the RunLoop: _drain(), _result, _last_exit, _error */
    PyObject *new_exit;     /* pykvm.exits.new_exit(vcpu, reason) */
};

static PyObject *thread_count;      /* _thread._count */
static PyObject *s_drain, *s_result, *s_last_exit, *s_error, *s_failed_exit, *s_value_slow, *s_respond_slow;

/* With the GIL held and an exception set: hand it to RunLoop.run() (loop._error, raised there
 * after the console is drained) and stop. */
static int stop_with_error(struct py_ctx *c)
{
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL) {
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        if (PyObject_SetAttr(c->loop, s_error, value) < 0)
            PyErr_Clear();            /* no memory to keep it: the run still stops */
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return PYKVM_CB_STOP;
}

/* The GIL is held: call the handler of `reason` with the exit object, filled in. */
static int call_handler(struct py_ctx *c, uint32_t reason, uint32_t info, uint64_t a, uint64_t b)
{
    PyObject *h, *ex, *res, *key;
    ExitState *st;
    int ret;

    if (info & 0x80000000u) {            /* the handler sees the console up to its exit */
        res = PyObject_CallMethodObjArgs(c->loop, s_drain, NULL);
        if (res == NULL)
            return stop_with_error(c);
        Py_DECREF(res);
        if (c->rs->closing)                  /* closed by a console callback */
            return PYKVM_CB_STOP;
    }
    h = PyList_GetItem(c->handlers, reason);          /* borrowed; 64 entries, reason < 64 */
    if (h == NULL)
        return stop_with_error(c);
    if (h == Py_None)
        return PYKVM_CB_STOP_EXIT;
    Py_INCREF(h);                            /* the handler may remove itself */
    ex = PyList_GetItem(c->exits, reason);
    if (ex == NULL) {
        Py_DECREF(h);
        return stop_with_error(c);
    }
    if (ex != Py_None && Py_REFCNT(ex) == 1 && PyObject_TypeCheck(ex, ExitState_Type)) {
        /* held by the cache only: reuse it */
        Py_INCREF(ex);
    } else {
        key = PyLong_FromUnsignedLong(reason);
        ex = key == NULL ? NULL : PyObject_CallFunctionObjArgs(c->new_exit, c->vcpu, key, NULL);
        Py_XDECREF(key);
        if (ex == NULL)
            goto error;
        if (!PyObject_TypeCheck(ex, ExitState_Type)) {
            PyErr_SetString(PyExc_TypeError, "new_exit() did not return an ExitState");
            goto error;
        }
        Py_INCREF(ex);                       /* one for the cache (taken by SetItem), one here */
        if (PyList_SetItem(c->exits, reason, ex) < 0)
            goto error;
    }
    st = (ExitState *)ex;
    st->seq = c->rs->seq;
    st->info = info & 0xffffu;
    st->a = a;
    st->b = b;
    st->reason = reason;
    st->decoded = 1;
    st->fast = st->rs == (PyObject *)c->rs &&
        (reason == KVM_EXIT_IO ? ((info & 0xff) == 1 || (info & 0xff) == 2 || (info & 0xff) == 4)
                               : (reason == KVM_EXIT_MMIO && (info & 0xff) >= 1 &&
                                  (info & 0xff) <= 8));
    res = PyObject_CallFunctionObjArgs(h, ex, NULL);
    if (res == NULL) {
        ret = stop_with_error(c);
        if (PyObject_SetAttr(c->loop, s_failed_exit, ex) < 0)   /* whose handler raised */
            PyErr_Clear();
        goto out;
    }
    if (res != Py_None) {                    /* the handler's value ends the run */
        if (PyObject_SetAttr(c->loop, s_result, res) < 0 ||
            PyObject_SetAttr(c->loop, s_last_exit, ex) < 0) {
            Py_DECREF(res);
            goto error;
        }
        Py_DECREF(res);
        ret = PYKVM_CB_STOP_EXIT;
    } else if (c->rs->closing) {             /* closed from the handler */
        Py_DECREF(res);
        ret = PYKVM_CB_STOP;
    } else {
        Py_DECREF(res);
        c->rs->seq++;                        /* the exit is gone once the guest runs again */
        ret = PYKVM_CB_RESUME;
    }
    goto out;
error:
    ret = stop_with_error(c);
out:
    Py_XDECREF(ex);
    Py_DECREF(h);
    return ret;
}

/* With the GIL held: whether this thread is the interpreter's only one (_thread._count() is 0:
 * no thread started by _thread or threading is running; it counts a thread until its very end,
 * so it errs towards "not alone"). Then no thread can be waiting for the GIL, and the loop keeps
 * it across KVM_RUN instead of releasing and taking it back around every handler call (0.25 us
 * of an exit's 1.6 us of Python on kvm_pvm hosts, whose VM exits flush the branch predictors).
 * Any new thread can only be started by Python code of this thread, i.e. by a handler or a
 * console callback, and the loop asks again after each: the next KVM_RUN then releases it.
 * Signals still interrupt KVM_RUN either way. On any error, not alone. */
static PyCFunction thread_count_c;          /* its C function, called without the call protocol */
static PyObject *thread_count_self;

static int alone(void)
{
    PyObject *n;
    long v;

    if (thread_count_c != NULL)
        n = thread_count_c(thread_count_self, NULL);          /* METH_NOARGS */
    else
        n = thread_count == NULL ? NULL : PyObject_CallObject(thread_count, NULL);
    v = n == NULL ? -1 : PyLong_AsLong(n);

    Py_XDECREF(n);
    if (v == -1 && PyErr_Occurred())
        PyErr_Clear();
    return v == 0;
}

/* Drop the GIL for KVM_RUN unless this thread is alone (see alone()). */
static void before_run(struct py_ctx *c)
{
    c->holding = alone();
    if (!c->holding)
        c->tstate = PyEval_SaveThread();
}

int pykvm_py_call(struct pykvm_loop *l, uint32_t reason, uint32_t info, uint64_t a, uint64_t b)
{
    struct py_ctx *c = (struct py_ctx *)(uintptr_t)l->py_ctx;
    int ret;

    if (c == NULL)                           /* entered through pykvm_loop_run(): no handlers */
        return PYKVM_CB_STOP_EXIT;
    if (!c->holding)
        PyEval_RestoreThread(c->tstate);
    ret = call_handler(c, reason, info, a, b);
    before_run(c);
    return ret;
}

/* run_handlers(loop_address, handlers, exits, vcpu, run_state, loop, new_exit) -> int:
 * pykvm_loop_run() with the GIL released (kept while this is the only thread: alone()), its
 * exits in callback_mask served by the handlers. */
static PyObject *run_handlers(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    struct py_ctx c;
    struct pykvm_loop *l;
    int r;

    if (!PyArg_ParseTuple(args, "KO!O!OO!OO:run_handlers", &addr, &PyList_Type, &c.handlers,
                          &PyList_Type, &c.exits, &c.vcpu, RunState_Type, &c.rs, &c.loop,
                          &c.new_exit))
        return NULL;
    if (PyList_Size(c.handlers) != PYKVM_MAX_EXIT_REASON ||
        PyList_Size(c.exits) != PYKVM_MAX_EXIT_REASON) {
        PyErr_SetString(PyExc_ValueError, "run_handlers: handlers and exits are lists of 64");
        return NULL;
    }
    if (addr == 0) {
        PyErr_SetString(PyExc_ValueError, "run_handlers: no loop");
        return NULL;
    }
    l = (struct pykvm_loop *)(uintptr_t)addr;
    if (l->py_ctx != 0) {
        PyErr_SetString(PyExc_RuntimeError, "run_handlers: the loop is already running");
        return NULL;
    }
    l->py_ctx = (uint64_t)(uintptr_t)&c;
    before_run(&c);
    r = pykvm_loop_run(l);
    if (!c.holding)
        PyEval_RestoreThread(c.tstate);
    l->py_ctx = 0;
    return PyLong_FromLong(r);
}

static PyMethodDef run_handlers_def = {
    "run_handlers", run_handlers, METH_VARARGS,
    "run_handlers(loop_address, handlers, exits, vcpu, run_state, loop, new_exit) -> int\n\n"
    "pykvm_loop_run() on the struct pykvm_loop at loop_address, with the GIL released; exits\n"
    "in its callback_mask call handlers[reason](exit) with the GIL held (handlers and exits:\n"
    "lists of 64, indexed by exit reason; see pykvm.runloop)."};

static void state_free(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    freefunc free_ = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    free_(self);
    Py_DECREF(tp);                           /* instances of a heap type hold their type */
}

/* RunState(run_address, run_size): run_address is the host address of the vCPU's kvm_run
 * mapping (bytes: run_size), which must outlive the object (pykvm.vcpu.Vcpu keeps both). */
static PyObject *run_state_new(PyTypeObject *tp, PyObject *args, PyObject *kw)
{
    unsigned long long run;
    unsigned int size;
    RunState *rs;

    if (!PyArg_ParseTuple(args, "KI:RunState", &run, &size))
        return NULL;
    if (run == 0 || size < sizeof(struct kvm_run)) {
        PyErr_SetString(PyExc_ValueError, "RunState: no kvm_run mapping");
        return NULL;
    }
    rs = (RunState *)PyType_GenericAlloc(tp, 0);
    if (rs != NULL) {
        rs->run = run;
        rs->run_size = size;
    }
    return (PyObject *)rs;
}

static PyObject *closing_get(PyObject *self, void *closure)
{
    return PyBool_FromLong(((RunState *)self)->closing);
}

/* Closing is one way: once set, a vCPU's exits (and its loops) never run it again. */
static int closing_set(PyObject *self, PyObject *value, void *closure)
{
    RunState *rs = (RunState *)self;
    int truth = value == NULL ? 0 : PyObject_IsTrue(value);

    if (truth < 0)
        return -1;
    if (!truth && rs->closing) {
        PyErr_SetString(PyExc_ValueError, "a closing vCPU cannot be reopened");
        return -1;
    }
    rs->closing = (char)truth;
    return 0;
}

static PyGetSetDef run_state_getset[] = {
    {"closing", closing_get, closing_set, "the vCPU is closing (set once, never cleared)", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMemberDef run_state_members[] = {
    {"seq", T_ULONGLONG, offsetof(RunState, seq), 0, "KVM_RUNs so far (exits of another are stale)"},
    {"run", T_ULONGLONG, offsetof(RunState, run), READONLY, "host address of kvm_run"},
    {"run_size", T_UINT, offsetof(RunState, run_size), READONLY, "bytes mapped at run"},
    {NULL, 0, 0, 0, NULL}};

static PyType_Slot run_state_slots[] = {
    {Py_tp_doc, (void *)"RunState(run_address, run_size): a vCPU's run sequence number and "
                        "closing flag, as C fields."},
    {Py_tp_members, run_state_members},
    {Py_tp_getset, run_state_getset},
    {Py_tp_dealloc, (void *)state_free},
    {Py_tp_new, (void *)run_state_new},
    {0, NULL}};

static PyType_Spec run_state_spec = {"pykvm._native.RunState", sizeof(RunState), 0,
                                     Py_TPFLAGS_DEFAULT, run_state_slots};

static void exit_state_dealloc(PyObject *self)
{
    ExitState *st = (ExitState *)self;

    Py_CLEAR(st->rs);                        /* a RunState holds no object: no cycle through it */
    state_free(self);
}

/* The exit is served by the fast paths: decoded in range by the loop and still current. */
static int exit_fast(ExitState *st)
{
    RunState *rs = (RunState *)st->rs;

    return st->decoded && st->fast && rs != NULL && Py_TYPE(rs) == RunState_Type &&
        rs->seq == st->seq && !rs->closing;
}

static PyObject *exit_value(PyObject *self, void *closure)
{
    ExitState *st = (ExitState *)self;

    if (exit_fast(st))
        return PyLong_FromUnsignedLongLong(st->b);
    return PyObject_CallMethodObjArgs(self, s_value_slow, NULL);
}

static PyObject *exit_respond(PyObject *self, PyObject *data)
{
    ExitState *st = (ExitState *)self;
    RunState *rs = (RunState *)st->rs;
    unsigned long long v, off, size, n, i;
    uint8_t *p;

    if (!exit_fast(st) || !PyLong_Check(data))
        return PyObject_CallMethodObjArgs(self, s_respond_slow, data, NULL);
    v = PyLong_AsUnsignedLongLongMask(data);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    size = st->info & 0xff;
    if (st->reason == KVM_EXIT_IO) {
        off = st->a >> 32;
        n = size * ((st->a >> 16) & 0xffff);
        if ((size != 1 && size != 2 && size != 4) || n == 0 || off < sizeof(struct kvm_run))
            return PyObject_CallMethodObjArgs(self, s_respond_slow, data, NULL);
    } else {
        off = offsetof(struct kvm_run, mmio.data);
        n = size;
        if (size < 1 || size > 8)
            return PyObject_CallMethodObjArgs(self, s_respond_slow, data, NULL);
    }
    /* the loop checked the span when it decoded the exit; checked here again all the same */
    if (off > rs->run_size || n > rs->run_size - off)
        return PyObject_CallMethodObjArgs(self, s_respond_slow, data, NULL);
    if (size < 8)
        v &= (1ULL << (8 * size)) - 1;
    p = (uint8_t *)(uintptr_t)rs->run + off;
    for (i = 0; i + size <= n; i += size)    /* little-endian, as x86 and RISC-V are */
        memcpy(p + i, &v, size);
    st->b = v;                               /* value now reads what the guest will read */
    Py_RETURN_NONE;
}

/* The fields as attributes. Any assignment from Python takes the exit off the fast paths (the
 * C loop sets `fast` again when it refills the exit), and `_rs` takes a RunState only. */
enum { F_RS, F_SEQ, F_A, F_B, F_INFO, F_DECODED };

static PyObject *field_get(PyObject *self, void *closure)
{
    ExitState *st = (ExitState *)self;

    switch ((int)(intptr_t)closure) {
    case F_RS:
        if (st->rs == NULL) {
            PyErr_SetString(PyExc_AttributeError, "_rs");
            return NULL;
        }
        Py_INCREF(st->rs);
        return st->rs;
    case F_SEQ:
        return PyLong_FromUnsignedLongLong(st->seq);
    case F_A:
        return PyLong_FromUnsignedLongLong(st->a);
    case F_B:
        return PyLong_FromUnsignedLongLong(st->b);
    case F_INFO:
        return PyLong_FromUnsignedLong(st->info);
    default:
        return PyBool_FromLong(st->decoded);
    }
}

static int field_set(PyObject *self, PyObject *value, void *closure)
{
    ExitState *st = (ExitState *)self;
    int field = (int)(intptr_t)closure, truth;
    unsigned long long v;
    PyObject *old;

    st->fast = 0;
    if (field == F_RS) {
        if (value != NULL && !PyObject_TypeCheck(value, RunState_Type)) {
            PyErr_SetString(PyExc_TypeError, "_rs must be a RunState");
            return -1;
        }
        old = st->rs;
        Py_XINCREF(value);
        st->rs = value;
        Py_XDECREF(old);
        return 0;
    }
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "exit fields cannot be deleted");
        return -1;
    }
    if (field == F_DECODED) {
        truth = PyObject_IsTrue(value);
        if (truth < 0)
            return -1;
        st->decoded = (char)truth;
        return 0;
    }
    v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    switch (field) {
    case F_SEQ:
        st->seq = v;
        break;
    case F_A:
        st->a = v;
        break;
    case F_B:
        st->b = v;
        break;
    default:
        if (v > 0xffffffffULL) {
            PyErr_SetString(PyExc_OverflowError, "_info is 32 bits");
            return -1;
        }
        st->info = (unsigned int)v;
    }
    return 0;
}

static PyGetSetDef exit_state_getset[] = {
    {"_rs", field_get, field_set, "the vCPU's RunState", (void *)F_RS},
    {"_seq", field_get, field_set, "the RunState seq this exit belongs to", (void *)F_SEQ},
    {"_a", field_get, field_set, "decoded field a (see py_exit() in csrc/runloop.c)", (void *)F_A},
    {"_b", field_get, field_set, "decoded field b", (void *)F_B},
    {"_info", field_get, field_set, "decoded size/direction", (void *)F_INFO},
    {"_decoded", field_get, field_set, "the loop decoded the fields", (void *)F_DECODED},
    {"_value", exit_value, NULL,
     "The data the guest wrote, as an int (I/O: the first element; MMIO: len bytes, "
     "little-endian). Served in C while the exit is current and was decoded by the run loop; "
     "otherwise by the exit class's _value_slow().", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMethodDef exit_state_methods[] = {
    {"_respond", exit_respond, METH_O,
     "Supply what an I/O in or an MMIO read returns: an int is written in C (I/O: repeated for "
     "each element; MMIO: len bytes, little-endian) while the exit is current and was decoded "
     "by the run loop; anything else goes to the exit class's _respond_slow(data)."},
    {NULL, NULL, 0, NULL}};

static PyType_Slot exit_state_slots[] = {
    {Py_tp_doc, (void *)"ExitState: the fields of an exit the C loop fills (base of Exit)."},
    {Py_tp_getset, exit_state_getset},
    {Py_tp_methods, exit_state_methods},
    {Py_tp_dealloc, (void *)exit_state_dealloc},
    {Py_tp_new, (void *)PyType_GenericNew},
    {0, NULL}};

static PyType_Spec exit_state_spec = {"pykvm._native.ExitState", sizeof(ExitState), 0,
                                      Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, exit_state_slots};

static int add(PyObject *mod, const char *name, PyObject *obj)
{
    int r;

    if (obj == NULL)
        return -1;
    r = PyObject_SetAttrString(mod, name, obj);
    Py_DECREF(obj);
    return r;
}

static int intern(PyObject **slot, const char *name)
{
    if (*slot == NULL)
        *slot = PyUnicode_InternFromString(name);
    return *slot == NULL ? -1 : 0;
}

int pykvm_pyapi_install(void)
{
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *mod;
    int r = -1;

    if (RunState_Type != NULL) {             /* installed already */
        r = 0;
        goto out;
    }
    if (intern(&s_drain, "_drain") || intern(&s_result, "_result") ||
        intern(&s_last_exit, "_last_exit") || intern(&s_error, "_error") ||
        intern(&s_failed_exit, "failed_exit") ||
        intern(&s_value_slow, "_value_slow") || intern(&s_respond_slow, "_respond_slow"))
        goto out;
    mod = PyImport_ImportModule("_thread");
    if (mod != NULL) {
        thread_count = PyObject_GetAttrString(mod, "_count");   /* kept for good */
        Py_DECREF(mod);
        if (thread_count != NULL && PyCFunction_Check(thread_count) &&
            PyCFunction_GetFlags(thread_count) == METH_NOARGS) {
            thread_count_c = PyCFunction_GetFunction(thread_count);
            thread_count_self = PyCFunction_GetSelf(thread_count);   /* borrowed: the module */
        }
    }
    PyErr_Clear();                           /* without it, the GIL is always released */
    mod = PyImport_AddModule("pykvm._native");        /* borrowed; imported by our caller */
    if (mod == NULL)
        goto out;
    RunState_Type = (PyTypeObject *)PyType_FromSpec(&run_state_spec);
    ExitState_Type = (PyTypeObject *)PyType_FromSpec(&exit_state_spec);
    if (RunState_Type == NULL || ExitState_Type == NULL)
        goto out;
    Py_INCREF(RunState_Type);                /* kept here as well as in the module */
    Py_INCREF(ExitState_Type);
    if (add(mod, "RunState", (PyObject *)RunState_Type) < 0 ||
        add(mod, "ExitState", (PyObject *)ExitState_Type) < 0 ||
        add(mod, "run_handlers", PyCFunction_NewEx(&run_handlers_def, NULL, NULL)) < 0)
        goto out;
    r = 0;
out:
    if (r < 0)
        PyErr_Clear();
    PyGILState_Release(g);
    return r;
}
