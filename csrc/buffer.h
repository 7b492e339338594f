/* buffer.h - growable byte buffers for connection input and output. */
#ifndef PP_BUFFER_H
#define PP_BUFFER_H

#include <stddef.h>
#include <string.h>

/* Bytes data[off..len) are the content; data[len..cap) is free space.  A
 * buffer is owned by one thread at a time; it has no lock. */
typedef struct pp_buf {
    unsigned char *data;
    size_t off;
    size_t len;
    size_t cap;
} pp_buf;

static inline size_t pp__buf_size(const pp_buf *b) { return b->len - b->off; }
static inline unsigned char *pp__buf_begin(const pp_buf *b) { return b->data + b->off; }

/* The slow half of pp__buf_reserve(): compacts or grows. */
int pp__buf_grow(pp_buf *b, size_t extra);

/* Makes room for extra more bytes after len, compacting first when the
 * consumed prefix is large enough to serve.  Returns 0 or -ENOMEM.  Inline:
 * the worker reserves once per reply, and the room is nearly always there. */
static inline int pp__buf_reserve(pp_buf *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    return pp__buf_grow(b, extra);
}

/* Appends n bytes.  Returns 0 or -ENOMEM. */
static inline int pp__buf_append(pp_buf *b, const void *p, size_t n)
{
    int rc = pp__buf_reserve(b, n);
    if (rc < 0)
        return rc;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

/* Drops n bytes from the front; an emptied buffer restarts at offset 0. */
void pp__buf_consume(pp_buf *b, size_t n);

/* Empties the buffer and frees its memory if it grew beyond keep bytes, so
 * that one large message does not pin memory for a connection's lifetime. */
void pp__buf_reset(pp_buf *b, size_t keep);

/* Frees the memory. */
void pp__buf_free(pp_buf *b);

#endif
