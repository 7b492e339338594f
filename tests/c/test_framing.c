/* test_framing.c - the raw, line and length framers and reply framing.
 *
 * Every input handed to pp__frame_next() sits at the very end of a malloc'd
 * block of exactly its size (as picohttpparser's tests put inputs before a
 * guard page), so under ASan or valgrind any read past len faults.  Streams are
 * fed incrementally the way the I/O loop does: the unconsumed bytes of the
 * current partial frame are offered again with more appended, and the
 * `scanned` hint is kept between calls on the same frame and reset to 0 after
 * each complete one. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "framing.h"

static int scale_pct(void)
{
    const char *s = getenv("PP_TEST_SCALE");
    int v = s ? atoi(s) : 100;
    return v > 0 ? v : 100;
}

static pp_config base_cfg(int kind, size_t max)
{
    pp_config c;
    memset(&c, 0, sizeof c);
    c.framing = kind;
    c.max_message_size = max;
    c.delimiter[0] = '\n';
    c.delimiter_len = 1;
    c.header_bytes = 4;
    c.threads = 1;
    return c;
}

static pp_framing make_line(const char *delim, size_t dl, size_t max)
{
    pp_config c = base_cfg(PP_FRAMING_LINE, max);
    memcpy(c.delimiter, delim, dl);
    c.delimiter_len = dl;
    pp_framing f;
    CHECK_EQ(pp__framing_init(&f, &c), 0);
    return f;
}

static pp_framing make_length(int hb, size_t max)
{
    pp_config c = base_cfg(PP_FRAMING_LENGTH, max);
    c.header_bytes = hb;
    pp_framing f;
    CHECK_EQ(pp__framing_init(&f, &c), 0);
    return f;
}

static pp_framing make_raw(size_t max)
{
    pp_config c = base_cfg(PP_FRAMING_RAW, max);
    pp_framing f;
    CHECK_EQ(pp__framing_init(&f, &c), 0);
    return f;
}

/* Calls the framer on a private exact-size copy of data[0..len). */
static int next_exact(const pp_framing *f, const void *data, size_t len,
                      size_t *scanned, pp_frame *fr)
{
    unsigned char *copy = malloc(len ? len : 1);
    CHECK(copy != NULL);
    unsigned char *p = copy;
    if (len)
        memcpy(p, data, len);
    else
        p = copy + 1;          /* one past the end: nothing may be read */
    memset(fr, 0xEE, sizeof *fr);
    int rc = pp__frame_next(f, p, len, scanned, fr);
    if (rc == 1) {
        CHECK(fr->frame_len <= len);
        CHECK(fr->frame_len > 0);
        CHECK(fr->msg_off + fr->msg_len <= fr->frame_len);
    }
    free(copy);
    return rc;
}

/* Collects frames as (offset, length) of message bodies within the stream. */
typedef struct frames {
    size_t n, cap;
    size_t *off, *len;
    int error;                 /* 0, or the negative code that ended the stream */
    size_t rest;               /* unframed bytes left at the end */
} frames;

static void frames_add(frames *fs, size_t off, size_t len)
{
    if (fs->n == fs->cap) {
        fs->cap = fs->cap ? fs->cap * 2 : 64;
        fs->off = realloc(fs->off, fs->cap * sizeof *fs->off);
        fs->len = realloc(fs->len, fs->cap * sizeof *fs->len);
        CHECK(fs->off && fs->len);
    }
    fs->off[fs->n] = off;
    fs->len[fs->n] = len;
    fs->n++;
}

static void frames_free(frames *fs)
{
    free(fs->off);
    free(fs->len);
    memset(fs, 0, sizeof *fs);
}

/* Feeds s[0..n) in chunks ending at cuts[0..ncuts) (increasing, the last one
 * n) the way the loop does, and records every frame.  Stops at an error. */
