/* fleece-backup: NBD URIs.
 *
 * libnbd parses the URI itself; this parser only checks the scheme and
 * finds the export name (percent-decoded, as libnbd decodes it).  The
 * bitmap's export is opened by name on the source's connection
 * parameters (lib/export.c), with no URI rewritten.  export_uri makes
 * the URI of snapshot/NAME for backup --control, whose pull is opened
 * by URI like any source (struct rw has no export name of its own).
 */

#include <config.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "backup.h"

static const char *const uri_schemes[] = {
  "nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock", NULL
};

void
uri_free (struct uri *u)
{
  free (u->scheme);
  free (u->authority);
  free (u->rest);
  free (u->export);
  memset (u, 0, sizeof *u);
}

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

/* Split an NBD URI.  On error returns -1 with a message in err. */
int
uri_parse (const char *s, struct uri *u, char *err, size_t errlen)
{
  const char *sep = strstr (s, "://"), *auth, *path, *rest;
  size_t i;

  memset (u, 0, sizeof *u);
  if (sep == NULL) {
    snprintf (err, errlen, "'%s' is not a URI", s);
    return -1;
  }
  for (i = 0; uri_schemes[i]; i++)
    if (strlen (uri_schemes[i]) == (size_t) (sep - s) &&
        strncmp (s, uri_schemes[i], sep - s) == 0)
      break;
  if (uri_schemes[i] == NULL) {
    snprintf (err, errlen, "'%s': unsupported URI scheme '%.*s' (use "
              "nbd, nbds, nbd+unix or nbds+unix)", s, (int) (sep - s), s);
    return -1;
  }
  auth = sep + 3;
  path = auth + strcspn (auth, "/?#");
  rest = path + strcspn (path, "?#");
  u->export = pct_decode (*path == '/' ? path + 1 : path,
                          *path == '/' ? (size_t) (rest - path - 1) : 0);
  if (u->export == NULL) {
    snprintf (err, errlen, "'%s': bad percent-encoding in the export "
              "name", s);
    return -1;
  }
  u->scheme = strndup (s, sep - s);
  u->authority = strndup (auth, path - auth);
  u->rest = strdup (rest);
  if (!u->scheme || !u->authority || !u->rest)
    die ("strdup: %m");
  return 0;
}

/* The URI of export "KIND/NAME" (bitmap, snapshot) on the server of
 * source_uri.
 */
char *
export_uri (const char *source_uri, const char *kind, const char *name)
{
  CLEANUP_FREE char *enc = NULL;
  struct uri u;
  char err[512], *r, *e;
  size_t i;

  if (uri_parse (source_uri, &u, err, sizeof err) == -1)
    return NULL;
  /* Percent-encode what is not unreserved (RFC 3986). */
  enc = e = xmalloc (3 * strlen (name) + 1);
  for (i = 0; name[i]; i++) {
    unsigned char c = name[i];
    if (isalnum (c) || strchr ("-._~", c))
      *e++ = c;
    else
      e += sprintf (e, "%%%02X", c);
  }
  *e = '\0';
  if (asprintf (&r, "%s://%s/%s/%s%s", u.scheme, u.authority, kind, enc,
                u.rest) == -1)
    die ("asprintf: %m");
  uri_free (&u);
  return r;
}

