/* test_proxy.c - the PROXY protocol parser (csrc/proxy.c), v1 and v2.
 *
 * Every valid form of the spec, every malformed one, each offered split at
 * every byte (a prefix of a valid header must say "not yet", a prefix of a
 * bad one "not yet" or the same error, never anything else), and a seeded
 * fuzz run of mutated headers.  Each input sits at the very end of a
 * malloc'd block of exactly its size, so under ASan or valgrind a read past
 * len faults. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "proxy.h"

static int scale_pct(void)
{
    const char *s = getenv("PP_TEST_SCALE");
    int v = s ? atoi(s) : 100;
    return v > 0 ? v : 100;
}

/* Parses a copy of buf[0..len) that ends where its allocation does. */
static long parse_exact(const void *buf, size_t len, pp_proxy_info *out)
{
    unsigned char *p = malloc(len ? len : 1);
    CHECK(p);
    if (len)
        memcpy(p, buf, len);
    long rc = pp__proxy_parse(p, len, out);
    free(p);
    return rc;
}

/* The whole input gives want; every prefix gives 0 or, for an error, the
 * same error. */
static void check_splits(const void *buf, size_t len, long want)
{
    pp_proxy_info info;
    CHECK_EQ(parse_exact(buf, len, &info), want);
    long stop = want > 0 ? want : (long)len;
    for (long k = 0; k < stop; k++) {
        long rc = parse_exact(buf, (size_t)k, &info);
        CHECKF(rc == 0 || (want < 0 && rc == want), "prefix %ld of %zu gave %ld (want 0 or %ld)",
               k, len, rc, want);
    }
}

static void check_v4(const struct sockaddr_storage *ss, const char *addr, int port)
{
    const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
    char got[INET_ADDRSTRLEN];
    CHECK_EQ(sin->sin_family, AF_INET);
    CHECK(inet_ntop(AF_INET, &sin->sin_addr, got, sizeof got) != NULL);
    CHECKF(strcmp(got, addr) == 0, "address %s, want %s", got, addr);
    CHECK_EQ(ntohs(sin->sin_port), port);
}

static void check_v6(const struct sockaddr_storage *ss, const char *addr, int port)
{
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
    struct in6_addr want;
    CHECK_EQ(sin6->sin6_family, AF_INET6);
    CHECK_EQ(inet_pton(AF_INET6, addr, &want), 1);
    CHECK(memcmp(&sin6->sin6_addr, &want, sizeof want) == 0);
    CHECK_EQ(ntohs(sin6->sin6_port), port);
}

static long parse_str(const char *s, pp_proxy_info *out)
{
    return parse_exact(s, strlen(s), out);
}

static void test_v1_valid(void)
{
    pp_proxy_info in;
    const char *a = "PROXY TCP4 198.18.0.1 198.19.0.2 56324 443\r\nGET /";
    CHECK_EQ(parse_str(a, &in), 44); /* the bytes after the header are not its */
    CHECK_EQ(in.version, 1);
    CHECK_EQ(in.local, 0);
    check_v4(&in.src, "198.18.0.1", 56324);
    check_v4(&in.dst, "198.19.0.2", 443);
    CHECK_EQ(in.src_len, sizeof(struct sockaddr_in));
    check_splits(a, strlen(a), 44);

    const char *b = "PROXY TCP6 2001:db8::1 ::ffff:198.18.0.1 0 65535\r\n";
    CHECK_EQ(parse_str(b, &in), (long)strlen(b));
    check_v6(&in.src, "2001:db8::1", 0);
    check_v6(&in.dst, "::ffff:198.18.0.1", 65535);
    check_splits(b, strlen(b), (long)strlen(b));

    CHECK_EQ(parse_str("PROXY UNKNOWN\r\n", &in), 15);
    CHECK_EQ(in.local, 1);
    CHECK_EQ(parse_str("PROXY UNKNOWN whatever follows 1 2 3 4 5 6\r\n", &in), 44);
    CHECK_EQ(in.local, 1);

    /* The spec's longest line: 107 bytes, accepted; one more is refused. */
    const char *f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    char line[160];
    int n = snprintf(line, sizeof line, "PROXY UNKNOWN %s %s 65535 65535\r\n", f, f);
    CHECK_EQ(n, PP_PROXY_V1_MAX);
    check_splits(line, (size_t)n, PP_PROXY_V1_MAX);
    n = snprintf(line, sizeof line, "PROXY UNKNOWN %s %s 65535 655350\r\n", f, f);
    check_splits(line, (size_t)n, -EMSGSIZE);
    n = snprintf(line, sizeof line, "PROXY TCP6 %s %s 65535 65535\r\n", f, f);
    CHECK_EQ(parse_exact(line, (size_t)n, &in), n);
    check_v6(&in.src, f, 65535);
    /* No CR within 107 bytes: refused at 107, not waited for. */
    memset(line, 'A', sizeof line);
    memcpy(line, "PROXY ", 6);
    CHECK_EQ(parse_exact(line, PP_PROXY_V1_MAX - 1, &in), 0);
    CHECK_EQ(parse_exact(line, PP_PROXY_V1_MAX, &in), -EMSGSIZE);
    CHECK_EQ(parse_exact(line, sizeof line, &in), -EMSGSIZE);
}

