/* fleece-colod: encoding and decoding the wire protocol's frames
 * (include/fleece-colo-wire.h, docs/replication.md "Wire protocol").
 *
 * Messages are typed structs in host byte order (struct colo_msg).  An
 * encoder numbers the frames it sends; a decoder takes the bytes of a
 * stream in pieces of any size and yields validated messages, one at a
 * time.  Neither does any I/O of its own: the caller passes callbacks,
 * or buffers, so that the same code runs over TLS, a socketpair and a
 * fuzzer's input.
 */

#ifndef FLEECE_COLO_WIRE_PRIV_H
#define FLEECE_COLO_WIRE_PRIV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define XXH_STATIC_LINKING_ONLY     /* XXH64_state_t in colo_wire_digest */
#include <xxhash.h>

#include "fleece-colo-wire.h"
#include "vector.h"

/* What went wrong, for the log and for the peer.  code is what to send
 * in an ERROR frame before disconnecting (enum colo_error_code), or 0
 * when there is nobody to tell (a read or write failed, the stream
 * ended, a checksum check that the caller turns into EPOCH_REFUSED).
 * msg is printable ASCII, never holding bytes copied from the peer.
 */
struct colo_wire_error {
  uint32_t code;
  char msg[256];
};

/* ---- Messages ---- */

struct colo_generation {
  uint8_t id[16];
  uint64_t start_epoch;
};

struct colo_msg_hello {
  uint16_t role;                /* enum colo_role */
  uint16_t max_version;
  uint32_t channel;             /* enum colo_channel */
  uint8_t volume_id[16];
  uint8_t generation_id[16];
  uint64_t last_committed;
  uint64_t last_applied;
  uint64_t disk_size;
  uint32_t cluster_size;        /* 0: not known yet */
  uint32_t history_count;
  struct colo_generation history[COLO_WIRE_MAX_HISTORY];
  uint32_t disk_count;          /* 0: not known yet */
  uint64_t disk_sizes[COLO_WIRE_MAX_DISKS];
};

struct colo_msg_hello_reply {
  uint32_t status;              /* enum colo_hello_status */
  char reason[COLO_WIRE_MAX_STRING + 1];
};

struct colo_msg_epoch_begin {
  uint64_t epoch;
  uint8_t generation_id[16];
  uint32_t cluster_size;
  uint32_t flags;               /* COLO_EPOCH_* */
  uint64_t extent_count;
  uint64_t total_bytes;
};

struct colo_msg_extent {
  uint64_t offset;
  uint32_t length;
  uint32_t flags;               /* COLO_EXTENT_DATA or COLO_EXTENT_ZERO,
                                   | disk << COLO_EXTENT_DISK_SHIFT */
  uint64_t checksum;            /* colo_wire_checksum (data, length) */
  const void *data;             /* length bytes for DATA, NULL for ZERO */
};

struct colo_msg_epoch_end {
  uint64_t epoch;
  uint64_t extent_count;
  uint64_t digest;              /* colo_wire_digest_* */
};

struct colo_msg_epoch_durable {
  uint64_t epoch;
};

struct colo_msg_epoch_refused {
  uint64_t epoch;
  uint32_t reason;              /* enum colo_refuse_reason */
  char message[COLO_WIRE_MAX_STRING + 1];
};

struct colo_msg_heartbeat {
  uint64_t monotonic_ms;
  uint64_t last_committed;
};

struct colo_msg_heartbeat_reply {
  uint64_t echo_ms;
  uint64_t monotonic_ms;
  uint64_t last_committed;
  uint64_t last_applied;
};

struct colo_msg_error {
  uint32_t code;                /* enum colo_error_code */
  char message[COLO_WIRE_MAX_STRING + 1];
};

struct colo_msg_diverged {
  uint64_t base_epoch;
  uint64_t disk_size;
  uint32_t cluster_size;
  uint32_t disk;                /* in the group: 0 .. COLO_WIRE_MAX_DISKS-1 */
  uint64_t bit_count;           /* 0 or ceil (disk_size / cluster_size) */
  const uint8_t *bits;          /* (bit_count + 7) / 8 bytes; NULL if 0 */
};

struct colo_msg {
  uint16_t type;                /* enum colo_msg_type: selects the member */
  union {
    struct colo_msg_hello hello;
    struct colo_msg_hello_reply hello_reply;
    struct colo_msg_epoch_begin epoch_begin;
    struct colo_msg_extent extent;
    struct colo_msg_epoch_end epoch_end;
    struct colo_msg_epoch_durable epoch_durable;
    struct colo_msg_epoch_refused epoch_refused;
    struct colo_msg_heartbeat heartbeat;
    struct colo_msg_heartbeat_reply heartbeat_reply;
    struct colo_msg_error error;
    struct colo_msg_diverged diverged;
  };
};

/* "HELLO", "EXTENT", ...; "unknown" for anything else. */
extern const char *colo_msg_type_name (unsigned type);

/* Checks a message as the decoder would (ranges, strings, counts), so
 * that nothing is sent that the peer would refuse.  0 or -1.
 */
extern int colo_msg_check (const struct colo_msg *m,
                           struct colo_wire_error *err);

/* Decodes one payload of the given type (no frame header).  An EXTENT's
 * data points into payload.  0 or -1.
 */
extern int colo_msg_decode (unsigned type, const void *payload, size_t len,
                            struct colo_msg *m, struct colo_wire_error *err);

/* ---- Encoding ---- */

/* Writes all of buf or fails: 0 or -1 (errno set). */
typedef int (*colo_wire_write_fn) (void *opaque, const void *buf,
                                   size_t len);

