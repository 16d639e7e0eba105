/* Errors, debug messages and small helpers.
 *
 * The engine never prints.  A failing function records one message, where
 * the failure happened, in a thread-local buffer and returns -1 with errno
 * set to what the NBD client should see; the caller (the plugin's
 * callback, the control service) passes the message on unchanged.
 */

#include <config.h>

#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

struct fleece_debug fleece_debug;

static __thread char last_error[512];
static __thread bool last_error_repeat;
static fleece_log_fn log_fn;
static fleece_log_fn warn_fn;

const char *
fleece_last_error (void)
{
  return last_error[0] ? last_error : "unknown error";
}

bool
fleece_last_error_is_repeat (void)
{
  return last_error_repeat;
}

void
fl_error_repeat (void)
{
  last_error_repeat = true;
}

/* Record the message; returns -1 with errno = err, so that callers can
 * write "return fl_error (EIO, ...)".  %m in fmt refers to err.
 */
int
fl_error (int err, const char *fmt, ...)
{
  va_list ap;

  errno = err;
  last_error_repeat = false;
  va_start (ap, fmt);
  vsnprintf (last_error, sizeof last_error, fmt, ap);
  va_end (ap);
  fl_debug ("error: %s", last_error);
  errno = err;
  return -1;
}

void
fleece_set_log (fleece_log_fn fn)
{
  log_fn = fn;
}

void
fleece_set_warn (fleece_log_fn fn)
{
  warn_fn = fn;
}

/* What the operator must see whatever the debug level: a loaded store
 * that was found damaged, and what that cost.  The engine still never
 * prints: the plugin passes it to nbdkit_error.
 */
/* Format a message of at most size - 1 bytes and pass it to fn, errno
 * untouched.
 */
static void
emit (fleece_log_fn fn, size_t size, const char *fmt, va_list ap)
{
  char msg[1024];
  int saved = errno;

  vsnprintf (msg, size < sizeof msg ? size : sizeof msg, fmt, ap);
  fn (msg);
  errno = saved;
}

/* A warning with no warning listener is a debug message. */
static void
warn_as_debug (const char *msg)
{
  fl_debug ("%s", msg);
}

void
fl_warn (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  emit (warn_fn ? warn_fn : warn_as_debug, 1024, fmt, ap);
  va_end (ap);
}

void
fl_debug (const char *fmt, ...)
{
  va_list ap;

  if (!fleece_debug.verbose || !log_fn)
    return;
  va_start (ap, fmt);
  emit (log_fn, 512, fmt, ap);
  va_end (ap);
}

/* True if len bytes at buf are all zero: test the first 16 bytes, then
 * compare the buffer with itself shifted by 16 (memcmp is vectorised).
 */
bool
fl_is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  size_t i, head = len < 16 ? len : 16;

  for (i = 0; i < head; i++)
    if (p[i])
      return false;
  return len <= 16 || memcmp (p, p + 16, len - 16) == 0;
}

/* Read count bytes at offset of fd, retrying short reads.  what names
 * the object in the error ("disk", "store").
 */
int
fl_pread_all (int fd, const char *what, const char *path, void *buf,
              size_t count, uint64_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = pread (fd, p, count, offset);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return fl_error (errno, "%s: pread: %s: offset %" PRIu64 ": %m",
                       what, path, offset);
    if (r == 0)
      return fl_error (EIO, "%s: pread: %s: unexpected end of file at "
                       "offset %" PRIu64, what, path, offset);
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

/* Write count bytes at offset of fd, retrying short writes; with dsync
 * the data is on stable storage when it returns (RWF_DSYNC).
 */
int
fl_pwrite_all (int fd, const char *what, const char *path, const void *buf,
               size_t count, uint64_t offset, bool dsync)
{
  const char *p = buf;

  while (count > 0) {
    struct iovec iov = { .iov_base = (void *) p, .iov_len = count };
    ssize_t r = pwritev2 (fd, &iov, 1, offset, dsync ? RWF_DSYNC : 0);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return fl_error (errno, "%s: pwrite: %s: offset %" PRIu64 ": %m",
                       what, path, offset);
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

/* Make fd's writes stable. */
int
fl_fdatasync (int fd, const char *what, const char *path)
{
  if (fdatasync (fd) == -1)
    return fl_error (errno, "%s: fdatasync: %s: %m", what, path);
  return 0;
}
