/* libfleececlient: opening an export of the server an NBD URI reaches
 * (export.c).
 *
 * A Fleece server serves the live disk, snapshot/NAME and bitmap/NAME
 * on one socket; a client is given one URI (with its host or socket and
 * its TLS parameters) and reaches the others by their names.  libnbd
 * does the work: the URI is connected in option mode, the export name
 * replaced, then NBD_OPT_GO; no URI is rewritten by hand.
 */

#ifndef FLEECE_LIB_EXPORT_H
#define FLEECE_LIB_EXPORT_H

#include <stdbool.h>
#include <stddef.h>

#include <libnbd.h>

#define EXPORT_EXTENTS 1u       /* ask for base:allocation */
#define EXPORT_FULL_INFO 2u     /* ask for the description (and more) */

/* Connect to export name (NULL: the URI's own) of the server uri
 * reaches.  handle_name, if not NULL, names the handle in libnbd's debug
 * messages.  Local files named by the URI (tls-certificates=,
 * tls-psk-file=) are allowed: the URI is the user's.
 *
 * Returns the handle, ready for commands, or NULL with libnbd's reason
 * in err.  *refused (if refused is not NULL) tells a server that refused
 * the export (it does not have it, or not for this connection) from a
 * connection that failed; a plaintext connection refused by a server
 * that offers TLS gets a hint to use nbds:// in err, because a server
 * with tls-exports-only=true refuses without saying why.
 */
extern struct nbd_handle *export_open (const char *uri, const char *name,
                                       const char *handle_name,
                                       unsigned flags, bool *refused,
                                       char *err, size_t errlen);

#endif /* FLEECE_LIB_EXPORT_H */
