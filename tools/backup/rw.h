/* fleece-backup: the two ends of a pull behind one operations table.
 *
 * The source is a snapshot export (NBD); the target is an NBD export or a
 * local file or block device.  The loop, the planner and the batches only
 * see a struct rw and call its operations, so that another kind of end
 * is one more table, not more branches (a repository point is written
 * through an NBD end: qemu-nbd serving the new qcow2 file, repo.h).
 *
 * Every operation is started on behalf of a job whose 'pending' count the
 * caller has already raised; it ends with job_completed (j, err,
 * rw->is_target), either later from a completion callback (NBD, when the
 * loop polls rw->nbd) or before it returns (a file: rw->nbd is NULL).
 * An operation that a kind of end does not have is NULL; the pull never
 * asks for it (a file is never the source, so has no trim nor block
 * status).
 */

#ifndef FLEECE_BACKUP_RW_H
#define FLEECE_BACKUP_RW_H

#include <stdbool.h>
#include <stdint.h>

#include <libnbd.h>

struct job;
struct rw;

struct rw_ops {
  const char *name;             /* "nbd", "file" */
  /* Read j->length bytes at j->offset into buf. */
  void (*pread) (struct rw *rw, struct job *j, char *buf);
  /* Write buf at j->offset. */
  void (*pwrite) (struct rw *rw, struct job *j, const char *buf);
  /* Make [j->offset, +j->length) read as zeroes. */
  void (*zero) (struct rw *rw, struct job *j);
  /* Make every completed write stable. */
  void (*flush) (struct rw *rw, struct job *j);
  /* Trim [j->offset, +j->length). */
  void (*trim) (struct rw *rw, struct job *j);
  /* base:allocation of [j->offset, +j->length) into j->ext. */
  void (*block_status) (struct rw *rw, struct job *j);
  /* Replace a lost connection by a new one to the same URI
   * (--on-error=retry); dies when that fails MAX_RETRIES times.
   */
  void (*reconnect) (struct rw *rw);
  /* The end of a pull: say goodbye, close; dies if that fails. */
  void (*close) (struct rw *rw);
};

struct rw {
  /* Set when opened, then constant. */
  const struct rw_ops *ops;
  const char *uri;              /* as given: cfg.source or cfg.target */
  const char *name;             /* "source" or "target" (libnbd's name) */
  bool is_target;
  /* Checked when opened and after every reconnection. */
  uint64_t size;
  bool can_extents, can_zero, can_flush;
  bool known_zero;              /* a new sparse file: holes are zero */
  /* NBD: the handle the loop polls, replaced when --on-error=retry
   * reconnects; NULL for a file.
   */
  struct nbd_handle *nbd;
  char *lost;                   /* why the connection died, or NULL */
  bool reset;                   /* the server is going away: reconnect */
  bool released;                /* disconnect sent before the last flush */
  /* File: how zeroes are written, downgraded when unsupported. */
  int fd;
  int zero_method;
};

extern struct rw src, tgt;
extern const struct rw_ops nbd_ops, file_ops;
extern char *zero_buf;          /* request_size zero bytes */

/* rw-nbd.c */
extern void nbd_rw_open (struct rw *rw, bool extents);

/* rw-file.c */
extern void file_rw_open (struct rw *rw);

/* source.c: the snapshot export. */
extern void source_open (void);
extern void source_check (bool again);
extern void source_release (void);

/* target.c */
extern void target_open (void);
extern void target_check (bool again);

/* Whether the connection of rw must be replaced. */
static inline bool
rw_lost (struct rw *rw)
{
  return rw->nbd && (nbd_aio_is_dead (rw->nbd) || nbd_aio_is_closed (rw->nbd)
                     || rw->reset);
}

#endif /* FLEECE_BACKUP_RW_H */
