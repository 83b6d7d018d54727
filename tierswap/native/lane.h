/* tierswap's native data lane: shared definitions.
 *
 * One `lane_t` per shard process. It serves every FUSE request of the shard's one file from
 * native threads (one /dev/fuse fd each, cloned from the session pyfuse3 mounted), and owns the
 * state those requests touch: the LMDB slot map, every tier's segment space, the RAM arenas
 * and the counters. Trio (the Python control plane) reaches that state only through the
 * functions in module.c, and does the byte I/O of the slow tiers (file, remote) for jobs the
 * lane hands it through a bounded queue.
 *
 * Locking: ONE mutex, `lane->mu`, guards the map, every space and every counter. Critical
 * sections are short (a map lookup or one small LMDB write transaction, a few allocator
 * updates); compression, decompression and every copy of page bytes run outside it. Nothing
 * that can block (I/O, waiting for a job buffer, the GIL) is ever done while holding it.
 * The GIL is never taken by lane threads.
 *
 * Memory: every buffer a request can need is allocated when the lane starts (job buffers,
 * compression contexts, scratch), so serving a request allocates nothing. Queues are bounded
 * by the job pool: a thread that finds the pool empty stops reading /dev/fuse until a job is
 * returned (back-pressure, never growth).
 */
#ifndef TIERSWAP_LANE_H
#define TIERSWAP_LANE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <lmdb.h>

#define PAGE 4096u
#define SEG_SHIFT 20u
#define SEG_SIZE (1u << SEG_SHIFT)
#define MAX_RUN 512u         /* pages per map record: a record stays well inside an LMDB page */
#define JOIN_BELOW 64u       /* runs this long are not grown further by joining */
#define ZERO_TIER 255u       /* a run of zero pages: no storage anywhere */
#define MAX_TIERS 8
#define MAX_THREADS 16
#define MAX_JOBS 64          /* job pool bound: lane threads + parked jobs */
#define MAX_GUARDS (MAX_JOBS + 16)  /* distinct read-guard generations alive per space */
#define BASE_BITS 48         /* byte address inside a tier's space; the top 16 bits hold gen */
#define BASE_MASK ((1ull << BASE_BITS) - 1)

/* The largest request the kernel sends: libfuse negotiates max_write = 1 MiB, and reads are cut
 * at max_pages (256). One page more for requests that do not start on a page boundary. */
#define MAX_IO (1u << 20)
#define MAX_REQ_PAGES (MAX_IO / PAGE + 1)
#define MAX_REQ_RUNS MAX_REQ_PAGES
#define MAX_PIECES 32
#define RECENT 4096          /* runs read from slower tiers, remembered for promotion */
#define REQ_BUF (MAX_IO + 2 * PAGE)  /* fuse_in_header + fuse_write_in + payload */

/* Run formats (low bits of the record's flags byte): how lens[] describe the stored bytes. */
enum { FMT_PAGES = 0 };    /* each page stored on its own: 0 zero, PAGE raw, else one frame */
#define FLAG_RECOMPRESSED 0x08  /* the run's bytes were recompressed for keeping: do not redo */
/* Codecs (bits 4..5 of flags): which compressor made the frames of a FMT_PAGES run. */
enum { CODEC_NONE = 0, CODEC_ZSTD = 1, CODEC_LZ4 = 2 };
#define FLAGS(fmt, codec) ((uint8_t)((fmt) | ((codec) << 4)))
#define FLAGS_CODEC(f) (((f) >> 4) & 3)

enum { TIER_MEMORY = 0, TIER_STORE = 1 };  /* bytes in an arena here, or in a Python store */

typedef struct {
    uint64_t start;          /* first virtual page */
    uint64_t base;           /* byte address of page `start` in the tier's space */
    uint32_t epoch;          /* coarse time of the last write or promotion-worthy read */
    uint16_t npages;
    uint16_t gen;            /* write generation: which publish made this run */
    uint8_t tier;
    uint8_t flags;
    const uint16_t *lens;    /* npages stored lengths (points into a record or a scratch) */
    uint64_t key;            /* start of the whole record this (possibly clipped) run is from */
} run_t;

