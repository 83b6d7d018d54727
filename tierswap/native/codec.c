/* Per-page codecs for the lane: zstd (any level, negative ones included) and lz4.
 *
 * A stored page describes itself by its length: 0 is a zero page, PAGE is the page stored raw
 * (it did not get smaller), anything else is one frame of the run's codec (the record's flags
 * say which). zstd frames omit content size, checksum and dictionary id: the map already
 * knows the size, and an error in the bytes is caught by the decoder or, where bytes leave
 * the host, by authentication.
 *
 * A context is created once (at lane start) and never allocates afterwards: the zstd contexts
 * are *static* (ZSTD_initStaticCCtx/DCtx on workspaces sized for a 4 KiB input at the highest
 * level we accept), and lz4 uses a preallocated state. A context is used by one thread at a
 * time; each lane thread has its own and Python threads borrow one from a small pool.
 */
#include "lane.h"

#include <lz4.h>
#include <stdlib.h>
#include <string.h>
#define ZSTD_STATIC_LINKING_ONLY  /* static contexts: stable in practice, exported by libzstd */
#include <zstd.h>

#define MAX_LEVEL 19

struct codec_ctx {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    void *cws, *dws;
    void *lz4state;
    int level;               /* level the cctx is set to (INT32_MIN: unset) */
    uint8_t tmp[PAGE];       /* compressor output before we know it is smaller than a page */
};

codec_ctx_t *codec_ctx_new(void)
{
    codec_ctx_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    /* The largest workspace any accepted level needs for a 4 KiB source. */
    size_t csz = 0;
    for (int lvl = ZSTD_minCLevel() > -7 ? ZSTD_minCLevel() : -7; lvl <= MAX_LEVEL; lvl++) {
        ZSTD_compressionParameters cp = ZSTD_getCParams(lvl, PAGE, 0);
        size_t s = ZSTD_estimateCCtxSize_usingCParams(cp);
        if (s > csz)
            csz = s;
    }
    size_t dsz = ZSTD_estimateDCtxSize();
    c->cws = aligned_alloc(64, (csz + 63) / 64 * 64);
    c->dws = aligned_alloc(64, (dsz + 63) / 64 * 64);
    c->lz4state = aligned_alloc(64, (LZ4_sizeofState() + 63) / 64 * 64);
    if (!c->cws || !c->dws || !c->lz4state)
        goto fail;
    memset(c->cws, 0, csz);   /* touched now: resident (and locked) before serving */
    memset(c->dws, 0, dsz);
    c->cctx = ZSTD_initStaticCCtx(c->cws, csz);
    c->dctx = ZSTD_initStaticDCtx(c->dws, dsz);
    if (!c->cctx || !c->dctx)
        goto fail;
    c->level = INT32_MIN;
    return c;
fail:
    codec_ctx_free(c);
    return NULL;
}

void codec_ctx_free(codec_ctx_t *c)
{
    if (!c)
        return;
    free(c->cws);
    free(c->dws);
    free(c->lz4state);
    free(c);
}

static int set_level(codec_ctx_t *c, int level)
{
    if (c->level == level)
        return 0;
    ZSTD_CCtx_reset(c->cctx, ZSTD_reset_session_and_parameters);
    if (ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_compressionLevel, level))
        || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_contentSizeFlag, 0))
        || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_checksumFlag, 0))
        || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_dictIDFlag, 0)))
        return -1;
    c->level = level;
    return 0;
}

uint32_t codec_compress_page(codec_ctx_t *c, int codec, int level, const uint8_t *src,
                             uint8_t *dst)
{
    size_t n = 0;
    if (codec == CODEC_ZSTD) {
        if (set_level(c, level) == 0) {
            n = ZSTD_compress2(c->cctx, c->tmp, PAGE - 1, src, PAGE);
            if (ZSTD_isError(n))
                n = 0;   /* dstSize_tooSmall: incompressible */
        }
    } else if (codec == CODEC_LZ4) {
        int accel = level > 1 ? level : 1;
        n = (size_t)LZ4_compress_fast_extState(c->lz4state, (const char *)src, (char *)c->tmp,
                                               PAGE, PAGE - 1, accel);
    }
    if (n == 0 || n >= PAGE) {
        memcpy(dst, src, PAGE);
        return PAGE;
    }
    memcpy(dst, c->tmp, n);
    return (uint32_t)n;
}

int codec_decode_page(codec_ctx_t *c, int codec, const uint8_t *src, uint32_t len, uint8_t *dst)
{
    if (len == 0) {
        memset(dst, 0, PAGE);
        return 0;
    }
    if (len == PAGE) {
        memcpy(dst, src, PAGE);
        return 0;
    }
    if (codec == CODEC_ZSTD) {
        size_t n = ZSTD_decompressDCtx(c->dctx, dst, PAGE, src, len);
        return (!ZSTD_isError(n) && n == PAGE) ? 0 : -1;
    }
    if (codec == CODEC_LZ4) {
        int n = LZ4_decompress_safe((const char *)src, (char *)dst, (int)len, PAGE);
        return n == (int)PAGE ? 0 : -1;
    }
    return -1;
}
