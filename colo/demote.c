/* fleece-colod demote: an old primary, before it becomes the secondary
 * of the side that was promoted, records in STATE_DIR/diverged
 * (state.c; secondary.c reads it) the clusters each disk of its group
 * was written since the last epoch the old secondary acknowledged (A,
 * primary.json's acked-epoch): the union of each plugin's colo-N
 * bitmaps from colo-A on (primary.c's note says what they hold).  The
 * first epoch after the failback replaces them with the new primary's
 * (docs/replication.md, "Failback").
 *
 * Every disk's bitmaps are read before anything is written, and the
 * file is written whole and renamed, so that a disk whose colo-A is
 * gone leaves no record of the others: the failback of a group is
 * incremental for all its disks or a full copy of all.  primary.json is
 * marked demoted last: a failure before leaves the primary as it was.
 */

#include <config.h>

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "colod.h"
#include "demote.h"
#include "log.h"
#include "plugin.h"
#include "source.h"
#include "state.h"

/* Disk i's clusters written since epoch acked into d: 0, or -1
 * (logged).
 */
static int
demote_disk (unsigned i, uint64_t acked, struct colo_diverged *d)
{
  struct primary_plugin *pl = &plugins[i];
  char err[1024], **names = NULL, what[PATH_MAX + 64] = "";
  size_t nnames = 0;
  int r, rc = -1;

  if (nplugins > 1)
    snprintf (what, sizeof what, "disk %u (--fleece %s): ", i, pl->socket);
  d->disk_sizes[i] = pl->disk_size;
  d->nbits[i] = (pl->disk_size + pl->cluster_size - 1) / pl->cluster_size;
  r = plugin_chain (pl, acked, UINT64_MAX, &names, &nnames, err,
                    sizeof err);
  if (r == -1)
    colod_err ("%s%s", what, err);
  if (r == 1)
    colod_err ("%scannot tell which clusters this side wrote since epoch %"
               PRIu64 " (bitmap " PLUGIN_PREFIX "%" PRIu64 " is not on the "
               "plugin)%s: restart it as a secondary with --discard-diverged "
               "for a full copy instead", what, acked, acked,
               nplugins > 1 ? "; nothing was recorded for any disk" : "");
  if (r != 0)
    goto out;
  if (colo_union_bitmaps (pl->nbd_uri, (const char *const *) names, nnames,
                          pl->disk_size, pl->cluster_size, false,
                          &d->bits[i], err, sizeof err) == -1) {
    colod_err ("%s%s", what, err);
    goto out;
  }
  rc = 0;
 out:
  plugin_free_names (names, nnames);
  return rc;
}

static uint64_t
count_bits (const uint8_t *bits, uint64_t nbits)
{
  uint64_t k, n = 0;

  for (k = 0; k < nbits; k++)
    n += (bits[k / 8] >> (k % 8)) & 1;
  return n;
}

int
colod_demote (void)
{
  struct colo_primary_state id;
  struct colo_diverged d = { 0 };
  char err[1024], id_path[PATH_MAX];
  uint64_t n[COLOD_MAX_DISKS], total = 0;
  unsigned i;
  int rc = COLOD_EXIT_ERROR, r;

  colo_state_path (colod.opt.state_dir, "primary.json", id_path,
                   sizeof id_path);
  r = colo_state_load_primary (colod.opt.state_dir, &id, err, sizeof err);
  if (r == -1)
    colod_err ("%s", err);
  if (r != 1) {
    colod_err ("%s: no primary state to demote", id_path);
    return COLOD_EXIT_ERROR;
  }
  if (id.demoted) {
    colod_err ("%s: already demoted", id_path);
    return COLOD_EXIT_ERROR;
  }
  if (plugin_start (false) == -1)
    return COLOD_EXIT_ERROR;
  d.base = id.acked;
  d.cluster_size = plugins[0].cluster_size;
  d.disk_count = nplugins;
  for (i = 0; i < nplugins; i++) {
    if (demote_disk (i, id.acked, &d) == -1)
      goto out;
    n[i] = count_bits (d.bits[i], d.nbits[i]);
    total += n[i];
  }
  if (colo_state_write_diverged (colod.opt.state_dir, &d, err,
                                 sizeof err) == -1) {
    colod_err ("%s", err);
    goto out;
  }
  id.demoted = true;
  if (colo_state_save_primary (colod.opt.state_dir, &id, err,
                               sizeof err) == -1) {
    colod_err ("%s", err);
    goto out;
  }
  printf ("demoted: %" PRIu64 " clusters written since epoch %" PRIu64
          " will be replaced from the new primary\n", total, id.acked);
  for (i = 0; nplugins > 1 && i < nplugins; i++)
    printf ("disk %u (--fleece %s): %" PRIu64 " clusters\n", i,
            plugins[i].socket, n[i]);
  rc = 0;
 out:
  colo_diverged_free (&d);
  for (i = 0; i < nplugins; i++)
    ctlc_close (plugins[i].ctl);
  return rc;
}
