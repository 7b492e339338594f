/* outbox.c - shared frames and segment queues (outbox.h). */
#include "outbox.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

pp_shared *pp__shared_frame(const pp_framing *f, const void *body, size_t len)
{
    size_t prefix = pp__frame_prefix_len(f);
    if (len > f->reply_max) {
        errno = EMSGSIZE;
        return NULL;
    }
    if (len > SIZE_MAX - sizeof(pp_shared) - prefix - f->delim_len) {
        errno = ENOMEM;
        return NULL;
    }
    size_t total = prefix + len + f->delim_len;
    pp_shared *s = malloc(sizeof *s + total);
    if (s == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    atomic_init(&s->refs, 1);
    s->len = total;
    s->data = (unsigned char *)(s + 1);
    s->owned = NULL;
    /* The same bytes pp__frame_append() would write, into a buffer we own. */
    pp_buf b = {.data = s->data, .off = 0, .len = 0, .cap = total};
    if (pp__frame_append(f, &b, body, len) < 0 || b.data != s->data || b.len != total)
        abort(); /* the room was reserved exactly: nothing may grow it */
    return s;
}

pp_shared *pp__shared_adopt(pp_buf *b)
{
    pp_shared *s = malloc(sizeof *s);
    if (s == NULL)
        return NULL;
    atomic_init(&s->refs, 1);
    s->len = pp__buf_size(b);
    s->data = pp__buf_begin(b);
    s->owned = b->data;
    b->data = NULL;
    b->off = b->len = b->cap = 0;
    return s;
}

void pp__shared_unref(pp_shared *s)
{
    /* acq_rel: every holder's reads of data happen before the last one's
     * free (a fence would do on the last alone, but ThreadSanitizer does
     * not model fences). */
    if (atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
        return;
    free(s->owned);
    free(s);
}

static int segq_grow(pp_segq *q, size_t want)
{
    if (q->cap >= want)
        return 0;
    size_t cap = q->cap ? q->cap : 4;
    while (cap < want) {
        if (cap > SIZE_MAX / 2 / sizeof(pp_seg))
            return -ENOMEM;
        cap *= 2;
    }
    pp_seg *v = malloc(cap * sizeof *v);
    if (v == NULL)
        return -ENOMEM;
    /* Unrolled to the front of the new ring. */
    for (size_t i = 0; i < q->n; i++)
        v[i] = *pp__segq_at(q, i);
    free(q->v);
    q->v = v;
    q->head = 0;
    q->cap = cap;
    return 0;
}

int pp__segq_push(pp_segq *q, pp_shared *sh, int push)
{
    if (q->n == q->cap && segq_grow(q, q->n + 1) < 0)
        return -ENOMEM;
    *pp__segq_at(q, q->n) = (pp_seg){.sh = sh, .off = 0, .push = push};
    q->n++;
    q->bytes += sh->len;
    return 0;
}

size_t pp__segq_consume(pp_segq *q, size_t n)
{
    size_t pushed = 0;
    while (n > 0) {
        if (q->n == 0)
            abort(); /* consuming more than is queued */
        pp_seg *s = pp__segq_at(q, 0);
        size_t left = s->sh->len - s->off;
        if (n < left) {
            s->off += n;
            q->bytes -= n;
            return pushed;
        }
        n -= left;
        q->bytes -= left;
        if (s->push)
            pushed += s->sh->len;
        pp__shared_unref(s->sh);
        q->head = (q->head + 1) % q->cap;
        q->n--;
    }
    if (q->n == 0)
        q->head = 0;
    return pushed;
}

int pp__segq_move(pp_segq *to, pp_segq *from)
{
    if (from->n == 0)
        return 0;
    if (to->n == 0 && to->cap <= from->cap) {
        /* The usual case: nothing queued yet, take the ring as it is. */
        pp_segq t = *to;
        *to = *from;
        *from = t;
        from->n = from->head = from->bytes = 0;
        return 0;
    }
    if (segq_grow(to, to->n + from->n) < 0)
        return -ENOMEM;
    for (size_t i = 0; i < from->n; i++)
        *pp__segq_at(to, to->n + i) = *pp__segq_at(from, i);
    to->n += from->n;
    to->bytes += from->bytes;
    from->n = from->head = from->bytes = 0;
    return 0;
}

void pp__segq_free(pp_segq *q)
{
    for (size_t i = 0; i < q->n; i++)
        pp__shared_unref(pp__segq_at(q, i)->sh);
    free(q->v);
    memset(q, 0, sizeof *q);
}
