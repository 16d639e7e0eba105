/* fleece-backup: the repository of restore points (repo.c, sums.c,
 * qemu.c, cmd-*.c; fleece-backup(1) "REPOSITORY", docs/design.md
 * "Restore points").
 *
 * What these files share.  A command runs in one thread; the pull it
 * may run (backup, restore) calls the sums_* hooks from the loop.
 */

#ifndef FLEECE_BACKUP_REPO_H
#define FLEECE_BACKUP_REPO_H

#include <stdbool.h>
#include <stdint.h>

#include "backup.h"

#define REPO_CLUSTER   65536u   /* checksum cluster = qcow2 cluster */
#define REPO_MANIFEST  "manifest.json"

/* One restore point, as the manifest records it. */
struct qimg;

struct point {
  char *name;
  char *file;                   /* NAME.qcow2, relative to the repository */
  char *parent;                 /* the backing point, or NULL: full */
  char *disk;                   /* the server's disk, from the export */
  uint64_t disk_size;
  uint32_t cluster_size;        /* of the checksums and of the qcow2 */
  char *checkpoint;             /* the snapshot (checkpoint) it holds */
  char *since;                  /* incremental: the parent's checkpoint */
  int64_t created;              /* the snapshot's creation time, or -1 */
  int64_t started, finished;    /* of the backup, seconds since 1970 */
  uint64_t read, written, zeroed;
  bool complete;
  bool compressed, encrypted;   /* --compress, --encrypt-key-file */
  char *sums;                   /* NAME.sums */
  char *sums_xxh3;              /* xxh3 of the sums file, hex */
};

struct repo {
  char *dir;
  int lock_fd;                  /* REPO/lock: writers, exclusive */
  int readers_fd;               /* REPO/readers: prune excludes readers */
  struct point *points;         /* oldest first */
  size_t n;
  /* The prune journal: a step written before it is done. */
  char *prune_drop, *prune_into;
};

/* repo.c */
enum repo_mode { REPO_READ, REPO_WRITE, REPO_PRUNE };
extern void repo_init (const char *dir);
extern void repo_open (struct repo *r, const char *dir, enum repo_mode m);
extern void repo_save (struct repo *r);
extern void repo_close (struct repo *r);
extern struct point *repo_find (struct repo *r, const char *name);
extern struct point *repo_newest (struct repo *r);
extern void repo_qimg (struct repo *r, const struct point *p,
                       struct qimg *q, char **path);
extern void repo_remove (struct repo *r, struct point *p);
extern char *repo_path (const struct repo *r, const char *file);
extern void fsync_path (const char *path, bool dir);
extern void point_free (struct point *p);
struct json_t;
extern struct json_t *point_json (const struct point *p);
extern void repo_crash_point (const char *where);
extern void repo_prune_finish (struct repo *r);

/* sums.c: xxh3 of each cluster of a point's whole image. */
struct sums {
  uint32_t cluster;
  uint64_t disk_size;
  uint64_t n;                   /* clusters */
  uint64_t *v;
  bool check;                   /* compare instead of store (restore) */
  const char *what;             /* the point, for messages */
};
extern struct sums *sums_on;    /* the pull's, or NULL (the old form) */
extern void sums_alloc (struct sums *s, uint64_t disk_size);
extern void sums_prepare (void);
extern void sums_align (struct job *j);
extern void sums_data (uint64_t offset, uint64_t length, const char *buf);
extern void sums_zero (uint64_t offset, uint64_t length);
extern uint64_t sums_hash (const char *buf, uint64_t length);
extern void sums_write (const char *path, const struct sums *s,
                        char **hex);
extern void sums_read (const char *path, const char *hex, struct sums *s);

/* qemu.c: QEMU's programs, the only code that reads or writes qcow2. */
DEFINE_VECTOR_TYPE (string_vector, char *);
struct args {                   /* an argv being built */
  string_vector v;
};
struct qimg {                   /* how QEMU opens a point */
  const char *path;
  unsigned depth;               /* backing files below it */
  bool encrypted;               /* qcow2 LUKS, key: repo_key_file */
  bool compress;                /* data writes become compressed clusters */
};
#define QUIET_OUT 1
#define QUIET_ERR 2
extern const char *repo_key_file;       /* --encrypt-key-file, or NULL */
extern void args_add (struct args *a, const char *s);
extern void args_push (struct args *a, char *s);
extern void args_free (struct args *a);
extern char *qemu_secret (void);
extern void qemu_image_args (struct args *a, const struct qimg *q);
extern int qemu_run (const char *const argv[], int quiet);
extern void qemu_run_ok (const char *const argv[]);
extern int qemu_img (const char *sub, const char *const extra[],
                     const struct qimg *q, int quiet);
extern void qemu_key_check (const struct qimg *q, const char *point);
extern char *qemu_nbd_start (const struct qimg *q, bool readonly);
extern void qemu_nbd_connected (void);
extern void qemu_nbd_wait (void);

/* cmd-backup.c, cmd-control.c */
extern struct point *backup_point (struct repo *r, const char *source,
                                   const char *checkpoint, const char *since,
                                   const char *name, bool compress,
                                   bool json);
extern void control_cycle (struct repo *r, const char *control,
                           const char *server_uri, const char *name,
                           bool full, bool compress, bool json);

/* cmd-*.c */
extern int cmd_init (int argc, char **argv);
extern int cmd_backup (int argc, char **argv);
extern int cmd_list (int argc, char **argv);
extern int cmd_verify (int argc, char **argv);
extern int cmd_restore (int argc, char **argv);
extern int cmd_serve (int argc, char **argv);
extern int cmd_prune (int argc, char **argv);
extern int repo_main (int argc, char **argv);

#endif /* FLEECE_BACKUP_REPO_H */
