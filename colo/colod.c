/* fleece-colod: the daemon's shared state (colod.h says what each
 * field is and which lock guards it).
 */

#include <config.h>

#include "colod.h"

struct colod colod = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .cond = PTHREAD_COND_INITIALIZER,
};

const char *
colod_failover_name (enum colod_failover f)
{
  switch (f) {
  case FAILOVER_NONE: return "none";
  case FAILOVER_REQUIRE: return "require";
  case FAILOVER_ACTIVE: return "active";
  case FAILOVER_COMPLETED: return "completed";
  }
  return "unknown";
}

unsigned
colod_ndisks (void)
{
  return colod.opt.ndisks ? colod.opt.ndisks : colod.opt.nfleece;
}

const char *
colod_disk_name (unsigned i)
{
  return colod.opt.ndisks ? colod.opt.disks[i] : colod.opt.fleece_sockets[i];
}
