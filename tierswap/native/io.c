/* Where a page goes: the lane's read, write and discard, as small state machines.
 *
 * write:   cut into pages -> partial pages at the edges: read-modify-write (below)
 *          -> zero pages: map only -> the others compressed one by one (outside the lock)
 *          -> place(): the first tier with room, the rest spills to the next (under the lock)
 *          -> copy into RAM arenas (outside the lock; the space is private until published)
 *          -> slow tiers: hand the job to trio, which writes the pieces and resumes it
 *          -> publish(): one LMDB transaction replaces the range; the replaced pages' space is
 *             released; reply.
 * read:    map lookup and pins (under the lock) -> slow runs: trio reads their bytes into the
 *          job's stage -> decode every page straight into the reply (outside the lock).
 * discard: whole pages leave the map; partial edges are written as zeros.
 *
 * Invariants (each relies on lane->mu, held for the marked steps only):
 *  1. Pin before use. Bytes of a tier are used outside the lock only under a pin taken in the
 *     same critical section as the lookup that found them (space.c): their segment cannot be
 *     reused while pinned, so a decode outside the lock never reads bytes of another page.
 *  2. Allocate, fill, publish. A write's space is allocated and counted live under the lock,
 *     filled outside it (nobody else can reach it: it is in no map record), and published in
 *     one map transaction together with releasing the space of what it replaced. Any failure
 *     before publishing releases the allocation.
 *  3. Read-modify-write publishes conditionally. A write that does not cover its edge pages
 *     completely records what the map said about each edge page (tier, address, length,
 *     generation) when it read it, and publishes only if the map still says exactly that;
 *     otherwise it starts over. Because the edge pages are pinned, an unchanged identity means
 *     unchanged bytes, so no partial write is ever lost to a concurrent write of the same page.
 *     Writes that cover whole pages publish unconditionally: any order of two of them is a
 *     valid order of a block device.
 *  4. Moves (module.c) publish with the same compare-and-swap on the whole record.
 *  5. A tier whose write fails is avoided for that request (its pages are placed in the next
 *     tier); after three consecutive failures the tier is marked failed and takes no new pages.
 */
#include "lane.h"

#include <errno.h>
#include <linux/fuse.h>
#include <string.h>
#include <unistd.h>

#define FAILED_AFTER 3        /* consecutive write errors that mark a tier failed */
#define RMW_ATTEMPTS 1000     /* conflicts a partial write may meet before it gives up (EIO) */

static const uint8_t zero_pages[2 * PAGE];

static int is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    for (unsigned i = 0; i < PAGE / 8; i += 8) {
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    }
    return 1;
}

uint64_t run_nonzero(const run_t *r)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < r->npages; i++)
        n += r->lens[i] != 0;
    return n;
}

/* The ledger: the only writer of the per-tier page counts (under lane->mu). */
void lane_account(lane_t *l, const run_t *runs, int n, int sign)
{
    for (int i = 0; i < n; i++) {
        const run_t *r = &runs[i];
        if (r->tier == ZERO_TIER) {
            l->c.zero_pages += (uint64_t)(sign * (int64_t)r->npages);
            continue;
        }
        uint64_t nz = run_nonzero(r);
        tier_t *t = &l->tiers[r->tier];
        t->c.pages += (uint64_t)(sign * (int64_t)nz);
        t->c.zero_pages += (uint64_t)(sign * (int64_t)(r->npages - nz));
    }
}

void lane_release_runs(lane_t *l, const run_t *runs, int n)
{
    lane_account(l, runs, n, -1);
    for (int i = 0; i < n; i++) {
        if (runs[i].tier == ZERO_TIER)
            continue;
        uint64_t nb = run_nbytes(&runs[i]);
        if (nb)
            space_release(&l->tiers[runs[i].tier].sp, runs[i].base, nb);
    }
}

static void pin(lane_t *l, job_t *j, int t)
{
    if (j->pinned & (1u << t))
        return;
    j->pin_gen[t] = space_pin(&l->tiers[t].sp);
    j->pinned |= 1u << t;
}

