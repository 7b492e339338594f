"""Builds ``_shout``: a native pollpool handler compiled through cffi, in the
user's own package.  Run ``python build_handler.py`` to compile it here."""

import pollpool
from cffi import FFI

ffi = FFI()
ffi.cdef("""
    typedef struct pp_reply pp_reply;
    int shout(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply);
""")
ffi.set_source("_shout", r"""
    #include <pollpool.h>

    /* Upper-cases each message.  Stateless, so thread-safe as it stands. */
    int shout(void *ctx, const unsigned char *msg, size_t len, pp_reply *reply)
    {
        (void)ctx;
        char buf[512];
        for (size_t off = 0; off < len; off += sizeof buf) {
            size_t k = len - off < sizeof buf ? len - off : sizeof buf;
            for (size_t i = 0; i < k; i++) {
                unsigned char c = msg[off + i];
                buf[i] = (char)(c >= 'a' && c <= 'z' ? c - 32 : c);
            }
            if (pp_reply_write(reply, buf, k) < 0)
                return -1;
        }
        return PP_KEEP;
    }
""", include_dirs=[pollpool.get_include()])

if __name__ == "__main__":
    ffi.compile(verbose=True)
