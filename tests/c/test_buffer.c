/* test_buffer.c - pp_buf: reserve/append/consume/reset, compaction, growth,
 * and content preserved across every operation, checked against a trivially
 * simple reference model driven by a fixed-seed random walk. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "buffer.h"
#include "check.h"

static int scale_pct(void)
{
    const char *s = getenv("PP_TEST_SCALE");
    int v = s ? atoi(s) : 100;
    return v > 0 ? v : 100;
}

static void check_invariants(const pp_buf *b)
{
    CHECK(b->off <= b->len);
    CHECK(b->len <= b->cap);
    CHECK(b->cap == 0 || b->data != NULL);
    /* An emptied buffer restarts at offset 0 (documented in buffer.h). */
    if (b->len == b->off)
        CHECK(b->off == 0 && b->len == 0);
}

static void fill(unsigned char *p, size_t n, uint64_t *rng)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)check_rand(rng);
}

/* A zeroed pp_buf is empty, owns nothing, and frees cleanly. */
static void test_empty(void)
{
    pp_buf b = {0};
    CHECK_EQ(pp__buf_size(&b), 0);
    CHECK_EQ(pp__buf_reserve(&b, 0), 0);
    CHECK(b.data == NULL && b.cap == 0);           /* nothing to do: no allocation */
    CHECK_EQ(pp__buf_append(&b, NULL, 0), 0);
    CHECK_EQ(pp__buf_size(&b), 0);
    pp__buf_consume(&b, 0);
    check_invariants(&b);
    pp__buf_reset(&b, 0);
    pp__buf_free(&b);
    pp__buf_free(&b);                              /* idempotent */
    CHECK(b.data == NULL && b.cap == 0 && b.len == 0 && b.off == 0);
}

static void test_append_consume(void)
{
    pp_buf b = {0};
    CHECK_EQ(pp__buf_append(&b, "hello ", 6), 0);
    CHECK_EQ(pp__buf_append(&b, "world", 5), 0);
    CHECK_EQ(pp__buf_size(&b), 11);
    CHECK(memcmp(pp__buf_begin(&b), "hello world", 11) == 0);
    pp__buf_consume(&b, 6);
    CHECK_EQ(pp__buf_size(&b), 5);
    CHECK_EQ(b.off, 6);
    CHECK(memcmp(pp__buf_begin(&b), "world", 5) == 0);
    pp__buf_consume(&b, 5);
    CHECK_EQ(b.off, 0);                            /* emptied: back to offset 0 */
    CHECK_EQ(b.len, 0);
    CHECK(b.cap > 0);                              /* memory kept for reuse */
    check_invariants(&b);
    pp__buf_free(&b);
}

/* reserve() guarantees the free tail; writing into it and bumping len (as the
 * loop does with recv()) keeps everything before it. */
static void test_reserve_then_fill(void)
{
    pp_buf b = {0};
    CHECK_EQ(pp__buf_append(&b, "abc", 3), 0);
    CHECK_EQ(pp__buf_reserve(&b, 10000), 0);
    CHECK(b.cap - b.len >= 10000);
    memset(b.data + b.len, 'x', 10000);            /* ASan: all of it is ours */
    b.len += 10000;
    CHECK_EQ(pp__buf_size(&b), 10003);
    CHECK(memcmp(pp__buf_begin(&b), "abc", 3) == 0);
    CHECK(pp__buf_begin(&b)[10002] == 'x');
    /* A reserve that already fits changes nothing. */
    unsigned char *data = b.data;
    size_t cap = b.cap, len = b.len;
    CHECK_EQ(pp__buf_reserve(&b, b.cap - b.len), 0);
    CHECK(b.data == data && b.cap == cap && b.len == len);
    pp__buf_free(&b);
}

/* When the consumed prefix makes enough room and the content is small, the
 * content slides down instead of the buffer growing. */