/* ------------------------------------------------------------------------------ space.c */

typedef struct {
    uint32_t a, b;           /* pages [a, b) of a batch ... */
    uint64_t base;           /* ... placed here (all in one segment) */
    uint32_t nbytes;
    uint8_t tier;
    uint32_t life;           /* the segment's allocation counter when this piece was placed */
} piece_t;

typedef struct {
    uint64_t gen;
    uint32_t count;
} guard_t;

typedef struct {
    uint64_t gen;
    uint32_t seg;
} retire_t;

/* Log-structured space inside one tier: 1 MiB segments, append-only fill of the open segment,
 * free by live byte count, and deferred reuse while a guarded reader may still target a
 * segment (see space.c). Every field is guarded by lane->mu. */
typedef struct {
    uint32_t nseg;           /* capacity */
    uint32_t available;      /* segments usable now (a memory tier grows) */
    uint32_t align;          /* batches start on multiples of this (1, or 4096 for O_DIRECT) */
    int64_t *live;           /* live bytes per segment */
    uint32_t *life;          /* per segment: bumped each time it is opened from free */
    uint64_t *freebits;      /* bit set: segment free */
    uint32_t nwords;
    uint32_t nfree;
    int64_t open_seg;        /* -1: none open */
    uint32_t fill;
    int64_t live_total;
    int draining;
    uint64_t gen;            /* bumped at each retirement */
    guard_t guards[MAX_GUARDS];  /* ascending gen */
    uint32_t nguards;
    retire_t *pending;       /* ring of retired segments waiting for older guards */
    uint32_t phead, pcount;
    uint64_t *freed_bits;    /* segments given back since trio last asked (stores that care) */
    uint32_t *freed_life;    /* ... and the life they were freed in */
} space_t;

int space_init(space_t *sp, uint32_t nseg, uint32_t available, uint32_t align, uint32_t *life);
void space_free(space_t *sp);
uint32_t space_add(space_t *sp, uint32_t count);
uint64_t space_free_bytes(const space_t *sp);
int space_alloc(space_t *sp, uint8_t tier, const uint16_t *lens, uint32_t n, uint32_t a0,
                piece_t *out, int maxout, uint32_t *done);
void space_release(space_t *sp, uint64_t base, uint64_t nbytes);
uint64_t space_pin(space_t *sp);
void space_unpin(space_t *sp, uint64_t gen);
void space_close_open(space_t *sp);
void space_rebuild_begin(space_t *sp);
int space_rebuild_add(space_t *sp, uint64_t base, uint64_t nbytes);
void space_rebuild_end(space_t *sp);
uint32_t space_largest_free_extent(const space_t *sp, uint32_t *extents);
int space_is_free(const space_t *sp, uint32_t seg);
int space_take(space_t *sp, uint32_t seg);
void space_give(space_t *sp, uint32_t seg);
int space_want_freed(space_t *sp);

/* ------------------------------------------------------------------------------ codec.c */

typedef struct codec_ctx codec_ctx_t;
codec_ctx_t *codec_ctx_new(void);
void codec_ctx_free(codec_ctx_t *c);
/* Compress one page; returns the stored length (PAGE means stored raw: `dst` holds the page). */
uint32_t codec_compress_page(codec_ctx_t *c, int codec, int level, const uint8_t *src,
                             uint8_t *dst);
/* Decode one stored page of `len` bytes into a full page; 0 on success, -1 if corrupt. */
int codec_decode_page(codec_ctx_t *c, int codec, const uint8_t *src, uint32_t len, uint8_t *dst);

/* ------------------------------------------------------------------------------ map.c */

typedef struct {
    MDB_env *env;
    MDB_dbi dbi;
    MDB_txn *rtxn;           /* one read transaction, reset/renewed under lane->mu */
    MDB_cursor *rcur;
    uint64_t map_size;
    uint16_t next_gen;
} map_t;

int map_open(map_t *m, const char *path, uint64_t map_size, int fresh, char *err, size_t errlen);
void map_close(map_t *m);
/* Runs overlapping pages [first, last), clipped to it, in page order. lens are copied into
 * `lens` (room for last - first entries). Returns the count, or -errno. */
