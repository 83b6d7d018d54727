/* Log-structured space inside a tier: fixed 1 MiB segments, append-only fill, free by live count.
 *
 * A request's stored pages are packed back to back into the *open* segment (no per-page
 * rounding; tiers that need it align each batch), so a batch is one contiguous extent per
 * segment it touches. Freeing a page only lowers its segment's live byte count. A closed
 * segment whose count reaches zero is *retired*; it returns to the free set once no guarded
 * reader that might still target it remains. Partly live segments come back by cleaning (their
 * runs are moved elsewhere: policy.py), and free segments are handed out lowest first, which
 * keeps a file tier compact.
 *
 * Read guards ("pins"). A job that will use bytes of a tier after leaving lane->mu (decoding a
 * RAM run outside the lock, an awaited read of a slow tier, a move, the edge pages of a
 * read-modify-write) takes a pin in the same critical section as its map lookup. A pin records
 * the space's retirement generation; a segment retired after it cannot be reused until the pin
 * is gone. Because a pinned address cannot be reused, (tier, address, length) identifies bytes
 * for as long as the pin lives, which is what makes compare-and-swap publishing exact.
 *
 * `life[seg]` counts how often a segment was opened from free; stores with per-segment state
 * (remote placement) compare it to know that a segment was reused. It may live in a memfd so
 * that it survives a restart. Every function here runs under lane->mu.
 */
#include "lane.h"

#include <stdlib.h>
#include <string.h>

static void set_free(space_t *sp, uint32_t seg)
{
    sp->freebits[seg >> 6] |= 1ull << (seg & 63);
    sp->nfree++;
}

static void clear_free(space_t *sp, uint32_t seg)
{
    sp->freebits[seg >> 6] &= ~(1ull << (seg & 63));
    sp->nfree--;
}

int space_is_free(const space_t *sp, uint32_t seg)
{
    return seg < sp->available && ((sp->freebits[seg >> 6] >> (seg & 63)) & 1);
}

static int64_t lowest_free(const space_t *sp)
{
    if (!sp->nfree)
        return -1;
    for (uint32_t w = 0; w < sp->nwords; w++)
        if (sp->freebits[w])
            return ((int64_t)w << 6) + __builtin_ctzll(sp->freebits[w]);
    return -1;
}

int space_init(space_t *sp, uint32_t nseg, uint32_t available, uint32_t align, uint32_t *life)
{
    memset(sp, 0, sizeof *sp);
    sp->nseg = nseg;
    sp->available = available > nseg ? nseg : available;
    sp->align = align ? align : 1;
    sp->nwords = (nseg + 63) / 64;
    sp->live = calloc(nseg ? nseg : 1, sizeof *sp->live);
    sp->freebits = calloc(sp->nwords ? sp->nwords : 1, sizeof *sp->freebits);
    sp->pending = calloc(nseg ? nseg : 1, sizeof *sp->pending);
    sp->life = life;
    if (!sp->live || !sp->freebits || !sp->pending)
        return -1;
    for (uint32_t s = 0; s < sp->available; s++)
        set_free(sp, s);
    sp->open_seg = -1;
    return 0;
}

int space_want_freed(space_t *sp)
{
    if (!sp->freed_bits) {
        sp->freed_bits = calloc(sp->nwords ? sp->nwords : 1, sizeof *sp->freed_bits);
        sp->freed_life = calloc(sp->nseg ? sp->nseg : 1, sizeof *sp->freed_life);
    }
    return sp->freed_bits && sp->freed_life ? 0 : -1;
}

void space_free(space_t *sp)
{
    free(sp->freed_bits);
    free(sp->freed_life);
    sp->freed_bits = NULL;
    sp->freed_life = NULL;
    free(sp->live);
    free(sp->freebits);
    free(sp->pending);
    sp->live = NULL;
    sp->freebits = NULL;
    sp->pending = NULL;
}

uint32_t space_add(space_t *sp, uint32_t count)
{
    uint32_t stop = sp->available + count;
    if (stop > sp->nseg)
        stop = sp->nseg;
    uint32_t added = stop - sp->available;
    for (uint32_t s = sp->available; s < stop; s++)
        set_free(sp, s);
    sp->available = stop;
    return added;
}

uint64_t space_free_bytes(const space_t *sp)
{
    uint64_t room = sp->open_seg >= 0 ? SEG_SIZE - sp->fill : 0;
    return (uint64_t)sp->nfree * SEG_SIZE + room;
}

static void release_pending(space_t *sp)
{
    uint64_t oldest = sp->nguards ? sp->guards[0].gen : sp->gen + 1;
    while (sp->pcount && sp->pending[sp->phead].gen <= oldest) {
        uint32_t seg = sp->pending[sp->phead].seg;
        sp->phead = (sp->phead + 1) % sp->nseg;
        sp->pcount--;
        if (sp->live[seg] == 0) {
            set_free(sp, seg);
            if (sp->freed_bits) {   /* a store with per-segment state wants to hear of it */
                sp->freed_bits[seg >> 6] |= 1ull << (seg & 63);
                sp->freed_life[seg] = sp->life ? sp->life[seg] : 0;
            }
        }
    }
}

static void retire(space_t *sp, uint32_t seg)
{
    sp->gen++;
    uint32_t tail = (sp->phead + sp->pcount) % sp->nseg;
    sp->pending[tail].gen = sp->gen;
    sp->pending[tail].seg = seg;
    sp->pcount++;
    release_pending(sp);
}

void space_close_open(space_t *sp)
{
    int64_t seg = sp->open_seg;
    sp->open_seg = -1;
    sp->fill = 0;
    if (seg >= 0 && sp->live[seg] == 0)
        retire(sp, (uint32_t)seg);
}

