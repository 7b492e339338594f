/*
 * reply.c - running a task on a worker: the handler per message, reply
 * framing, and sending straight from the worker.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "core.h"

/* Output above this is sent between two messages of one task, so a long
 * pipeline does not build one huge buffer before the first byte leaves. */
#define PP_FLUSH_AT (64 * 1024)

typedef struct reply_impl {
    pp_server *srv;
    pp_conn *conn;
    size_t mark;        /* size of out where the open reply's body starts */
    int open;           /* a reply for the current message has begun */
    int error;          /* errno of a failed write; the reply is void */
    uint64_t replies;
    uint64_t sent;      /* bytes sent by this worker for this task */
    int overflow;       /* output_limit passed: the task must stop */
    pp_dimpl *deferred; /* pp_reply_defer() was called in this call */
    size_t rest_off;    /* then: where the messages after it begin in task */
    pp_dimpl *held;     /* max_deferred > 1: the task's newest handle, whose
                           after buffer takes the replies made now */
    size_t held_bytes;  /* bytes in the after buffers of the older ones */
    size_t ndef;        /* handles this task queued on the connection */
    const pp_msg *msgs; /* a batch call's messages */
    size_t nmsgs;
    size_t handled;     /* pp_reply_defer_batch(): messages before next */
} reply_impl;

/* Where replies go: the output, or behind a pending reply. */
static inline pp_buf *ri_out(reply_impl *ri)
{
    return ri->held ? &ri->held->after : &ri->conn->out;
}

static int reply_write(pp_reply *r, const void *data, size_t len)
{
    reply_impl *ri = r->impl;
    const pp_framing *f = &ri->srv->framing;
    pp_buf *out = ri_out(ri);
    if (ri->deferred) {
        errno = EINVAL; /* the reply is the handle's now */
        return -1;
    }
    if (ri->error) {
        errno = ri->error;
        return -1;
    }
    if (!ri->open) {
        size_t prefix = pp__frame_prefix_len(f);
        /* The whole frame is reserved at once: header, body and delimiter,
         * with a length so large that the sum would wrap refused first. */
        if (len > SIZE_MAX - prefix - f->delim_len ||
            pp__buf_reserve(out, prefix + len + f->delim_len) < 0)
            goto nomem;
        out->len += prefix;
        ri->mark = pp__buf_size(out);
        ri->open = 1;
    } else if (pp__buf_reserve(out, len) < 0) {
        goto nomem;
    }
    /* Refused as it is written, so the handler learns it at once. */
    if (len > f->reply_max - (pp__buf_size(out) - ri->mark)) {
        ri->error = EMSGSIZE;
        errno = EMSGSIZE;
        return -1;
    }
    if (len)
        memcpy(out->data + out->len, data, len);
    out->len += len;
    return 0;
nomem:
    ri->error = ENOMEM;
    errno = ENOMEM;
    return -1;
}

/* Ends the open reply once the handler has returned st: frames it, or takes
 * it back if a write failed, it does not fit the framing, or the handler
 * failed (st < 0: pollpool.h promises that only the replies for earlier
 * messages are sent, so what it wrote before failing never leaves).
 * Returns 0 or -errno of a failed write; either way no reply is open after. */
static inline int reply_close(reply_impl *ri, int st)
{
    int rc = ri->error ? -ri->error : 0;
    ri->error = 0;
    if (!ri->open)
        return rc;
    ri->open = 0;
    const pp_framing *f = &ri->srv->framing;
    pp_buf *out = ri_out(ri);
    size_t body = pp__buf_size(out) - ri->mark;
    if (rc == 0 && st >= 0)
        rc = pp__frame_finish(f, out, body);
    if (rc < 0 || st < 0)
        out->len -= body + pp__frame_prefix_len(f); /* no half reply goes out */
    else if (ri->held)
        ri->held->after_n++; /* counted when it joins the output */
    else
        ri->replies++;
    return rc;
}

static int flush_now(reply_impl *ri);

/* Takes the open reply (what pp_reply_write() wrote of it) over into a new
 * handle. */