int map_lookup(map_t *m, uint64_t first, uint64_t last, run_t *out, int maxout, uint16_t *lens);
/* The whole record holding page `page` (unclipped); lens copied to `lens` (MAX_RUN). */
int map_get(map_t *m, uint64_t page, run_t *out, uint16_t *lens);
/* Drop pages [first, last) and insert `add` (which lie inside) in one write transaction.
 * `removed` gets the dropped pieces (clipped; lens point into `rlens`, room for last-first). */
int map_replace(map_t *m, uint64_t first, uint64_t last, const run_t *add, int nadd,
                run_t *removed, int maxremoved, uint16_t *rlens, int *nremoved);
/* Compare-and-swap: replace record `old` (same start, tier, base, gen, lens) by `add`. */
int map_relocate(map_t *m, const run_t *old, const run_t *add, int nadd);
int map_touch(map_t *m, uint64_t start, uint16_t gen, uint32_t epoch);
/* Up to `maxout` runs of `tier` (255: any) with start >= *cursor and epoch <= max_epoch; the
 * cursor is moved past what was scanned (at most `budget` records per call). */
int map_scan(map_t *m, uint64_t *cursor, int tier, uint32_t max_epoch, uint32_t budget,
             run_t *out, int maxout, uint16_t *lens, uint32_t lens_room, int *done);
int map_stats(map_t *m, uint64_t *runs, uint64_t *bytes_used, uint64_t *last_page_bytes);
uint16_t map_next_gen(map_t *m);
uint64_t run_nbytes(const run_t *r);

/* ------------------------------------------------------------------------------ lane */

typedef struct {
    uint64_t pages;          /* non-zero pages held */
    uint64_t zero_pages;     /* zero pages inside runs of this tier */
    uint64_t pages_in, pages_out;
    uint64_t promotions, demotions, bytes_moved;
    uint64_t read_errors, write_errors;
    uint64_t grow_requests;
} tier_counters_t;

typedef struct {
    int kind;
    int codec, level;
    uint8_t *arena;          /* memory tier: the whole capacity, mapped once */
    size_t arena_len;
    space_t sp;
    uint64_t grow_below;     /* memory tier: ask trio to grow when free room falls below */
    int failed;              /* after repeated write errors: takes no new pages */
    int offline;             /* the store says it cannot take pages now (no target up) */
    uint32_t consecutive_errors;
    tier_counters_t c;
} tier_t;

enum {                       /* job states */
    J_FREE = 0,
    J_READ_IO,               /* waiting for trio to read slow extents into stage */
    J_WRITE_RMW_IO,          /* waiting for trio to read the edge pages of a partial write */
    J_WRITE_IO,              /* waiting for trio to write slow pieces */
    J_WRITE_GROW,            /* every tier full: waiting for a memory tier to grow */
};

typedef struct {
    uint8_t write;           /* 0 read into stage, 1 write from stage */
    uint8_t tier;
    uint64_t base;
    uint32_t length;
    uint32_t offset;         /* in stage */
    uint32_t life;
} io_t;

typedef struct lane lane_t;

typedef struct job {
    lane_t *lane;
    int state;
    int thread;              /* index of the fd that read the request: the reply goes there */
    int in_queue;
    uint64_t unique;
    uint32_t opcode;
    uint64_t off;
    uint32_t size;
    int discard;             /* a write of zeros made by a discard's partial edges */
    uint8_t *buf;            /* the request as read; the reply is built in place */
    uint8_t *stage;          /* compressed bytes, to and from tiers */
    uint8_t *edges;          /* two decoded edge pages for read-modify-write */
    const uint8_t *data;     /* write payload */
    uint64_t first, last;    /* pages of the request */
    uint16_t lens[MAX_REQ_PAGES];
    uint32_t stage_off[MAX_REQ_PAGES + 1];
    run_t runs[MAX_REQ_RUNS];      /* read: what the map holds; write: the runs to publish */
    uint16_t runlens[MAX_REQ_PAGES];
    int nruns;
    run_t old[MAX_REQ_RUNS + 2];   /* what a publish replaced */
    uint16_t oldlens[MAX_REQ_PAGES];
    uint32_t zero_from;      /* pages from here on are zero and need no room */
    uint64_t dlen;           /* discard: length of the whole range */
    uint64_t doff;
    int grew;                /* a full write already waited for growth once */
    piece_t pieces[MAX_PIECES];
    int npieces;
    io_t io[MAX_REQ_RUNS];
    int nio;
    uint64_t pin_gen[MAX_TIERS];
    uint32_t pinned;         /* bit per tier */
    /* read-modify-write: identity of the edge pages as read */
    int nedge;
    uint64_t edge_page[2];
    uint8_t edge_tier[2];
    uint64_t edge_addr[2];
    uint16_t edge_len[2];
    uint16_t edge_gen[2];
    int err;
    int attempts;
    uint32_t avoid;          /* tiers that failed a write of this request: placed elsewhere */
    int codec, level;        /* the codec the request's pages were compressed with */
    int failed_tier;         /* set by trio on an I/O error: which tier failed */
    struct job *next;
} job_t;