static void test_v1_malformed(void)
{
    static const char *const bad[] = {
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 2\n",        /* bare LF */
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 2\rX",       /* CR without LF */
        "PROXY  TCP4 198.18.0.1 198.18.0.2 1 2\r\n",     /* two spaces */
        "PROXY TCP4 198.18.0.1  198.18.0.2 1 2\r\n",
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 2 \r\n",     /* trailing space */
        "PROXY TCP4 198.18.0.1 198.18.0.2 1\r\n",        /* a field missing */
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 2 3\r\n",    /* one too many */
        "PROXY TCP4 2001:db8::1 198.18.0.2 1 2\r\n",     /* family mismatch */
        "PROXY TCP6 198.18.0.1 2001:db8::2 1 2\r\n",
        "PROXY TCP4 198.18.0.256 198.18.0.2 1 2\r\n",
        "PROXY TCP4 198.18.0 198.18.0.2 1 2\r\n",
        "PROXY TCP4 198.18.0.1 198.18.0.2 65536 2\r\n",  /* port range */
        "PROXY TCP4 198.18.0.1 198.18.0.2 01 2\r\n",     /* leading zero */
        "PROXY TCP4 198.18.0.1 198.18.0.2 -1 2\r\n",
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 2x\r\n",
        "PROXY TCP4 198.18.0.1 198.18.0.2 1 \r\n",
        "PROXY TCP5 198.18.0.1 198.18.0.2 1 2\r\n",      /* protocol */
        "PROXY tcp4 198.18.0.1 198.18.0.2 1 2\r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY \r\n",
        "PROXY\r\n",                                     /* no space */
        "proxy TCP4 198.18.0.1 198.18.0.2 1 2\r\n",      /* signature case */
        "PROXX TCP4 198.18.0.1 198.18.0.2 1 2\r\n",
        "GET / HTTP/1.1\r\n",                            /* not a balancer */
        "hello\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        pp_proxy_info in;
        long rc = parse_str(bad[i], &in);
        CHECKF(rc == -EPROTO, "\"%s\" gave %ld", bad[i], rc);
        check_splits(bad[i], strlen(bad[i]), -EPROTO);
    }
    /* A NUL inside the line. */
    static const char nul[] = "PROXY TCP4 198.18.0.1\0198.18.0.2 1 2\r\n";
    check_splits(nul, sizeof nul - 1, -EPROTO);
}

/* ---- v2 ------------------------------------------------------------------ */

