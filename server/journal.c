/* Structured log records for the systemd journal, shared by the plugin
 * (its events) and fleece-colod (its log and events).
 *
 * A program whose stderr systemd connected to the journal (the
 * JOURNAL_STREAM variable names that stream's device and inode) sends
 * its records with sd_journal_sendv instead: the same text in MESSAGE,
 * its priority in PRIORITY rather than a prefix, and fields that a
 * query can select on (journalctl FLEECE_EVENT=SNAPSHOT_BROKEN).  Only
 * when stderr is still that stream: a program whose stderr was
 * redirected elsewhere keeps writing there.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <syslog.h>

/* CODE_FILE= and CODE_LINE= would name this file, not the caller. */
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include "internal.h"
#include "fleece-metrics.h"

bool
fleece_stderr_is_journal (void)
{
  const char *e = getenv ("JOURNAL_STREAM");
  unsigned long long dev, ino;
  struct stat st;

  return e && sscanf (e, "%llu:%llu", &dev, &ino) == 2 &&
    fstat (2, &st) == 0 && st.st_dev == dev && st.st_ino == ino;
}

int
fleece_journal_send (int priority, const char *message,
                     const char *const *fields, size_t n)
{
  char pri[16], *msg;
  struct iovec iov[FLEECE_JOURNAL_MAX_FIELDS + 2];
  size_t i, k = 0;
  int r;

  if (n > FLEECE_JOURNAL_MAX_FIELDS)
    n = FLEECE_JOURNAL_MAX_FIELDS;
  if (asprintf (&msg, "MESSAGE=%s", message) == -1)
    return -1;
  snprintf (pri, sizeof pri, "PRIORITY=%d", priority & LOG_PRIMASK);
  iov[k++] = (struct iovec) { msg, strlen (msg) };
  iov[k++] = (struct iovec) { pri, strlen (pri) };
  for (i = 0; i < n; i++)
    iov[k++] = (struct iovec) { (void *) fields[i], strlen (fields[i]) };
  r = sd_journal_sendv (iov, k);
  free (msg);
  return r < 0 ? -1 : 0;
}
