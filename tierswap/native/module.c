/* tierswap._lane: the Python face of the native lane (see lane.h for what the lane owns).
 *
 * Three types:
 *   Lane  one per shard process: built from the FUSE fds, the map memfd and the tiers; starts
 *         and stops the reader threads; hands trio the jobs that need slow tiers; answers the
 *         control plane's questions about the map and the spaces.
 *   Job   a request that waits for trio: `ops` says which byte extents to read or write in which
 *         store, `buffer` is where they go, `resume(err)` lets the lane finish it.
 *   Move  one background move of a map record (demotion, promotion, cleaning, migration):
 *         begin (pins the source), load, optionally recompress, allocate, fill, commit with
 *         compare-and-swap on the record.
 * Every method that does real work (resume, recompress, populate, stop) releases the GIL; lane
 * threads never take it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "lane.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define MOVE_SLOTS 2
#define MOVE_BUF ((size_t)MAX_RUN * PAGE)

typedef struct {
    PyObject_HEAD
    lane_t *l;
    Py_buffer life[MAX_TIERS];
    int life_held[MAX_TIERS];
    uint8_t *movebuf[MOVE_SLOTS][2];
    int move_busy[MOVE_SLOTS];
    uint8_t *jobmem;
    size_t jobmem_len;
} LaneObject;

typedef struct {
    PyObject_HEAD
    LaneObject *owner;
    job_t *j;
    int exports;
} JobObject;

typedef struct {
    PyObject_HEAD
    LaneObject *owner;
    run_t run;
    uint16_t lens[MAX_RUN];
    uint64_t pin_gen;
    int pinned;
    int slot;
    uint8_t *buf, *alt;
    uint16_t nlens[MAX_RUN];
    uint32_t noff[MAX_RUN + 1];
    int codec, level;
    int recompressed;
    piece_t pieces[MAX_PIECES];
    int npieces;
    uint32_t zero_from;
    int allocated;
    int dst;
    int exports;
    int done;
} MoveObject;

static PyTypeObject LaneType, JobType, MoveType;
static PyObject *LaneError;

static lane_t *need(LaneObject *self)
{
    if (!self->l)
        PyErr_SetString(LaneError, "the lane is closed");
    return self->l;
}

static int tier_arg(lane_t *l, int t)
{
    if (t < 0 || t >= l->ntiers) {
        PyErr_Format(PyExc_IndexError, "no tier %d", t);
        return -1;
    }
    return 0;
}

static codec_ctx_t *borrow_ctx(lane_t *l)
{
    pthread_mutex_lock(&l->qmu);
    while (!l->pyctx_free)
        pthread_cond_wait(&l->pyctx_cond, &l->qmu);
    codec_ctx_t *c = NULL;
    for (int i = 0; i < 4; i++)
        if (l->pyctx_free & (1 << i)) {
            l->pyctx_free &= ~(1 << i);
            c = l->pyctx[i];
            break;
        }
    pthread_mutex_unlock(&l->qmu);
    return c;
}

static void return_ctx(lane_t *l, codec_ctx_t *c)
{
    pthread_mutex_lock(&l->qmu);
    for (int i = 0; i < 4; i++)
        if (l->pyctx[i] == c)
            l->pyctx_free |= 1 << i;
    pthread_cond_signal(&l->pyctx_cond);
    pthread_mutex_unlock(&l->qmu);
}

static void *map_populated(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    madvise(p, len, MADV_DONTDUMP);   /* page content never goes into a core file */
    return p;
}

/* ------------------------------------------------------------------------------ Lane */

static long dict_long(PyObject *d, const char *key, long dflt, int *err)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v)
        return dflt;
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred())
        *err = 1;
    return x;
}

static int parse_codec(PyObject *d, int *codec, int *level)
{
    PyObject *v = PyDict_GetItemString(d, "codec");
    const char *s = v ? PyUnicode_AsUTF8(v) : "zstd";
    if (!s)
        return -1;
    if (!strcmp(s, "zstd"))
        *codec = CODEC_ZSTD;
    else if (!strcmp(s, "lz4"))
        *codec = CODEC_LZ4;
    else if (!strcmp(s, "none"))
        *codec = CODEC_NONE;
    else {
        PyErr_Format(PyExc_ValueError, "unknown codec %s", s);
        return -1;
    }
    int err = 0;
    *level = (int)dict_long(d, "level", 1, &err);
    return err ? -1 : 0;
}

static void lane_free(LaneObject *self)
{
    lane_t *l = self->l;
    if (!l)
        return;
    if (l->started) {
        Py_BEGIN_ALLOW_THREADS
        lane_stop_threads(l);
        Py_END_ALLOW_THREADS
    }
    map_close(&l->map);
    for (int t = 0; t < l->ntiers; t++) {
        tier_t *T = &l->tiers[t];
        if (T->arena)
            munmap(T->arena, T->arena_len);
        space_free(&T->sp);
        if (self->life_held[t]) {
            PyBuffer_Release(&self->life[t]);
            self->life_held[t] = 0;
        } else {
            free(T->sp.life);
        }
    }
    for (int t = 0; t < MAX_THREADS; t++)
        codec_ctx_free(l->tctx[t]);
    for (int i = 0; i < 4; i++)
        codec_ctx_free(l->pyctx[i]);
    if (self->jobmem)
        munmap(self->jobmem, self->jobmem_len);
    for (int s = 0; s < MOVE_SLOTS; s++)
        for (int k = 0; k < 2; k++)
            if (self->movebuf[s][k])
                munmap(self->movebuf[s][k], MOVE_BUF);
    free(l->jobs);
    if (l->efd >= 0)
        close(l->efd);
    pthread_mutex_destroy(&l->mu);
    pthread_mutex_destroy(&l->qmu);
    pthread_cond_destroy(&l->qcond);
    pthread_cond_destroy(&l->pyctx_cond);
    free(l);
    self->l = NULL;
}

/* The spaces and counters of a map that outlived its lane (a replacement shard). Strict: a
 * record this lane cannot place (a tier it does not have, an address outside its tier) or a
 * failed scan fails the start. Skipping one would leave its bytes counted free, to be reused
 * while the map still points at them. Returns 0, or a negative errno with *why set. */
static int rebuild(lane_t *l, const char **why)
{
    for (int t = 0; t < l->ntiers; t++)
        space_rebuild_begin(&l->tiers[t].sp);
    memset(&l->c, 0, sizeof l->c);
    static run_t runs[1024];
    static uint16_t lens[1024 * 16];
    uint64_t cursor = 0;
    int done = 0;
    while (!done) {
        int n = map_scan(&l->map, &cursor, ZERO_TIER + 1, UINT32_MAX, 1024, runs, 1024, lens,
                         sizeof lens / sizeof lens[0], &done);
        if (n < 0) {
            *why = "the map cannot be read";
            return n;
        }
        for (int i = 0; i < n; i++) {
            run_t *r = &runs[i];
            if (r->tier == ZERO_TIER)
                continue;
            if (r->tier >= l->ntiers) {
                *why = "the map names a tier this configuration does not have";
                return -EINVAL;
            }
            if (space_rebuild_add(&l->tiers[r->tier].sp, r->base, run_nbytes(r)) < 0) {
                *why = "the map points outside a tier's space (was a tier made smaller?)";
                return -EINVAL;
            }
        }
        lane_account(l, runs, n, +1);
    }
    for (int t = 0; t < l->ntiers; t++)
        space_rebuild_end(&l->tiers[t].sp);
    return 0;
}

