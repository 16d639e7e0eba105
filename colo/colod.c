/* fleece-colod: the daemon's shared state (colod.h says what each
 * field is and which lock guards it).
 */

#include <config.h>

#include "colod.h"

struct colod colod = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .cond = PTHREAD_COND_INITIALIZER,
};
