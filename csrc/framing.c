/* framing.c - raw, line and length-prefixed framing. */
#include "framing.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int pp__framing_init(pp_framing *f, const pp_config *cfg)
{
    memset(f, 0, sizeof *f);
    f->kind = cfg->framing;
    f->max_size = cfg->max_message_size;
    f->reply_max = SIZE_MAX;
    if (f->max_size == 0)
        return -EINVAL;
    switch (cfg->framing) {
    case PP_FRAMING_RAW:
        return 0;
    case PP_FRAMING_LINE:
        if (cfg->delimiter_len == 0 || cfg->delimiter_len > PP_MAX_DELIMITER)
            return -EINVAL;
        memcpy(f->delim, cfg->delimiter, cfg->delimiter_len);
        f->delim_len = cfg->delimiter_len;
        for (size_t k = 1; k < f->delim_len; k++)
            if (memcmp(f->delim, f->delim + f->delim_len - k, k) == 0)
                f->delim_overlaps = 1;
        return 0;
    case PP_FRAMING_LENGTH:
        switch (cfg->header_bytes) {
        case 1: case 2: case 4: case 8:
            break;
        default:
            return -EINVAL;
        }
        f->header_bytes = cfg->header_bytes;
        /* A frame larger than the header can describe cannot arrive. */
        if (f->header_bytes < 8) {
            uint64_t cap = (UINT64_C(1) << (8 * f->header_bytes)) - 1;
            if (f->max_size > cap)
                f->max_size = (size_t)cap;
            f->reply_max = (size_t)cap;
        }
        return 0;
    default:
        return -EINVAL;
    }
}

static int frame_line(const pp_framing *f, const unsigned char *data, size_t len,
                      size_t *scanned, pp_frame *fr)
{
    size_t dl = f->delim_len;
    size_t pos = *scanned;
    /* A delimiter could straddle the end of what was scanned last time. */
    pos = pos >= dl - 1 ? pos - (dl - 1) : 0;
    while (pos + dl <= len) {
        const unsigned char *hit = memchr(data + pos, f->delim[0], len - pos - dl + 1);
        if (hit == NULL)
            break;
        size_t at = (size_t)(hit - data);
        if (dl == 1 || memcmp(hit + 1, f->delim + 1, dl - 1) == 0) {
            if (at > f->max_size)
                return -EMSGSIZE;
            fr->msg_off = 0;
            fr->msg_len = at;
            fr->frame_len = at + dl;
            *scanned = 0;
            return 1;
        }
        pos = at + 1;
    }
    *scanned = len;
    /* The earliest a delimiter can still start is len - dl + 1. */
    if (len >= dl && len - dl + 1 > f->max_size)
        return -EMSGSIZE;
    return 0;
}

long pp__frame_whole_prefix(const pp_framing *f, const unsigned char *data,
                            size_t len, size_t *scanned)
{
    /* Without self-overlap, delimiters found from either end are the same
     * ones; within max_size bytes no frame can be oversize. */
    if (f->kind != PP_FRAMING_LINE || f->delim_overlaps || len > f->max_size)
        return -1;
    size_t dl = f->delim_len;
    unsigned char last = f->delim[dl - 1];
    /* The usual read ends with a whole message: no search at all. */
    if (len >= dl && data[len - 1] == last &&
        (dl == 1 || memcmp(data + len - dl, f->delim, dl) == 0)) {
        *scanned = 0;
        return (long)len;
    }
    size_t end = len;
    while (end >= dl) {
        const unsigned char *hit = memrchr(data + dl - 1, last, end - (dl - 1));
        if (hit == NULL)
            break;
        size_t at = (size_t)(hit - data) + 1; /* one past the delimiter */
        if (dl == 1 || memcmp(data + at - dl, f->delim, dl) == 0) {
            *scanned = len - at;
            return (long)at;
        }
        end = at - 1;
    }
    *scanned = len;
    return 0;
}

static int frame_length(const pp_framing *f, const unsigned char *data,
                        size_t len, pp_frame *fr)
{
    size_t hb = (size_t)f->header_bytes;
    if (len < hb)
        return 0;
    uint64_t n = 0;
    for (size_t i = 0; i < hb; i++)
        n = (n << 8) | data[i];
    /* Checked before any use of n, so a garbage 8-byte header never turns
     * into an allocation or an overflow. */
    if (n > f->max_size)
        return -EMSGSIZE;
    if (len - hb < n)
        return 0;
    fr->msg_off = hb;
    fr->msg_len = (size_t)n;
    fr->frame_len = hb + (size_t)n;
    return 1;
}

int pp__frame_next_any(const pp_framing *f, const unsigned char *data,
                       size_t len, size_t *scanned, pp_frame *fr)
{
    switch (f->kind) {
    case PP_FRAMING_RAW:
        if (len == 0)
            return 0;
        fr->msg_off = 0;
        fr->msg_len = len < f->max_size ? len : f->max_size;
        fr->frame_len = fr->msg_len;
        return 1;
    case PP_FRAMING_LINE:
        return frame_line(f, data, len, scanned, fr);
    case PP_FRAMING_LENGTH:
        return frame_length(f, data, len, fr);
    default:
        abort();
    }
}

int pp__frame_finish_any(const pp_framing *f, pp_buf *out, size_t body_len)
{
    switch (f->kind) {
    case PP_FRAMING_RAW:
        return 0;
    case PP_FRAMING_LINE:
        return pp__buf_append(out, f->delim, f->delim_len);
    case PP_FRAMING_LENGTH: {
        size_t hb = (size_t)f->header_bytes;
        if (hb < 8 && (uint64_t)body_len >> (8 * hb))
            return -EMSGSIZE;
        unsigned char *h = out->data + out->len - body_len - hb;
        uint64_t n = body_len;
        for (size_t i = hb; i-- > 0; n >>= 8)
            h[i] = (unsigned char)(n & 0xff);
        return 0;
    }
    default:
        abort();
    }
}

int pp__frame_append(const pp_framing *f, pp_buf *out, const void *body,
                     size_t len)
{
    size_t prefix = pp__frame_prefix_len(f);
    size_t mark = out->len;
    if (len > SIZE_MAX - prefix - f->delim_len)
        return -ENOMEM;
    int rc = pp__buf_reserve(out, prefix + len + f->delim_len);
    if (rc < 0)
        return rc;
    out->len += prefix;
    if (len)
        memcpy(out->data + out->len, body, len);
    out->len += len;
    rc = pp__frame_finish(f, out, len);
    if (rc < 0)
        out->len = mark;
    return rc;
}