static void test_compaction(void)
{
    pp_buf b = {0};
    unsigned char src[4096];
    for (size_t i = 0; i < sizeof src; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    CHECK_EQ(pp__buf_append(&b, src, sizeof src), 0);
    size_t cap = b.cap;
    /* Fill exactly to capacity, then consume most of it. */
    size_t more = b.cap - b.len;
    unsigned char *tmp = malloc(more ? more : 1);
    CHECK(tmp != NULL);
    memset(tmp, 0xAB, more);
    CHECK_EQ(pp__buf_append(&b, tmp, more), 0);
    free(tmp);
    CHECK_EQ(b.len, cap);
    size_t keep = 100;
    pp__buf_consume(&b, cap - keep);
    unsigned char *data = b.data;
    unsigned char expect[100];
    memcpy(expect, pp__buf_begin(&b), keep);
    CHECK_EQ(pp__buf_reserve(&b, cap / 2), 0);
    CHECK(b.data == data);                         /* no new allocation */
    CHECK_EQ(b.cap, cap);
    CHECK_EQ(b.off, 0);
    CHECK_EQ(pp__buf_size(&b), keep);
    CHECK(memcmp(pp__buf_begin(&b), expect, keep) == 0);
    CHECK(b.cap - b.len >= cap / 2);
    pp__buf_free(&b);

    /* When the content is large, growing must still keep it intact. */
    CHECK_EQ(pp__buf_append(&b, src, sizeof src), 0);
    pp__buf_consume(&b, 10);
    CHECK_EQ(pp__buf_reserve(&b, b.cap), 0);
    CHECK(b.cap - b.len >= 4096);
    CHECK_EQ(pp__buf_size(&b), sizeof src - 10);
    CHECK(memcmp(pp__buf_begin(&b), src + 10, sizeof src - 10) == 0);
    check_invariants(&b);
    pp__buf_free(&b);
}

/* Appending one byte at a time must reallocate O(log n) times, not O(n). */
static void test_geometric_growth(void)
{
    pp_buf b = {0};
    size_t n = (size_t)1 << 20, reallocs = 0;
    unsigned char *last = NULL;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)(i ^ (i >> 8));
        CHECK_EQ(pp__buf_append(&b, &c, 1), 0);
        if (b.data != last) {
            reallocs++;
            last = b.data;
        }
    }
    CHECK(reallocs <= 24);
    CHECK_EQ(pp__buf_size(&b), n);
    for (size_t i = 0; i < n; i++)
        CHECK(b.data[i] == (unsigned char)(i ^ (i >> 8)));
    pp__buf_free(&b);
}

static void test_large_append(void)
{
    uint64_t rng = 42;
    size_t n = (size_t)24 << 20;                   /* 24 MiB, not a power of two */
    unsigned char *src = malloc(n);
    CHECK(src != NULL);
    fill(src, n, &rng);
    pp_buf b = {0};
    CHECK_EQ(pp__buf_append(&b, "x", 1), 0);
    CHECK_EQ(pp__buf_append(&b, src, n), 0);
    CHECK_EQ(pp__buf_size(&b), n + 1);
    CHECK(pp__buf_begin(&b)[0] == 'x');
    CHECK(memcmp(pp__buf_begin(&b) + 1, src, n) == 0);
    pp__buf_consume(&b, n / 3);
    CHECK_EQ(pp__buf_append(&b, src, n), 0);
    CHECK(memcmp(pp__buf_begin(&b), src + n / 3 - 1, n - n / 3 + 1) == 0);
    CHECK(memcmp(pp__buf_begin(&b) + n - n / 3 + 1, src, n) == 0);
    pp__buf_free(&b);
    free(src);
}

/* Requests whose size would overflow are refused without touching the buffer. */
static void test_overflow_refused(void)
{
    pp_buf b = {0};
    CHECK_EQ(pp__buf_append(&b, "abcdef", 6), 0);
    pp__buf_consume(&b, 2);
    pp_buf before = b;
    CHECK_EQ(pp__buf_reserve(&b, SIZE_MAX), -ENOMEM);
    CHECK_EQ(pp__buf_reserve(&b, SIZE_MAX - 3), -ENOMEM);
    CHECK_EQ(pp__buf_reserve(&b, SIZE_MAX / 2), -ENOMEM);
    CHECK_EQ(pp__buf_append(&b, "x", SIZE_MAX), -ENOMEM);
    CHECK(memcmp(&b, &before, sizeof b) == 0);
    CHECK(memcmp(pp__buf_begin(&b), "cdef", 4) == 0);
    pp__buf_free(&b);
}