/* Place a prefix of the pages lens[a0..n) here; pieces go to `out`. *done is the first page not
 * placed (the caller offers the rest to the next tier). Space is counted live at once;
 * space_release undoes it if the write to the tier then fails. */
int space_alloc(space_t *sp, uint8_t tier, const uint16_t *lens, uint32_t n, uint32_t a0,
                piece_t *out, int maxout, uint32_t *done)
{
    int np = 0;
    uint32_t a = a0;
    if (sp->draining) {
        *done = a0;
        return 0;
    }
    while (a < n && np < maxout) {
        if (sp->open_seg < 0) {
            int64_t seg = lowest_free(sp);
            if (seg < 0)
                break;
            clear_free(sp, (uint32_t)seg);
            if (sp->life)
                sp->life[seg]++;
            sp->open_seg = seg;
            sp->fill = 0;
        }
        uint32_t room = SEG_SIZE - sp->fill;
        uint32_t b = a;
        uint64_t bytes = 0;
        while (b < n && bytes + lens[b] <= room)
            bytes += lens[b++];
        if (b == a) {
            space_close_open(sp);
            continue;
        }
        uint32_t seg = (uint32_t)sp->open_seg;
        piece_t *p = &out[np++];
        p->a = a;
        p->b = b;
        p->base = ((uint64_t)seg << SEG_SHIFT) + sp->fill;
        p->nbytes = (uint32_t)bytes;
        p->tier = tier;
        p->life = sp->life ? sp->life[seg] : 0;
        sp->live[seg] += (int64_t)bytes;
        sp->live_total += (int64_t)bytes;
        if (bytes)
            sp->fill += (uint32_t)((bytes + sp->align - 1) / sp->align * sp->align);
        if (sp->fill >= SEG_SIZE)
            space_close_open(sp);
        a = b;
    }
    *done = a;
    return np;
}

void space_release(space_t *sp, uint64_t base, uint64_t nbytes)
{
    if (!nbytes)
        return;
    uint32_t seg = (uint32_t)(base >> SEG_SHIFT);
    if (seg >= sp->nseg)
        return;
    sp->live[seg] -= (int64_t)nbytes;
    sp->live_total -= (int64_t)nbytes;
    if (sp->live[seg] < 0) {   /* a bookkeeping bug: never let it free live data */
        sp->live_total -= sp->live[seg];
        sp->live[seg] = 0;
    }
    if (sp->live[seg] == 0 && (int64_t)seg != sp->open_seg)
        retire(sp, seg);
}

uint64_t space_pin(space_t *sp)
{
    uint64_t g = sp->gen;
    if (sp->nguards && sp->guards[sp->nguards - 1].gen == g) {
        sp->guards[sp->nguards - 1].count++;
        return g;
    }
    if (sp->nguards == MAX_GUARDS) {
        /* Recording a newer reader under an older generation only delays reuse more. */
        sp->guards[sp->nguards - 1].count++;
        return sp->guards[sp->nguards - 1].gen;
    }
    sp->guards[sp->nguards].gen = g;
    sp->guards[sp->nguards].count = 1;
    sp->nguards++;
    return g;
}

void space_unpin(space_t *sp, uint64_t gen)
{
    for (uint32_t i = 0; i < sp->nguards; i++) {
        if (sp->guards[i].gen != gen)
            continue;
        if (--sp->guards[i].count == 0) {
            memmove(&sp->guards[i], &sp->guards[i + 1],
                    (sp->nguards - i - 1) * sizeof sp->guards[0]);
            sp->nguards--;
            if (i == 0)
                release_pending(sp);
        }
        return;
    }
}

/* After a restart: live counts come from the map, everything else is derived. */
void space_rebuild_begin(space_t *sp)
{
    memset(sp->live, 0, sp->nseg * sizeof *sp->live);
    memset(sp->freebits, 0, sp->nwords * sizeof *sp->freebits);
    sp->nfree = 0;
    sp->live_total = 0;
    sp->open_seg = -1;
    sp->fill = 0;
    sp->pcount = 0;
    sp->phead = 0;
    sp->nguards = 0;
}

int space_rebuild_add(space_t *sp, uint64_t base, uint64_t nbytes)
{
    uint64_t seg = base >> SEG_SHIFT;
    if (seg >= sp->nseg || (nbytes && ((base + nbytes - 1) >> SEG_SHIFT) != seg))
        return -1; /* outside the tier, or across a segment: not a record we wrote */
    sp->live[seg] += (int64_t)nbytes;
    sp->live_total += (int64_t)nbytes;
    return 0;
}

void space_rebuild_end(space_t *sp)
{
    for (uint32_t s = 0; s < sp->available; s++)
        if (sp->live[s] == 0)
            set_free(sp, s);
}

uint32_t space_largest_free_extent(const space_t *sp, uint32_t *extents)
{
    uint32_t best = 0, cur = 0, n = 0;
    for (uint32_t s = 0; s < sp->available; s++) {
        if (space_is_free(sp, s)) {
            if (!cur)
                n++;
            if (++cur > best)
                best = cur;
        } else {
            cur = 0;
        }
    }
    if (extents)
        *extents = n;
    return best;
}

/* Withhold a free segment (compaction punches its hole meanwhile); 0 if it was not free. */
int space_take(space_t *sp, uint32_t seg)
{
    if (!space_is_free(sp, seg))
        return 0;
    clear_free(sp, seg);
    return 1;
}

void space_give(space_t *sp, uint32_t seg)
{
    if (seg < sp->available && !space_is_free(sp, seg) && sp->live[seg] == 0
        && (int64_t)seg != sp->open_seg)
        set_free(sp, seg);
}