static void feed(const pp_framing *f, const unsigned char *s, size_t n,
                 const size_t *cuts, size_t ncuts, frames *out)
{
    memset(out, 0, sizeof *out);
    size_t start = 0, scanned = 0;
    for (size_t c = 0; c < ncuts; c++) {
        size_t avail = cuts[c];
        CHECK(avail <= n);
        for (;;) {
            pp_frame fr;
            int rc = next_exact(f, s + start, avail - start, &scanned, &fr);
            if (rc < 0) {
                out->error = rc;
                out->rest = n - start;
                return;
            }
            if (rc == 0) {
                CHECK(scanned <= avail - start);
                break;
            }
            CHECK_EQ(rc, 1);
            /* Line framing documents that the hint restarts after a frame;
             * the loop relies on it, so check it rather than reset it. */
            if (f->kind == PP_FRAMING_LINE)
                CHECK_EQ(scanned, 0);
            frames_add(out, start + fr.msg_off, fr.msg_len);
            start += fr.frame_len;
            if (f->kind == PP_FRAMING_RAW && start == avail)
                break;
        }
    }
    out->rest = n - start;
}

/* ---- a trivially simple reference framer (whole stream, no hints) ---- */

static size_t naive_find(const unsigned char *s, size_t n, const unsigned char *d,
                         size_t dl)
{
    for (size_t i = 0; i + dl <= n; i++)
        if (memcmp(s + i, d, dl) == 0)
            return i;
    return SIZE_MAX;
}

static void reference(const pp_framing *f, const unsigned char *s, size_t n,
                      frames *out)
{
    memset(out, 0, sizeof *out);
    size_t start = 0;
    for (;;) {
        const unsigned char *p = s + start;
        size_t len = n - start;
        if (f->kind == PP_FRAMING_LINE) {
            size_t at = naive_find(p, len, f->delim, f->delim_len);
            if (at == SIZE_MAX) {
                /* No delimiter: too long once none can start at <= max. */
                if (len >= f->delim_len && len - f->delim_len + 1 > f->max_size)
                    out->error = -EMSGSIZE;
                break;
            }
            if (at > f->max_size) {
                out->error = -EMSGSIZE;
                break;
            }
            frames_add(out, start, at);
            start += at + f->delim_len;
        } else {
            size_t hb = (size_t)f->header_bytes;
            if (len < hb)
                break;
            uint64_t v = 0;
            for (size_t i = 0; i < hb; i++)
                v = v << 8 | p[i];
            uint64_t cap = hb == 8 ? UINT64_MAX : (UINT64_C(1) << (8 * hb)) - 1;
            uint64_t max = f->max_size < cap ? f->max_size : cap;
            if (v > max) {
                out->error = -EMSGSIZE;
                break;
            }
            if (len - hb < v)
                break;
            frames_add(out, start + hb, (size_t)v);
            start += hb + (size_t)v;
        }
    }
    out->rest = n - start;
}

static void check_same(const frames *a, const frames *b, const char *what)
{
    CHECKF(a->n == b->n, "%s: %zu frames, expected %zu", what, a->n, b->n);
    for (size_t i = 0; i < a->n; i++)
        CHECKF(a->off[i] == b->off[i] && a->len[i] == b->len[i],
               "%s: frame %zu at %zu+%zu, expected %zu+%zu", what, i, a->off[i],
               a->len[i], b->off[i], b->len[i]);
    CHECKF(a->error == b->error, "%s: error %d, expected %d", what, a->error, b->error);
    if (a->error == 0)
        CHECKF(a->rest == b->rest, "%s: %zu bytes left, expected %zu", what,
               a->rest, b->rest);
}

/* ---- stream building ---- */

typedef struct stream {
    unsigned char *s;
    size_t n, cap;
    size_t nmsg;
    size_t *moff, *mlen;      /* where each message body is in s */
} stream;

static void stream_put(stream *st, const void *p, size_t n)
{
    while (st->n + n > st->cap) {
        st->cap = st->cap ? st->cap * 2 : 256;
        st->s = realloc(st->s, st->cap);
        CHECK(st->s);
    }
    memcpy(st->s + st->n, p, n);
    st->n += n;
}

static void stream_msg(stream *st, const pp_framing *f, const void *body, size_t n)
{
    st->moff = realloc(st->moff, (st->nmsg + 1) * sizeof *st->moff);
    st->mlen = realloc(st->mlen, (st->nmsg + 1) * sizeof *st->mlen);
    CHECK(st->moff && st->mlen);
    if (f->kind == PP_FRAMING_LENGTH) {
        unsigned char h[8];
        uint64_t v = n;
        for (int i = f->header_bytes; i-- > 0; v >>= 8)
            h[i] = (unsigned char)v;
        stream_put(st, h, (size_t)f->header_bytes);
    }
    st->moff[st->nmsg] = st->n;
    st->mlen[st->nmsg] = n;
    st->nmsg++;
    stream_put(st, body, n);
    if (f->kind == PP_FRAMING_LINE)
        stream_put(st, f->delim, f->delim_len);
}