static int Lane_init(LaneObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fds", "size", "map_path", "map_size", "fresh", "tiers", "uid",
                             "gid", "mtime_ns", "jobs", NULL};
    PyObject *fds, *tiers;
    unsigned long long size, map_size, mtime_ns = 0;
    const char *map_path;
    int fresh, jobs = 16;
    unsigned int uid = 0, gid = 0;
    if (self->l) {
        PyErr_SetString(LaneError, "already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKsKpO|IIKi", kwlist, &fds, &size, &map_path,
                                     &map_size, &fresh, &tiers, &uid, &gid, &mtime_ns, &jobs))
        return -1;
    Py_ssize_t nfds = PySequence_Size(fds), ntiers = PySequence_Size(tiers);
    if (nfds < 1 || nfds > MAX_THREADS || ntiers < 1 || ntiers > MAX_TIERS || size % PAGE
        || !size || size / PAGE > (1ull << 40)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad lane geometry");
        return -1;
    }
    if (jobs < nfds + 1)
        jobs = (int)nfds + 1;
    if (jobs > MAX_JOBS)
        jobs = MAX_JOBS;
    lane_t *l = calloc(1, sizeof *l);
    if (!l) {
        PyErr_NoMemory();
        return -1;
    }
    self->l = l;
    l->efd = -1;
    pthread_mutex_init(&l->mu, NULL);
    pthread_mutex_init(&l->qmu, NULL);
    pthread_cond_init(&l->qcond, NULL);
    pthread_cond_init(&l->pyctx_cond, NULL);
    l->size = size;
    l->npages = size / PAGE;
    l->uid = uid;
    l->gid = gid;
    l->mtime_ns = mtime_ns;
    l->nthreads = 0;
    char err[256];
    for (Py_ssize_t i = 0; i < nfds; i++) {
        PyObject *o = PySequence_GetItem(fds, i);
        long fd = o ? PyLong_AsLong(o) : -1;
        Py_XDECREF(o);
        if (fd < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bad fd");
            goto fail;
        }
        l->fds[i] = (int)fd;
    }
    int nthreads = (int)nfds;
    for (Py_ssize_t i = 0; i < ntiers; i++) {
        PyObject *d = PySequence_GetItem(tiers, i);
        if (!d)
            goto fail;
        if (!PyDict_Check(d)) {
            Py_DECREF(d);
            PyErr_SetString(PyExc_TypeError, "a tier is a dict");
            goto fail;
        }
        tier_t *T = &l->tiers[i];
        int e = 0;
        PyObject *kind = PyDict_GetItemString(d, "kind");
        const char *ks = kind ? PyUnicode_AsUTF8(kind) : NULL;
        T->kind = (ks && !strcmp(ks, "memory")) ? TIER_MEMORY : TIER_STORE;
        long nseg = dict_long(d, "nseg", 0, &e);
        long avail = dict_long(d, "available", nseg, &e);
        long align = dict_long(d, "align", T->kind == TIER_MEMORY ? 1 : PAGE, &e);
        long arena_fd = dict_long(d, "arena_fd", -1, &e);
        T->grow_below = (uint64_t)dict_long(d, "grow_below", 64l << 20, &e);
        if (e || parse_codec(d, &T->codec, &T->level) || nseg <= 0 || nseg > (1l << 27)) {
            Py_DECREF(d);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bad tier geometry");
            goto fail;
        }
        uint32_t *life = NULL;
        PyObject *lb = PyDict_GetItemString(d, "life");
        if (lb && lb != Py_None) {
            if (PyObject_GetBuffer(lb, &self->life[i], PyBUF_WRITABLE) < 0) {
                Py_DECREF(d);
                goto fail;
            }
            self->life_held[i] = 1;
            if ((size_t)self->life[i].len < (size_t)nseg * sizeof(uint32_t)) {
                Py_DECREF(d);
                PyErr_SetString(PyExc_ValueError, "life buffer too small");
                goto fail;
            }
            life = self->life[i].buf;
        } else {
            life = calloc((size_t)nseg, sizeof *life);
        }
        if (space_init(&T->sp, (uint32_t)nseg, (uint32_t)avail, (uint32_t)align, life)) {
            Py_DECREF(d);
            PyErr_NoMemory();
            goto fail;
        }
        l->ntiers = (int)i + 1;
        if (T->kind == TIER_MEMORY) {
            if (arena_fd < 0) {
                Py_DECREF(d);
                PyErr_SetString(PyExc_ValueError, "a memory tier needs arena_fd");
                goto fail;
            }
            T->arena_len = (size_t)nseg * SEG_SIZE;
            T->arena = mmap(NULL, T->arena_len, PROT_READ | PROT_WRITE, MAP_SHARED,
                            (int)arena_fd, 0);
            if (T->arena == MAP_FAILED) {
                T->arena = NULL;
                Py_DECREF(d);
                PyErr_SetFromErrno(PyExc_OSError);
                goto fail;
            }
            madvise(T->arena, T->arena_len, MADV_DONTDUMP);
        }
        Py_DECREF(d);
    }
    if (map_open(&l->map, map_path, map_size, fresh, err, sizeof err)) {
        PyErr_SetString(LaneError, err);
        goto fail;
    }
    /* jobs: request buffer, compressed stage, two edge pages; all populated now */
    size_t per = REQ_BUF + (size_t)MAX_REQ_PAGES * PAGE + 2 * PAGE;
    per = (per + PAGE - 1) / PAGE * PAGE;
    self->jobmem_len = per * (size_t)jobs;
    self->jobmem = map_populated(self->jobmem_len);
    l->jobs = calloc((size_t)jobs, sizeof(job_t));
    if (!self->jobmem || !l->jobs) {
        PyErr_NoMemory();
        goto fail;
    }
    l->njobs = jobs;
    for (int i = 0; i < jobs; i++) {
        job_t *j = &l->jobs[i];
        j->lane = l;
        j->buf = self->jobmem + per * (size_t)i;
        j->stage = j->buf + REQ_BUF;
        j->edges = j->stage + (size_t)MAX_REQ_PAGES * PAGE;
        j->next = l->pool;
        l->pool = j;
    }
    for (int s = 0; s < MOVE_SLOTS; s++)
        for (int k = 0; k < 2; k++)
            if (!(self->movebuf[s][k] = map_populated(MOVE_BUF))) {
                PyErr_NoMemory();
                goto fail;
            }
    for (int t = 0; t < nthreads; t++)
        if (!(l->tctx[t] = codec_ctx_new())) {
            PyErr_NoMemory();
            goto fail;
        }
    for (int i = 0; i < 4; i++)
        if (!(l->pyctx[i] = codec_ctx_new())) {
            PyErr_NoMemory();
            goto fail;
        }
    l->pyctx_free = 0xf;
    l->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    l->nthreads = nthreads;
    if (!fresh) {
        const char *why = "";
        int rc = rebuild(l, &why);
        if (rc < 0) {
            PyErr_Format(LaneError, "%s (%s)", why, strerror(-rc));
            goto fail;
        }
    }
    return 0;