typedef struct {
    uint64_t reads, writes, discards, other_ops;
    uint64_t read_errors, write_errors, enospc;
    uint64_t native, forwarded;   /* requests answered without trio / handed to trio */
    uint64_t rmw, rmw_conflicts;  /* partial-page writes, and their retries after a race */
    uint64_t zero_pages;          /* pages in ZERO_TIER runs */
    uint64_t corrupt;
    uint64_t pool_waits;
} lane_counters_t;

struct lane {
    pthread_mutex_t mu;
    map_t map;
    int ntiers;
    tier_t tiers[MAX_TIERS];
    uint64_t npages, size;
    uint32_t uid, gid;
    uint64_t mtime_ns;
    uint64_t epoch0;             /* CLOCK_BOOTTIME seconds that map epochs count from */
    /* threads */
    int nthreads;
    int fds[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started;
    volatile int stopping;
    int running;                 /* threads still running */
    codec_ctx_t *tctx[MAX_THREADS];
    /* job pool and the queue to trio */
    pthread_mutex_t qmu;
    pthread_cond_t qcond;        /* a job came back to the pool */
    job_t *jobs;
    int njobs;
    job_t *pool;                 /* free jobs */
    job_t *qhead, *qtail;        /* jobs for trio */
    int qlen;
    int efd;                     /* eventfd: readable while the queue is non-empty */
    codec_ctx_t *pyctx[4];       /* codec contexts for calls from Python threads */
    int pyctx_free;
    pthread_cond_t pyctx_cond;
    lane_counters_t c;
    uint32_t want_grow;          /* bit per memory tier that should grow */
    struct { uint64_t start; uint16_t gen; uint8_t tier; } recent[RECENT];  /* slow reads */
    uint32_t recent_head, recent_count;
    int conn_gone;
    uint64_t forget_epoch;
};

uint32_t lane_epoch(lane_t *l);
void lane_queue(lane_t *l, job_t *j);          /* hand a job to trio */
void job_put(lane_t *l, job_t *j);             /* back to the pool */
job_t *job_get(lane_t *l, int wait);

/* io.c: request state machines */
void io_read(lane_t *l, job_t *j, codec_ctx_t *ctx);
void io_write(lane_t *l, job_t *j, codec_ctx_t *ctx);
void io_discard(lane_t *l, job_t *j, codec_ctx_t *ctx);
void io_resume(lane_t *l, job_t *j, int err, codec_ctx_t *ctx);  /* after trio did j->io */
void io_reply(lane_t *l, job_t *j, int err, const void *data, size_t len);
void lane_release_runs(lane_t *l, const run_t *runs, int n);
int build_runs(const piece_t *pieces, int npieces, const uint16_t *lens, const uint32_t *off,
               uint32_t n, uint32_t zero_from, uint64_t first, uint8_t flags, uint32_t epoch,
               uint16_t gen, run_t *out);
void lane_account(lane_t *l, const run_t *runs, int n, int sign);
uint64_t run_nonzero(const run_t *r);

/* fuse.c */
int lane_start_threads(lane_t *l);
void lane_stop_threads(lane_t *l);
int lane_send_resend(lane_t *l);

#endif