static void stream_free(stream *st)
{
    free(st->s);
    free(st->moff);
    free(st->mlen);
    memset(st, 0, sizeof *st);
}

/* Frames must be exactly the stream's messages, nothing left over. */
static void check_messages(const stream *st, const frames *fs, const char *what)
{
    CHECKF(fs->error == 0, "%s: error %d", what, fs->error);
    CHECKF(fs->n == st->nmsg, "%s: %zu frames, expected %zu", what, fs->n, st->nmsg);
    for (size_t i = 0; i < fs->n; i++)
        CHECKF(fs->len[i] == st->mlen[i] &&
                   memcmp(st->s + fs->off[i], st->s + st->moff[i], fs->len[i]) == 0,
               "%s: message %zu differs", what, i);
    CHECKF(fs->rest == 0, "%s: %zu bytes left", what, fs->rest);
}

/* Messages whose bodies are built to contain partial delimiters (the
 * delimiter's prefixes, repeated) without containing the delimiter itself. */
static void build_stream(stream *st, const pp_framing *f, size_t nmsg, uint64_t *rng)
{
    unsigned char body[64];
    for (size_t m = 0; m < nmsg; m++) {
        size_t n = 0, want = (size_t)check_range(rng, 0, 20);
        if (m % 7 == 3)
            want = 0;                                     /* empty messages too */
        while (n < want) {
            unsigned char c;
            if (f->kind == PP_FRAMING_LINE && check_rand(rng) % 2)
                c = f->delim[check_rand(rng) % f->delim_len];
            else
                c = (unsigned char)check_range(rng, 'a', 'z');
            body[n++] = c;
            /* Drop the byte again if it completed a delimiter. */
            if (f->kind == PP_FRAMING_LINE && n >= f->delim_len &&
                memcmp(body + n - f->delim_len, f->delim, f->delim_len) == 0)
                n--;
            /* A body ending in a proper prefix of the delimiter could join
             * with the delimiter itself to form an earlier match: avoid it. */
            if (n == want && f->kind == PP_FRAMING_LINE) {
                unsigned char tmp[64 + PP_MAX_DELIMITER];
                memcpy(tmp, body, n);
                memcpy(tmp + n, f->delim, f->delim_len);
                if (naive_find(tmp, n + f->delim_len, f->delim, f->delim_len) != n)
                    n--;
            }
        }
        stream_msg(st, f, body, n);
    }
}

/* Every single split point, and byte-at-a-time feeding (every boundary at
 * once), give exactly the original messages. */
static void check_all_splits(const pp_framing *f, const char *what, uint64_t seed)
{
    uint64_t rng = seed;
    stream st = {0};
    build_stream(&st, f, 40, &rng);
    frames fs;
    char label[128];

    size_t cuts[2];
    for (size_t k = 0; k <= st.n; k++) {
        cuts[0] = k;
        cuts[1] = st.n;
        feed(f, st.s, st.n, cuts, 2, &fs);
        snprintf(label, sizeof label, "%s split at %zu/%zu", what, k, st.n);
        check_messages(&st, &fs, label);
        frames_free(&fs);
    }

    size_t *every = malloc(st.n * sizeof *every);
    CHECK(every);
    for (size_t k = 0; k < st.n; k++)
        every[k] = k + 1;
    feed(f, st.s, st.n, every, st.n, &fs);
    snprintf(label, sizeof label, "%s byte at a time", what);
    check_messages(&st, &fs, label);
    frames_free(&fs);
    free(every);
    stream_free(&st);
}

static void test_split_everywhere(void)
{
    pp_framing f;
    f = make_line("\n", 1, 1024);
    check_all_splits(&f, "line \\n", 1);
    f = make_line("\r\n", 2, 1024);
    check_all_splits(&f, "line \\r\\n", 2);
    f = make_line("aab", 3, 1024);
    check_all_splits(&f, "line aab", 3);
    f = make_line("abab", 4, 1024);
    check_all_splits(&f, "line abab", 4);
    f = make_line("\r\n\r\n", 4, 1024);
    check_all_splits(&f, "line crlfcrlf", 5);
    for (int hb = 1; hb <= 8; hb *= 2) {
        f = make_length(hb, 1024);
        char label[32];
        snprintf(label, sizeof label, "length %d", hb);
        check_all_splits(&f, label, 10 + (uint64_t)hb);
    }
}

