/* fleece-backup: the target, an NBD URI or a local file or block device.
 *
 * TARGET names an NBD export when it has "://", a file otherwise.  What a
 * pull needs of an NBD target is checked here, when it is opened and
 * again after every reconnection: writable, and at least as large as the
 * source.  A file is checked when it is opened (rw-file.c).
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <string.h>

#include "backup.h"

struct rw tgt = { .name = "target", .is_target = true, .fd = -1 };
char *zero_buf;

void
target_check (bool again)
{
  int64_t size = nbd_get_size (tgt.nbd);

  if (size == -1)
    die ("%s: %s", cfg.target, nbd_get_error ());
  if (nbd_is_read_only (tgt.nbd) == 1)
    die ("target %s is read-only", cfg.target);
  if ((uint64_t) size < src.size)
    die ("target too small: %s is %" PRIi64 " bytes, the source is "
         "%" PRIu64 " bytes", cfg.target, size, src.size);
  tgt.can_zero = nbd_can_zero (tgt.nbd) == 1;
  tgt.can_flush = nbd_can_flush (tgt.nbd) == 1;
  if (!again)
    limit_request_size (tgt.nbd);
}

void
target_open (void)
{
  tgt.uri = tgt.what = cfg.target;
  if (strstr (cfg.target, "://") == NULL) {
    file_rw_open (&tgt);
    return;
  }
  nbd_rw_open (&tgt, false);
  target_check (false);
}
