/*
 * outbox.h - what a connection sends besides the replies of its current task:
 * frames shared by every connection they are queued to, and the queues that
 * hold them.
 *
 * A push, a publish or a broadcast frames its message once into a pp_shared;
 * each recipient's queue holds a reference (pp_seg), and the owner of the
 * connection's output sends it with the rest through one sendmsg().  A
 * connection's output is its segment queue (outq) followed by its open reply
 * buffer (out): replies a task writes always come after what was queued
 * before them, and a push is never cut into a reply.
 */
#ifndef PP_OUTBOX_H
#define PP_OUTBOX_H

#include <stdatomic.h>
#include <stddef.h>

#include "buffer.h"
#include "framing.h"

/* One framed message, read-only once made, freed by its last reference.
 * Any thread may hold and drop references. */
typedef struct pp_shared {
    atomic_size_t refs;
    size_t len;
    unsigned char *data;        /* the frame: inline after the header, or owned */
    unsigned char *owned;       /* a separate block freed with it, or NULL */
} pp_shared;

/* Frames body (len bytes) once into a new shared buffer with one reference.
 * Returns NULL with errno = ENOMEM, or EMSGSIZE when the framing cannot carry
 * len bytes. */
pp_shared *pp__shared_frame(const pp_framing *f, const void *body, size_t len);

/* Takes b's content without copying (b is left empty), one reference; NULL
 * when out of memory (b is then untouched). */
pp_shared *pp__shared_adopt(pp_buf *b);

static inline void pp__shared_ref(pp_shared *s)
{
    atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
}

void pp__shared_unref(pp_shared *s);

/* A reference to the unsent part of a shared frame. */
typedef struct pp_seg {
    pp_shared *sh;
    size_t off;                 /* bytes of it already sent */
    int push;                   /* counts against the connection's push_limit */
} pp_seg;

/* A FIFO of segments in a growable ring; one owner at a time, no lock of its
 * own.  bytes is what its segments still have to send. */
typedef struct pp_segq {
    pp_seg *v;
    size_t head, n, cap;
    size_t bytes;
} pp_segq;

/* Appends a segment holding one reference the caller gives up.  Returns 0 or
 * -ENOMEM (the reference is then still the caller's). */
int pp__segq_push(pp_segq *q, pp_shared *sh, int push);

/* The i-th segment from the front. */
static inline pp_seg *pp__segq_at(const pp_segq *q, size_t i)
{
    return &q->v[(q->head + i) % q->cap];
}

/* Drops n sent bytes from the front: whole segments are unreferenced, a
 * partly sent one keeps its place.  Returns the bytes of push segments that
 * were completed, for the push_limit accounting. */
size_t pp__segq_consume(pp_segq *q, size_t n);

/* Moves every segment of from to the tail of to; from is left empty.
 * Returns 0 or -ENOMEM (nothing moved). */
int pp__segq_move(pp_segq *to, pp_segq *from);

/* Unreferences every segment and frees the ring. */
void pp__segq_free(pp_segq *q);

#endif
