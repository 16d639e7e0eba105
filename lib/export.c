/* libfleececlient: opening an export by name (export.h).
 *
 * Option mode (nbd_set_opt_mode) keeps the handle in negotiation after
 * nbd_connect_uri, which has applied everything the URI says: the
 * transport, the host or the socket, TLS and its credentials, and the
 * URI's own export name.  nbd_set_export_name then names the export
 * wanted and nbd_opt_go asks for it.  So the export name is never
 * written into a URI: it needs no percent-encoding, and the URI's query
 * stays exactly as the user wrote it.
 *
 * Option mode also separates the two ways to fail: the connection (no
 * server, TLS) fails in nbd_connect_uri, a refused export in
 * nbd_opt_go.  An oldstyle server skips negotiation: the handle is then
 * ready as soon as it is connected, and serves its one export.
 */

#include <config.h>

#include <stdio.h>
#include <string.h>

#include "export.h"
#include "messages.h"

/* A plaintext connection was refused an export: does the server offer
 * TLS?  A probe connection lets libnbd try STARTTLS: 1 yes, 0 no, -1
 * unknown.
 */
static int
server_offers_tls (const char *uri)
{
  struct nbd_handle *h = nbd_create ();
  int r = -1;

  if (h == NULL)
    return -1;
  if (nbd_set_opt_mode (h, true) == 0 &&
      nbd_set_tls (h, LIBNBD_TLS_ALLOW) == 0 &&
      nbd_set_uri_allow_local_file (h, true) == 0 &&
      nbd_connect_uri (h, uri) == 0)
    r = nbd_get_tls_negotiated (h);
  if (r != -1)
    nbd_opt_abort (h);
  nbd_close (h);
  return r;
}

/* The refusal's message, and what to try when it may be about TLS. */
static void
refused_message (const char *uri, const char *why, char *err, size_t errlen)
{
  int tls;

  if (strncmp (uri, "nbd://", 6) != 0 &&
      strncmp (uri, "nbd+unix://", 11) != 0) {
    snprintf (err, errlen, "%s", why);
    return;
  }
  tls = server_offers_tls (uri);
  snprintf (err, errlen, "%s (%s)", why,
            tls == 0 ? "the server does not serve this export, and it "
            "offers no TLS"
            : tls == 1 ? "the server offers TLS and may serve this export "
            "only over TLS: use nbds:// or nbds+unix:// with "
            "tls-certificates= or tls-psk-file="
            : "if the server requires TLS, use nbds:// or nbds+unix:// "
            "with tls-certificates= or tls-psk-file=");
}

struct nbd_handle *
export_open (const char *uri, const char *name, const char *handle_name,
             unsigned flags, bool *refused, char *err, size_t errlen)
{
  struct nbd_handle *h;
  char why[1024];

  if (refused)
    *refused = false;
  h = nbd_create ();
  if (h == NULL) {
    seterr (err, errlen, "nbd_create: %s", nbd_get_error ());
    return NULL;
  }
  if ((handle_name && nbd_set_handle_name (h, handle_name) == -1) ||
      nbd_set_uri_allow_local_file (h, true) == -1 ||
      nbd_set_opt_mode (h, true) == -1 ||
      ((flags & EXPORT_EXTENTS) &&
       nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) ||
      ((flags & EXPORT_FULL_INFO) && nbd_set_full_info (h, true) == -1)) {
    seterr (err, errlen, "%s", nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  if (nbd_connect_uri (h, uri) == -1) {
    seterr (err, errlen, "%s", nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  if (!nbd_aio_is_negotiating (h))      /* an oldstyle server */
    return h;
  if ((name == NULL || nbd_set_export_name (h, name) == 0) &&
      nbd_opt_go (h) == 0)
    return h;
  snprintf (why, sizeof why, "%s", nbd_get_error ());
  nbd_close (h);
  if (refused)
    *refused = true;
  refused_message (uri, why, err, errlen);
  return NULL;
}
