/* The lane's FUSE side: reader threads, request dispatch, the file's metadata, the job pool.
 *
 * Each thread blocks in read() on its own /dev/fuse fd (cloned from the session fd with
 * FUSE_DEV_IOC_CLONE by the caller), so the kernel hands every request to exactly one waiting
 * thread, and the reply goes back on the fd that read it, as FUSE requires. A thread holds one
 * job from the pool while it waits: the request is read straight into that job's buffer, and
 * the reply is built in the same buffer. A job that needs a slow tier leaves with trio and the
 * thread takes another from the pool; with the pool empty the thread waits for one to come back
 * instead of reading more requests, so the work in flight is bounded by the pool.
 *
 * After INIT (answered by pyfuse3 before the lane starts) the kernel sends, for our one file:
 * LOOKUP, GETATTR, SETATTR, OPEN/RELEASE, FLUSH, FSYNC, READ, WRITE, FALLOCATE, STATFS, the
 * directory calls, FORGET and INTERRUPT. Everything else gets ENOSYS, which the kernel
 * remembers for the calls where that matters (xattrs, lseek). Requests are never trusted for
 * sizes: a malformed one is answered with EINVAL, never followed out of the buffer.
 */
#include "lane.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#ifndef FUSE_NOTIFY_RESEND
#define FUSE_NOTIFY_RESEND 7
#endif

#define ROOT_INO 1
#define FILE_INO 2
static const char FILE_NAME[] = "swap.img";

uint32_t lane_epoch(lane_t *l)
{
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    (void)l;
    return (uint32_t)ts.tv_sec;
}

/* ------------------------------------------------------------------------------ jobs */

job_t *job_get(lane_t *l, int wait)
{
    pthread_mutex_lock(&l->qmu);
    while (!l->pool) {
        if (!wait || l->stopping) {
            pthread_mutex_unlock(&l->qmu);
            return NULL;
        }
        l->c.pool_waits++;
        pthread_cond_wait(&l->qcond, &l->qmu);
    }
    job_t *j = l->pool;
    l->pool = j->next;
    j->next = NULL;
    pthread_mutex_unlock(&l->qmu);
    return j;
}

void job_put(lane_t *l, job_t *j)
{
    pthread_mutex_lock(&l->qmu);
    j->state = J_FREE;
    j->next = l->pool;
    l->pool = j;
    pthread_cond_signal(&l->qcond);
    pthread_mutex_unlock(&l->qmu);
}

void lane_queue(lane_t *l, job_t *j)
{
    pthread_mutex_lock(&l->qmu);
    j->next = NULL;
    j->in_queue = 1;
    if (l->qtail)
        l->qtail->next = j;
    else
        l->qhead = j;
    l->qtail = j;
    l->qlen++;
    pthread_mutex_unlock(&l->qmu);
    uint64_t one = 1;
    if (write(l->efd, &one, sizeof one) < 0) { /* the counter cannot overflow in practice */ }
}

/* ------------------------------------------------------------------------------ metadata */

static void fill_attr(lane_t *l, uint64_t ino, struct fuse_attr *a)
{
    memset(a, 0, sizeof *a);
    a->ino = ino;
    a->uid = l->uid;
    a->gid = l->gid;
    a->atime = a->mtime = a->ctime = l->mtime_ns / 1000000000ull;
    a->atimensec = a->mtimensec = a->ctimensec = (uint32_t)(l->mtime_ns % 1000000000ull);
    a->blksize = PAGE;
    if (ino == ROOT_INO) {
        a->mode = 0040700;
        a->nlink = 2;
    } else {
        a->mode = 0100600;
        a->nlink = 1;
        a->size = l->size;
        uint64_t stored = 0;
        for (int t = 0; t < l->ntiers; t++)   /* unlocked read: an estimate is all st_blocks is */
            stored += (uint64_t)l->tiers[t].sp.live_total;
        a->blocks = stored / 512;
    }
}

static void reply_entry(lane_t *l, job_t *j, uint64_t ino)
{
    struct fuse_entry_out e;
    memset(&e, 0, sizeof e);
    e.nodeid = ino;
    e.entry_valid = e.attr_valid = 3600;
    fill_attr(l, ino, &e.attr);
    io_reply(l, j, 0, &e, sizeof e);
}