fail:
    l->nthreads = 0;
    lane_free(self);
    return -1;
}

static void Lane_dealloc(LaneObject *self)
{
    lane_free(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Lane_start(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    if (l->started)
        Py_RETURN_NONE;
    int rc = lane_start_threads(l);
    if (rc)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Lane_stop(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    if (l->started) {
        Py_BEGIN_ALLOW_THREADS
        lane_stop_threads(l);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Lane_close(LaneObject *self, PyObject *unused)
{
    lane_free(self);
    Py_RETURN_NONE;
}

static PyObject *Lane_resend(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    return PyLong_FromLong(-lane_send_resend(l));
}

static PyObject *Lane_take_jobs(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    uint64_t v;
    if (read(l->efd, &v, sizeof v) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (;;) {
        pthread_mutex_lock(&l->qmu);
        job_t *j = l->qhead;
        if (j) {
            l->qhead = j->next;
            if (!l->qhead)
                l->qtail = NULL;
            l->qlen--;
            j->next = NULL;
            j->in_queue = 0;
        }
        pthread_mutex_unlock(&l->qmu);
        if (!j)
            break;
        JobObject *jo = PyObject_New(JobObject, &JobType);
        if (!jo) {
            Py_DECREF(out);
            return NULL;   /* the job is lost for now: its request is resent after a restart */
        }
        Py_INCREF(self);
        jo->owner = self;
        jo->j = j;
        jo->exports = 0;
        PyList_Append(out, (PyObject *)jo);
        Py_DECREF(jo);
    }
    return out;
}

static PyObject *Lane_take_grow(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    pthread_mutex_lock(&l->mu);
    uint32_t m = l->want_grow;
    l->want_grow = 0;
    pthread_mutex_unlock(&l->mu);
    return PyLong_FromUnsignedLong(m);
}

static PyObject *Lane_take_recent(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    pthread_mutex_lock(&l->mu);
    uint32_t n = l->recent_count, h = l->recent_head;
    static struct { uint64_t start; uint16_t gen; uint8_t tier; } copy[RECENT];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = (h + i) % RECENT;
        copy[i].start = l->recent[k].start;
        copy[i].gen = l->recent[k].gen;
        copy[i].tier = l->recent[k].tier;
    }
    l->recent_count = 0;
    pthread_mutex_unlock(&l->mu);
    for (uint32_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KII)", (unsigned long long)copy[i].start,
                                    (unsigned)copy[i].gen, (unsigned)copy[i].tier);
        if (!t || PyList_Append(out, t)) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *Lane_add_segments(LaneObject *self, PyObject *args)
{
    int t;
    unsigned int count;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iI", &t, &count) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    uint32_t added = space_add(&l->tiers[t].sp, count);
    pthread_mutex_unlock(&l->mu);
    return PyLong_FromUnsignedLong(added);
}

static PyObject *Lane_populate(LaneObject *self, PyObject *args)
{
    int t;
    unsigned long long off, len;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iKK", &t, &off, &len) || tier_arg(l, t))
        return NULL;
    tier_t *T = &l->tiers[t];
    if (!T->arena || off + len > T->arena_len || off % PAGE) {
        PyErr_SetString(PyExc_ValueError, "populate: not inside the arena");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = madvise(T->arena + off, len, MADV_POPULATE_WRITE);
    Py_END_ALLOW_THREADS
    if (rc)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Lane_set_draining(LaneObject *self, PyObject *args)
{
    int t, on;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "ip", &t, &on) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    l->tiers[t].sp.draining = on;
    if (on)
        space_close_open(&l->tiers[t].sp);
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_NONE;
}

static PyObject *Lane_set_offline(LaneObject *self, PyObject *args)
{
    int t, on;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "ip", &t, &on) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    l->tiers[t].offline = on;
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_NONE;
}

static PyObject *Lane_set_failed(LaneObject *self, PyObject *args)
{
    int t, on;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "ip", &t, &on) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    l->tiers[t].failed = on;
    if (!on)
        l->tiers[t].consecutive_errors = 0;
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_NONE;
}

#define SET(d, k, v) do { PyObject *_o = PyLong_FromUnsignedLongLong((unsigned long long)(v)); \
    if (!_o || PyDict_SetItemString(d, k, _o)) { Py_XDECREF(_o); goto fail; } Py_DECREF(_o); } while (0)

static PyObject *Lane_statistics(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    lane_counters_t c;
    tier_t tiers[MAX_TIERS];
    uint32_t largest[MAX_TIERS], extents[MAX_TIERS];
    uint64_t runs = 0, used = 0, hw = 0;
    pthread_mutex_lock(&l->mu);
    c = l->c;
    for (int t = 0; t < l->ntiers; t++) {
        tiers[t] = l->tiers[t];
        largest[t] = space_largest_free_extent(&l->tiers[t].sp, &extents[t]);
    }
    map_stats(&l->map, &runs, &used, &hw);
    pthread_mutex_unlock(&l->mu);
    pthread_mutex_lock(&l->qmu);
    c.pool_waits = l->c.pool_waits;
    int qlen = l->qlen;
    pthread_mutex_unlock(&l->qmu);
    PyObject *d = PyDict_New(), *tl = PyList_New(0);
    if (!d || !tl)
        goto fail;
    SET(d, "reads", c.reads);
    SET(d, "writes", c.writes);
    SET(d, "discards", c.discards);
    SET(d, "other_ops", __atomic_load_n(&l->c.other_ops, __ATOMIC_RELAXED));
    SET(d, "read_errors", c.read_errors);
    SET(d, "write_errors", c.write_errors);
    SET(d, "enospc", c.enospc);
    SET(d, "native", c.native);
    SET(d, "forwarded", c.forwarded);
    SET(d, "rmw", c.rmw);
    SET(d, "rmw_conflicts", c.rmw_conflicts);
    SET(d, "zero_pages", c.zero_pages);
    SET(d, "corrupt", c.corrupt);
    SET(d, "pool_waits", c.pool_waits);
    SET(d, "queued", qlen);
    SET(d, "runs", runs);
    SET(d, "map_bytes", used);
    SET(d, "map_high_water", hw);
    SET(d, "map_size", l->map.map_size);
    SET(d, "threads_running", __atomic_load_n(&l->running, __ATOMIC_SEQ_CST));
    SET(d, "jobs", l->njobs);
    for (int t = 0; t < l->ntiers; t++) {
        tier_t *T = &tiers[t];
        PyObject *td = PyDict_New();
        if (!td || PyList_Append(tl, td)) {
            Py_XDECREF(td);
            goto fail;
        }
        Py_DECREF(td);
        SET(td, "pages", T->c.pages);
        SET(td, "zero_pages", T->c.zero_pages);
        SET(td, "pages_in", T->c.pages_in);
        SET(td, "pages_out", T->c.pages_out);
        SET(td, "promotions", T->c.promotions);
        SET(td, "demotions", T->c.demotions);
        SET(td, "bytes_moved", T->c.bytes_moved);
        SET(td, "read_errors", T->c.read_errors);
        SET(td, "write_errors", T->c.write_errors);
        SET(td, "grow_requests", T->c.grow_requests);
        SET(td, "live_bytes", T->sp.live_total);
        SET(td, "segments", T->sp.available);
        SET(td, "capacity_segments", T->sp.nseg);
        SET(td, "free_segments", T->sp.nfree);
        SET(td, "free_bytes", space_free_bytes(&T->sp));
        SET(td, "largest_free_extent", (uint64_t)largest[t] * SEG_SIZE);
        SET(td, "free_extents", extents[t]);
        SET(td, "draining", T->sp.draining);
        SET(td, "failed", T->failed);
        SET(td, "offline", T->offline);
        SET(td, "guards", T->sp.nguards);
        SET(td, "retiring", T->sp.pcount);
    }
    if (PyDict_SetItemString(d, "tiers", tl))
        goto fail;
    Py_DECREF(tl);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(tl);
    return NULL;
}

static PyObject *run_tuple(const run_t *r)
{
    PyObject *lens = PyBytes_FromStringAndSize((const char *)r->lens, 2 * r->npages);
    if (!lens)
        return NULL;
    PyObject *t = Py_BuildValue("(KIIKIIKIKN)", (unsigned long long)r->start,
                                (unsigned)r->npages, (unsigned)r->tier,
                                (unsigned long long)r->base, (unsigned)r->gen,
                                (unsigned)r->epoch, (unsigned long long)run_nbytes(r),
                                (unsigned)r->flags, (unsigned long long)run_nonzero(r), lens);
    return t;
}

static PyObject *runs_list(const run_t *runs, int n)
{
    PyObject *out = PyList_New(n);
    if (!out)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *t = run_tuple(&runs[i]);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *Lane_scan(LaneObject *self, PyObject *args)
{
    int tier;
    unsigned long long cursor;
    unsigned int max_epoch = UINT32_MAX, budget = 4096;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iK|II", &tier, &cursor, &max_epoch, &budget))
        return NULL;
    if (budget > 4096)
        budget = 4096;
    static run_t runs[4096];
    static uint16_t lens[4096 * 8];
    int done = 0;
    uint64_t cur = cursor;
    pthread_mutex_lock(&l->mu);
    int n = map_scan(&l->map, &cur, tier < 0 ? (int)ZERO_TIER + 1 : tier, max_epoch, budget,
                     runs, 4096, lens, sizeof lens / sizeof lens[0], &done);
    pthread_mutex_unlock(&l->mu);
    /* Python objects are made after unlocking: no allocation while lane threads may wait on mu.
     * The static arrays are safe: the GIL is held from here to the end. */
    PyObject *out = n < 0 ? NULL : runs_list(runs, n);
    if (n < 0) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (!out)
        return NULL;
    return Py_BuildValue("(NKO)", out, (unsigned long long)cur, done ? Py_True : Py_False);
}

static PyObject *Lane_lookup(LaneObject *self, PyObject *args)
{
    unsigned long long first, last;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "KK", &first, &last))
        return NULL;
    if (last < first || last - first > MAX_REQ_PAGES) {
        PyErr_SetString(PyExc_ValueError, "lookup range too long");
        return NULL;
    }
    static run_t runs[MAX_REQ_RUNS];
    static uint16_t lens[MAX_REQ_PAGES];
    pthread_mutex_lock(&l->mu);
    int n = map_lookup(&l->map, first, last, runs, MAX_REQ_RUNS, lens);
    pthread_mutex_unlock(&l->mu);
    PyObject *out = n < 0 ? NULL : runs_list(runs, n);
    if (n < 0) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return out;
}

static PyObject *Lane_get_run(LaneObject *self, PyObject *args)
{
    unsigned long long page;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "K", &page))
        return NULL;
    run_t r;
    static uint16_t lens[MAX_RUN];
    pthread_mutex_lock(&l->mu);
    int n = map_get(&l->map, page, &r, lens);
    pthread_mutex_unlock(&l->mu);
    PyObject *out = n > 0 ? run_tuple(&r) : NULL;
    if (n < 0) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (n == 0)
        Py_RETURN_NONE;
    return out;
}

