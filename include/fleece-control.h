/* The control service: a Unix socket speaking QMP-shaped JSON, one object
 * per line (docs/control-protocol.md).  Part of libfleece; the plugin
 * opens it, fleecectl and backup software talk to it.
 */

#ifndef FLEECE_CONTROL_H
#define FLEECE_CONTROL_H

#include <stddef.h>

#include "fleece.h"

#define CTL_MAX_LINE   (64 * 1024)  /* longest request line accepted */
#define CTL_MAX_CLIENTS 32
/* A client that is not subscribed (subscribe-events) is closed after so
 * long without a complete request: since it connected, or since its
 * last one.  -D fleece.ctl_idle_timeout_ms=N sets both (for the tests).
 */
#define CTL_NEW_TIMEOUT_MS   10000
#define CTL_IDLE_TIMEOUT_MS  60000
/* With CTL_MAX_CLIENTS connected, a new client takes the place of the
 * client not subscribed that has been idle longest, at least this long.
 */
#define CTL_EVICT_IDLE_MS    1000

struct ctl;

/* Extra facts for query-status that the engine does not know. */
struct ctl_info {
  const char *on_cbw_error;     /* "break-snapshot" | "fail-write" */
  int persistent;
  /* Called by the service thread for every event, subscribers or not,
   * so that the program logs it (NULL: not logged).  snapshot is "" for
   * an event about the store as a whole.
   */
  void (*log_event) (const char *event, const char *snapshot,
                     const char *reason);
};

/* Create the socket at path (mode 0600) and listen.  A stale socket left
 * by a dead server is replaced; a live one, or a path that is not a
 * socket, is refused.  Returns NULL with fleece_last_error() set.
 * Registers itself as fl's event listener.
 */
extern struct ctl *ctl_open (struct fleece *fl, const char *path,
                             const struct ctl_info *info);

/* Start the service thread (the plugin calls this after nbdkit forks). */
extern int ctl_start (struct ctl *ctl);

/* Stop the thread, close every client, unlink the socket, free. */
extern void ctl_close (struct ctl *ctl);

/* Handle one request line (without its newline) and return the reply
 * line (without newline), malloc'd.  Never NULL except when out of
 * memory.  Used by the service thread, the tests and the fuzzer.
 */
extern char *ctl_handle_line (struct ctl *ctl, const char *line, size_t len);

#endif /* FLEECE_CONTROL_H */
