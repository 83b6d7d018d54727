/* The virtual slot map: page index -> where the page lives, one LMDB record per *run*.
 *
 * A run is a range of consecutive virtual pages stored by one publish into one place: a tier and
 * a contiguous byte range of its space. Page i of a run starts at base + sum(lens[:i]) and is
 * lens[i] bytes long (0: a zero page; PAGE: stored raw). One record per run instead of one per
 * page is what keeps the map near 2-16 bytes per stored page.
 *
 *   key   u64 big-endian   first page (big-endian, so LMDB's byte order is page order)
 *   value u8  tier         index into the configured tiers; 255 = ZERO_TIER (no storage)
 *         u8  flags        format (bits 0-2), FLAG_RECOMPRESSED (bit 3), codec (bits 4-5) of the run's bytes
 *         u16 npages       at most MAX_RUN
 *         u32 epoch        coarse seconds (CLOCK_BOOTTIME) of the last write or promotion read
 *         u64 base | gen   byte address in the tier's space (low 48 bits); write generation
 *                          (high 16 bits): which publish made the run
 *         u16 lens[npages]
 *   (value fields little-endian; header 16 bytes)
 *
 * Runs never overlap. A write over part of a run cuts it; a remainder keeps the run's
 * generation (its bytes did not change), a publish gives new runs a fresh one. A new run is
 * joined with the run that ends where it starts when their bytes are contiguous in one segment.
 *
 * LMDB is opened without its lock (MDB_NOLOCK) and with MDB_NOTLS: every call here runs under
 * lane->mu, so there is never more than one transaction at a time (and the static scratch
 * arrays below are used by one caller at a time). Reads use one reset/renewed
 * read transaction and cursor; writes use mdb_put/mdb_del on the environment's preallocated write
 * transaction. Neither allocates on the I/O path. The file is a memfd (opened through
 * /proc/self/fd): the map survives the process that wrote it while another process holds the
 * fd, never touches a disk, and cannot fill a file system. Its size is fixed; a full map is
 * ENOSPC for the write that needed room, never a signal (the lane keeps the pages LMDB can
 * touch allocated ahead, see lane_map_reserve in module.c).
 */
#include "lane.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#define HDR 16
#define VAL_MAX (HDR + 2 * MAX_RUN)

static inline uint64_t be64(uint64_t x) { return __builtin_bswap64(x); }

static inline uint64_t key_page(const MDB_val *k)
{
    uint64_t v;
    memcpy(&v, k->mv_data, 8);
    return be64(v);
}

uint64_t run_nbytes(const run_t *r)
{
    uint64_t s = 0;
    for (uint32_t i = 0; i < r->npages; i++)
        s += r->lens[i];
    return s;
}

static void decode(const MDB_val *k, const MDB_val *v, run_t *r)
{
    const uint8_t *p = v->mv_data;
    uint64_t bg;
    r->start = key_page(k);
    r->tier = p[0];
    r->flags = p[1];
    memcpy(&r->npages, p + 2, 2);
    memcpy(&r->epoch, p + 4, 4);
    memcpy(&bg, p + 8, 8);
    r->base = bg & BASE_MASK;
    r->gen = (uint16_t)(bg >> BASE_BITS);
    r->lens = (const uint16_t *)(p + HDR);
    r->key = r->start;
}

static size_t encode(const run_t *r, uint8_t *out)
{
    uint64_t bg = (r->base & BASE_MASK) | ((uint64_t)r->gen << BASE_BITS);
    out[0] = r->tier;
    out[1] = r->flags;
    memcpy(out + 2, &r->npages, 2);
    memcpy(out + 4, &r->epoch, 4);
    memcpy(out + 8, &bg, 8);
    memcpy(out + HDR, r->lens, 2u * r->npages);
    return HDR + 2u * r->npages;
}

static uint64_t run_end(const run_t *r) { return r->start + r->npages; }

