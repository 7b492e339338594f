/*
 * proxy.c - the PROXY protocol header, v1 and v2 (see proxy.h).
 *
 * Strict where the spec is: v1 is "PROXY", one space, TCP4, TCP6 or
 * UNKNOWN, single spaces, numeric addresses of that family, decimal ports
 * without leading zeros, CRLF, at most 107 bytes; v2 is the 12-byte
 * signature, version 2, command LOCAL or PROXY, a known family and
 * protocol, and a length that covers the addresses its family needs and
 * TLVs that end exactly where it says.  Anything else is refused as soon as
 * the bytes seen contradict it, so a client that is not a balancer is cut
 * at its first bytes rather than at the timeout.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>

#include "proxy.h"

static const unsigned char v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                         0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
static const char v1_sig[6] = {'P', 'R', 'O', 'X', 'Y', ' '};

/* buf[0..len) agrees with the first bytes of sig (all of it if len is as long). */
static int agrees(const unsigned char *buf, size_t len, const void *sig, size_t n)
{
    return memcmp(buf, sig, len < n ? len : n) == 0;
}

/* A decimal port: 1 to 5 digits, no leading zero but in "0", at most 65535. */
static int parse_port(const char *s, size_t n, uint16_t *port)
{
    if (n == 0 || n > 5 || (n > 1 && s[0] == '0'))
        return -1;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > 65535)
        return -1;
    *port = (uint16_t)v;
    return 0;
}

/* One address token of the family into ss. */
static int parse_addr(int family, const char *s, size_t n, struct sockaddr_storage *ss,
                      socklen_t *sl, uint16_t port)
{
    char tmp[INET6_ADDRSTRLEN];
    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, tmp, &sin->sin_addr) != 1)
            return -1;
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
        *sl = sizeof *sin;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, tmp, &sin6->sin6_addr) != 1)
            return -1;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(port);
        *sl = sizeof *sin6;
    }
    return 0;
}

static long parse_v1(const unsigned char *buf, size_t len, pp_proxy_info *out)
{
    if (!agrees(buf, len, v1_sig, sizeof v1_sig))
        return -EPROTO;
    size_t lim = len < PP_PROXY_V1_MAX ? len : PP_PROXY_V1_MAX;
    size_t cr = 0;
    for (size_t i = sizeof v1_sig; i < lim; i++) {
        unsigned char ch = buf[i];
        if (ch == '\r') {
            cr = i;
            break;
        }
        if (ch < 0x20 || ch > 0x7e)
            return -EPROTO; /* a bare LF, a NUL, binary: not a v1 line */
    }
    if (cr == 0)
        return len >= PP_PROXY_V1_MAX ? -EMSGSIZE : 0;
    if (cr + 2 > PP_PROXY_V1_MAX)
        return -EMSGSIZE;
    if (cr + 1 == len)
        return 0;
    if (buf[cr + 1] != '\n')
        return -EPROTO;

    const char *line = (const char *)buf + sizeof v1_sig;
    size_t n = cr - sizeof v1_sig;
    memset(out, 0, sizeof *out);
    out->version = 1;
    if (n >= 7 && memcmp(line, "UNKNOWN", 7) == 0 && (n == 7 || line[7] == ' ')) {
        out->local = 1; /* the rest of the line, whatever it is, is ignored */
        return (long)(cr + 2);
    }
    /* Tokens between single spaces: proto, src, dst, sport, dport. */
    const char *tok[5];
    size_t tlen[5];
    size_t ntok = 0, start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || line[i] == ' ') {
            if (ntok == 5)
                return -EPROTO; /* more than five */
            tok[ntok] = line + start;
            tlen[ntok] = i - start;
            ntok++;
            start = i + 1;
        }
    }
    int family;
    if (tlen[0] == 4 && memcmp(tok[0], "TCP4", 4) == 0)
        family = AF_INET;
    else if (tlen[0] == 4 && memcmp(tok[0], "TCP6", 4) == 0)
        family = AF_INET6;
    else
        return -EPROTO;
    if (ntok != 5)
        return -EPROTO; /* also an empty token: two spaces, or one at the end */
    uint16_t sport, dport;
    if (parse_port(tok[3], tlen[3], &sport) < 0 || parse_port(tok[4], tlen[4], &dport) < 0 ||
        parse_addr(family, tok[1], tlen[1], &out->src, &out->src_len, sport) < 0 ||
        parse_addr(family, tok[2], tlen[2], &out->dst, &out->dst_len, dport) < 0)
        return -EPROTO;
    return (long)(cr + 2);
}

