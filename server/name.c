/* Names of snapshots, bitmaps and checkpoints.
 *
 * A name becomes an export name ("snapshot/NAME", "bitmap/NAME"), a JSON
 * string in the control protocol and a line in an operator's listing, so
 * it must be one NBD export name component and must show as what it is.
 * fleece_check_name holds for every name, including those a store written
 * by an older version holds (they are still loaded, found and deleted);
 * fleece_check_new_name adds the rules for a name being given now.
 */

#include <config.h>

#include <errno.h>
#include <string.h>

#include "internal.h"

int
fleece_check_name (const char *what, const char *name)
{
  size_t i, len = name ? strlen (name) : 0;

  if (len == 0)
    return fl_error (EINVAL, "%s name is empty", what);
  if (len > FLEECE_SNAPSHOT_NAME_MAX)
    return fl_error (EINVAL, "%s name is %zu bytes long, the limit is %d",
                     what, len, FLEECE_SNAPSHOT_NAME_MAX);
  for (i = 0; i < len; i++) {
    unsigned char ch = name[i];
    if (ch == '/')
      return fl_error (EINVAL, "%s name '%s' contains '/'", what, name);
    if (ch < 0x20 || ch == 0x7f)
      return fl_error (EINVAL, "%s name contains control character 0x%02x "
                       "at byte %zu", what, ch, i);
  }
  return 0;
}

/* The code point of the 2- or 3-byte UTF-8 sequence at p (*len = its
 * length), or 0 with *len = 1: every bidirectional control and every
 * non-ASCII space is in the Basic Multilingual Plane.
 */
static uint32_t
utf8_at (const unsigned char *p, size_t avail, size_t *len)
{
  if (p[0] >= 0xc2 && p[0] <= 0xdf && avail >= 2 && (p[1] & 0xc0) == 0x80) {
    *len = 2;
    return ((p[0] & 0x1fu) << 6) | (p[1] & 0x3fu);
  }
  if (p[0] >= 0xe0 && p[0] <= 0xef && avail >= 3 &&
      (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
    *len = 3;
    return ((p[0] & 0x0fu) << 12) | ((p[1] & 0x3fu) << 6) | (p[2] & 0x3fu);
  }
  *len = 1;
  return 0;
}

/* Unicode whitespace that is not ASCII (ASCII whitespace other than the
 * space is a control character, refused anyway).
 */
static bool
is_unicode_space (uint32_t cp)
{
  return cp == 0x00a0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200b) ||
    cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
    cp == 0x3000 || cp == 0xfeff;
}

/* The embeddings, overrides and isolates of the Unicode bidirectional
 * algorithm: in a name they make a listing show it differently from
 * what it is ("Trojan Source").
 */
static bool
is_bidi_control (uint32_t cp)
{
  return (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069);
}

/* The rules for a name being given to a new snapshot, bitmap or
 * checkpoint, on top of fleece_check_name's: no "." or "..", not only
 * whitespace, no bidirectional control characters.  Names that a store
 * written by an older version holds are still loaded, found and deleted
 * (fleece_check_name alone).
 */
int
fleece_check_new_name (const char *what, const char *name)
{
  const unsigned char *p = (const unsigned char *) name;
  size_t i, n, len;
  bool blank = true;

  if (fleece_check_name (what, name) == -1)
    return -1;
  if (strcmp (name, ".") == 0 || strcmp (name, "..") == 0)
    return fl_error (EINVAL, "%s name '%s' is refused: '.' and '..' are "
                     "not names", what, name);
  len = strlen (name);
  for (i = 0; i < len; i += n) {
    uint32_t cp = utf8_at (p + i, len - i, &n);
    if (is_bidi_control (cp))
      return fl_error (EINVAL, "%s name contains the bidirectional control "
                       "character U+%04" PRIX32 " at byte %zu: it would be "
                       "shown differently from what it is", what, cp, i);
    if (p[i] != ' ' && !is_unicode_space (cp))
      blank = false;
  }
  if (blank)
    return fl_error (EINVAL, "%s name is only whitespace", what);
  return 0;
}
