/* handlers.c - built-in native handlers. */
#include "pp_server.h"

/* Replies with the message itself; with framing applied to both sides this
 * makes the server the identity in every framing. */
int pp_handler_echo(void *ctx, const unsigned char *msg, size_t len,
                    pp_reply *reply)
{
    (void)ctx;
    return pp_reply_write(reply, msg, len) < 0 ? -1 : PP_KEEP;
}