static void unpin_all(lane_t *l, job_t *j)
{
    for (int t = 0; t < l->ntiers; t++)
        if (j->pinned & (1u << t))
            space_unpin(&l->tiers[t].sp, j->pin_gen[t]);
    j->pinned = 0;
}

static void release_pieces(lane_t *l, job_t *j)
{
    for (int i = 0; i < j->npieces; i++)
        space_release(&l->tiers[j->pieces[i].tier].sp, j->pieces[i].base, j->pieces[i].nbytes);
    j->npieces = 0;
}

void io_reply(lane_t *l, job_t *j, int err, const void *data, size_t len)
{
    struct fuse_out_header *h = (struct fuse_out_header *)j->buf;
    uint8_t *payload = j->buf + sizeof *h;
    if (err)
        len = 0;
    if (len && data != payload)
        memmove(payload, data, len);
    h->len = (uint32_t)(sizeof *h + len);
    h->error = -err;
    h->unique = j->unique;
    ssize_t n;
    do
        n = write(l->fds[j->thread], j->buf, h->len);
    while (n < 0 && errno == EINTR);
    /* n < 0 with ENOENT: the request was interrupted or the connection aborted; nothing to do. */
    job_put(l, j);
}

/* ------------------------------------------------------------------------------ read */

static void emit(job_t *j, uint64_t page, const uint8_t *src)
{
    /* copy the part of `page` (a decoded page, or NULL for zeros) that the read covers */
    uint64_t ps = page * PAGE, pe = ps + PAGE, rs = j->off, re = j->off + j->size;
    uint64_t a = ps > rs ? ps : rs, b = pe < re ? pe : re;
    uint8_t *out = j->buf + sizeof(struct fuse_out_header) + (a - rs);
    if (src)
        memcpy(out, src + (a - ps), b - a);
    else
        memset(out, 0, b - a);
}

static int page_inside(const job_t *j, uint64_t page)
{
    return page * PAGE >= j->off && page * PAGE + PAGE <= j->off + j->size;
}

static void read_finish(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint8_t *out = j->buf + sizeof(struct fuse_out_header);
    int err = 0, k = 0;
    uint64_t p = j->first;
    for (int i = 0; i <= j->nruns; i++) {
        const run_t *r = i < j->nruns ? &j->runs[i] : NULL;
        uint64_t upto = r ? r->start : j->last;
        for (; p < upto; p++)
            emit(j, p, NULL);
        if (!r)
            break;
        const uint8_t *src = NULL;
        if (r->tier != ZERO_TIER) {
            tier_t *t = &l->tiers[r->tier];
            if (t->kind == TIER_MEMORY)
                src = t->arena + r->base;
            else if (run_nbytes(r))
                src = j->stage + j->io[k++].offset;
        }
        int codec = FLAGS_CODEC(r->flags);
        for (uint32_t q = 0; q < r->npages; q++, p++) {
            uint32_t len = r->lens[q];
            if (!src || !len) {
                emit(j, p, NULL);
                continue;
            }
            if (page_inside(j, p)) {
                if (codec_decode_page(ctx, codec, src, len, out + (p * PAGE - j->off)))
                    err = EIO;
            } else {
                if (codec_decode_page(ctx, codec, src, len, j->edges))
                    err = EIO;
                emit(j, p, j->edges);
            }
            src += len;
        }
    }
    pthread_mutex_lock(&l->mu);
    unpin_all(l, j);
    if (err) {
        l->c.corrupt++;
        l->c.read_errors++;
    }
    pthread_mutex_unlock(&l->mu);
    io_reply(l, j, err, out, j->size);
}