static void reply_attr(lane_t *l, job_t *j, uint64_t ino)
{
    struct fuse_attr_out a;
    memset(&a, 0, sizeof a);
    a.attr_valid = 3600;
    fill_attr(l, ino, &a.attr);
    io_reply(l, j, 0, &a, sizeof a);
}

static void reply_open(lane_t *l, job_t *j, uint64_t fh, uint32_t flags)
{
    struct fuse_open_out o;
    memset(&o, 0, sizeof o);
    o.fh = fh;
    o.open_flags = flags;
    io_reply(l, j, 0, &o, sizeof o);
}

static void reply_readdir(lane_t *l, job_t *j, const struct fuse_read_in *in, int plus)
{
    uint64_t out[64];   /* 8-byte aligned room for one entry */
    size_t len = 0, namelen = sizeof FILE_NAME - 1;
    memset(out, 0, sizeof out);
    if (in->offset == 0) {
        struct fuse_dirent *d = (struct fuse_dirent *)out;
        if (plus) {
            struct fuse_direntplus *dp = (struct fuse_direntplus *)out;
            dp->entry_out.nodeid = FILE_INO;
            dp->entry_out.entry_valid = dp->entry_out.attr_valid = 3600;
            fill_attr(l, FILE_INO, &dp->entry_out.attr);
            d = &dp->dirent;
        }
        d->ino = FILE_INO;
        d->off = 1;
        d->namelen = (uint32_t)namelen;
        d->type = 8;   /* DT_REG */
        memcpy(d->name, FILE_NAME, namelen);
        len = plus ? FUSE_DIRENTPLUS_SIZE((struct fuse_direntplus *)out) : FUSE_DIRENT_SIZE(d);
        if (len > in->size)
            len = 0;
    }
    io_reply(l, j, 0, out, len);
}

static void reply_statfs(lane_t *l, job_t *j)
{
    struct fuse_statfs_out s;
    memset(&s, 0, sizeof s);
    uint64_t stored = 0;
    for (int t = 0; t < l->ntiers; t++)
        stored += l->tiers[t].c.pages;
    s.st.bsize = s.st.frsize = PAGE;
    s.st.blocks = l->size / PAGE;
    s.st.bfree = s.st.bavail = s.st.blocks > stored ? s.st.blocks - stored : 0;
    s.st.namelen = 255;
    io_reply(l, j, 0, &s, sizeof s);
}

/* ------------------------------------------------------------------------------ dispatch */

#define ARG(type) ((const type *)(j->buf + sizeof(struct fuse_in_header)))
#define NEED(type) do { if (arglen < sizeof(type)) { io_reply(l, j, EINVAL, NULL, 0); return; } } while (0)