/* Hand-written cases around multi-byte delimiters with repeated prefixes. */
static void test_line_delimiters(void)
{
    pp_framing f = make_line("aab", 3, 100);
    pp_frame fr;
    size_t sc = 0;
    /* "aaab": the match starts at 1, after a false start at 0. */
    CHECK_EQ(next_exact(&f, "aaab", 4, &sc, &fr), 1);
    CHECK_EQ(fr.msg_off, 0);
    CHECK_EQ(fr.msg_len, 1);
    CHECK_EQ(fr.frame_len, 4);
    /* "xaaaab" fed as "xaa" + "aab": the delimiter straddles the cut and
     * begins before the end of what was scanned first. */
    sc = 0;
    CHECK_EQ(next_exact(&f, "xaa", 3, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "xaaaab", 6, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 3);
    CHECK_EQ(fr.frame_len, 6);
    /* "xa" + "ab": two bytes of delimiter were already there. */
    sc = 0;
    CHECK_EQ(next_exact(&f, "xa", 2, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "xaa", 3, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "xaab", 4, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 1);
    /* "aa" + "aa" + "b" */
    sc = 0;
    CHECK_EQ(next_exact(&f, "aa", 2, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "aaaa", 4, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "aaaab", 5, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 2);

    f = make_line("\r\n", 2, 100);
    sc = 0;
    CHECK_EQ(next_exact(&f, "ab\r", 3, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "ab\r\n", 4, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 2);
    CHECK_EQ(fr.frame_len, 4);
    sc = 0;
    CHECK_EQ(next_exact(&f, "a\n\rb\r\r\n", 7, &sc, &fr), 1);  /* lone \n, \r are data */
    CHECK_EQ(fr.msg_len, 5);
    /* An empty line is an empty message. */
    sc = 0;
    CHECK_EQ(next_exact(&f, "\r\nx", 3, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 0);
    CHECK_EQ(fr.frame_len, 2);
    /* Nothing yet: need more. */
    sc = 0;
    CHECK_EQ(next_exact(&f, "", 0, &sc, &fr), 0);

    /* A 16-byte delimiter, the largest allowed. */
    f = make_line("0123456789abcdef", 16, 100);
    sc = 0;
    CHECK_EQ(next_exact(&f, "hi0123456789abcde", 17, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "hi0123456789abcdef", 18, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 2);
    CHECK_EQ(fr.frame_len, 18);
}

/* A line of exactly max_size is accepted; without a delimiter, the framer
 * gives up once none can start at or before max_size, and not one byte
 * earlier. */
static void test_line_oversize(void)
{
    const char *delims[] = {"\n", "\r\n", "aab", "0123456789abcdef"};
    for (size_t d = 0; d < 4; d++) {
        size_t dl = strlen(delims[d]);
        for (size_t max = 1; max <= 40; max += 13) {
            pp_framing f = make_line(delims[d], dl, max);
            unsigned char *buf = malloc(max + 2 * dl + 8);
            CHECK(buf);
            pp_frame fr;
            size_t sc;

            /* Exactly max_size, then the delimiter: accepted. */
            memset(buf, 'x', max);
            memcpy(buf + max, delims[d], dl);
            sc = 0;
            CHECK_EQ(next_exact(&f, buf, max + dl, &sc, &fr), 1);
            CHECK_EQ(fr.msg_len, max);
            /* The same, fed byte by byte with the hint: accepted. */
            sc = 0;
            for (size_t k = 1; k < max + dl; k++)
                CHECKF(next_exact(&f, buf, k, &sc, &fr) == 0, "delim %zu max %zu k %zu", d, max, k);
            CHECK_EQ(next_exact(&f, buf, max + dl, &sc, &fr), 1);
            CHECK_EQ(fr.msg_len, max);

            /* max_size + 1, then the delimiter: refused. */
            memset(buf, 'x', max + 1);
            memcpy(buf + max + 1, delims[d], dl);
            sc = 0;
            CHECK_EQ(next_exact(&f, buf, max + 1 + dl, &sc, &fr), -EMSGSIZE);

            /* No delimiter: max + dl - 1 bytes may still become a line of
             * max bytes; one more cannot. */
            memset(buf, 'x', max + dl);
            sc = 0;
            CHECK_EQ(next_exact(&f, buf, max + dl - 1, &sc, &fr), 0);
            CHECK_EQ(next_exact(&f, buf, max + dl, &sc, &fr), -EMSGSIZE);
            sc = 0;
            CHECK_EQ(next_exact(&f, buf, max + dl, &sc, &fr), -EMSGSIZE);
            free(buf);
        }
    }
    /* Oversize is decided on the first frame only: a good frame before a
     * long tail is still delivered, and the tail is refused next. */
    pp_framing f = make_line("\n", 1, 4);
    pp_frame fr;
    size_t sc = 0;
    CHECK_EQ(next_exact(&f, "abcd\nefghijk", 12, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 4);
    sc = 0;
    CHECK_EQ(next_exact(&f, "efghijk", 7, &sc, &fr), -EMSGSIZE);
}

static void put_be(unsigned char *h, int hb, uint64_t v)
{
    for (int i = hb; i-- > 0; v >>= 8)
        h[i] = (unsigned char)v;
}

static void test_length(void)
{
    pp_frame fr;
    size_t sc = 0;
    for (int hb = 1; hb <= 8; hb *= 2) {
        pp_framing f = make_length(hb, 1000);
        unsigned char buf[8 + 300];
        size_t body = hb == 1 ? 255 : 300;
        put_be(buf, hb, body);
        for (size_t i = 0; i < body; i++)
            buf[hb + i] = (unsigned char)i;
        /* Every proper prefix needs more; the whole frame is one message. */
        for (size_t k = 0; k < (size_t)hb + body; k++)
            CHECK_EQ(next_exact(&f, buf, k, &sc, &fr), 0);
        CHECK_EQ(next_exact(&f, buf, (size_t)hb + body, &sc, &fr), 1);
        CHECK_EQ(fr.msg_off, hb);
        CHECK_EQ(fr.msg_len, body);
        CHECK_EQ(fr.frame_len, (size_t)hb + body);
        /* A zero-length message. */
        put_be(buf, hb, 0);
        CHECK_EQ(next_exact(&f, buf, (size_t)hb, &sc, &fr), 1);
        CHECK_EQ(fr.msg_len, 0);
        CHECK_EQ(fr.frame_len, (size_t)hb);
    }

    /* max_size exactly is accepted; one more is refused as soon as the header
     * is complete, with no body byte present. */
    pp_framing f = make_length(2, 1000);
    unsigned char h[8];
    put_be(h, 2, 1000);
    CHECK_EQ(next_exact(&f, h, 2, &sc, &fr), 0);
    put_be(h, 2, 1001);
    CHECK_EQ(next_exact(&f, h, 1, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, h, 2, &sc, &fr), -EMSGSIZE);

    /* Headers announcing 4 GiB and 2^63 (and the largest 8-byte value):
     * -EMSGSIZE at once, from the header alone.  A framer that trusted the
     * header would read past these exact-size inputs or allocate. */
    f = make_length(4, (size_t)1 << 20);
    put_be(h, 4, UINT32_MAX);
    CHECK_EQ(next_exact(&f, h, 4, &sc, &fr), -EMSGSIZE);
    f = make_length(8, (size_t)1 << 20);
    put_be(h, 8, UINT64_C(1) << 32);
    CHECK_EQ(next_exact(&f, h, 8, &sc, &fr), -EMSGSIZE);
    put_be(h, 8, UINT64_C(1) << 63);
    CHECK_EQ(next_exact(&f, h, 8, &sc, &fr), -EMSGSIZE);
    put_be(h, 8, UINT64_MAX);
    CHECK_EQ(next_exact(&f, h, 8, &sc, &fr), -EMSGSIZE);
    /* Even with no configured limit, an 8-byte header beyond what size_t
     * and the address space allow must not turn into a huge frame length
     * that overflows hb + n. */
    f = make_length(8, SIZE_MAX);
    put_be(h, 8, UINT64_MAX);
    int rc = next_exact(&f, h, 8, &sc, &fr);
    CHECKF(rc == -EMSGSIZE || rc == 0, "rc %d", rc);
    put_be(h, 8, UINT64_MAX - 3);
    rc = next_exact(&f, h, 8, &sc, &fr);
    CHECKF(rc == -EMSGSIZE || rc == 0, "rc %d", rc);

    /* A 1-byte header cannot describe more than 255: max_size is clamped
     * to what the header can carry, so 255 passes with a larger limit. */
    f = make_length(1, 1 << 20);
    CHECK_EQ(f.max_size, 255);
    f = make_length(2, 1 << 20);
    CHECK_EQ(f.max_size, 65535);
}

static void test_raw(void)
{
    pp_framing f = make_raw(10);
    pp_frame fr;
    size_t sc = 0;
    CHECK_EQ(next_exact(&f, "", 0, &sc, &fr), 0);
    CHECK_EQ(next_exact(&f, "abc", 3, &sc, &fr), 1);
    CHECK_EQ(fr.msg_off, 0);
    CHECK_EQ(fr.msg_len, 3);
    CHECK_EQ(fr.frame_len, 3);
    CHECK_EQ(next_exact(&f, "0123456789", 10, &sc, &fr), 1);
    CHECK_EQ(fr.msg_len, 10);
    /* Longer than max_size: cut into max_size pieces, never refused. */
    const char *s = "0123456789abcdefghijKLMNO";
    size_t n = strlen(s);
    size_t cuts[1] = {n};
    frames fs;
    feed(&f, (const unsigned char *)s, n, cuts, 1, &fs);
    CHECK_EQ(fs.error, 0);
    CHECK_EQ(fs.n, 3);
    CHECK_EQ(fs.len[0], 10);
    CHECK_EQ(fs.len[1], 10);
    CHECK_EQ(fs.len[2], 5);
    CHECK_EQ(fs.off[1], 10);
    CHECK_EQ(fs.off[2], 20);
    CHECK_EQ(fs.rest, 0);
    frames_free(&fs);
    /* Each chunk is its own message: the raw framer never waits. */
    size_t cuts2[3] = {4, 7, n};
    feed(&f, (const unsigned char *)s, n, cuts2, 3, &fs);
    CHECK_EQ(fs.n, 4);
    CHECK_EQ(fs.len[0], 4);
    CHECK_EQ(fs.len[1], 3);
    CHECK_EQ(fs.len[2], 10);
    CHECK_EQ(fs.len[3], 8);
    frames_free(&fs);
}

static void test_init_validation(void)
{
    pp_framing f;
    pp_config c = base_cfg(PP_FRAMING_LINE, 100);
    CHECK_EQ(pp__framing_init(&f, &c), 0);
    c.delimiter_len = 0;
    CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
    c.delimiter_len = PP_MAX_DELIMITER + 1;
    CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
    c.delimiter_len = PP_MAX_DELIMITER;
    CHECK_EQ(pp__framing_init(&f, &c), 0);
    c = base_cfg(PP_FRAMING_LINE, 0);
    CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
    c = base_cfg(PP_FRAMING_LENGTH, 100);
    int bad[] = {0, 3, 5, 7, 9, 16, -1};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        c.header_bytes = bad[i];
        CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
    }
    c = base_cfg(3, 100);
    CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
    c = base_cfg(-1, 100);
    CHECK_EQ(pp__framing_init(&f, &c), -EINVAL);
}

/* frame_append then frame_next gives back the body, for several replies in
 * a row; bodies too large for the header are refused and leave out as it was. */
static void test_reply_roundtrip(void)
{
    uint64_t rng = 77;
    pp_framing fw[] = {
        make_raw(1 << 20),
        make_line("\n", 1, 1 << 20),
        make_line("\r\n", 2, 1 << 20),
        make_line("aab", 3, 1 << 20),
        make_length(1, 1 << 20),
        make_length(2, 1 << 20),
        make_length(4, 1 << 20),
        make_length(8, 1 << 20),
    };
    for (size_t k = 0; k < sizeof fw / sizeof fw[0]; k++) {
        const pp_framing *f = &fw[k];
        pp_buf out = {0};
        size_t nrep = f->kind == PP_FRAMING_RAW ? 1 : 50;
        unsigned char bodies[50][300];
        size_t lens[50];
        for (size_t i = 0; i < nrep; i++) {
            size_t max = f->kind == PP_FRAMING_LENGTH && f->header_bytes == 1 ? 255 : 300;
            lens[i] = i == 0 ? max : (size_t)check_range(&rng, 0, max);
            for (size_t j = 0; j < lens[i]; j++)
                bodies[i][j] = (unsigned char)check_range(&rng, 'c', 'z');
            if (i % 2) {
                CHECK_EQ(pp__frame_append(f, &out, bodies[i], lens[i]), 0);
            } else {
                /* The handler path: reserve the prefix, write the body, finish. */
                size_t pre = pp__frame_prefix_len(f);
                CHECK_EQ(pre, f->kind == PP_FRAMING_LENGTH ? (size_t)f->header_bytes : 0);
                CHECK_EQ(pp__buf_reserve(&out, pre), 0);
                out.len += pre;
                CHECK_EQ(pp__buf_append(&out, bodies[i], lens[i]), 0);
                CHECK_EQ(pp__frame_finish(f, &out, lens[i]), 0);
            }
        }
        size_t off = 0, sc = 0;
        for (size_t i = 0; i < nrep; i++) {
            pp_frame fr;
            CHECKF(next_exact(f, pp__buf_begin(&out) + off, pp__buf_size(&out) - off,
                              &sc, &fr) == 1, "framing %zu reply %zu", k, i);
            CHECKF(fr.msg_len == lens[i] &&
                       memcmp(pp__buf_begin(&out) + off + fr.msg_off, bodies[i],
                              lens[i]) == 0,
                   "framing %zu reply %zu differs", k, i);
            off += fr.frame_len;
        }
        CHECK_EQ(off, pp__buf_size(&out));
        pp__buf_free(&out);
    }

    /* Header overflow: 256 bytes do not fit a 1-byte header, 65536 not a
     * 2-byte one.  The buffer keeps exactly what it had. */
    unsigned char big[65536];
    memset(big, 'q', sizeof big);
    pp_framing f1 = make_length(1, 1 << 20);
    pp_buf out = {0};
    CHECK_EQ(pp__frame_append(&f1, &out, "ok", 2), 0);
    CHECK_EQ(pp__buf_size(&out), 3);
    CHECK_EQ(pp__frame_append(&f1, &out, big, 256), -EMSGSIZE);
    CHECK_EQ(pp__buf_size(&out), 3);
    CHECK_EQ(pp__frame_append(&f1, &out, big, 255), 0);
    CHECK_EQ(pp__buf_size(&out), 3 + 256);
    CHECK(pp__buf_begin(&out)[0] == 2 && pp__buf_begin(&out)[3] == 255);
    /* frame_finish on its own refuses too. */
    size_t mark = out.len;
    CHECK_EQ(pp__buf_reserve(&out, 1 + 256), 0);
    out.len += 1;
    CHECK_EQ(pp__buf_append(&out, big, 256), 0);
    CHECK_EQ(pp__frame_finish(&f1, &out, 256), -EMSGSIZE);
    out.len = mark;
    pp__buf_free(&out);

    pp_framing f2 = make_length(2, 1 << 20);
    CHECK_EQ(pp__frame_append(&f2, &out, big, 65535), 0);
    CHECK_EQ(pp__buf_size(&out), 65537);
    CHECK_EQ(pp__frame_append(&f2, &out, big, sizeof big), -EMSGSIZE);
    CHECK_EQ(pp__buf_size(&out), 65537);
    pp__buf_free(&out);
}

/* Random streams of a small alphabet (so partial delimiters abound), random
 * framings and random cuts, compared with the reference framer run on the
 * whole stream at once.  The stream includes oversize and garbage. */
static void test_differential(void)
{
    uint64_t rng = 0xd1ff;
    int iters = 20000 * scale_pct() / 100;
    if (iters < 1000)
        iters = 1000;
    for (int it = 0; it < iters; it++) {
        pp_framing f;
        size_t max = (size_t)check_range(&rng, 1, 24);
        if (check_rand(&rng) % 3) {
            const unsigned char alpha[] = "ab\n\r";
            unsigned char d[PP_MAX_DELIMITER];
            size_t dl = (size_t)check_range(&rng, 1, 4);
            for (size_t i = 0; i < dl; i++)
                d[i] = alpha[check_rand(&rng) % 4];
            f = make_line((const char *)d, dl, max);
        } else {
            int hbs[] = {1, 2, 4, 8};
            f = make_length(hbs[check_rand(&rng) % 4], max);
        }
        size_t n = (size_t)check_range(&rng, 0, 200);
        unsigned char *s = malloc(n ? n : 1);
        CHECK(s);
        if (f.kind == PP_FRAMING_LINE) {
            const unsigned char alpha[] = "ab\n\rab";
            for (size_t i = 0; i < n; i++)
                s[i] = alpha[check_rand(&rng) % 6];
        } else {
            /* Mostly valid frames with small lengths, sometimes garbage. */
            size_t i = 0, hb = (size_t)f.header_bytes;
            while (i < n) {
                if (check_rand(&rng) % 16 == 0) {
                    s[i++] = (unsigned char)check_rand(&rng);
                    continue;
                }
                uint64_t len = check_range(&rng, 0, max + 2);
                unsigned char h[8];
                put_be(h, (int)hb, len);
                for (size_t j = 0; j < hb && i < n; j++)
                    s[i++] = h[j];
                for (uint64_t j = 0; j < len && i < n; j++)
                    s[i++] = (unsigned char)check_rand(&rng);
            }
        }
        size_t cuts[8], ncuts = (size_t)check_range(&rng, 1, 8);
        for (size_t c = 0; c + 1 < ncuts; c++)
            cuts[c] = n ? (size_t)check_range(&rng, 0, n) : 0;
        cuts[ncuts - 1] = n;
        for (size_t a = 0; a < ncuts; a++)             /* sort: tiny insertion */
            for (size_t b = a; b > 0 && cuts[b - 1] > cuts[b]; b--) {
                size_t t = cuts[b];
                cuts[b] = cuts[b - 1];
                cuts[b - 1] = t;
            }
        frames got, want;
        feed(&f, s, n, cuts, ncuts, &got);
        reference(&f, s, n, &want);
        char label[96];
        snprintf(label, sizeof label, "differential iteration %d (kind %d)", it, f.kind);
        check_same(&got, &want, label);
        frames_free(&got);
        frames_free(&want);
        free(s);
    }
}

/* pp__frame_whole_prefix() (the I/O thread's backward search) must agree
 * with cutting frame by frame whenever it answers, and must decline where
 * its premises fail: an overlapping delimiter, or more than max_size bytes. */
static void test_whole_prefix(void)
{
    uint64_t rng = 0x3a11;
    int answered = 0, declined = 0;
    for (int it = 0; it < 20000; it++) {
        const unsigned char alpha[] = "ab\n\r";
        unsigned char d[4];
        size_t dl = (size_t)check_range(&rng, 1, 3);
        for (size_t i = 0; i < dl; i++)
            d[i] = alpha[check_rand(&rng) % 4];
        size_t max = (size_t)check_range(&rng, 1, 64);
        pp_framing f = make_line((const char *)d, dl, max);
        size_t n = (size_t)check_range(&rng, 0, 80);
        unsigned char *s = malloc(n ? n : 1);
        CHECK(s);
        for (size_t i = 0; i < n; i++)
            s[i] = alpha[check_rand(&rng) % 4];
        /* Exactly sized, so a read past the end trips ASan. */
        size_t scanned = 12345;
        long whole = pp__frame_whole_prefix(&f, s, n, &scanned);
        int overlaps = 0;
        for (size_t k = 1; k < dl; k++)
            overlaps |= memcmp(d, d + dl - k, k) == 0;
        if (overlaps || n > max) {
            CHECKF(whole == -1, "iteration %d: should decline", it);
            declined++;
        } else {
            size_t pos = 0, sc = 0;
            pp_frame fr;
            int rc;
            while ((rc = pp__frame_next(&f, s + pos, n - pos, &sc, &fr)) == 1)
                pos += fr.frame_len;
            CHECKF(rc == 0, "iteration %d: no frame may be oversize here", it);
            CHECKF(whole == (long)pos, "iteration %d: %ld != %zu", it, whole, pos);
            CHECK_EQ(scanned, n - pos);
            answered++;
        }
        free(s);
    }
    CHECK(answered > 1000 && declined > 1000);
}

int main(void)
{
    alarm(60);
    test_init_validation();
    test_line_delimiters();
    test_line_oversize();
    test_length();
    test_raw();
    test_split_everywhere();
    test_reply_roundtrip();
    test_differential();
    test_whole_prefix();
    printf("test_framing: all passed\n");
    return 0;
}