void io_read(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    j->first = j->off / PAGE;
    j->last = (j->off + j->size + PAGE - 1) / PAGE;
    j->nio = 0;
    j->pinned = 0;
    uint32_t stage = 0;
    pthread_mutex_lock(&l->mu);
    l->c.reads++;
    if (!j->size) {
        pthread_mutex_unlock(&l->mu);
        io_reply(l, j, 0, NULL, 0);
        return;
    }
    int n = map_lookup(&l->map, j->first, j->last, j->runs, MAX_REQ_RUNS, j->runlens);
    if (n < 0) {
        l->c.read_errors++;
        pthread_mutex_unlock(&l->mu);
        io_reply(l, j, -n, NULL, 0);
        return;
    }
    j->nruns = n;
    for (int i = 0; i < n; i++) {
        const run_t *r = &j->runs[i];
        if (r->tier == ZERO_TIER)
            continue;
        tier_t *t = &l->tiers[r->tier];
        t->c.pages_out += run_nonzero(r);
        uint64_t nb = run_nbytes(r);
        if (!nb)
            continue;
        pin(l, j, r->tier);
        if (t->kind == TIER_STORE) {
            io_t *io = &j->io[j->nio++];
            io->write = 0;
            io->tier = r->tier;
            io->base = r->base;
            io->length = (uint32_t)nb;
            io->offset = stage;
            io->life = 0;
            stage += (uint32_t)nb;
            uint32_t at = (l->recent_head + l->recent_count) % RECENT;
            l->recent[at].start = r->key;
            l->recent[at].gen = r->gen;
            l->recent[at].tier = r->tier;
            if (l->recent_count < RECENT)
                l->recent_count++;
            else
                l->recent_head = (l->recent_head + 1) % RECENT;
        }
    }
    if (j->nio)
        l->c.forwarded++;
    else
        l->c.native++;
    pthread_mutex_unlock(&l->mu);
    if (j->nio) {
        j->state = J_READ_IO;
        lane_queue(l, j);
        return;
    }
    read_finish(l, j, ctx);
}

/* ------------------------------------------------------------------------------ write */

static int place(lane_t *l, job_t *j, codec_ctx_t *ctx);
static int publish(lane_t *l, job_t *j, codec_ctx_t *ctx);
static void discard_next(lane_t *l, job_t *j, codec_ctx_t *ctx);

static void fail(lane_t *l, job_t *j, int err)
{
    pthread_mutex_lock(&l->mu);
    release_pieces(l, j);
    unpin_all(l, j);
    l->c.write_errors++;
    if (err == ENOSPC)
        l->c.enospc++;
    pthread_mutex_unlock(&l->mu);
    io_reply(l, j, err, NULL, 0);
}

static const uint8_t *page_src(const job_t *j, uint32_t i)
{
    uint64_t p = j->first + i;
    for (int e = 0; e < j->nedge; e++)
        if (j->edge_page[e] == p)
            return j->edges + (size_t)e * PAGE;
    return j->data + (p * PAGE - j->off);
}

/* What the map says about one page, in the terms read-modify-write compares. */
static void page_identity(const run_t *r, int n, uint8_t *tier, uint64_t *addr, uint16_t *len,
                          uint16_t *gen)
{
    if (n <= 0 || r->tier == ZERO_TIER || r->lens[0] == 0) {
        *tier = ZERO_TIER;
        *addr = 0;
        *len = 0;
        *gen = 0;
        return;
    }
    *tier = r->tier;
    *addr = r->base;
    *len = r->lens[0];
    *gen = r->gen;
}

static int compress_place(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint32_t n = (uint32_t)(j->last - j->first), so = 0;
    /* compress with the codec of the first tier that can take pages now */
    pthread_mutex_lock(&l->mu);
    j->codec = CODEC_NONE;
    j->level = 0;
    for (int t = 0; t < l->ntiers; t++) {
        tier_t *T = &l->tiers[t];
        if (T->failed || T->offline || T->sp.draining || (j->avoid & (1u << t)))
            continue;
        if (space_free_bytes(&T->sp) || (T->kind == TIER_MEMORY && T->sp.available < T->sp.nseg)
            || t == l->ntiers - 1) {
            j->codec = T->codec;
            j->level = T->level;
            break;
        }
    }
    pthread_mutex_unlock(&l->mu);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *src = page_src(j, i);
        j->stage_off[i] = so;
        if (is_zero(src)) {
            j->lens[i] = 0;
            continue;
        }
        j->lens[i] = (uint16_t)codec_compress_page(ctx, j->codec, j->level, src, j->stage + so);
        so += j->lens[i];
    }
    j->stage_off[n] = so;
    return place(l, j, ctx);
}