static void dispatch(lane_t *l, job_t *j, size_t n, codec_ctx_t *ctx)
{
    const struct fuse_in_header *h = (const struct fuse_in_header *)j->buf;
    j->unique = h->unique;
    j->opcode = h->opcode;
    j->attempts = 0;
    j->discard = 0;
    j->avoid = 0;
    j->failed_tier = -1;
    j->nedge = 0;
    j->pinned = 0;
    j->npieces = 0;
    j->nio = 0;
    if (h->len != n || n < sizeof *h) {
        io_reply(l, j, EINVAL, NULL, 0);
        return;
    }
    size_t arglen = n - sizeof *h;
    uint64_t ino = h->nodeid;
    switch (h->opcode) {
    case FUSE_READ: {
        NEED(struct fuse_read_in);
        const struct fuse_read_in *in = ARG(struct fuse_read_in);
        if (ino != FILE_INO) {
            io_reply(l, j, ino == ROOT_INO ? EISDIR : EBADF, NULL, 0);
            return;
        }
        if (in->size > MAX_IO) {
            io_reply(l, j, EINVAL, NULL, 0);
            return;
        }
        j->off = in->offset;
        j->size = in->offset >= l->size ? 0
                  : (in->size < l->size - in->offset ? in->size : (uint32_t)(l->size - in->offset));
        io_read(l, j, ctx);
        return;
    }
    case FUSE_WRITE: {
        NEED(struct fuse_write_in);
        const struct fuse_write_in *in = ARG(struct fuse_write_in);
        if (ino != FILE_INO) {
            io_reply(l, j, ino == ROOT_INO ? EISDIR : EBADF, NULL, 0);
            return;
        }
        if (in->size > MAX_IO || arglen < sizeof *in + in->size) {
            io_reply(l, j, EINVAL, NULL, 0);
            return;
        }
        if (in->offset > l->size || in->size > l->size - in->offset) {
            io_reply(l, j, EFBIG, NULL, 0);
            return;
        }
        j->off = in->offset;
        j->size = in->size;
        j->data = j->buf + sizeof *h + sizeof *in;
        io_write(l, j, ctx);
        return;
    }
    case FUSE_FALLOCATE: {
        NEED(struct fuse_fallocate_in);
        const struct fuse_fallocate_in *in = ARG(struct fuse_fallocate_in);
        const uint32_t punch = 0x02 | 0x01, zero_range = 0x10 | 0x01;  /* with KEEP_SIZE */
        if (ino != FILE_INO) {
            io_reply(l, j, EBADF, NULL, 0);
            return;
        }
        if (in->mode == punch || in->mode == zero_range) {
            uint64_t off = in->offset, len = in->length;
            if (off >= l->size || !len) {
                io_reply(l, j, 0, NULL, 0);   /* beyond the end: nothing to punch */
                return;
            }
            if (len > l->size - off)
                len = l->size - off;
            j->doff = off;
            j->dlen = len;
            io_discard(l, j, ctx);
            return;
        }
        if (in->mode == 0 || in->mode == 0x01) {   /* allocate: storage is thin, nothing to do */
            int ok = in->offset <= l->size && in->length <= l->size - in->offset;
            io_reply(l, j, ok ? 0 : EFBIG, NULL, 0);
            return;
        }
        io_reply(l, j, EOPNOTSUPP, NULL, 0);
        return;
    }
    case FUSE_LOOKUP: {
        const char *name = (const char *)ARG(char);
        size_t room = arglen;
        if (ino == ROOT_INO && room >= sizeof FILE_NAME && memcmp(name, FILE_NAME, sizeof FILE_NAME) == 0)
            reply_entry(l, j, FILE_INO);
        else
            io_reply(l, j, ENOENT, NULL, 0);
        break;
    }
    case FUSE_GETATTR:
        if (ino == ROOT_INO || ino == FILE_INO)
            reply_attr(l, j, ino);
        else
            io_reply(l, j, ENOENT, NULL, 0);
        break;
    case FUSE_SETATTR: {
        NEED(struct fuse_setattr_in);
        const struct fuse_setattr_in *in = ARG(struct fuse_setattr_in);
        if (ino != ROOT_INO && ino != FILE_INO) {
            io_reply(l, j, ENOENT, NULL, 0);
        } else if ((in->valid & (FATTR_MODE | FATTR_UID | FATTR_GID))
                   || ((in->valid & FATTR_SIZE) && (ino != FILE_INO || in->size != l->size))) {
            io_reply(l, j, EPERM, NULL, 0);   /* the device has a fixed size and owner */
        } else {
            reply_attr(l, j, ino);            /* times and no-op sizes: accepted */
        }
        break;
    }
    case FUSE_OPEN: {
        NEED(struct fuse_open_in);
        const struct fuse_open_in *in = ARG(struct fuse_open_in);
        if (ino == ROOT_INO)
            io_reply(l, j, EISDIR, NULL, 0);
        else if (ino != FILE_INO)
            io_reply(l, j, ENOENT, NULL, 0);
        else if (in->flags & (O_TRUNC | O_APPEND))
            io_reply(l, j, EPERM, NULL, 0);
        else   /* no page cache of ours; the loop device's writes run in parallel */
            reply_open(l, j, FILE_INO, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES);
        break;
    }
    case FUSE_OPENDIR:
        if (ino == ROOT_INO)
            reply_open(l, j, ROOT_INO, 0);
        else
            io_reply(l, j, ENOTDIR, NULL, 0);
        break;
    case FUSE_READDIR:
    case FUSE_READDIRPLUS:
        NEED(struct fuse_read_in);
        if (ino != ROOT_INO)
            io_reply(l, j, ENOTDIR, NULL, 0);
        else
            reply_readdir(l, j, ARG(struct fuse_read_in), h->opcode == FUSE_READDIRPLUS);
        break;
    case FUSE_STATFS:
        reply_statfs(l, j);
        break;
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_FLUSH:
    case FUSE_FSYNC:       /* swap contents need not survive a host crash */
    case FUSE_FSYNCDIR:
    case FUSE_ACCESS:
    case FUSE_DESTROY:
        io_reply(l, j, 0, NULL, 0);
        break;
    case FUSE_FORGET:
    case FUSE_BATCH_FORGET:
    case FUSE_INTERRUPT:   /* nothing we do can be interrupted, and none of these is answered */
        job_put(l, j);
        break;
    default:
        io_reply(l, j, ENOSYS, NULL, 0);
    }
    __atomic_fetch_add(&l->c.other_ops, 1, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------------------ threads */

typedef struct {
    lane_t *l;
    int t;
} targ_t;

static targ_t targs[MAX_THREADS];
static int wake_signal;

static void on_wake(int sig) { (void)sig; }

static void *thread_main(void *arg)
{
    targ_t *ta = arg;
    lane_t *l = ta->l;
    int t = ta->t;
    /* Process-directed signals (SIGTERM, SIGINT) belong to the Python main thread. */
    sigset_t all;
    sigfillset(&all);
    sigdelset(&all, wake_signal);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    /* Touch the stack now, so that a request never faults in (and allocates) stack memory. */
    volatile uint8_t touch[64 * 1024];
    memset((void *)touch, 0, sizeof touch);
    codec_ctx_t *ctx = l->tctx[t];
    while (!l->stopping) {
        job_t *j = job_get(l, 1);
        if (!j)
            break;
        ssize_t n = read(l->fds[t], j->buf, REQ_BUF);
        if (n < 0) {
            int e = errno;
            job_put(l, j);
            if (e == EINTR || e == EAGAIN || e == ENOENT)
                continue;
            l->conn_gone = e;   /* ENODEV: unmounted or aborted */
            break;
        }
        if (n == 0) {           /* EOF: the other end of a test socket went away */
            job_put(l, j);
            l->conn_gone = -1;
            break;
        }
        j->thread = t;
        dispatch(l, j, (size_t)n, ctx);
    }
    __atomic_fetch_sub(&l->running, 1, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    if (write(l->efd, &one, sizeof one) < 0) { /* trio looks at `running` when woken */ }
    return NULL;
}

int lane_start_threads(lane_t *l)
{
    if (!wake_signal) {
        wake_signal = SIGRTMIN + 4;
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_wake;   /* no SA_RESTART: a blocked read() returns EINTR */
        sigemptyset(&sa.sa_mask);
        if (sigaction(wake_signal, &sa, NULL))
            return -errno;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    l->stopping = 0;
    for (int t = 0; t < l->nthreads; t++) {
        targs[t].l = l;
        targs[t].t = t;
        __atomic_fetch_add(&l->running, 1, __ATOMIC_SEQ_CST);
        int rc = pthread_create(&l->threads[t], &attr, thread_main, &targs[t]);
        if (rc) {
            __atomic_fetch_sub(&l->running, 1, __ATOMIC_SEQ_CST);
            l->nthreads = t;
            pthread_attr_destroy(&attr);
            lane_stop_threads(l);
            return -rc;
        }
    }
    pthread_attr_destroy(&attr);
    l->started = 1;
    return 0;
}

void lane_stop_threads(lane_t *l)
{
    l->stopping = 1;
    pthread_mutex_lock(&l->qmu);
    pthread_cond_broadcast(&l->qcond);
    pthread_mutex_unlock(&l->qmu);
    for (int t = 0; t < l->nthreads; t++) {
        /* A thread may enter read() just after the signal: keep waking it until it is gone. */
        for (;;) {
            pthread_kill(l->threads[t], wake_signal);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 20 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            if (pthread_timedjoin_np(l->threads[t], NULL, &ts) == 0)
                break;
        }
    }
    l->nthreads = 0;
    l->started = 0;
}

int lane_send_resend(lane_t *l)
{
    struct fuse_out_header h = {.len = sizeof h, .error = FUSE_NOTIFY_RESEND, .unique = 0};
    ssize_t n = write(l->fds[0], &h, sizeof h);
    return n == (ssize_t)sizeof h ? 0 : -errno;
}