/* The part of `r` inside [first, last), base moved accordingly; lens copied to `lens`. */
static void clip_copy(const run_t *r, uint64_t first, uint64_t last, run_t *out, uint16_t *lens)
{
    uint64_t a = (first > r->start ? first : r->start) - r->start;
    uint64_t e = run_end(r);
    uint64_t b = (last < e ? last : e) - r->start;
    uint64_t skip = 0;
    for (uint64_t i = 0; i < a; i++)
        skip += r->lens[i];
    *out = *r;
    out->start = r->start + a;
    out->base = r->base + skip;
    out->npages = (uint16_t)(b - a);
    memcpy(lens, r->lens + a, 2 * (b - a));
    out->lens = lens;
}

static int rbegin(map_t *m)
{
    int rc = mdb_txn_renew(m->rtxn);
    if (rc)
        return rc;
    return mdb_cursor_renew(m->rtxn, m->rcur);
}

static void rend(map_t *m) { mdb_txn_reset(m->rtxn); }

static int lmdb_errno(int rc)
{
    if (rc == MDB_MAP_FULL || rc == MDB_TXN_FULL || rc == MDB_PAGE_FULL)
        return -ENOSPC;
    if (rc > 0 && rc < 1000)
        return -rc;
    return -EIO;
}

int map_open(map_t *m, const char *path, uint64_t map_size, int fresh, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    int rc = mdb_env_create(&m->env);
    if (!rc)
        rc = mdb_env_set_mapsize(m->env, map_size);
    if (!rc)
        rc = mdb_env_set_maxdbs(m->env, 1);
    if (!rc)
        rc = mdb_env_open(m->env, path,
                          MDB_NOSUBDIR | MDB_NOLOCK | MDB_WRITEMAP | MDB_NOSYNC | MDB_NOMETASYNC
                              | MDB_NOTLS | MDB_NORDAHEAD | MDB_NOMEMINIT,
                          0600);
    if (rc) {
        snprintf(err, errlen, "slot map: %s", mdb_strerror(rc));
        if (m->env)
            mdb_env_close(m->env);
        m->env = NULL;
        return -1;
    }
    MDB_txn *txn;
    rc = mdb_txn_begin(m->env, NULL, 0, &txn);
    if (!rc)
        rc = mdb_dbi_open(txn, "runs", MDB_CREATE, &m->dbi);
    if (!rc && fresh)
        rc = mdb_drop(txn, m->dbi, 0);
    if (!rc)
        rc = mdb_txn_commit(txn);
    else
        mdb_txn_abort(txn);
    if (!rc)
        rc = mdb_txn_begin(m->env, NULL, MDB_RDONLY, &m->rtxn);
    if (!rc)
        rc = mdb_cursor_open(m->rtxn, m->dbi, &m->rcur);
    if (rc) {
        snprintf(err, errlen, "slot map: %s", mdb_strerror(rc));
        map_close(m);
        return -1;
    }
    mdb_txn_reset(m->rtxn);
    m->map_size = map_size;
    m->next_gen = (uint16_t)(map_size ^ (uint64_t)path[0]);
    return 0;
}

void map_close(map_t *m)
{
    if (m->rcur)
        mdb_cursor_close(m->rcur);
    if (m->rtxn)
        mdb_txn_abort(m->rtxn);
    if (m->env)
        mdb_env_close(m->env);
    memset(m, 0, sizeof *m);
}

uint16_t map_next_gen(map_t *m) { return ++m->next_gen; }

/* Position `cur` on the first record overlapping pages [first, ...); 0 or MDB_NOTFOUND. */
static int seek_overlap(MDB_cursor *cur, uint64_t first, MDB_val *k, MDB_val *v)
{
    uint64_t kb = be64(first);
    k->mv_size = 8;
    k->mv_data = &kb;
    int rc = mdb_cursor_get(cur, k, v, MDB_SET_RANGE);
    run_t r;
    if (rc == 0) {
        if (key_page(k) == first)
            return 0;
        MDB_val k2, v2;
        if (mdb_cursor_get(cur, &k2, &v2, MDB_PREV) == 0) {
            decode(&k2, &v2, &r);
            if (run_end(&r) > first) {
                *k = k2;
                *v = v2;
                return 0;
            }
            return mdb_cursor_get(cur, k, v, MDB_NEXT);
        }
        return mdb_cursor_get(cur, k, v, MDB_FIRST);
    }
    if (rc != MDB_NOTFOUND)
        return rc;
    rc = mdb_cursor_get(cur, k, v, MDB_LAST);
    if (rc)
        return rc;
    decode(k, v, &r);
    return run_end(&r) > first ? 0 : MDB_NOTFOUND;
}