static PyObject *Lane_touch(LaneObject *self, PyObject *args)
{
    unsigned long long start;
    unsigned int gen, epoch;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "KII", &start, &gen, &epoch))
        return NULL;
    pthread_mutex_lock(&l->mu);
    int rc = map_touch(&l->map, start, (uint16_t)gen, epoch);
    pthread_mutex_unlock(&l->mu);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(rc);
}

static PyObject *Lane_epoch(LaneObject *self, PyObject *unused)
{
    lane_t *l = need(self);
    if (!l)
        return NULL;
    return PyLong_FromUnsignedLong(lane_epoch(l));
}

static PyObject *Lane_segments(LaneObject *self, PyObject *args)
{
    /* live bytes per segment (int64 little-endian) and the free bitmap, for cleaning/compaction */
    int t;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "i", &t) || tier_arg(l, t))
        return NULL;
    space_t *sp = &l->tiers[t].sp;
    /* allocated before taking the lock (capacity, not `available`, which may grow meanwhile) */
    PyObject *live = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)sp->nseg * 8);
    PyObject *free = PyBytes_FromStringAndSize(NULL, sp->nseg);
    if (!live || !free) {
        Py_XDECREF(live);
        Py_XDECREF(free);
        return NULL;
    }
    pthread_mutex_lock(&l->mu);
    uint32_t n = sp->available;
    memcpy(PyBytes_AS_STRING(live), sp->live, (size_t)n * 8);
    for (uint32_t s = 0; s < n; s++)
        PyBytes_AS_STRING(free)[s] = (char)space_is_free(sp, s);
    int64_t open = sp->open_seg;
    pthread_mutex_unlock(&l->mu);
    if (_PyBytes_Resize(&live, (Py_ssize_t)n * 8) || _PyBytes_Resize(&free, n)) {
        Py_XDECREF(live);
        Py_XDECREF(free);
        return NULL;
    }
    return Py_BuildValue("(NNL)", live, free, (long long)open);
}