static const unsigned char SIG[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* Builds a v2 header: signature, ver_cmd, fam, then len from body. */
static size_t v2(unsigned char *out, unsigned ver_cmd, unsigned fam,
                 const unsigned char *body, size_t n)
{
    memcpy(out, SIG, 12);
    out[12] = (unsigned char)ver_cmd;
    out[13] = (unsigned char)fam;
    out[14] = (unsigned char)(n >> 8);
    out[15] = (unsigned char)n;
    if (n)
        memcpy(out + 16, body, n);
    return 16 + n;
}

static const unsigned char INET_BODY[12] = {198, 18, 0, 1, 198, 19, 0, 2, 0xDC, 0x04, 0x01, 0xBB};

static void test_v2_valid(void)
{
    unsigned char h[16 + PP_PROXY_V2_MAX_LEN + 64];
    pp_proxy_info in;
    size_t n = v2(h, 0x21, 0x11, INET_BODY, sizeof INET_BODY);
    memcpy(h + n, "data", 4);
    CHECK_EQ(parse_exact(h, n + 4, &in), (long)n);
    CHECK_EQ(in.version, 2);
    CHECK_EQ(in.local, 0);
    check_v4(&in.src, "198.18.0.1", 56324);
    check_v4(&in.dst, "198.19.0.2", 443);
    check_splits(h, n, (long)n);

    unsigned char b6[36] = {0};
    inet_pton(AF_INET6, "2001:db8::7", b6);
    inet_pton(AF_INET6, "2001:db8::8", b6 + 16);
    b6[32] = 0x30, b6[33] = 0x39, b6[34] = 0x00, b6[35] = 0x50; /* 12345, 80 */
    n = v2(h, 0x21, 0x21, b6, sizeof b6);
    CHECK_EQ(parse_exact(h, n, &in), (long)n);
    check_v6(&in.src, "2001:db8::7", 12345);
    check_v6(&in.dst, "2001:db8::8", 80);
    check_splits(h, n, (long)n);

    /* LOCAL: a health check; the block (anything) is skipped. */
    n = v2(h, 0x20, 0x00, NULL, 0);
    CHECK_EQ(parse_exact(h, n, &in), 16);
    CHECK_EQ(in.local, 1);
    n = v2(h, 0x20, 0x11, INET_BODY, sizeof INET_BODY);
    CHECK_EQ(parse_exact(h, n, &in), (long)n);
    CHECK_EQ(in.local, 1);
    /* PROXY with UNSPEC family: the socket's addresses too. */
    n = v2(h, 0x21, 0x00, NULL, 0);
    CHECK_EQ(parse_exact(h, n, &in), 16);
    CHECK_EQ(in.local, 1);
    /* UNIX family: paths, no TCP peer to give. */
    unsigned char un[216] = {0};
    n = v2(h, 0x21, 0x31, un, sizeof un);
    CHECK_EQ(parse_exact(h, n, &in), (long)n);
    CHECK_EQ(in.local, 1);

    /* TLVs after the addresses, an empty one among them: skipped. */
    unsigned char body[64];
    memcpy(body, INET_BODY, 12);
    size_t k = 12;
    static const unsigned char tlvs[] = {0x01, 0x00, 0x02, 'h', '2',  /* ALPN */
                                         0x04, 0x00, 0x00,            /* NOOP, empty */
                                         0x05, 0x00, 0x03, 1, 2, 3};  /* UNIQUE_ID */
    memcpy(body + k, tlvs, sizeof tlvs);
    k += sizeof tlvs;
    n = v2(h, 0x21, 0x11, body, k);
    CHECK_EQ(parse_exact(h, n, &in), (long)n);
    check_v4(&in.src, "198.18.0.1", 56324);
    check_splits(h, n, (long)n);

    /* The largest accepted: 4,096 bytes after the fixed part. */
    static unsigned char big[PP_PROXY_V2_MAX_LEN];
    memset(big, 0, sizeof big);
    memcpy(big, INET_BODY, 12);
    size_t tl = PP_PROXY_V2_MAX_LEN - 12 - 3;
    big[12] = 0x04, big[13] = (unsigned char)(tl >> 8), big[14] = (unsigned char)tl;
    n = v2(h, 0x21, 0x11, big, sizeof big);
    CHECK_EQ(parse_exact(h, n, &in), (long)n);
}

static void test_v2_malformed(void)
{
    unsigned char h[16 + 300];
    size_t n;
    struct { unsigned ver_cmd, fam; size_t len; const char *why; } bad[] = {
        {0x11, 0x11, 12, "version 1"},
        {0x31, 0x11, 12, "version 3"},
        {0x22, 0x11, 12, "command 2"},
        {0x2F, 0x11, 12, "command 15"},
        {0x21, 0x41, 12, "family 4"},
        {0x21, 0x13, 12, "protocol 3"},
        {0x21, 0x12, 12, "DGRAM"},
        {0x21, 0x11, 11, "INET with 11 bytes"},
        {0x21, 0x21, 35, "INET6 with 35 bytes"},
        {0x21, 0x31, 215, "UNIX with 215 bytes"},
    };
    unsigned char body[300] = {0};
    memcpy(body, INET_BODY, 12);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        n = v2(h, bad[i].ver_cmd, bad[i].fam, body, bad[i].len);
        pp_proxy_info in;
        long rc = parse_exact(h, n, &in);
        CHECKF(rc == -EPROTO, "%s gave %ld", bad[i].why, rc);
        check_splits(h, n, -EPROTO);
    }
    /* Every signature byte wrong in turn. */
    for (int i = 0; i < 12; i++) {
        n = v2(h, 0x21, 0x11, INET_BODY, 12);
        h[i] ^= 0x40;
        check_splits(h, n, -EPROTO);
    }
    /* TLVs that lie: one byte of a TLV header, two, a length past the end. */
    static const unsigned char t1[] = {0x04};
    static const unsigned char t2[] = {0x04, 0x00};
    static const unsigned char t3[] = {0x04, 0x00, 0x03, 1, 2};
    const unsigned char *ts[] = {t1, t2, t3};
    size_t tn[] = {sizeof t1, sizeof t2, sizeof t3};
    for (int i = 0; i < 3; i++) {
        memcpy(body + 12, ts[i], tn[i]);
        n = v2(h, 0x21, 0x11, body, 12 + tn[i]);
        check_splits(h, n, -EPROTO);
    }
    /* Longer than we accept: refused from the length alone. */
    n = v2(h, 0x21, 0x11, INET_BODY, 12);
    h[14] = (unsigned char)((PP_PROXY_V2_MAX_LEN + 1) >> 8);
    h[15] = (unsigned char)(PP_PROXY_V2_MAX_LEN + 1);
    pp_proxy_info in;
    CHECK_EQ(parse_exact(h, 16, &in), -EMSGSIZE);
    CHECK_EQ(parse_exact(h, 15, &in), 0);
    h[14] = h[15] = 0xFF;
    CHECK_EQ(parse_exact(h, 16, &in), -EMSGSIZE);
}

