/* framing.h - cutting messages out of a byte stream, and framing replies. */
#ifndef PP_FRAMING_H
#define PP_FRAMING_H

#include <stddef.h>
#include <string.h>

#include "buffer.h"
#include "pp_server.h"

typedef struct pp_framing {
    int kind;                   /* PP_FRAMING_* */
    unsigned char delim[PP_MAX_DELIMITER];
    size_t delim_len;
    int header_bytes;           /* 1, 2, 4 or 8 */
    size_t max_size;
    size_t reply_max;           /* largest reply body the framing can carry */
    int delim_overlaps;         /* a proper prefix of delim is also its suffix */
} pp_framing;

/* One complete frame: the message is data[msg_off..msg_off+msg_len) and the
 * whole frame is frame_len bytes from the start. */
typedef struct pp_frame {
    size_t msg_off;
    size_t msg_len;
    size_t frame_len;
} pp_frame;

/* Fills f from cfg; returns -EINVAL if the framing options are invalid. */
int pp__framing_init(pp_framing *f, const pp_config *cfg);

/* Looks for one frame at the start of data[0..len).  Returns 1 and fills *fr
 * when a whole frame is there, 0 when more bytes are needed, -EMSGSIZE when
 * the frame is or will be larger than max_size.  *scanned is a hint kept
 * between calls on the same growing frame (line framing resumes its search
 * there); set it to 0 for a new frame.  Raw framing: every byte is message,
 * cut into pieces of at most max_size. */
int pp__frame_next_any(const pp_framing *f, const unsigned char *data,
                       size_t len, size_t *scanned, pp_frame *fr);

/* A worker cuts every message of a task with this, so the common case, a
 * one-byte delimiter found in one memchr(), is inline; the rest is
 * pp__frame_next_any(). */
static inline int pp__frame_next(const pp_framing *f, const unsigned char *data,
                                 size_t len, size_t *scanned, pp_frame *fr)
{
    if (f->kind == PP_FRAMING_LINE && f->delim_len == 1 && *scanned == 0) {
        const unsigned char *hit = memchr(data, f->delim[0], len);
        if (hit != NULL && (size_t)(hit - data) <= f->max_size) {
            fr->msg_off = 0;
            fr->msg_len = (size_t)(hit - data);
            fr->frame_len = fr->msg_len + 1;
            return 1;
        }
    }
    return pp__frame_next_any(f, data, len, scanned, fr);
}

/* Returns how many bytes at the start of data[0..len) are whole frames,
 * found from the end in one backward search, or -1 when that shortcut does
 * not apply (not line framing, a self-overlapping delimiter, or len above
 * max_size, where a frame inside could be oversize) and the caller must cut
 * frame by frame.  Sets *scanned for the partial frame after them. */
long pp__frame_whole_prefix(const pp_framing *f, const unsigned char *data,
                            size_t len, size_t *scanned);

/* Bytes a reply needs before its body (the length header), 0 for raw/line. */
static inline size_t pp__frame_prefix_len(const pp_framing *f)
{
    return f->kind == PP_FRAMING_LENGTH ? (size_t)f->header_bytes : 0;
}

/* Completes a reply whose body is the last body_len bytes of out and whose
 * prefix_len bytes of prefix were reserved just before it: writes the length
 * header or appends the delimiter.  Returns 0, -EMSGSIZE when body_len does
 * not fit the header, or -ENOMEM. */
int pp__frame_finish_any(const pp_framing *f, pp_buf *out, size_t body_len);

/* Inline for a delimiter that fits: one per reply. */
static inline int pp__frame_finish(const pp_framing *f, pp_buf *out,
                                   size_t body_len)
{
    if (f->kind == PP_FRAMING_LINE && out->cap - out->len >= f->delim_len) {
        memcpy(out->data + out->len, f->delim, f->delim_len);
        out->len += f->delim_len;
        return 0;
    }
    return pp__frame_finish_any(f, out, body_len);
}

/* Appends a whole framed reply. */
int pp__frame_append(const pp_framing *f, pp_buf *out, const void *body,
                     size_t len);

#endif
