/* check.h - the one assertion the C tests use.
 *
 * CHECK(expr) prints file:line and the failed expression and exits 1, even
 * in builds with NDEBUG, so a failed check always fails `make`.  CHECK_EQ
 * also prints both values, which saves a debugger run for the common case. */
#ifndef PP_TEST_CHECK_H
#define PP_TEST_CHECK_H

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#define CHECK(expr)                                                           \
    do {                                                                      \
        if (!(expr)) {                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__,  \
                    #expr);                                                   \
            fflush(stderr);                                                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

/* Compares two integers (converted to intmax_t) and prints both on failure. */
#define CHECK_EQ(a, b)                                                        \
    do {                                                                      \
        intmax_t check_a_ = (intmax_t)(a), check_b_ = (intmax_t)(b);          \
        if (check_a_ != check_b_) {                                           \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%jd != %jd)\n",   \
                    __FILE__, __LINE__, #a, #b, check_a_, check_b_);          \
            fflush(stderr);                                                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

/* Like CHECK, with a printf-style message for context (iteration, seed...). */
#define CHECKF(expr, ...)                                                     \
    do {                                                                      \
        if (!(expr)) {                                                        \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__,  \
                    #expr);                                                   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
            fflush(stderr);                                                   \
            exit(1);                                                          \
        }                                                                     \
    } while (0)

/* A small fixed-seed PRNG (splitmix64), so every run sees the same data and a
 * failure reproduces; rand() differs between libcs. */
static inline uint64_t check_rand(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static inline uint64_t check_range(uint64_t *state, uint64_t lo, uint64_t hi)
{
    return lo + check_rand(state) % (hi - lo + 1);
}

/* Milliseconds of CPU (user + system) this process used so far: the tests
 * that prove "never spin" compare it with the wall time of a quiet spell. */
static inline int64_t cpu_ms(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return (int64_t)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1000 +
           (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1000;
}

/* Milliseconds on the monotonic clock. */
static inline int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleeps ms milliseconds, through signals. */
static inline void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

#endif