struct colo_wire_encoder {
  uint64_t sequence;            /* of the last frame encoded; 0: none */
};

/* Frames colo_wire_encode appended: a growable array of bytes
 * (common/include/vector.h: ptr, len, cap; colo_wire_buf_reset frees
 * it).  All zeroes is empty.
 */
DEFINE_VECTOR_TYPE (colo_wire_buf, uint8_t)

extern void colo_wire_encoder_init (struct colo_wire_encoder *enc);

/* Sends one frame through write_fn: the header and fixed part in one
 * call, an EXTENT's data in a second one (not copied).  0 or -1.
 */
extern int colo_wire_send (struct colo_wire_encoder *enc,
                           const struct colo_msg *m,
                           colo_wire_write_fn write_fn, void *opaque,
                           struct colo_wire_error *err);

/* Appends one frame to buf (grown as needed).  0 or -1. */
extern int colo_wire_encode (struct colo_wire_encoder *enc,
                             const struct colo_msg *m, colo_wire_buf *buf,
                             struct colo_wire_error *err);

/* Sends ERROR (e->code, e->msg) if e->code is not 0: what to do before
 * closing a connection after a failure.  0 or -1.
 */
extern int colo_wire_send_error (struct colo_wire_encoder *enc,
                                 const struct colo_wire_error *e,
                                 colo_wire_write_fn write_fn, void *opaque);

/* ---- Decoding ---- */

/* Reads up to len bytes: > 0 bytes read, 0 at end of stream, -1 on
 * error (errno set).
 */
typedef ssize_t (*colo_wire_read_fn) (void *opaque, void *buf, size_t len);

/* The frame behind the message the decoder holds. */
struct colo_wire_frame {
  uint16_t type;
  uint32_t length;
  uint64_t sequence;
  const uint8_t *header;        /* COLO_WIRE_HEADER_SIZE bytes */
  const uint8_t *payload;       /* length bytes */
};

struct colo_wire_decoder;

/* NULL on out of memory. */
extern struct colo_wire_decoder *colo_wire_decoder_new (void);
extern void colo_wire_decoder_free (struct colo_wire_decoder *dec);

/* Zero copy: where to put the stream's next bytes (at most *len of
 * them), then how many were put there.  commit returns 1 when a message
 * is complete and valid (colo_wire_decoder_msg), 0 when more bytes are
 * needed, -1 on error.  The message is held until the next call to
 * buffer, feed or recv.  Errors are final: every later call fails with
 * the same error.
 */
extern int colo_wire_decoder_buffer (struct colo_wire_decoder *dec,
                                     void **buf, size_t *len,
                                     struct colo_wire_error *err);
extern int colo_wire_decoder_commit (struct colo_wire_decoder *dec, size_t n,
                                     struct colo_wire_error *err);

/* Copying: consumes bytes of data up to the end of a message at most
 * (*used says how many), with the same result as commit.
 */
extern int colo_wire_decoder_feed (struct colo_wire_decoder *dec,
                                   const void *data, size_t len,
                                   size_t *used,
                                   struct colo_wire_error *err);

/* Blocking: reads through read_fn until a message is complete.  1 with
 * *msg set, 0 at end of stream between frames, -1 on error (including
 * an end of stream inside a frame).
 */
extern int colo_wire_recv (struct colo_wire_decoder *dec,
                           colo_wire_read_fn read_fn, void *opaque,
                           const struct colo_msg **msg,
                           struct colo_wire_error *err);

/* The message and frame held after a 1, or NULL. */
extern const struct colo_msg *
colo_wire_decoder_msg (const struct colo_wire_decoder *dec);
extern const struct colo_wire_frame *
colo_wire_decoder_frame (const struct colo_wire_decoder *dec);

/* Take the payload buffer of the message the decoder holds, leaving it
 * *mem instead (a buffer from an earlier call, or NULL) of *cap payload
 * bytes: the message's data (an EXTENT's) then lives in the buffer
 * returned in *mem and *cap, the caller's, until it hands it back this
 * way or frees it with colo_wire_buffer_free.  The receiver uses this to
 * keep receiving while another thread writes the data out.  0, or -1 if
 * the decoder holds no message.
 */
extern int colo_wire_decoder_swap_buffer (struct colo_wire_decoder *dec,
                                          void **mem, size_t *cap);
extern void colo_wire_buffer_free (void *mem);

/* The stream ended: 0 if that is between frames, else -1 ("connection
 * closed in the middle of a frame"), and the decoder fails from now on.
 */
extern int colo_wire_decoder_eof (struct colo_wire_decoder *dec,
                                  struct colo_wire_error *err);

/* ---- Extents and epochs ---- */

/* xxh64 (seed 0): an EXTENT's checksum. */
extern uint64_t colo_wire_checksum (const void *data, size_t len);

/* Does a DATA extent's data match its checksum?  0, or -1 with code 0:
 * the epoch is refused (COLO_REFUSE_CHECKSUM), the connection stays.
 */
extern int colo_wire_extent_verify (const struct colo_msg_extent *x,
                                    struct colo_wire_error *err);

/* EPOCH_END's digest: xxh64 over the epoch's extent descriptors
 * (struct colo_wire_extent, as on the wire) in the order sent.
 */
struct colo_wire_digest {
  XXH64_state_t state;
  uint64_t count;               /* extents added */
};

extern void colo_wire_digest_init (struct colo_wire_digest *d);
extern void colo_wire_digest_add (struct colo_wire_digest *d,
                                  const struct colo_msg_extent *x);
extern uint64_t colo_wire_digest_final (const struct colo_wire_digest *d);

#endif /* FLEECE_COLO_WIRE_PRIV_H */
