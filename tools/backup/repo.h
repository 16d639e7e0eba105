/* fleece-backup: the repository of restore points (repo.c, sums.c,
 * qemu.c, cmd-*.c; cmd-group.c for groups of disks; fleece-backup(1)
 * "REPOSITORY", docs/design.md "Restore points").
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

/* A group repository (cmd-group.c): its disks are repositories of
 * their own, REPO/disks/NAME, and a group point is one point of the same
 * name in each, taken at one instant.
 */
struct gdisk {                  /* one disk of a group point */
  char *disk;                   /* the disk's name in the repository */
  char *id;                     /* the server's disk identity, or NULL */
  uint64_t size;
};
struct gpoint {
  char *name;                   /* the point's name in every disk */
  bool complete;                /* every disk's point is complete */
  int64_t started, finished;
  struct gdisk *d;
  size_t n;
};

struct repo {
  char *dir;
  int lock_fd;                  /* REPO/lock: writers, exclusive */
  int readers_fd;               /* REPO/readers: prune excludes readers */
  struct point *points;         /* oldest first */
  size_t n;
  /* The prune journal: a step written before it is done. */
  char *prune_drop, *prune_into;
  /* Version 2: a group repository's disks and group points (oldest
   * first), or, in a disk's repository, its name in its group.
   */
  char **disks;
  size_t ndisks;
  struct gpoint *groups;
  size_t ngroups;
  char *member_of;
};

/* repo.c */
enum repo_mode { REPO_READ, REPO_WRITE, REPO_PRUNE };
extern bool repo_group_writer;  /* cmd-group.c writes a disk's repository */
extern void repo_init (const char *dir, const char *member_of);
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
extern struct gpoint *repo_find_group (struct repo *r, const char *name);
extern void gpoint_free (struct gpoint *g);
extern struct json_t *gpoint_json (const struct gpoint *g);

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

/* cmd-backup.c, cmd-control.c; export: the snapshot export to pull
 * from source's server by name instead of source's own (NULL).
 */
extern void backup_key_precheck (struct repo *r, bool full);
extern struct point *backup_point (struct repo *r, const char *source,
                                   const char *export,
                                   const char *checkpoint, const char *since,
                                   const char *name, bool compress,
                                   bool json);
extern void control_cycle (struct repo *r, const char *control,
                           const char *server_uri, const char *name,
                           bool made, bool full, bool compress, bool json);
extern struct ctlc *control_connect (const char *spec, char *err,
                                     size_t errlen);

/* cmd-restore.c, cmd-prune.c: one point, one disk */
extern void verify_point (struct repo *r, struct point *p);
extern void restore_point (struct repo *r, const char *name,
                           const char *target);
extern void prune_keep (struct repo *r, size_t keep);
extern void pull_reset (void);

/* cmd-group.c: the same commands on a group repository */
struct backup_opts {
  const char *name;             /* --name, or NULL: a timestamp */
  bool full, compress, json;
  const char *pre_hook, *post_hook;
  int hook_timeout;             /* seconds */
  int deadline_ms;
};
extern void group_backup (struct repo *r, char **sources, size_t n,
                          const char *const *controls, size_t ncontrols,
                          const struct backup_opts *o);
extern void group_list (struct repo *r, bool json);
extern int group_verify (struct repo *r, const char *only);
extern void group_restore (struct repo *r, const char *name,
                           const char *dir, const char *const *targets,
                           size_t ntargets);
extern void group_prune (struct repo *r, size_t keep);

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
