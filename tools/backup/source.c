/* fleece-backup: the source, a snapshot export of a Fleece server.
 *
 * The source is always NBD (rw-nbd.c) and asked for base:allocation.
 * What a pull needs of it is checked here, when it is opened and again
 * after every reconnection, which must find the same export: a size that
 * changed means another export, and the pull stops rather than mixing
 * two.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

#include "backup.h"

struct rw src = { .name = "source", .fd = -1 };

/* Check the source after a connection; a reconnection must find the
 * same export.
 */
void
source_check (bool again)
{
  int64_t size = nbd_get_size (src.nbd);

  if (size == -1)
    die ("%s: %s", source_name (), nbd_get_error ());
  if (again && (uint64_t) size != src.size)
    die ("%s: the export is now %" PRIi64 " bytes, it was %" PRIu64,
         source_name (), size, src.size);
  src.size = size;
  src.can_extents =
    nbd_can_meta_context (src.nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  if (cfg.discard_source && nbd_can_trim (src.nbd) != 1)
    die ("source cannot trim: %s does not support trim, which "
         "--discard-source needs", source_name ());
  if (!again)
    limit_request_size (src.nbd);
}

/* The source in messages: SOURCE, or the export opened on its server
 * (set by source_open; reachable until the next source_open).
 */
static char *source_what;

const char *
source_name (void)
{
  return source_what ? source_what : cfg.source;
}

void
source_open (void)
{
  free (source_what);
  source_what = NULL;
  if (cfg.source_export &&
      asprintf (&source_what, "%s on %s", cfg.source_export,
                cfg.source) == -1)
    die ("asprintf: %m");
  src.uri = cfg.source;
  src.export = cfg.source_export;
  src.what = source_name ();
  nbd_rw_open (&src, true);
  source_check (false);
}

/* Before the last flush of a file target: if nothing more can be asked
 * of the source (no verify, no trim, no retry after a failed flush),
 * say goodbye now, so that the server closes the connection while the
 * target is flushed rather than after; pull_end waits for it.
 */
void
source_release (void)
{
  if (!pull_idle () || cfg.verify || cfg.discard_source || cfg.retry ||
      P.others > 0 || nbd_lost (src.nbd) ||
      nbd_aio_in_flight (src.nbd) > 0)
    return;
  src.released = nbd_aio_disconnect (src.nbd, 0) == 0;
}
