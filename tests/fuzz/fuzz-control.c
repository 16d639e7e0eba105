/* libFuzzer target: the control socket's request handler.
 *
 * Every line a client can send goes through ctl_handle_line, which must
 * answer anything (malformed JSON, odd types, huge or hostile names, any
 * command with any arguments) with a well-formed reply and never crash,
 * leak or corrupt the engine.  The engine behind it is real: a small disk
 * and store in a temporary directory, so that snapshot, bitmap and
 * checkpoint commands really run.  Each reply is checked to be one line
 * of JSON holding "return" or "error".
 *
 * Built and run by "make fuzz" (tests/Makefile.am) with clang
 * -fsanitize=fuzzer,address,undefined; seeds in tests/fuzz/control-corpus.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "fleece.h"
#include "fleece-control.h"

static struct fleece *fl;
static struct ctl *ctl;
static char dir[] = "/tmp/fuzz-control.XXXXXX";
static char disk[64], store[64], sock[64];

static void
cleanup (void)
{
  ctl_close (ctl);
  fleece_close (fl);
  unlink (disk);
  unlink (store);
  rmdir (dir);
}

int LLVMFuzzerInitialize (int *argc, char ***argv);
int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize (int *argc, char ***argv)
{
  const struct ctl_info info = { .on_cbw_error = "break-snapshot" };
  struct fleece_config cfg = { .cluster_size = 4096 };
  FILE *fp;

  if (mkdtemp (dir) == NULL)
    abort ();
  snprintf (disk, sizeof disk, "%s/disk", dir);
  snprintf (store, sizeof store, "%s/store", dir);
  snprintf (sock, sizeof sock, "%s/ctl", dir);
  fp = fopen (disk, "w");
  if (fp == NULL || ftruncate (fileno (fp), 1 << 20) == -1)
    abort ();
  fclose (fp);
  cfg.disk = disk;
  cfg.store = store;
  fl = fleece_open (&cfg);
  if (fl && fleece_start (fl) == -1) {
    fleece_close (fl);
    fl = NULL;
  }
  ctl = fl ? ctl_open (fl, sock, &info) : NULL;
  if (ctl == NULL) {
    fprintf (stderr, "fuzz-control: %s\n", fleece_last_error ());
    abort ();
  }
  atexit (cleanup);
  return 0;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  char *reply = ctl_handle_line (ctl, (const char *) data, size);
  json_error_t err;
  json_t *v;

  if (reply == NULL)
    abort ();                   /* only allowed when out of memory */
  if (strchr (reply, '\n'))
    abort ();                   /* a reply is one line */
  v = json_loads (reply, 0, &err);
  if (v == NULL || !json_is_object (v) ||
      (!json_object_get (v, "return") && !json_object_get (v, "error")))
    abort ();
  json_decref (v);
  free (reply);
  return 0;
}
