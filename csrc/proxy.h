/*
 * proxy.h - the PROXY protocol header a balancer (HAProxy, nginx stream,
 * Envoy, a cloud NLB) puts before a connection's first byte, versions 1
 * (text) and 2 (binary), as haproxy's doc/proxy-protocol.txt specifies.
 *
 * The parser is incremental and pure: it looks at the bytes read so far and
 * says "a whole header of n bytes", "not yet" or "not a header", never
 * reading past len, so the I/O thread can call it after each read without
 * keeping state of its own.
 */
#ifndef PP_PROXY_H
#define PP_PROXY_H

#include <stddef.h>
#include <sys/socket.h>

/* The longest v1 line, "PROXY TCP6 <39> <39> 65535 65535\r\n", by the spec. */
#define PP_PROXY_V1_MAX 107
/* v2: the fixed part, and the most we accept after it (addresses and TLVs;
 * the spec allows 65,535, balancers send a few hundred at most). */
#define PP_PROXY_V2_FIXED 16
#define PP_PROXY_V2_MAX_LEN 4096

typedef struct pp_proxy_info {
    /* 1: v2 LOCAL, v2 UNSPEC or v1 UNKNOWN: a balancer's own connection (a
     * health check); the socket's addresses stand.  src/dst are unset. */
    int local;
    int version;                /* 1 or 2 */
    struct sockaddr_storage src, dst;
    socklen_t src_len, dst_len; /* of sockaddr_in or sockaddr_in6 */
} pp_proxy_info;

/* Looks at the first len bytes of a connection.  Returns the header's
 * length (> 0, at most len) once a whole valid header is there, with *out
 * filled in; 0 while what is there can still become one; -EPROTO when it
 * cannot (a wrong signature, version, command, family or address, a length
 * that lies, TLVs that overrun); -EMSGSIZE when it would be longer than the
 * limits above. */
long pp__proxy_parse(const unsigned char *buf, size_t len, pp_proxy_info *out);

/* 1 if buf[0..len) begins with something that could be a PROXY header's
 * signature (to refuse a second header after the first), else 0. */
int pp__proxy_signature(const unsigned char *buf, size_t len);

#endif