static uint16_t be16(const unsigned char *p)
{
    return (uint16_t)((p[0] << 8) | p[1]);
}

static long parse_v2(const unsigned char *buf, size_t len, pp_proxy_info *out)
{
    if (!agrees(buf, len, v2_sig, sizeof v2_sig))
        return -EPROTO;
    if (len < 13)
        return 0;
    unsigned ver = buf[12] >> 4, cmd = buf[12] & 0x0F;
    if (ver != 2 || cmd > 1)
        return -EPROTO;
    if (len < 14)
        return 0;
    unsigned fam = buf[13] >> 4, proto = buf[13] & 0x0F;
    if (fam > 3 || proto > 2)
        return -EPROTO;
    if (len < PP_PROXY_V2_FIXED)
        return 0;
    size_t body = be16(buf + 14);
    if (body > PP_PROXY_V2_MAX_LEN)
        return -EMSGSIZE;
    size_t total = PP_PROXY_V2_FIXED + body;
    if (len < total)
        return 0;
    memset(out, 0, sizeof *out);
    out->version = 2;
    if (cmd == 0 || fam == 0) {
        /* LOCAL (the balancer's own health check), or PROXY with no
         * address family: the block is skipped, the socket's addresses
         * stand. */
        out->local = 1;
        return (long)total;
    }
    /* A stream server takes stream connections (or UNSPEC) only. */
    if (proto == 2)
        return -EPROTO;
    static const size_t need[4] = {0, 12, 36, 216};
    if (body < need[fam])
        return -EPROTO; /* a length that cannot hold the family's addresses */
    const unsigned char *a = buf + PP_PROXY_V2_FIXED;
    if (fam == 1) {
        struct sockaddr_in *s = (struct sockaddr_in *)&out->src;
        struct sockaddr_in *d = (struct sockaddr_in *)&out->dst;
        s->sin_family = d->sin_family = AF_INET;
        memcpy(&s->sin_addr, a, 4);
        memcpy(&d->sin_addr, a + 4, 4);
        memcpy(&s->sin_port, a + 8, 2); /* both in network order already */
        memcpy(&d->sin_port, a + 10, 2);
        out->src_len = out->dst_len = sizeof(struct sockaddr_in);
    } else if (fam == 2) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&out->src;
        struct sockaddr_in6 *d = (struct sockaddr_in6 *)&out->dst;
        s->sin6_family = d->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, a, 16);
        memcpy(&d->sin6_addr, a + 16, 16);
        memcpy(&s->sin6_port, a + 32, 2);
        memcpy(&d->sin6_port, a + 34, 2);
        out->src_len = out->dst_len = sizeof(struct sockaddr_in6);
    } else {
        out->local = 1; /* AF_UNIX paths: no address to give a TCP peer */
    }
    /* TLVs: type, 16-bit length, value; skipped, but they must end exactly
     * where the header does. */
    size_t p = PP_PROXY_V2_FIXED + need[fam];
    while (p < total) {
        if (total - p < 3)
            return -EPROTO;
        size_t tl = be16(buf + p + 1);
        if (tl > total - p - 3)
            return -EPROTO;
        p += 3 + tl;
    }
    return (long)total;
}

long pp__proxy_parse(const unsigned char *buf, size_t len, pp_proxy_info *out)
{
    if (len == 0)
        return 0;
    if (buf[0] == 'P')
        return parse_v1(buf, len, out);
    if (buf[0] == v2_sig[0])
        return parse_v2(buf, len, out);
    return -EPROTO;
}

int pp__proxy_signature(const unsigned char *buf, size_t len)
{
    return (len >= sizeof v1_sig && memcmp(buf, v1_sig, sizeof v1_sig) == 0) ||
           (len >= sizeof v2_sig && memcmp(buf, v2_sig, sizeof v2_sig) == 0);
}