static void test_signature(void)
{
    CHECK(pp__proxy_signature((const unsigned char *)"PROXY TCP4", 10));
    CHECK(pp__proxy_signature(SIG, 12));
    CHECK(!pp__proxy_signature(SIG, 11));
    CHECK(!pp__proxy_signature((const unsigned char *)"PROXY", 5));
    CHECK(!pp__proxy_signature((const unsigned char *)"hello world", 11));
}

/* v1 round trip over random addresses and ports. */
static void test_v1_roundtrip(uint64_t *rng, int rounds)
{
    for (int i = 0; i < rounds; i++) {
        int six = (int)(check_rand(rng) & 1);
        unsigned char a[16], b[16];
        for (int k = 0; k < 16; k++) {
            a[k] = (unsigned char)check_rand(rng);
            b[k] = (unsigned char)check_rand(rng);
        }
        char sa[INET6_ADDRSTRLEN], sb[INET6_ADDRSTRLEN], line[200];
        int af = six ? AF_INET6 : AF_INET;
        CHECK(inet_ntop(af, a, sa, sizeof sa) && inet_ntop(af, b, sb, sizeof sb));
        int sp = (int)(check_rand(rng) % 65536), dp = (int)(check_rand(rng) % 65536);
        int n = snprintf(line, sizeof line, "PROXY TCP%c %s %s %d %d\r\n", six ? '6' : '4',
                         sa, sb, sp, dp);
        pp_proxy_info in;
        CHECK_EQ(parse_exact(line, (size_t)n, &in), n);
        if (six) {
            check_v6(&in.src, sa, sp);
            check_v6(&in.dst, sb, dp);
        } else {
            check_v4(&in.src, sa, sp);
            check_v4(&in.dst, sb, dp);
        }
    }
}