static int rmw_finish(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    int k = 0;
    for (int e = 0; e < j->nedge; e++) {
        uint8_t *dst = j->edges + (size_t)e * PAGE;
        if (j->edge_tier[e] == ZERO_TIER) {
            memset(dst, 0, PAGE);
        } else {
            tier_t *t = &l->tiers[j->edge_tier[e]];
            const uint8_t *src = t->kind == TIER_MEMORY ? t->arena + j->edge_addr[e]
                                                        : j->stage + j->io[k++].offset;
            if (codec_decode_page(ctx, FLAGS_CODEC(j->runs[e].flags), src, j->edge_len[e], dst)) {
                pthread_mutex_lock(&l->mu);
                l->c.corrupt++;
                pthread_mutex_unlock(&l->mu);
                fail(l, j, EIO);
                return 0;
            }
        }
        /* merge the bytes the request brings for this page */
        uint64_t ps = j->edge_page[e] * PAGE, pe = ps + PAGE;
        uint64_t a = ps > j->off ? ps : j->off, b = pe < j->off + j->size ? pe : j->off + j->size;
        memcpy(dst + (a - ps), j->data + (a - j->off), b - a);
    }
    return compress_place(l, j, ctx);
}

static int rmw_begin(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint64_t head = j->off % PAGE, tail = (j->off + j->size) % PAGE;
    int ne = 0;
    if (head)
        j->edge_page[ne++] = j->first;
    if (tail && !(ne && j->edge_page[0] == j->last - 1))
        j->edge_page[ne++] = j->last - 1;
    j->nedge = ne;
    j->nio = 0;
    uint32_t stage = 0;
    pthread_mutex_lock(&l->mu);
    if (!j->attempts)
        l->c.rmw++;
    for (int e = 0; e < ne; e++) {
        int n = map_lookup(&l->map, j->edge_page[e], j->edge_page[e] + 1, &j->runs[e], 1,
                           &j->runlens[e]);
        if (n < 0) {
            pthread_mutex_unlock(&l->mu);
            fail(l, j, -n);
            return 0;
        }
        page_identity(&j->runs[e], n, &j->edge_tier[e], &j->edge_addr[e], &j->edge_len[e],
                      &j->edge_gen[e]);
        if (j->edge_tier[e] == ZERO_TIER)
            continue;
        pin(l, j, j->edge_tier[e]);
        if (l->tiers[j->edge_tier[e]].kind == TIER_STORE) {
            io_t *io = &j->io[j->nio++];
            io->write = 0;
            io->tier = j->edge_tier[e];
            io->base = j->edge_addr[e];
            io->length = j->edge_len[e];
            io->offset = stage;
            io->life = 0;
            stage += j->edge_len[e];
        }
    }
    pthread_mutex_unlock(&l->mu);
    if (j->nio) {
        j->state = J_WRITE_RMW_IO;
        lane_queue(l, j);
        return 0;
    }
    return rmw_finish(l, j, ctx);
}

static int write_once(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    j->first = j->off / PAGE;
    j->last = (j->off + j->size + PAGE - 1) / PAGE;
    j->nio = 0;
    j->npieces = 0;
    j->nedge = 0;
    j->grew = 0;
    if (!j->discard && !j->attempts) {
        pthread_mutex_lock(&l->mu);
        l->c.writes++;
        pthread_mutex_unlock(&l->mu);
    }
    if (!j->size) {   /* a WRITE reply always carries fuse_write_out, even for 0 bytes */
        struct fuse_write_out wo = {.size = 0};
        io_reply(l, j, 0, &wo, sizeof wo);
        return 0;
    }
    if (j->off % PAGE || (j->off + j->size) % PAGE)
        return rmw_begin(l, j, ctx);
    return compress_place(l, j, ctx);
}

