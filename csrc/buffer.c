/* buffer.c - growable byte buffers. */
#include "buffer.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Small: a connection's buffers are sized by its messages (256 B, then
 * doubling), so idle connections with small messages stay cheap. */
#define PP_BUF_MIN 256

int pp__buf_grow(pp_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    size_t used = b->len - b->off;
    if (extra > SIZE_MAX / 2 - used)
        return -ENOMEM;
    /* Sliding the content down is cheaper than growing when the consumed
     * prefix alone makes enough room and the content is small. */
    if (b->off > 0 && b->cap - used >= extra && used <= b->cap / 2) {
        memmove(b->data, b->data + b->off, used);
        b->off = 0;
        b->len = used;
        return 0;
    }
    size_t need = used + extra;
    size_t cap = b->cap ? b->cap : PP_BUF_MIN;
    while (cap < need)
        cap *= 2;
    unsigned char *p = malloc(cap);
    if (p == NULL)
        return -ENOMEM;
    if (used)
        memcpy(p, b->data + b->off, used);
    free(b->data);
    b->data = p;
    b->off = 0;
    b->len = used;
    b->cap = cap;
    return 0;
}

void pp__buf_consume(pp_buf *b, size_t n)
{
    if (n > b->len - b->off)
        abort(); /* consuming more than is there is a bug in the caller */
    b->off += n;
    if (b->off == b->len)
        b->off = b->len = 0;
}

void pp__buf_reset(pp_buf *b, size_t keep)
{
    b->off = b->len = 0;
    if (b->cap > keep) {
        free(b->data);
        b->data = NULL;
        b->cap = 0;
    }
}

void pp__buf_free(pp_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
}