static pp_dimpl *defer_open(reply_impl *ri)
{
    if (ri->deferred) {
        errno = EINVAL; /* once per call */
        return NULL;
    }
    pp_dimpl *d = pp__deferred_new(ri->srv, ri->conn);
    if (d == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    if (ri->open) {
        const pp_framing *f = &ri->srv->framing;
        pp_buf *out = ri_out(ri);
        size_t body = pp__buf_size(out) - ri->mark;
        int rc = ri->error ? -ri->error : d->pub.ops->write(&d->pub, out->data + out->len - body, body);
        if (rc < 0) {
            pp__deferred_free(d);
            errno = -rc;
            return NULL;
        }
        out->len -= body + pp__frame_prefix_len(f);
        ri->open = 0;
    }
    ri->deferred = d;
    return d;
}

pp_deferred *pp__reply_defer(pp_reply *r)
{
    reply_impl *ri = r->impl;
    pp_dimpl *d = defer_open(ri);
    if (d == NULL)
        return NULL;
    ri->rest_off = SIZE_MAX; /* run_handler: after the current message */
    return &d->pub;
}

pp_deferred *pp_reply_defer_batch(pp_reply *r, size_t next)
{
    reply_impl *ri = r->impl;
    if (ri->msgs == NULL || next > ri->nmsgs) {
        errno = EINVAL;
        return NULL;
    }
    pp_dimpl *d = defer_open(ri);
    if (d == NULL)
        return NULL;
    const pp_buf *task = &ri->conn->task;
    ri->handled = next;
    if (next == ri->nmsgs)
        ri->rest_off = pp__buf_size(task);
    else
        ri->rest_off = (size_t)(ri->msgs[next].data - pp__buf_begin(task)) -
                       pp__frame_prefix_len(&ri->srv->framing);
    return &d->pub;
}

/* Queues d, deferred by the call just made, on the connection; replies made
 * after it are held in its after buffer. */
static void defer_queue(reply_impl *ri, pp_dimpl *d)
{
    pp_conn *c = ri->conn;
    ri->deferred = NULL;
    if (ri->held)
        ri->held_bytes += pp__buf_size(&ri->held->after);
    ri->held = d;
    ri->ndef++;
    if (c->def_tail)
        c->def_tail->qnext = d;
    else
        c->def_head = d;
    c->def_tail = d;
    c->ndef++;
}

/* Checked after every message, so the check is inline and the send not.
 * Held replies wait for the pending one before them: nothing to send. */
static inline int maybe_flush(reply_impl *ri)
{
    if (ri->held != NULL || pp__buf_size(&ri->conn->out) < PP_FLUSH_AT)
        return 0;
    return flush_now(ri);
}

/* After a whole reply from a batch handler: send if enough waits.  A failed
 * send means the peer is gone: the task ends with the error recorded, and
 * replies that cannot be delivered are moot.  Returns -1 with errno =
 * ENOBUFS once output_limit is passed; the batch handler must stop. */
static int after_reply(reply_impl *ri)
{
    if (ri->conn->send_error)
        return 0;
    int rc = maybe_flush(ri);
    if (rc == -ENOBUFS) {
        ri->overflow = 1;
        errno = ENOBUFS;
        return -1;
    }
    if (rc < 0)
        ri->conn->send_error = -rc;
    return 0;
}

int pp_reply_send(pp_reply *r, const void *data, size_t len)
{
    reply_impl *ri = r->impl;
    reply_write(r, data, len);
    int rc = reply_close(ri, PP_KEEP);
    if (rc < 0) {
        errno = -rc;
        return -1;
    }
    return after_reply(ri);
}

int pp_reply_send_framed(pp_reply *r, const void *data, size_t len,
                         size_t nreplies)
{
    reply_impl *ri = r->impl;
    if (ri->open)
        abort(); /* mixing with pp_reply_write() inside one message */
    if (pp__buf_append(ri_out(ri), data, len) < 0) {
        errno = ENOMEM;
        return -1;
    }
    if (ri->held)
        ri->held->after_n += nreplies;
    else
        ri->replies += nreplies;
    return after_reply(ri);
}

/* Segments and the reply buffer in one sendmsg(): a broadcast's frame is
 * never copied per recipient. */
#define PP_IOV 64

static int flush_segments(pp_conn *c, uint64_t *sent)
{
    pp_buf *out = &c->out;
    while (c->outq.n > 0) {
        struct iovec iov[PP_IOV];
        size_t n = 0, want = 0;
        for (; n < c->outq.n && n < PP_IOV; n++) {
            const pp_seg *s = pp__segq_at(&c->outq, n);
            iov[n].iov_base = s->sh->data + s->off;
            iov[n].iov_len = s->sh->len - s->off;
            want += iov[n].iov_len;
        }
        if (n < PP_IOV && pp__buf_size(out) > 0) {
            iov[n].iov_base = pp__buf_begin(out);
            iov[n].iov_len = pp__buf_size(out);
            want += iov[n++].iov_len;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = n};
        ssize_t k = sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (k <= 0)
            return k < 0 ? -errno : -EIO;
        *sent += (uint64_t)k;
        size_t left = (size_t)k;
        size_t in_q = left < c->outq.bytes ? left : c->outq.bytes;
        size_t pushed = pp__segq_consume(&c->outq, in_q);
        if (pushed)
            atomic_fetch_sub_explicit(&c->push_queued, pushed, memory_order_relaxed);
        left -= in_q;
        if (left)
            pp__buf_consume(out, left);
        if ((size_t)k < want)
            return 0; /* the socket buffer is full: wait for POLLOUT */
    }
    return 1; /* segments gone: the reply buffer alone is left */
}

int pp__conn_flush(pp_conn *c, uint64_t *sent)
{
    pp_buf *out = &c->out;
    if (c->outq.n > 0) {
        int rc = flush_segments(c, sent);
        if (rc <= 0)
            return rc;
    }
    while (pp__buf_size(out) > 0) {
        size_t want = pp__buf_size(out);
        ssize_t n = send(c->fd, pp__buf_begin(out), want,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            pp__buf_consume(out, (size_t)n);
            *sent += (uint64_t)n;
            if ((size_t)n < want)
                return 0; /* the socket buffer is full: wait for POLLOUT */
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        return n < 0 ? -errno : -EIO;
    }
    return 0;
}

/* Sends between messages (maybe_flush() found enough waiting).  Returns 0,
 * -errno of a failed send, or -ENOBUFS when what the peer has not taken
 * passes output_limit: a handler whose replies dwarf its input is stopped
 * within the task, not after it. */
static int flush_now(reply_impl *ri)
{
    pp_buf *out = &ri->conn->out;
    int rc = pp__conn_flush(ri->conn, &ri->sent);
    if (rc < 0)
        return rc;
    size_t limit = ri->srv->cfg.output_limit;
    return limit && pp__buf_size(out) > limit ? -ENOBUFS : 0;
}

static int run_handler(pp_server *srv, pp_worker *w, pp_conn *c, pp_reply *r,
                       reply_impl *ri, uint64_t *nmsg)
{
    const unsigned char *p = pp__buf_begin(&c->task);
    size_t len = pp__buf_size(&c->task);
    size_t pos = 0, scanned = 0;
    (void)w;
    while (pos < len) {
        pp_frame fr;
        if (pp__frame_next(&srv->framing, p + pos, len - pos, &scanned, &fr) != 1)
            abort(); /* the I/O thread hands over whole, valid frames only */
        int st = srv->cfg.handler(srv->cfg.ctx, p + pos + fr.msg_off, fr.msg_len, r);
        pos += fr.frame_len;
        ++*nmsg;
        if (ri->deferred) {
            defer_queue(ri, ri->deferred);
            /* The messages after this one wait for it, unless the handler
             * may go on while it is pending (max_deferred), with what it
             * holds back bounded by output_high_water. */
            if (ri->ndef >= srv->max_deferred || pos == len ||
                ri->held_bytes > srv->cfg.output_high_water) {
                ri->rest_off = pos;
                return PP_DEFER;
            }
            continue;
        }
        if (st == PP_DEFER)
            st = -EINVAL; /* nothing was deferred */
        int rc = reply_close(ri, st);
        if (rc < 0 && st >= 0)
            st = rc;
        if (st != PP_KEEP) {
            ri->rest_off = len; /* with replies pending: none of the rest runs */
            return st > 0 ? PP_CLOSE : st;
        }
        if (ri->held != NULL) {
            size_t held = ri->held_bytes + pp__buf_size(&ri->held->after);
            if (srv->cfg.output_limit && held > srv->cfg.output_limit) {
                ri->rest_off = len;
                return -ENOBUFS; /* as flush_now() would: replies dwarf input */
            }
            if (pos < len && held > srv->cfg.output_high_water) {
                ri->rest_off = pos;
                return PP_DEFER;
            }
            continue;
        }
        rc = maybe_flush(ri);
        if (rc == -ENOBUFS)
            return rc;
        if (rc < 0) {
            c->send_error = -rc;
            return PP_KEEP;
        }
    }
    if (ri->ndef) {
        ri->rest_off = len;
        return PP_DEFER;
    }
    return PP_KEEP;
}

static int run_batch(pp_server *srv, pp_worker *w, pp_conn *c, pp_reply *r,
                     uint64_t *nmsg)
{
    const unsigned char *p = pp__buf_begin(&c->task);
    size_t len = pp__buf_size(&c->task);
    size_t pos = 0, scanned = 0, n = 0;
    while (pos < len) {
        pp_frame fr;
        if (pp__frame_next(&srv->framing, p + pos, len - pos, &scanned, &fr) != 1)
            abort();
        if (n == w->msgs_cap) {
            size_t cap = w->msgs_cap ? w->msgs_cap * 2 : 64;
            pp_msg *m = realloc(w->msgs, cap * sizeof *m);
            if (m == NULL)
                return -ENOMEM;
            w->msgs = m;
            w->msgs_cap = cap;
        }
        w->msgs[n].data = p + pos + fr.msg_off;
        w->msgs[n].len = fr.msg_len;
        n++;
        pos += fr.frame_len;
    }
    *nmsg = n;
    reply_impl *ri = r->impl;
    ri->msgs = w->msgs;
    ri->nmsgs = n;
    int st = srv->cfg.batch(srv->cfg.ctx, r, w->msgs, n);
    ri->msgs = NULL;
    if (ri->deferred) {
        if (ri->rest_off == SIZE_MAX)
            ri->rest_off = len; /* pp_reply_defer(): the whole batch */
        else
            *nmsg = ri->handled; /* the rest are counted when they run */
        return PP_DEFER;
    }
    if (ri->overflow)
        return -ENOBUFS;
    if (st == PP_DEFER)
        return -EINVAL;
    return st > 0 ? PP_CLOSE : st;
}

static int addr_text(const struct sockaddr_storage *ss, char *host, size_t hostlen, int *port)
{
    const void *addr;
    if (ss->ss_family == AF_INET) {
        addr = &((const struct sockaddr_in *)ss)->sin_addr;
        *port = ntohs(((const struct sockaddr_in *)ss)->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        addr = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        *port = ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    } else {
        return -EAFNOSUPPORT;
    }
    if (inet_ntop(ss->ss_family, addr, host, (socklen_t)hostlen) == NULL)
        return -errno;
    return 0;
}

int pp_reply_peer(const pp_reply *r, char *host, size_t hostlen, int *port)
{
    const reply_impl *ri = r->impl;
    return addr_text(&ri->conn->peer, host, hostlen, port);
}

int pp_reply_peer_cred(const pp_reply *r, int *pid, int *uid, int *gid)
{
    const reply_impl *ri = r->impl;
    if (ri->conn->peer.ss_family != AF_UNIX)
        return -EAFNOSUPPORT;
    struct ucred cr;
    socklen_t cl = sizeof cr;
    if (getsockopt(ri->conn->fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) < 0)
        return -errno;
    *pid = (int)cr.pid;
    *uid = (int)cr.uid;
    *gid = (int)cr.gid;
    return 0;
}

int pp_reply_proxy_peer(const pp_reply *r, char *host, size_t hostlen, int *port)
{
    const reply_impl *ri = r->impl;
    if (ri->conn->proxy_peer == NULL)
        return -ENOENT;
    return addr_text(&ri->conn->proxy_peer->addr, host, hostlen, port);
}

void pp__task_run(void *arg, pp_worker *w, pp_task *t)
{
    pp_server *srv = arg;
    pp_conn *c = (pp_conn *)t; /* task_link is the first member */
    reply_impl ri = {.srv = srv, .conn = c};
    pp_reply r = {.write = reply_write, .conn_id = c->id, .impl = &ri,
                  .services = &srv->services};
    uint64_t nmsg = 0;
    int st = PP_KEEP;

    if (c->event == PP_EV_CLOSE) {
        /* Nothing may be sent any more: the socket is shut down. */
        srv->cfg.on_close(srv->cfg.ctx, c->id);
        c->status = PP_KEEP;
        pp__loop_complete(srv, c);
        return;
    }
    if (c->event == PP_EV_OPEN) {
        if (srv->cfg.on_open) {
            st = srv->cfg.on_open(srv->cfg.ctx, &r);
            if (ri.deferred) {
                st = PP_DEFER;
                ri.rest_off = 0; /* an open task holds no messages */
            } else {
                if (st == PP_DEFER)
                    st = -EINVAL;
                int rc = reply_close(&ri, st);
                if (rc < 0 && st >= 0)
                    st = rc;
                st = st > 0 ? PP_CLOSE : st;
            }
        }
    } else if (srv->cfg.handler) {
        st = run_handler(srv, w, c, &r, &ri, &nmsg);
    } else {
        st = run_batch(srv, w, c, &r, &nmsg);
    }
    if (ri.deferred != NULL)
        defer_queue(&ri, ri.deferred); /* the open hook's or a batch's */
    if (ri.ndef > 0) {
        /* The task ended with replies pending, on PP_DEFER or on an outcome
         * the I/O thread applies once they are in. */
        c->rest_off = st == PP_DEFER ? ri.rest_off : pp__buf_size(&c->task);
        pp__stat_add(&w->stats.deferred_total, ri.ndef);
    }
    if (st == -ENOMEM)
        pp__stat_add(&w->stats.nomem_errors, 1);
    else if (st == -ENOBUFS)
        pp__stat_add(&w->stats.output_overflows, 1);
    else if (st < 0)
        pp__stat_add(&w->stats.handler_errors, 1);
    /* Pushes made meanwhile (by this handler too) go after the task's
     * replies, in the same send; replies held behind a pending one are not
     * in the output yet, and the pushes go before them. */
    if (atomic_load_explicit(&c->outbox_has, memory_order_relaxed) &&
        (pp__push_take(srv, c, 0) & PP_P_NOMEM)) {
        /* Pushes were lost: none may follow the gap. */
        pp__push_refuse(srv, c);
        pp__stat_add(&w->stats.nomem_errors, 1);
        if (ri.ndef > 0)
            c->send_error = ENOMEM; /* the I/O thread cuts it, handles and all */
        else if (st >= 0)
            st = -ENOMEM;
    }
    if (c->send_error == 0 && pp__conn_pending(c) > 0) {
        int rc = pp__conn_flush(c, &ri.sent);
        if (rc < 0)
            c->send_error = -rc;
    }
    atomic_store_explicit(&c->out_pending, pp__conn_pending(c), memory_order_relaxed);
    if (c->send_error)
        pp__stat_add(&w->stats.write_errors, 1);
    pp__stat_add(&w->stats.messages, nmsg);
    pp__stat_add(&w->stats.replies, ri.replies);
    pp__stat_add(&w->stats.bytes_out, ri.sent);
    c->status = st;
    /* Past this call the connection is the I/O thread's again. */
    pp__loop_complete(srv, c);
}