/* Every stage of a write returns 1 when publish met a conflict (the write must start over)
 * and 0 when the job left our hands (replied, failed, or handed to trio): after 0, the job
 * is not touched again. Starting over is this loop, never a recursion. */
void io_write(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    while (write_once(l, j, ctx)) {
    }
}

static int nonzero_from(const job_t *j, uint32_t a, uint32_t n)
{
    for (uint32_t i = a; i < n; i++)
        if (j->lens[i])
            return 1;
    return 0;
}

static int place(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint32_t n = (uint32_t)(j->last - j->first), a = 0;
    pthread_mutex_lock(&l->mu);
    j->npieces = 0;
    for (int t = 0; t < l->ntiers && a < n; t++) {
        tier_t *T = &l->tiers[t];
        if (!nonzero_from(j, a, n))
            break;
        if (T->failed || T->offline || (j->avoid & (1u << t)))
            continue;
        uint32_t done;
        int np = space_alloc(&T->sp, (uint8_t)t, j->lens, n, a, j->pieces + j->npieces,
                             MAX_PIECES - j->npieces, &done);
        j->npieces += np;
        a = done;
        if (T->kind == TIER_MEMORY && T->sp.available < T->sp.nseg
            && space_free_bytes(&T->sp) < T->grow_below && !(l->want_grow & (1u << t))) {
            l->want_grow |= 1u << t;
            T->c.grow_requests++;
            uint64_t one = 1;
            if (write(l->efd, &one, sizeof one) < 0) { /* a wake-up is only a hint */ }
        }
    }
    if (nonzero_from(j, a, n)) {
        release_pieces(l, j);
        int can_grow = 0;
        for (int t = 0; t < l->ntiers; t++) {
            tier_t *T = &l->tiers[t];
            if (T->kind == TIER_MEMORY && !T->failed && !T->sp.draining
                && T->sp.available < T->sp.nseg && !(j->avoid & (1u << t)))
                can_grow = 1;
        }
        int err = j->avoid ? EIO : ENOSPC;
        if (can_grow && !j->grew) {
            j->grew = 1;
            l->c.forwarded++;
            pthread_mutex_unlock(&l->mu);
            j->state = J_WRITE_GROW;
            lane_queue(l, j);
            return 0;
        }
        pthread_mutex_unlock(&l->mu);
        fail(l, j, err);
        return 0;
    }
    j->zero_from = a;
    pthread_mutex_unlock(&l->mu);

    j->nio = 0;
    for (int i = 0; i < j->npieces; i++) {
        piece_t *p = &j->pieces[i];
        tier_t *T = &l->tiers[p->tier];
        if (!p->nbytes)
            continue;
        if (T->kind == TIER_MEMORY) {
            memcpy(T->arena + p->base, j->stage + j->stage_off[p->a], p->nbytes);
        } else {
            io_t *io = &j->io[j->nio++];
            io->write = 1;
            io->tier = p->tier;
            io->base = p->base;
            io->length = p->nbytes;
            io->offset = j->stage_off[p->a];
            io->life = p->life;
        }
    }
    if (j->nio) {
        pthread_mutex_lock(&l->mu);
        l->c.forwarded++;
        pthread_mutex_unlock(&l->mu);
        j->state = J_WRITE_IO;
        lane_queue(l, j);
        return 0;
    }
    return publish(l, j, ctx);
}

/* The map records for a placement: one per piece (cut at MAX_RUN), zero pages without room as
 * ZERO_TIER runs. `off[i]` is page i's offset in the placed bytes. Returns the count. */