int map_lookup(map_t *m, uint64_t first, uint64_t last, run_t *out, int maxout, uint16_t *lens)
{
    if (last <= first)   /* an empty range overlaps nothing (not a run of zero pages) */
        return 0;
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    MDB_val k, v;
    int n = 0;
    size_t used = 0;
    rc = seek_overlap(m->rcur, first, &k, &v);
    while (rc == 0) {
        run_t r;
        decode(&k, &v, &r);
        if (r.start >= last || n == maxout)
            break;
        clip_copy(&r, first, last, &out[n], lens + used);
        used += out[n].npages;
        n++;
        rc = mdb_cursor_get(m->rcur, &k, &v, MDB_NEXT);
    }
    rend(m);
    return (rc == 0 || rc == MDB_NOTFOUND) ? n : lmdb_errno(rc);
}

int map_get(map_t *m, uint64_t page, run_t *out, uint16_t *lens)
{
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    MDB_val k, v;
    rc = seek_overlap(m->rcur, page, &k, &v);
    int found = 0;
    if (rc == 0) {
        run_t r;
        decode(&k, &v, &r);
        if (r.start <= page && run_end(&r) > page) {
            *out = r;
            memcpy(lens, r.lens, 2u * r.npages);
            out->lens = lens;
            found = 1;
        }
    }
    rend(m);
    return (rc == 0 || rc == MDB_NOTFOUND) ? found : lmdb_errno(rc);
}

static int put(MDB_txn *txn, MDB_dbi dbi, const run_t *r)
{
    uint8_t val[VAL_MAX];
    uint64_t kb = be64(r->start);
    MDB_val k = {8, &kb}, v = {encode(r, val), val};
    return mdb_put(txn, dbi, &k, &v, 0);
}