static PyObject *Lane_take_freed(LaneObject *self, PyObject *args)
{
    /* take_freed(tier) -> [(segment, life)] given back to the free set since the last call
     * (the first call starts the recording for that tier) */
    int t;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "i", &t) || tier_arg(l, t))
        return NULL;
    space_t *sp = &l->tiers[t].sp;
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    static uint32_t segs[1 << 16], lives[1 << 16];
    for (;;) {
        uint32_t n = 0;
        int more = 0;
        pthread_mutex_lock(&l->mu);
        if (!sp->freed_bits) {
            int rc = space_want_freed(sp);
            pthread_mutex_unlock(&l->mu);
            if (rc) {
                Py_DECREF(out);
                return PyErr_NoMemory();
            }
            return out;
        }
        for (uint32_t w = 0; w < sp->nwords && !more; w++) {
            while (sp->freed_bits[w]) {
                if (n == sizeof segs / sizeof segs[0]) {
                    more = 1;
                    break;
                }
                uint32_t seg = (w << 6) + (uint32_t)__builtin_ctzll(sp->freed_bits[w]);
                sp->freed_bits[w] &= sp->freed_bits[w] - 1;
                segs[n] = seg;
                lives[n++] = sp->freed_life[seg];
            }
        }
        pthread_mutex_unlock(&l->mu);
        for (uint32_t i = 0; i < n; i++) {
            PyObject *t2 = Py_BuildValue("(II)", segs[i], lives[i]);
            if (!t2 || PyList_Append(out, t2)) {
                Py_XDECREF(t2);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(t2);
        }
        if (!more)
            return out;
    }
}

static PyObject *Lane_take_segment(LaneObject *self, PyObject *args)
{
    int t;
    unsigned int seg;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iI", &t, &seg) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    int ok = space_take(&l->tiers[t].sp, seg);
    pthread_mutex_unlock(&l->mu);
    return PyBool_FromLong(ok);
}

static PyObject *Lane_give_segment(LaneObject *self, PyObject *args)
{
    int t;
    unsigned int seg;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iI", &t, &seg) || tier_arg(l, t))
        return NULL;
    pthread_mutex_lock(&l->mu);
    space_give(&l->tiers[t].sp, seg);
    pthread_mutex_unlock(&l->mu);
    Py_RETURN_NONE;
}

static PyObject *Lane_move(LaneObject *self, PyObject *args);

/* Test support. arena_address: where a memory tier's arena is mapped (userfaultfd tests).
 * debug_fill: publish `count` one-page records of a fixed compressed page, `stride` pages
 * apart, into memory tier `tier`, as fast as the map allows (tests that need a map of
 * millions of runs; each is a real record a read decodes). */
static PyObject *Lane_arena_address(LaneObject *self, PyObject *args)
{
    int t;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "i", &t) || tier_arg(l, t))
        return NULL;
    return PyLong_FromVoidPtr(l->tiers[t].arena);
}

static PyObject *Lane_debug_fill(LaneObject *self, PyObject *args)
{
    int t;
    unsigned long long first, count, stride;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "iKKK", &t, &first, &count, &stride) || tier_arg(l, t))
        return NULL;
    tier_t *T = &l->tiers[t];
    if (T->kind != TIER_MEMORY || !stride) {
        PyErr_SetString(PyExc_ValueError, "debug_fill: a memory tier and a stride");
        return NULL;
    }
    uint64_t done = 0;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    static uint16_t lens1[1];
    static uint8_t page0[PAGE], bytes[PAGE];
    for (unsigned k = 0; k < PAGE; k++)
        page0[k] = (uint8_t)("tierswap debug_fill "[k % 20]);
    codec_ctx_t *ctx = borrow_ctx(l);
    lens1[0] = (uint16_t)codec_compress_page(ctx, CODEC_ZSTD, 1, page0, bytes);
    return_ctx(l, ctx);
    for (uint64_t i = 0; i < count && !rc; i++) {
        uint64_t page = first + i * stride;
        if (page >= l->npages)
            break;
        pthread_mutex_lock(&l->mu);
        piece_t p;
        uint32_t got;
        if (space_alloc(&T->sp, (uint8_t)t, lens1, 1, 0, &p, 1, &got) != 1 || got != 1) {
            pthread_mutex_unlock(&l->mu);
            rc = -ENOSPC;
            break;
        }
        memcpy(T->arena + p.base, bytes, lens1[0]);
        run_t r = {.start = page, .key = page, .base = p.base, .epoch = lane_epoch(l),
                   .npages = 1, .gen = map_next_gen(&l->map), .tier = (uint8_t)t,
                   .flags = FLAGS(FMT_PAGES, CODEC_ZSTD), .lens = lens1};
        static run_t old[4];
        static uint16_t oldlens[4];
        int nold = 0;
        rc = map_replace(&l->map, page, page + 1, &r, 1, old, 4, oldlens, &nold);
        if (rc == 0) {
            lane_account(l, &r, 1, +1);
            lane_release_runs(l, old, nold);
            T->c.pages_in++;
            done++;
        } else {
            space_release(&T->sp, p.base, p.nbytes);
        }
        pthread_mutex_unlock(&l->mu);
    }
    Py_END_ALLOW_THREADS
    if (rc && !done) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(done);
}

static PyObject *Lane_get_eventfd(LaneObject *self, void *c)
{
    lane_t *l = need(self);
    return l ? PyLong_FromLong(l->efd) : NULL;
}

static PyObject *Lane_get_running(LaneObject *self, void *c)
{
    lane_t *l = need(self);
    return l ? PyLong_FromLong(__atomic_load_n(&l->running, __ATOMIC_SEQ_CST)) : NULL;
}

static PyObject *Lane_get_conn_gone(LaneObject *self, void *c)
{
    lane_t *l = need(self);
    return l ? PyLong_FromLong(l->conn_gone) : NULL;
}

static PyObject *Lane_get_closed(LaneObject *self, void *c)
{
    return PyBool_FromLong(self->l == NULL);
}