int build_runs(const piece_t *pieces, int npieces, const uint16_t *lens, const uint32_t *off,
               uint32_t n, uint32_t zero_from, uint64_t first, uint8_t flags, uint32_t epoch,
               uint16_t gen, run_t *out)
{
    int nr = 0;
    for (int i = 0; i < npieces; i++) {
        const piece_t *p = &pieces[i];
        uint64_t base = p->base;
        for (uint32_t a = p->a; a < p->b; a += MAX_RUN) {
            uint32_t b = a + MAX_RUN < p->b ? a + MAX_RUN : p->b;
            run_t *r = &out[nr++];
            r->start = r->key = first + a;
            r->npages = (uint16_t)(b - a);
            r->lens = lens + a;
            r->epoch = epoch;
            r->gen = gen;
            if (p->nbytes) {
                r->tier = p->tier;
                r->base = base;
                r->flags = flags;
                base += off[b] - off[a];
            } else {
                r->tier = ZERO_TIER;
                r->base = 0;
                r->flags = 0;
            }
        }
    }
    for (uint32_t a = zero_from; a < n; a += MAX_RUN) {
        uint32_t b = a + MAX_RUN < n ? a + MAX_RUN : n;
        run_t *r = &out[nr++];
        r->start = r->key = first + a;
        r->npages = (uint16_t)(b - a);
        r->lens = lens + a;
        r->epoch = epoch;
        r->gen = gen;
        r->tier = ZERO_TIER;
        r->base = 0;
        r->flags = 0;
    }
    return nr;
}

static int edges_unchanged(lane_t *l, job_t *j)
{
    for (int e = 0; e < j->nedge; e++) {
        run_t r;
        uint16_t lens[1];
        int n = map_lookup(&l->map, j->edge_page[e], j->edge_page[e] + 1, &r, 1, lens);
        uint8_t tier;
        uint64_t addr;
        uint16_t len, gen;
        page_identity(&r, n, &tier, &addr, &len, &gen);
        if (n < 0 || tier != j->edge_tier[e] || addr != j->edge_addr[e] || len != j->edge_len[e]
            || gen != j->edge_gen[e])
            return 0;
    }
    return 1;
}

static int publish(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint32_t n = (uint32_t)(j->last - j->first);
    uint32_t epoch = lane_epoch(l);
    int nr = 0;
    pthread_mutex_lock(&l->mu);
    if (j->nedge && !edges_unchanged(l, j)) {
        /* another write reached an edge page since we read it: start over */
        release_pieces(l, j);
        unpin_all(l, j);
        l->c.rmw_conflicts++;
        pthread_mutex_unlock(&l->mu);
        if (++j->attempts > RMW_ATTEMPTS) {
            fail(l, j, EIO);
            return 0;
        }
        return 1;   /* io_write's loop starts the write over */
    }
    uint16_t gen = map_next_gen(&l->map);
    nr = build_runs(j->pieces, j->npieces, j->lens, j->stage_off, n, j->zero_from, j->first,
                    FLAGS(FMT_PAGES, j->codec), epoch, gen, j->runs);
    int nold = 0;
    int rc = map_replace(&l->map, j->first, j->last, j->runs, nr, j->old, MAX_REQ_RUNS + 2,
                         j->oldlens, &nold);
    if (rc < 0) {
        pthread_mutex_unlock(&l->mu);
        fail(l, j, -rc);
        return 0;
    }
    lane_account(l, j->runs, nr, +1);
    lane_release_runs(l, j->old, nold);
    for (int i = 0; i < j->npieces; i++) {
        tier_t *T = &l->tiers[j->pieces[i].tier];
        for (uint32_t a = j->pieces[i].a; a < j->pieces[i].b; a++)
            T->c.pages_in += j->lens[a] != 0;
        if (T->kind == TIER_STORE && j->pieces[i].nbytes)
            T->consecutive_errors = 0;
    }
    j->npieces = 0;
    unpin_all(l, j);
    if (j->nio == 0 && !j->discard)
        l->c.native++;
    pthread_mutex_unlock(&l->mu);
    if (j->discard) {
        discard_next(l, j, ctx);
        return 0;
    }
    struct fuse_write_out wo = {.size = j->size};
    io_reply(l, j, 0, &wo, sizeof wo);
    return 0;
}

/* ------------------------------------------------------------------------------ discard */

