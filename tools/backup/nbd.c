/* fleece-backup: connecting to an NBD server, and leaving it.
 *
 * Every connection is made by lib/export.c, in option mode, so that a
 * server that refuses the export is told from one that cannot be
 * reached, and gets a hint when it may serve the export only over TLS;
 * the files a URI names for TLS are looked for first.  A connection is
 * replaced
 * (--on-error=retry) only once no command is in flight on it, because
 * nbd_close drops commands without calling their completion callbacks.
 * Closing waits for the server to close its end, so that whatever
 * follows the pull finds the export released.
 */

#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cleanup.h"
#include "monotonic.h"
#include "export.h"
#include "backup.h"

/* The files a URI's TLS query parameters name must exist: libnbd only
 * says "connection is closed" when they do not.  Returns false with the
 * reason in *msg (to free).
 */
static bool
uri_tls_files_exist (const char *uri, char **msg)
{
  static const struct { const char *key; bool dir; } keys[] = {
    { "tls-certificates", true }, { "tls-psk-file", false },
  };
  const char *q = strchr (uri, '?');
  size_t i;

  while (q && *q && *q != '#') {
    size_t len;
    q++;                                /* past '?', '&' or ';' */
    len = strcspn (q, "&;#");
    for (i = 0; i < sizeof keys / sizeof keys[0]; i++) {
      size_t klen = strlen (keys[i].key);
      CLEANUP_FREE char *path = NULL;
      struct stat st;
      int err = 0;

      if (len <= klen || strncmp (q, keys[i].key, klen) != 0 ||
          q[klen] != '=')
        continue;
      path = pct_decode (q + klen + 1, len - klen - 1);
      if (path == NULL)
        err = EINVAL;
      else if (stat (path, &st) == -1)
        err = errno;
      else if (keys[i].dir && !S_ISDIR (st.st_mode))
        err = ENOTDIR;
      if (err && asprintf (msg, "%s=%.*s: %s", keys[i].key,
                           (int) (len - klen - 1), q + klen + 1,
                           strerror (err)) == -1)
        die ("asprintf: %m");
      if (err)
        return false;
    }
    q += len;
  }
  return true;
}

/* Connect to uri (lib/export.c).  On failure returns NULL and the
 * reason in *msg (to free); *refused tells a server that refused the
 * export (it does not have it, or not for us) from a connection that
 * failed.
 */
struct nbd_handle *
nbd_open_uri (const char *uri, const char *name, bool extents, char **msg,
              bool *refused)
{
  struct nbd_handle *h;
  char why[1024];

  *refused = false;
  if (!uri_tls_files_exist (uri, msg))
    return NULL;
  /* The source's description names the disk (cmd-backup.c). */
  h = export_open (uri, NULL, name,
                   extents ? EXPORT_EXTENTS | EXPORT_FULL_INFO : 0, refused,
                   why, sizeof why);
  if (h == NULL && (*msg = strdup (why)) == NULL)
    die ("strdup: %m");
  return h;
}

/* Say goodbye and wait for the server to close the connection (so that
 * whatever follows sees the export released), then free the handle.
 * After nbd_aio_disconnect, only wait.
 */
void
nbd_finish (struct nbd_handle *h, bool disconnected)
{
  int64_t deadline = monotonic_us () + 5000000;

  if (!disconnected && !nbd_lost (h))
    nbd_shutdown (h, 0);
  while (disconnected && !nbd_lost (h) && monotonic_us () < deadline &&
         nbd_poll (h, 100) != -1)
    ;
  nbd_close (h);
}

bool
nbd_lost (struct nbd_handle *h)
{
  return nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
}

/* Limit the request size to what a server accepts. */
void
limit_request_size (struct nbd_handle *h)
{
  int64_t max = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);

  if (max >= 512 && (uint64_t) max < cfg.request_size)
    cfg.request_size = max;
}

/* Replace a handle by a new connection to the same URI, trying
 * MAX_RETRIES times.  A dead handle has already failed every command
 * that was on it; a live one (a server going away answers everything
 * with ESHUTDOWN) is drained first, because nbd_close drops commands
 * without calling their completion callbacks.  The failed jobs are then
 * retried as usual.
 */
void
nbd_reconnect (struct nbd_handle **hp, const char *uri, const char *name,
           bool extents, char **lost)
{
  int64_t deadline = monotonic_us () + 5000000;
  bool refused;
  char *msg;
  unsigned i;

  warn ("connection to %s lost (%s): reconnecting", uri,
        *lost ? *lost : nbd_lost (*hp) ? "closed" : "server shutting down");
  while (!nbd_lost (*hp) && nbd_aio_in_flight (*hp) > 0 &&
         monotonic_us () < deadline)
    poll_handles (100);
  if (nbd_aio_in_flight (*hp) > 0)
    die ("%s: requests still in flight on a connection that must be "
         "replaced", uri);
  nbd_close (*hp);
  *hp = NULL;
  for (i = 0; ; i++) {
    sleep_ms (RETRY_DELAY_MS << i);
    *hp = nbd_open_uri (uri, name, extents, &msg, &refused);
    if (*hp)
      break;
    if (i + 1 >= MAX_RETRIES)
      die ("cannot reconnect to %s: %s", uri, msg);
    warn ("reconnecting to %s failed: %s", uri, msg);
    free (msg);
  }
  free (*lost);
  *lost = NULL;
}