static PyMethodDef Lane_methods[] = {
    {"start", (PyCFunction)Lane_start, METH_NOARGS, "Start the reader threads."},
    {"stop", (PyCFunction)Lane_stop, METH_NOARGS, "Stop the reader threads (requests in flight finish)."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Stop, close the map, unmap everything."},
    {"resend", (PyCFunction)Lane_resend, METH_NOARGS,
     "FUSE_NOTIFY_RESEND: the kernel re-queues requests read but never answered; 0 or errno."},
    {"take_jobs", (PyCFunction)Lane_take_jobs, METH_NOARGS, "Jobs waiting for trio (drains the eventfd)."},
    {"take_grow", (PyCFunction)Lane_take_grow, METH_NOARGS, "Bit mask of memory tiers that want to grow."},
    {"take_recent", (PyCFunction)Lane_take_recent, METH_NOARGS,
     "Runs read from slow tiers since the last call: (record start, gen, tier)."},
    {"add_segments", (PyCFunction)Lane_add_segments, METH_VARARGS, "Grow a tier's usable space."},
    {"populate", (PyCFunction)Lane_populate, METH_VARARGS, "Fault in (and so lock) part of an arena."},
    {"set_draining", (PyCFunction)Lane_set_draining, METH_VARARGS, ""},
    {"set_failed", (PyCFunction)Lane_set_failed, METH_VARARGS, ""},
    {"set_offline", (PyCFunction)Lane_set_offline, METH_VARARGS, ""},
    {"statistics", (PyCFunction)Lane_statistics, METH_NOARGS, "Counters and per-tier space state."},
    {"scan", (PyCFunction)Lane_scan, METH_VARARGS,
     "scan(tier, cursor, max_epoch=~0, budget=4096) -> (runs, next cursor, done); tier -1: all."},
    {"lookup", (PyCFunction)Lane_lookup, METH_VARARGS, "Runs over pages [first, last), clipped."},
    {"get_run", (PyCFunction)Lane_get_run, METH_VARARGS, "The record holding a page, or None."},
    {"touch", (PyCFunction)Lane_touch, METH_VARARGS, "Set a record's epoch if its gen matches."},
    {"epoch", (PyCFunction)Lane_epoch, METH_NOARGS, "The map's clock (CLOCK_BOOTTIME seconds)."},
    {"segments", (PyCFunction)Lane_segments, METH_VARARGS, "(live int64 bytes, free flags, open)"},
    {"take_segment", (PyCFunction)Lane_take_segment, METH_VARARGS, "Withhold a free segment."},
    {"take_freed", (PyCFunction)Lane_take_freed, METH_VARARGS,
     "Segments given back since the last call: [(segment, life)]."},
    {"give_segment", (PyCFunction)Lane_give_segment, METH_VARARGS, "Return a withheld segment."},
    {"arena_address", (PyCFunction)Lane_arena_address, METH_VARARGS, "(tests) arena mapping"},
    {"debug_fill", (PyCFunction)Lane_debug_fill, METH_VARARGS, "(tests) bulk one-page records"},
    {"move", (PyCFunction)Lane_move, METH_VARARGS,
     "move(start, gen) -> Move, or None when the record is no longer there."},
    {NULL}};

static PyGetSetDef Lane_getset[] = {
    {"eventfd", (getter)Lane_get_eventfd, NULL, "readable while jobs wait for trio", NULL},
    {"running", (getter)Lane_get_running, NULL, "reader threads still running", NULL},
    {"conn_gone", (getter)Lane_get_conn_gone, NULL, "errno that ended a reader (0: none)", NULL},
    {"closed", (getter)Lane_get_closed, NULL, "", NULL},
    {NULL}};

/* ------------------------------------------------------------------------------ Job */

static void Job_dealloc(JobObject *self)
{
    /* A job dropped without resume keeps its request unanswered (it is resent after a restart)
     * and its buffer out of the pool: only shutdown does that. */
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static job_t *job_need(JobObject *self)
{
    if (!self->j || !self->owner->l) {
        PyErr_SetString(LaneError, "the job is finished");
        return NULL;
    }
    return self->j;
}

static PyObject *Job_get_kind(JobObject *self, void *c)
{
    job_t *j = job_need(self);
    if (!j)
        return NULL;
    switch (j->state) {
    case J_READ_IO: return PyUnicode_FromString("read");
    case J_WRITE_RMW_IO: return PyUnicode_FromString("rmw");
    case J_WRITE_IO: return PyUnicode_FromString("write");
    case J_WRITE_GROW: return PyUnicode_FromString("grow");
    }
    return PyUnicode_FromString("?");
}

static PyObject *Job_get_ops(JobObject *self, void *c)
{
    job_t *j = job_need(self);
    if (!j)
        return NULL;
    PyObject *out = PyList_New(j->nio);
    if (!out)
        return NULL;
    for (int i = 0; i < j->nio; i++) {
        io_t *io = &j->io[i];
        PyObject *t = Py_BuildValue("(OiKIII)", io->write ? Py_True : Py_False, (int)io->tier,
                                    (unsigned long long)io->base, io->length, io->offset,
                                    io->life);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *Job_resume(JobObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"err", "failed_tier", NULL};
    int err = 0, failed = -1;
    job_t *j = job_need(self);
    if (!j || !PyArg_ParseTupleAndKeywords(args, kw, "|ii", kwlist, &err, &failed))
        return NULL;
    if (self->exports) {
        PyErr_SetString(LaneError, "release the job's buffer before resuming it");
        return NULL;
    }
    lane_t *l = self->owner->l;
    self->j = NULL;
    j->failed_tier = failed;
    Py_BEGIN_ALLOW_THREADS
    codec_ctx_t *ctx = borrow_ctx(l);
    io_resume(l, j, err < 0 ? -err : err, ctx);
    return_ctx(l, ctx);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int Job_getbuffer(JobObject *self, Py_buffer *view, int flags)
{
    job_t *j = job_need(self);
    if (!j) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, j->stage, (Py_ssize_t)MAX_REQ_PAGES * PAGE, 0,
                          flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Job_releasebuffer(JobObject *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs Job_as_buffer = {(getbufferproc)Job_getbuffer,
                                      (releasebufferproc)Job_releasebuffer};

static PyMethodDef Job_methods[] = {
    {"resume", (PyCFunction)(void (*)(void))Job_resume, METH_VARARGS | METH_KEYWORDS,
     "resume(err=0, failed_tier=-1): the ops are done (or failed); the lane finishes the request."},
    {NULL}};

static PyGetSetDef Job_getset[] = {
    {"kind", (getter)Job_get_kind, NULL, "read | rmw | write | grow", NULL},
    {"ops", (getter)Job_get_ops, NULL, "[(write, tier, base, length, offset, life)]", NULL},
    {NULL}};

/* ------------------------------------------------------------------------------ Move */

static void move_release(MoveObject *m)
{
    LaneObject *o = m->owner;
    lane_t *l = o->l;
    if (l && !m->done) {
        pthread_mutex_lock(&l->mu);
        for (int i = 0; i < m->npieces; i++)
            space_release(&l->tiers[m->pieces[i].tier].sp, m->pieces[i].base, m->pieces[i].nbytes);
        m->npieces = 0;
        if (m->pinned)
            space_unpin(&l->tiers[m->run.tier].sp, m->pin_gen);
        m->pinned = 0;
        pthread_mutex_unlock(&l->mu);
    }
    m->done = 1;
    if (m->slot >= 0) {
        o->move_busy[m->slot] = 0;
        m->slot = -1;
    }
}

static void Move_dealloc(MoveObject *self)
{
    move_release(self);
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static PyObject *Lane_move(LaneObject *self, PyObject *args)
{
    unsigned long long start;
    unsigned int gen;
    lane_t *l = need(self);
    if (!l || !PyArg_ParseTuple(args, "KI", &start, &gen))
        return NULL;
    int slot = -1;
    for (int s = 0; s < MOVE_SLOTS; s++)
        if (!self->move_busy[s]) {
            slot = s;
            break;
        }
    if (slot < 0) {
        PyErr_SetString(LaneError, "too many moves at once");
        return NULL;
    }
    MoveObject *m = PyObject_New(MoveObject, &MoveType);
    if (!m)
        return NULL;
    Py_INCREF(self);
    m->owner = self;
    m->slot = -1;
    m->pinned = 0;
    m->npieces = 0;
    m->exports = 0;
    m->done = 0;
    m->allocated = 0;
    m->recompressed = 0;
    m->dst = -1;
    pthread_mutex_lock(&l->mu);
    int n = map_get(&l->map, start, &m->run, m->lens);
    if (n <= 0 || m->run.start != start || m->run.gen != (uint16_t)gen
        || m->run.tier == ZERO_TIER) {
        pthread_mutex_unlock(&l->mu);
        m->done = 1;
        Py_DECREF(m);
        Py_RETURN_NONE;
    }
    m->run.lens = m->lens;
    tier_t *T = &l->tiers[m->run.tier];
    m->pin_gen = space_pin(&T->sp);
    m->pinned = 1;
    self->move_busy[slot] = 1;
    m->slot = slot;
    m->buf = self->movebuf[slot][0];
    m->alt = self->movebuf[slot][1];
    uint64_t nb = run_nbytes(&m->run);
    pthread_mutex_unlock(&l->mu);
    if (T->kind == TIER_MEMORY && nb)   /* pinned: the bytes cannot change under the copy */
        memcpy(m->buf, T->arena + m->run.base, nb);
    memcpy(m->nlens, m->lens, 2u * m->run.npages);
    m->noff[0] = 0;
    for (uint32_t i = 0; i < m->run.npages; i++)
        m->noff[i + 1] = m->noff[i] + m->nlens[i];
    m->codec = FLAGS_CODEC(m->run.flags);
    m->level = 0;
    return (PyObject *)m;
}

static MoveObject *move_need(MoveObject *m)
{
    if (m->done || !m->owner->l) {
        PyErr_SetString(LaneError, "the move is finished");
        return NULL;
    }
    return m;
}

static PyObject *Move_recompress(MoveObject *self, PyObject *args)
{
    const char *name;
    int level;
    if (!move_need(self) || !PyArg_ParseTuple(args, "si", &name, &level))
        return NULL;
    int codec = !strcmp(name, "zstd") ? CODEC_ZSTD : !strcmp(name, "lz4") ? CODEC_LZ4
                : !strcmp(name, "none") ? CODEC_NONE : -1;
    if (codec < 0) {
        PyErr_Format(PyExc_ValueError, "unknown codec %s", name);
        return NULL;
    }
    if (self->allocated || self->exports) {
        PyErr_SetString(LaneError, "recompress before allocating");
        return NULL;
    }
    lane_t *l = self->owner->l;
    int bad = 0;
    uint64_t before = self->noff[self->run.npages], after = 0;
    Py_BEGIN_ALLOW_THREADS
    /* background work: only on CPU time nothing else wants (restored below) */
    int policy = sched_getscheduler(0);
    struct sched_param sp_old, sp_idle = {0};
    sched_getparam(0, &sp_old);
    sched_setscheduler(0, SCHED_IDLE, &sp_idle);
    codec_ctx_t *ctx = borrow_ctx(l);
    uint8_t page[PAGE];
    uint32_t so = 0;
    uint16_t newlens[MAX_RUN];
    for (uint32_t i = 0; i < self->run.npages && !bad; i++) {
        uint32_t len = self->nlens[i];
        if (codec_decode_page(ctx, self->codec, self->buf + self->noff[i], len, page)) {
            bad = 1;
            break;
        }
        if (!len) {
            newlens[i] = 0;
            continue;
        }
        newlens[i] = (uint16_t)codec_compress_page(ctx, codec, level, page, self->alt + so);
        so += newlens[i];
    }
    return_ctx(l, ctx);
    after = so;
    if (!bad && after < before) {   /* keep the new form only if it is smaller */
        uint8_t *t = self->buf;
        self->buf = self->alt;
        self->alt = t;
        memcpy(self->nlens, newlens, 2u * self->run.npages);
        self->noff[0] = 0;
        for (uint32_t i = 0; i < self->run.npages; i++)
            self->noff[i + 1] = self->noff[i] + self->nlens[i];
        self->codec = codec;
        self->level = level;
    }
    if (!bad)
        self->recompressed = 1;   /* kept or not, this record has had its chance */
    sched_setscheduler(0, policy, &sp_old);
    Py_END_ALLOW_THREADS
    if (bad) {
        errno = EIO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(self->noff[self->run.npages]);
}

static PyObject *Move_allocate(MoveObject *self, PyObject *args)
{
    /* allocate(tiers): place the record's bytes in the first of `tiers` with room (no spill
     * inside one record). Returns the store writes to do, or None when none has room. */
    PyObject *seq;
    if (!move_need(self) || !PyArg_ParseTuple(args, "O", &seq))
        return NULL;
    if (self->allocated || self->exports) {
        PyErr_SetString(LaneError, "already allocated, or the buffer is in use");
        return NULL;
    }
    lane_t *l = self->owner->l;
    Py_ssize_t nt = PySequence_Size(seq);
    if (nt < 0)
        return NULL;
    int order[MAX_TIERS], no = 0;
    for (Py_ssize_t i = 0; i < nt && no < MAX_TIERS; i++) {
        PyObject *o = PySequence_GetItem(seq, i);
        long t = o ? PyLong_AsLong(o) : -1;
        Py_XDECREF(o);
        if (t < 0 || t >= l->ntiers) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_IndexError, "no tier %ld", t);
            return NULL;
        }
        order[no++] = (int)t;
    }
    uint32_t n = self->run.npages;
    int tier = -1;
    pthread_mutex_lock(&l->mu);
    for (int k = 0; k < no; k++) {
        tier_t *T = &l->tiers[order[k]];
        if (T->failed || T->offline)   /* the run's own tier is fine: cleaning moves within it */
            continue;
        uint32_t done;
        int np = space_alloc(&T->sp, (uint8_t)order[k], self->nlens, n, 0, self->pieces,
                             MAX_PIECES, &done);
        int rest = 0;
        for (uint32_t i = done; i < n; i++)
            rest |= self->nlens[i] != 0;
        if (!rest) {
            self->npieces = np;
            self->zero_from = done;
            self->allocated = 1;
            self->dst = tier = order[k];
            break;
        }
        for (int i = 0; i < np; i++)
            space_release(&T->sp, self->pieces[i].base, self->pieces[i].nbytes);
    }
    pthread_mutex_unlock(&l->mu);
    if (tier < 0)
        Py_RETURN_NONE;
    tier_t *T = &l->tiers[tier];
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    for (int i = 0; i < self->npieces; i++) {
        piece_t *p = &self->pieces[i];
        if (!p->nbytes)
            continue;
        if (T->kind == TIER_MEMORY) {
            memcpy(T->arena + p->base, self->buf + self->noff[p->a], p->nbytes);
            continue;
        }
        PyObject *t = Py_BuildValue("(iKIII)", tier, (unsigned long long)p->base, p->nbytes,
                                    self->noff[p->a], p->life);
        if (!t || PyList_Append(out, t)) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}

static PyObject *Move_commit(MoveObject *self, PyObject *unused)
{
    if (!move_need(self))
        return NULL;
    if (self->exports) {
        PyErr_SetString(LaneError, "release the move's buffer first");
        return NULL;
    }
    lane_t *l = self->owner->l;
    if (!self->allocated) {
        PyErr_SetString(LaneError, "nothing allocated");
        return NULL;
    }
    static run_t add[MAX_RUN + MAX_PIECES];
    pthread_mutex_lock(&l->mu);
    uint16_t gen = map_next_gen(&l->map);
    int nr = build_runs(self->pieces, self->npieces, self->nlens, self->noff, self->run.npages,
                        self->zero_from, self->run.start,
                        FLAGS(FMT_PAGES, self->codec)
                            | ((self->recompressed || (self->run.flags & FLAG_RECOMPRESSED))
                                   ? FLAG_RECOMPRESSED : 0),
                        self->run.epoch, gen, add);
    int rc = map_relocate(&l->map, &self->run, add, nr);
    if (rc == 1) {
        int dst = self->dst;   /* (a record of zero pages only becomes a ZERO_TIER run) */
        tier_t *D = &l->tiers[dst];
        lane_release_runs(l, &self->run, 1);
        lane_account(l, add, nr, +1);
        uint64_t moved = run_nonzero(&self->run);
        D->c.bytes_moved += self->noff[self->run.npages];
        D->c.pages_in += moved;
        if (dst < self->run.tier)
            D->c.promotions += moved;
        else
            D->c.demotions += moved;
        self->npieces = 0;   /* published: not ours to release any more */
    }
    pthread_mutex_unlock(&l->mu);
    move_release(self);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(rc == 1);
}

static PyObject *Move_abort(MoveObject *self, PyObject *unused)
{
    move_release(self);
    Py_RETURN_NONE;
}

static int Move_getbuffer(MoveObject *self, Py_buffer *view, int flags)
{
    if (!move_need(self)) {
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->buf,
                          (Py_ssize_t)self->noff[self->run.npages], 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Move_releasebuffer(MoveObject *self, Py_buffer *view) { self->exports--; }

static PyBufferProcs Move_as_buffer = {(getbufferproc)Move_getbuffer,
                                       (releasebufferproc)Move_releasebuffer};

static PyObject *Move_get_store(MoveObject *self, void *c)
{
    lane_t *l = self->owner->l;
    if (!l)
        return PyErr_Format(LaneError, "the lane is closed");
    return PyBool_FromLong(l->tiers[self->run.tier].kind == TIER_STORE);
}

static PyObject *Move_get_run(MoveObject *self, void *c) { return run_tuple(&self->run); }

static PyObject *Move_get_nbytes(MoveObject *self, void *c)
{
    return PyLong_FromUnsignedLongLong(self->noff[self->run.npages]);
}

static PyMethodDef Move_methods[] = {
    {"recompress", (PyCFunction)Move_recompress, METH_VARARGS,
     "recompress(codec, level) -> stored bytes (kept only if smaller)."},
    {"allocate", (PyCFunction)Move_allocate, METH_VARARGS,
     "allocate(tiers) -> [(tier, base, length, offset, life)] store writes to do, or None."},
    {"commit", (PyCFunction)Move_commit, METH_NOARGS,
     "Publish if the record is unchanged (compare-and-swap); True if published."},
    {"abort", (PyCFunction)Move_abort, METH_NOARGS, "Give back what the move holds."},
    {NULL}};

static PyGetSetDef Move_getset[] = {
    {"store", (getter)Move_get_store, NULL, "the source is a store: fill the buffer first", NULL},
    {"run", (getter)Move_get_run, NULL, "the source record as a run tuple", NULL},
    {"nbytes", (getter)Move_get_nbytes, NULL, "stored bytes now", NULL},
    {NULL}};

/* ------------------------------------------------------------------------------ module */

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tierswap._lane.Lane",
    .tp_basicsize = sizeof(LaneObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

static PyTypeObject JobType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tierswap._lane.Job",
    .tp_basicsize = sizeof(JobObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Job_dealloc,
    .tp_methods = Job_methods,
    .tp_getset = Job_getset,
    .tp_as_buffer = &Job_as_buffer,
};

static PyTypeObject MoveType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tierswap._lane.Move",
    .tp_basicsize = sizeof(MoveObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Move_dealloc,
    .tp_methods = Move_methods,
    .tp_getset = Move_getset,
    .tp_as_buffer = &Move_as_buffer,
};

static PyModuleDef lane_module = {PyModuleDef_HEAD_INIT, "tierswap._lane",
                                  "tierswap's native data lane (see tierswap/native/lane.h).",
                                  -1, NULL};

PyMODINIT_FUNC PyInit__lane(void)
{
    if (PyType_Ready(&LaneType) < 0 || PyType_Ready(&JobType) < 0 || PyType_Ready(&MoveType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lane_module);
    if (!m)
        return NULL;
    LaneError = PyErr_NewException("tierswap._lane.LaneError", PyExc_RuntimeError, NULL);
    Py_INCREF(&LaneType);
    PyModule_AddObject(m, "Lane", (PyObject *)&LaneType);
    PyModule_AddObject(m, "LaneError", LaneError);
    PyModule_AddIntConstant(m, "PAGE", PAGE);
    PyModule_AddIntConstant(m, "SEG_SIZE", SEG_SIZE);
    PyModule_AddIntConstant(m, "MAX_RUN", MAX_RUN);
    PyModule_AddIntConstant(m, "ZERO_TIER", ZERO_TIER);
    PyModule_AddIntConstant(m, "MAX_IO", MAX_IO);
    PyModule_AddIntConstant(m, "FLAG_RECOMPRESSED", FLAG_RECOMPRESSED);
    PyModule_AddIntConstant(m, "REQ_BUF", REQ_BUF);
    return m;
}
