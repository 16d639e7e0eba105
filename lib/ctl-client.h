/* libfleececlient: the client of a control socket
 * (docs/control-protocol.md), used by fleecectl, fleece-backup and
 * fleece-colod.  See ctl-client.c for the design.
 *
 * A client reaches the server either through its Unix socket
 * (ctlc_connect) or through a command whose stdin and stdout are the
 * socket, such as "ssh -T HOST fleecectl -s PATH relay" (ctlc_spawn).
 * Both check the server's greeting before they return.
 *
 * Errors: every function that can fail returns -1 (or NULL) and writes
 * one message into err (errlen bytes).  A message about the connection
 * (connect, a read or write that failed, a timeout, a closed connection,
 * a malformed reply) starts "control socket NAME: ", NAME being the path
 * or the name given to ctlc_spawn; an error reply from the server is
 * "LABEL: DESC", LABEL being the command (or what ctlc_set_label gave)
 * and DESC the server's own words.
 *
 * The API is stable: fleece-backup's --control uses it as it is.
 */

#ifndef FLEECE_LIB_CTL_CLIENT_H
#define FLEECE_LIB_CTL_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct ctlc;

/* Connect to the server listening on path and read its greeting.  Every
 * later wait for a reply lasts at most timeout_ms (-1: no limit).
 */
extern struct ctlc *ctlc_connect (const char *path, int64_t timeout_ms,
                                  char *err, size_t errlen);

/* Run argv (argv[0] looked up in $PATH) with its stdin and stdout
 * connected to the client, its stderr left as ours, and read the
 * greeting through it.  name says in messages what was reached (for
 * example "ssh://host/run/fleece.sock").  ctlc_close reaps the child.
 */
extern struct ctlc *ctlc_spawn (const char *name, char *const argv[],
                                int64_t timeout_ms,
                                char *err, size_t errlen);

/* The name error replies give to the commands that follow instead of
 * the command itself (NULL: the command).  label must outlive its use.
 */
extern void ctlc_set_label (struct ctlc *c, const char *label);

/* Run cmd with args (consumed; NULL for none) and return the reply's
 * "return" value, a new reference.  Events that come meanwhile are
 * skipped, or kept for ctlc_next_event after ctlc_subscribe.
 */
extern json_t *ctlc_execute (struct ctlc *c, const char *cmd, json_t *args,
                             char *err, size_t errlen);

/* Send one line as it is (a newline is added), then read the reply to
 * it: the next line that is not an event, parsed, and its text in *text
 * if text is not NULL (malloc'ed).  An error reply is a reply here, not
 * an error.  For requests built elsewhere (fleecectl raw).
 */
extern int ctlc_send_line (struct ctlc *c, const char *line,
                           char *err, size_t errlen);
extern json_t *ctlc_reply (struct ctlc *c, char **text,
                           char *err, size_t errlen);

/* subscribe-events: from now on the server sends events on this
 * connection and keeps it however long it is idle.  Events that come
 * before the reply, or while a later command waits for its own, are
 * kept in order for ctlc_next_event.
 */
extern int ctlc_subscribe (struct ctlc *c, char *err, size_t errlen);

/* The next event: 1 with *event (a new reference) and, if text is not
 * NULL, its line as received (malloc'ed); 0 when deadline_ms passes
 * first (a time of monotonic_ms (), common/include/monotonic.h; -1: no
 * limit); -1 on error, including the server closing the connection.
 */
extern int ctlc_next_event (struct ctlc *c, int64_t deadline_ms,
                            json_t **event, char **text,
                            char *err, size_t errlen);

/* Whether the server has closed the connection: after an error, tells
 * the end of a conversation (fleece-colod events stops there) from a
 * failure.
 */
extern bool ctlc_closed (const struct ctlc *c);

/* Close the connection; for a spawned command, wait for it to exit
 * (killing it if it does not within a few seconds).  NULL is ignored.
 */
extern void ctlc_close (struct ctlc *c);

/* fleecectl relay: connect to path, then copy in_fd to the socket and
 * the socket to out_fd until the server closes its end.  When in_fd
 * ends, the socket's sending side is shut down so that the server
 * answers what it has and closes; when out_fd's reader is gone, the
 * relay ends too.  Returns 0, or -1 with the reason in err.
 */
extern int ctlc_relay (const char *path, int in_fd, int out_fd,
                       char *err, size_t errlen);

#endif /* FLEECE_LIB_CTL_CLIENT_H */