static void discard_next(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint64_t off = j->doff, end = j->doff + j->dlen;
    uint64_t a = (off + PAGE - 1) / PAGE, b = end / PAGE;
    for (;;) {
        int stage = j->discard;
        uint64_t s = 0, e = 0;
        if (stage == 1) {             /* the head edge (or the whole range, if no full page) */
            j->discard = 2;
            if (a >= b) {
                s = off;
                e = end;
                j->discard = 3;
            } else if (off < a * PAGE) {
                s = off;
                e = a * PAGE;
            }
        } else if (stage == 2) {      /* the tail edge */
            j->discard = 3;
            if (a < b && end > b * PAGE) {
                s = b * PAGE;
                e = end;
            }
        } else {
            j->discard = 0;
            io_reply(l, j, 0, NULL, 0);
            return;
        }
        if (e > s) {
            j->off = s;
            j->size = (uint32_t)(e - s);
            j->data = zero_pages;
            j->attempts = 0;
            io_write(l, j, ctx);
            return;
        }
    }
}

void io_discard(lane_t *l, job_t *j, codec_ctx_t *ctx)
{
    uint64_t off = j->doff, end = j->doff + j->dlen;
    uint64_t a = (off + PAGE - 1) / PAGE, b = end / PAGE;
    pthread_mutex_lock(&l->mu);
    l->c.discards++;
    pthread_mutex_unlock(&l->mu);
    /* Whole pages, in slices so that one huge discard never holds the lock for long. A slice
     * of MAX_REQ_PAGES - 1 pages overlaps at most that many records: it always fits `old`. */
    for (uint64_t s = a; s < b;) {
        uint64_t e = s + MAX_REQ_PAGES - 1 < b ? s + MAX_REQ_PAGES - 1 : b;
        int nold = 0;
        pthread_mutex_lock(&l->mu);
        int rc = map_replace(&l->map, s, e, NULL, 0, j->old, MAX_REQ_RUNS + 2, j->oldlens, &nold);
        if (rc == 0)
            lane_release_runs(l, j->old, nold);
        pthread_mutex_unlock(&l->mu);
        if (rc < 0) {
            io_reply(l, j, -rc, NULL, 0);
            return;
        }
        s = e;
    }
    j->discard = 1;
    discard_next(l, j, ctx);
}

/* ------------------------------------------------------------------------------ resume */

void io_resume(lane_t *l, job_t *j, int err, codec_ctx_t *ctx)
{
    int state = j->state;
    j->state = J_FREE;
    switch (state) {
    case J_READ_IO:
        if (err) {
            pthread_mutex_lock(&l->mu);
            unpin_all(l, j);
            l->c.read_errors++;
            if (j->failed_tier >= 0 && j->failed_tier < l->ntiers)
                l->tiers[j->failed_tier].c.read_errors++;
            pthread_mutex_unlock(&l->mu);
            io_reply(l, j, err, NULL, 0);
            return;
        }
        read_finish(l, j, ctx);
        return;
    case J_WRITE_RMW_IO:
        if (err) {
            fail(l, j, err);
            return;
        }
        if (rmw_finish(l, j, ctx))
            io_write(l, j, ctx);
        return;
    case J_WRITE_IO:
        if (err) {
            pthread_mutex_lock(&l->mu);
            int t = j->failed_tier;
            if (t >= 0 && t < l->ntiers) {
                tier_t *T = &l->tiers[t];
                T->c.write_errors++;
                if (++T->consecutive_errors >= FAILED_AFTER)
                    T->failed = 1;
                j->avoid |= 1u << t;
            } else {
                j->avoid |= (1u << l->ntiers) - 1;   /* unknown: give up cleanly */
            }
            release_pieces(l, j);
            pthread_mutex_unlock(&l->mu);
            if (place(l, j, ctx))    /* spill what that tier held to the tiers that work */
                io_write(l, j, ctx);
            return;
        }
        if (publish(l, j, ctx))
            io_write(l, j, ctx);
        return;
    case J_WRITE_GROW:
        if (place(l, j, ctx))
            io_write(l, j, ctx);
        return;
    default:
        io_reply(l, j, EIO, NULL, 0);
    }
}
