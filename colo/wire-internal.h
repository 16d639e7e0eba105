/* fleece-colod's wire protocol, inside: what wire.c (the messages' rules),
 * wire-encode.c and wire-decode.c share.  Not for the protocol's users,
 * who see wire.h only.
 */

#ifndef FLEECE_COLO_WIRE_INTERNAL_H
#define FLEECE_COLO_WIRE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "wire.h"

#define HDR COLO_WIRE_HEADER_SIZE
#define STR_MAX (sizeof (struct colo_wire_string) + COLO_WIRE_MAX_STRING)
#define HELLO_MAX (sizeof (struct colo_wire_hello) + \
                   COLO_WIRE_MAX_HISTORY * sizeof (struct colo_wire_generation) \
                   + sizeof (struct colo_wire_disks) + COLO_WIRE_MAX_DISKS * 8)
#define FIXED_MAX HELLO_MAX     /* largest payload but EXTENT's data */
#define FIRST_ALLOC (64 * 1024)
#define DATA_ALIGN 4096
#define DATA_ALIGN_PAD (DATA_ALIGN - sizeof (struct colo_wire_extent))

/* One fixed field of a message: its offset in the payload (struct
 * colo_wire_T) and in the message (struct colo_msg_T), which name it
 * alike, and its size in both: 2, 4 or 8 (a little-endian number) or
 * 16 (bytes).
 */
struct wire_field {
  uint16_t wire, msg, size;
};

/* What follows a message's fixed fields. */
enum wire_tail {
  TAIL_NONE,
  TAIL_STRING,                  /* a colo_wire_string, at string */
  TAIL_OTHER,                   /* HELLO's history, EXTENT's data,
                                   DIVERGED's bits: its own code */
};

/* Each type: its payload's bounds, checked from the header alone, and
 * its layout, which the encoder and the decoder both follow.
 */
struct type_info {
  const char *name;
  uint32_t min, max;
  uint32_t fixed;               /* sizeof (struct colo_wire_T) */
  const struct wire_field *fields;
  unsigned nfields;
  enum wire_tail tail;
  uint16_t string;              /* TAIL_STRING: its offset in colo_msg_T */
};

/* wire.c */

/* The bounds of type, or NULL for a type that does not exist. */
extern const struct type_info *wire_type_info (unsigned type);

/* Record code and the message in *err (which may be NULL); returns -1 so
 * that callers can "return wire_set_error (...)".  %m works.
 */
extern int wire_set_error (struct colo_wire_error *err, uint32_t code,
                           const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
#define PROTO(err, ...) wire_set_error ((err), COLO_ERROR_PROTOCOL, __VA_ARGS__)

/* Copy the fixed fields of a message of type t between the payload p
 * and the message's body (the member of struct colo_msg's union, all of
 * which start at the same address).  wire_put_fields writes t->fixed
 * bytes, reserved ones as zeroes.
 */
extern void wire_get_fields (const struct type_info *t, const uint8_t *p,
                             void *body);
extern void wire_put_fields (const struct type_info *t, uint8_t *p,
                             const void *body);

extern bool wire_is_printable (uint8_t c);
/* The checks of colo_msg_check that the decoder also runs on a message
 * whose payload it has just read: 0, or -1 with *err set.
 */
extern int wire_check_hello (const struct colo_msg_hello *h,
                             struct colo_wire_error *err);
extern int wire_check_extent (const struct colo_msg_extent *x,
                              struct colo_wire_error *err);
extern int wire_check_diverged (const struct colo_msg_diverged *d,
                                struct colo_wire_error *err);

/* wire-encode.c */

/* Store an EXTENT's fixed fields (sizeof (struct colo_wire_extent)
 * bytes) at p: the frame's payload, and what the epoch digest hashes.
 */
extern void wire_put_extent (uint8_t *p, const struct colo_msg_extent *x);

#endif /* FLEECE_COLO_WIRE_INTERNAL_H */