static int del(MDB_txn *txn, MDB_dbi dbi, uint64_t start)
{
    uint64_t kb = be64(start);
    MDB_val k = {8, &kb};
    int rc = mdb_del(txn, dbi, &k, NULL);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

/* Can `right` be appended to `left` as one record? */
static int joinable(const run_t *left, const run_t *right)
{
    if (left->tier != right->tier || left->flags != right->flags)
        return 0;
    if (left->npages >= JOIN_BELOW || left->npages + right->npages > MAX_RUN)
        return 0;
    if (run_end(left) != right->start)
        return 0;
    if (left->tier == ZERO_TIER)
        return 1;
    uint64_t lb = run_nbytes(left), rb = run_nbytes(right);
    if (left->base + lb != right->base)
        return 0;
    if (rb && (left->base >> SEG_SHIFT) != ((right->base + rb - 1) >> SEG_SHIFT))
        return 0;   /* a run never spans segments */
    return 1;
}

/* Room for a write: the pages the map's trees hold (data and free list) must leave a guard
 * of the fixed map size unused. Only additions are refused: LMDB copies pages on write, so a
 * delete needs new pages too, and the guard is what lets discards (which free everything
 * else) always proceed in a full map. */
static int room_for_additions(map_t *m)
{
    MDB_stat main_st, free_st;
    if (mdb_stat(m->rtxn, m->dbi, &main_st) || mdb_stat(m->rtxn, 0, &free_st))
        return 1;
    uint64_t used = (uint64_t)(main_st.ms_branch_pages + main_st.ms_leaf_pages
                               + main_st.ms_overflow_pages + free_st.ms_branch_pages
                               + free_st.ms_leaf_pages + free_st.ms_overflow_pages + 4)
                    * main_st.ms_psize;
    uint64_t guard = m->map_size / 64 > (256u << 10) ? m->map_size / 64 : (256u << 10);
    return used + guard <= m->map_size;
}

int map_replace(map_t *m, uint64_t first, uint64_t last, const run_t *add, int nadd,
                run_t *removed, int maxremoved, uint16_t *rlens, int *nremoved)
{
    /* Phase 1, read: what overlaps, the remainders to keep, and the run a new run may join. */
    static uint64_t dkeys[MAX_REQ_RUNS + 2];
    static uint16_t left_rem[MAX_RUN], right_rem[MAX_RUN], join_lens[MAX_RUN];
    int ndel = 0, have_lrem = 0, have_rrem = 0, have_join = 0;
    run_t lrem, rrem, join;
    size_t used = 0;
    *nremoved = 0;
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    if (nadd && !room_for_additions(m)) {
        rend(m);
        return -ENOSPC;
    }
    MDB_val k, v;
    rc = seek_overlap(m->rcur, first, &k, &v);
    while (rc == 0) {
        run_t r;
        decode(&k, &v, &r);
        if (r.start >= last)
            break;
        if (ndel == MAX_REQ_RUNS + 2 || *nremoved == maxremoved) {
            rend(m);
            return -E2BIG;
        }
        dkeys[ndel++] = r.start;
        clip_copy(&r, first, last, &removed[*nremoved], rlens + used);
        used += removed[*nremoved].npages;
        (*nremoved)++;
        if (r.start < first) {
            clip_copy(&r, r.start, first, &lrem, left_rem);
            have_lrem = 1;
        }
        if (run_end(&r) > last) {
            clip_copy(&r, last, run_end(&r), &rrem, right_rem);
            have_rrem = 1;
        }
        rc = mdb_cursor_get(m->rcur, &k, &v, MDB_NEXT);
    }
    if (rc != 0 && rc != MDB_NOTFOUND) {
        rend(m);
        return lmdb_errno(rc);
    }
    if (nadd && add[0].start == first) {
        if (have_lrem) {
            join = lrem;
            memcpy(join_lens, left_rem, 2u * lrem.npages);
            join.lens = join_lens;
            have_join = 1;
        } else if (first > 0) {
            run_t r;
            uint16_t *tmp = join_lens;
            rc = seek_overlap(m->rcur, first - 1, &k, &v);
            if (rc == 0) {
                decode(&k, &v, &r);
                if (run_end(&r) == first && r.npages < JOIN_BELOW) {
                    memcpy(tmp, r.lens, 2u * r.npages);
                    join = r;
                    join.lens = tmp;
                    have_join = 1;
                }
            }
        }
        if (have_join && !joinable(&join, &add[0]))
            have_join = 0;
    }
    rend(m);

    /* Phase 2, write: one transaction. */
    MDB_txn *txn;
    rc = mdb_txn_begin(m->env, NULL, 0, &txn);
    if (rc)
        return lmdb_errno(rc);
    for (int i = 0; i < ndel && !rc; i++)
        rc = del(txn, m->dbi, dkeys[i]);
    if (!rc && have_lrem && !have_join)
        rc = put(txn, m->dbi, &lrem);
    if (!rc && have_rrem)
        rc = put(txn, m->dbi, &rrem);
    for (int i = 0; i < nadd && !rc; i++) {
        if (i == 0 && have_join) {
            static uint16_t merged[MAX_RUN];
            run_t mr = join;
            memcpy(merged, join.lens, 2u * join.npages);
            memcpy(merged + join.npages, add[0].lens, 2u * add[0].npages);
            mr.npages = (uint16_t)(join.npages + add[0].npages);
            mr.lens = merged;
            mr.gen = add[0].gen;
            mr.epoch = join.epoch > add[0].epoch ? join.epoch : add[0].epoch;
            rc = put(txn, m->dbi, &mr);
        } else {
            rc = put(txn, m->dbi, &add[i]);
        }
    }
    if (rc) {
        mdb_txn_abort(txn);
        return lmdb_errno(rc);
    }
    rc = mdb_txn_commit(txn);
    return rc ? lmdb_errno(rc) : 0;
}

static int same_run(const run_t *a, const run_t *b)
{
    return a->start == b->start && a->tier == b->tier && a->flags == b->flags
        && a->base == b->base && a->gen == b->gen && a->npages == b->npages
        && memcmp(a->lens, b->lens, 2u * a->npages) == 0;
}

int map_relocate(map_t *m, const run_t *old, const run_t *add, int nadd)
{
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    uint64_t kb = be64(old->start);
    MDB_val k = {8, &kb}, v;
    rc = mdb_get(m->rtxn, m->dbi, &k, &v);
    int same = 0;
    if (rc == 0) {
        run_t now;
        decode(&k, &v, &now);
        same = same_run(&now, old);
    }
    rend(m);
    if (rc == MDB_NOTFOUND || !same)
        return 0;
    if (rc)
        return lmdb_errno(rc);
    if (rbegin(m) == 0) {   /* a move is an addition too: it must not eat the guard */
        int ok = room_for_additions(m);
        rend(m);
        if (!ok)
            return -ENOSPC;
    }
    MDB_txn *txn;
    rc = mdb_txn_begin(m->env, NULL, 0, &txn);
    if (rc)
        return lmdb_errno(rc);
    rc = del(txn, m->dbi, old->start);
    for (int i = 0; i < nadd && !rc; i++)
        rc = put(txn, m->dbi, &add[i]);
    if (rc) {
        mdb_txn_abort(txn);
        return lmdb_errno(rc);
    }
    rc = mdb_txn_commit(txn);
    return rc ? lmdb_errno(rc) : 1;
}

int map_touch(map_t *m, uint64_t start, uint16_t gen, uint32_t epoch)
{
    static uint16_t lens[MAX_RUN];
    run_t r;
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    uint64_t kb = be64(start);
    MDB_val k = {8, &kb}, v;
    rc = mdb_get(m->rtxn, m->dbi, &k, &v);
    int ok = 0;
    if (rc == 0) {
        decode(&k, &v, &r);
        if (r.gen == gen) {
            memcpy(lens, r.lens, 2u * r.npages);
            r.lens = lens;
            ok = 1;
        }
    }
    rend(m);
    if (!ok)
        return 0;
    r.epoch = epoch;
    MDB_txn *txn;
    rc = mdb_txn_begin(m->env, NULL, 0, &txn);
    if (!rc)
        rc = put(txn, m->dbi, &r);
    if (rc) {
        if (txn)
            mdb_txn_abort(txn);
        return lmdb_errno(rc);
    }
    rc = mdb_txn_commit(txn);
    return rc ? lmdb_errno(rc) : 1;
}

int map_scan(map_t *m, uint64_t *cursor, int tier, uint32_t max_epoch, uint32_t budget,
             run_t *out, int maxout, uint16_t *lens, uint32_t lens_room, int *done)
{
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    uint64_t kb = be64(*cursor);
    MDB_val k = {8, &kb}, v;
    int n = 0;
    uint32_t used = 0, seen = 0;
    *done = 0;
    rc = mdb_cursor_get(m->rcur, &k, &v, MDB_SET_RANGE);
    while (rc == 0) {
        run_t r;
        decode(&k, &v, &r);
        if (seen == budget || n == maxout || used + r.npages > lens_room) {
            *cursor = r.start;
            break;
        }
        seen++;
        if ((tier == ZERO_TIER + 1 || r.tier == tier) && r.epoch <= max_epoch) {
            out[n] = r;
            memcpy(lens + used, r.lens, 2u * r.npages);
            out[n].lens = lens + used;
            used += r.npages;
            n++;
        }
        rc = mdb_cursor_get(m->rcur, &k, &v, MDB_NEXT);
    }
    if (rc == MDB_NOTFOUND)
        *done = 1;
    rend(m);
    return (rc == 0 || rc == MDB_NOTFOUND) ? n : lmdb_errno(rc);
}

int map_stats(map_t *m, uint64_t *runs, uint64_t *bytes_used, uint64_t *last_page_bytes)
{
    int rc = rbegin(m);
    if (rc)
        return lmdb_errno(rc);
    MDB_stat st;
    rc = mdb_stat(m->rtxn, m->dbi, &st);
    rend(m);
    if (rc)
        return lmdb_errno(rc);
    MDB_envinfo info;
    mdb_env_info(m->env, &info);
    *runs = st.ms_entries;
    *bytes_used = (uint64_t)(st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages)
                  * st.ms_psize;
    *last_page_bytes = (uint64_t)(info.me_last_pgno + 1) * st.ms_psize;
    return 0;
}