/* Mutations of valid headers: whatever the result, nothing is read past
 * len (ASan), a header is never longer than the input, a whole header
 * parses alone to the same length, and each of its prefixes says "not
 * yet". */
static void test_fuzz(uint64_t *rng, int rounds)
{
    unsigned char seeds[6][160];
    size_t seedn[6];
    seedn[0] = (size_t)snprintf((char *)seeds[0], 160, "PROXY TCP4 198.18.0.1 198.19.0.2 56324 443\r\n");
    seedn[1] = (size_t)snprintf((char *)seeds[1], 160, "PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
    seedn[2] = (size_t)snprintf((char *)seeds[2], 160, "PROXY UNKNOWN\r\n");
    seedn[3] = v2(seeds[3], 0x21, 0x11, INET_BODY, 12);
    unsigned char body[60];
    memcpy(body, INET_BODY, 12);
    memcpy(body + 12, "\x01\x00\x02h2\x04\x00\x00", 8);
    seedn[4] = v2(seeds[4], 0x21, 0x11, body, 20);
    seedn[5] = v2(seeds[5], 0x20, 0x00, NULL, 0);
    unsigned char buf[256];
    for (int r = 0; r < rounds; r++) {
        int s = (int)(check_rand(rng) % 6);
        size_t n = seedn[s];
        memcpy(buf, seeds[s], n);
        int muts = 1 + (int)(check_rand(rng) % 4);
        for (int m = 0; m < muts; m++) {
            switch (check_rand(rng) % 4) {
            case 0: /* flip a byte */
                buf[check_rand(rng) % n] = (unsigned char)check_rand(rng);
                break;
            case 1: /* truncate */
                n = (size_t)(check_rand(rng) % (n + 1));
                if (n == 0)
                    n = 1;
                break;
            case 2: /* append noise */
                while (n < sizeof buf && check_rand(rng) % 8)
                    buf[n++] = (unsigned char)check_rand(rng);
                break;
            default: /* a v2 length byte or a v1 digit, the fields that lie */
                if (n > 15 && buf[0] == 0x0D)
                    buf[14 + check_rand(rng) % 2] = (unsigned char)check_rand(rng);
                else
                    buf[check_rand(rng) % n] = (unsigned char)('0' + check_rand(rng) % 10);
                break;
            }
        }
        pp_proxy_info in;
        long rc = parse_exact(buf, n, &in);
        CHECK(rc == 0 || rc == -EPROTO || rc == -EMSGSIZE || (rc > 0 && (size_t)rc <= n));
        if (rc > 0) {
            CHECK_EQ(parse_exact(buf, (size_t)rc, &in), rc);
            for (long k = 0; k < rc; k++)
                CHECK_EQ(parse_exact(buf, (size_t)k, &in), 0);
        }
    }
}

int main(void)
{
    alarm(120);
    uint64_t rng = 0x5eed2026;
    test_v1_valid();
    test_v1_malformed();
    test_v2_valid();
    test_v2_malformed();
    test_signature();
    test_v1_roundtrip(&rng, 2000 * scale_pct() / 100 + 1);
    int rounds = 200000 * scale_pct() / 100 + 1;
    test_fuzz(&rng, rounds);
    printf("test_proxy: all passed (%d fuzz rounds)\n", rounds);
    return 0;
}