/* reset(keep) empties; frees only memory beyond keep. */
static void test_reset(void)
{
    pp_buf b = {0};
    CHECK_EQ(pp__buf_append(&b, "abc", 3), 0);
    size_t cap = b.cap;
    pp__buf_reset(&b, cap);                        /* small: kept */
    CHECK(b.data != NULL && b.cap == cap && b.len == 0 && b.off == 0);
    CHECK_EQ(pp__buf_append(&b, "xyz", 3), 0);
    CHECK(memcmp(pp__buf_begin(&b), "xyz", 3) == 0);
    pp__buf_reset(&b, cap - 1);                    /* grew beyond keep: freed */
    CHECK(b.data == NULL && b.cap == 0 && b.len == 0 && b.off == 0);
    CHECK_EQ(pp__buf_append(&b, "123", 3), 0);     /* usable again */
    CHECK(memcmp(pp__buf_begin(&b), "123", 3) == 0);
    pp__buf_free(&b);
}

/* Consuming more than is there is a caller bug and must abort loudly. */
static void test_overconsume_aborts(void)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        pp_buf b = {0};
        if (pp__buf_append(&b, "ab", 2) != 0)
            _exit(3);
        pp__buf_consume(&b, 3);
        _exit(0);                                  /* not reached if it aborts */
    }
    int st;
    CHECK(waitpid(pid, &st, 0) == pid);
    CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT);
}

/* Random walk over every operation, compared with a flat reference copy
 * after each step. */
static void test_random_model(void)
{
    uint64_t rng = 0x5eed0001;
    int steps = 20000 * scale_pct() / 100;
    if (steps < 2000)
        steps = 2000;
    size_t model_cap = 1 << 16, model_len = 0;
    unsigned char *model = malloc(model_cap);
    unsigned char *scratch = malloc(1 << 18);
    CHECK(model && scratch);
    pp_buf b = {0};
    for (int step = 0; step < steps; step++) {
        int op = (int)check_range(&rng, 0, 99);
        if (op < 35) {                             /* append */
            size_t n = check_rand(&rng) % 8 == 0 ? check_range(&rng, 0, 1 << 18)
                                                  : check_range(&rng, 0, 300);
            fill(scratch, n, &rng);
            CHECK_EQ(pp__buf_append(&b, scratch, n), 0);
            while (model_len + n > model_cap) {
                model_cap *= 2;
                model = realloc(model, model_cap);
                CHECK(model != NULL);
            }
            memcpy(model + model_len, scratch, n);
            model_len += n;
        } else if (op < 55) {                      /* reserve + fill the tail, like recv() */
            size_t extra = check_range(&rng, 0, 20000);
            CHECK_EQ(pp__buf_reserve(&b, extra), 0);
            CHECKF(b.cap - b.len >= extra, "step %d", step);
            size_t n = extra ? check_range(&rng, 0, extra) : 0;
            fill(b.data + b.len, extra, &rng);     /* ASan: the whole tail is ours */
            b.len += n;
            while (model_len + n > model_cap) {
                model_cap *= 2;
                model = realloc(model, model_cap);
                CHECK(model != NULL);
            }
            memcpy(model + model_len, b.data + b.len - n, n);
            model_len += n;
        } else if (op < 90) {                      /* consume */
            size_t n = model_len ? check_range(&rng, 0, model_len) : 0;
            if (check_rand(&rng) % 10 == 0)
                n = model_len;
            pp__buf_consume(&b, n);
            memmove(model, model + n, model_len - n);
            model_len -= n;
        } else if (op < 95) {                      /* reset */
            pp__buf_reset(&b, check_range(&rng, 0, 1 << 17));
            model_len = 0;
        } else {                                   /* free: back to a zero buffer */
            pp__buf_free(&b);
            CHECK(b.data == NULL && b.cap == 0);
            model_len = 0;
        }
        check_invariants(&b);
        CHECKF(pp__buf_size(&b) == model_len, "step %d op %d: %zu != %zu", step, op,
               pp__buf_size(&b), model_len);
        CHECKF(model_len == 0 || memcmp(pp__buf_begin(&b), model, model_len) == 0,
               "step %d op %d: content differs", step, op);
    }
    pp__buf_free(&b);
    free(model);
    free(scratch);
}

int main(void)
{
    alarm(60);
    test_empty();
    test_append_consume();
    test_reserve_then_fill();
    test_compaction();
    test_geometric_growth();
    test_large_append();
    test_overflow_refused();
    test_reset();
    test_overconsume_aborts();
    test_random_model();
    printf("test_buffer: all passed\n");
    return 0;
}
