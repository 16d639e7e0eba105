/* fleece-backup: checking NBD URI arguments.
 *
 * libnbd parses and connects every URI itself (lib/export.c), and every
 * other export of the same server (bitmap/NAME, and snapshot/NAME for
 * backup --control) is opened by name on that URI: no URI is ever
 * built or rewritten here.  What remains is what must be known before
 * connecting, when an argument is checked: that the scheme is an NBD
 * one, and the export name (percent-decoded, as libnbd decodes it) to
 * tell a snapshot export from another.  libnbd has no call that parses
 * a URI without connecting to it.  pct_decode also serves the TLS file
 * check of nbd.c.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backup.h"

static const char *const uri_schemes[] = {
  "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", NULL
};

static int
hex_value (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Decode n bytes of s; NULL if an escape is malformed or decodes to NUL. */
char *
pct_decode (const char *s, size_t n)
{
  char *r = xmalloc (n + 1), *p = r;
  size_t i;

  for (i = 0; i < n; i++) {
    if (s[i] != '%') {
      *p++ = s[i];
      continue;
    }
    if (i + 2 >= n || hex_value (s[i+1]) < 0 ||
        hex_value (s[i+2]) < 0 ||
        (hex_value (s[i+1]) == 0 && hex_value (s[i+2]) == 0)) {
      free (r);
      return NULL;
    }
    *p++ = hex_value (s[i+1]) * 16 + hex_value (s[i+2]);
    i += 2;
  }
  *p = '\0';
  return r;
}

/* The export name of NBD URI s (decoded), to check an argument before
 * any connection is made.  On error returns NULL with a message in err.
 */
char *
uri_export (const char *s, char *err, size_t errlen)
{
  const char *sep = strstr (s, "://"), *path;
  char *export;
  size_t i;

  if (sep == NULL) {
    snprintf (err, errlen, "'%s' is not a URI", s);
    return NULL;
  }
  for (i = 0; uri_schemes[i]; i++)
    if (strlen (uri_schemes[i]) == (size_t) (sep - s) &&
        strncmp (s, uri_schemes[i], sep - s) == 0)
      break;
  if (uri_schemes[i] == NULL) {
    snprintf (err, errlen, "'%s': unsupported URI scheme '%.*s' (use "
              "nbd, nbds, nbd+unix or nbds+unix)", s, (int) (sep - s), s);
    return NULL;
  }
  path = sep + 3 + strcspn (sep + 3, "/?#");
  export = *path == '/' ? pct_decode (path + 1, strcspn (path + 1, "?#"))
    : pct_decode ("", 0);
  if (export == NULL)
    snprintf (err, errlen, "'%s': bad percent-encoding in the export "
              "name", s);
  return export;
}
