/* crash-writer: the writer and the verifier of test-crash-loop.sh.
 *
 *   crash-writer init   DISKFILE BLOCKSIZE
 *   crash-writer write  URI LOG BLOCKSIZE SEED [RATE]
 *   crash-writer verify DISKFILE LOG BLOCKSIZE
 *   crash-writer snapcheck FILE LOG BLOCKSIZE BEFORE AFTER
 *
 * The question is durability across kill -9 of the server: every write
 * acknowledged before a flush that completed must be on the disk, and
 * nothing but the initial content or a write that was really issued may
 * be found anywhere.
 *
 * Blocks.  The disk is cut into BLOCKSIZE blocks.  Every block on the
 * disk is self-describing, so that the verifier can tell which write (if
 * any) put it there:
 *
 *   offset  0  magic     "FLCWRITE" (a write) or "FLCINIT_" (initial)
 *           8  seq       the write's sequence number, 0 for initial
 *          16  block     the block number it was written to
 *          24  checksum  XXH64 (seed 0) of the whole block, this field 0
 *          32  payload   splitmix64 stream seeded from seq (for a write)
 *                        or from the block number (initial)
 *
 * all little-endian.  The initial content is made by "init": every block
 * of the existing DISKFILE gets its initial block (not zeroes, so that
 * copy-before-write really copies data into the store).
 *
 * The writer keeps DEPTH writes in flight (libnbd aio) to random blocks
 * chosen by SEED, or with RATE (writes per second) sends bursts of DEPTH
 * writes at that rate, so that copy-before-write goes on all along
 * instead of only just after a snapshot.  It never has two writes to the
 * same block in flight: the writes to one block are serialized, so the
 * last acknowledged write to a block is what the disk holds, and "the
 * block's seq is at least the last durable write's" is a sound test.
 * Every FLUSH_EVERY acknowledgements it sends a flush (one at a time) and
 * when it completes, logs a durability mark covering exactly the writes
 * acknowledged before the flush was sent.  When the server dies it logs
 * the end and exits 0; any other error exits 1.
 *
 * SIGTERM stops it as a well-behaved client stops: no new write, every
 * write in flight waited for, a last flush, then NBD_CMD_DISC; it logs
 * the end and exits 0.  A test that means to stop the writer, not to
 * crash the server, must not drop the connection with replies still
 * queued: nbdkit 1.32.4 to 1.33.9 (Debian 12 ships 1.32.5) can abort on
 * an assertion then (raw_send_socket: `sock >= 0', fixed upstream in
 * 1.33.10), which would read as the server failing its clean stop.
 *
 * The log is a binary file of 16-byte records in host byte order,
 * appended with write(2) before the event they announce can matter (the
 * server is killed, not the machine: no fsync).  One log serves many
 * writer sessions on the same disk; each starts with a START record and
 * numbers its writes on from the largest seq already in the log, so seq
 * grows across sessions and orders every write ever issued:
 *
 *   START   n = first seq of this session
 *   INTENT  n = seq, block: logged before the write is sent
 *   ACK     n = seq, block: the write completed successfully
 *   DURABLE n = k: the first k ACK records of this session are durable
 *   END     n = ACKs of this session (connection lost)
 *
 * The verifier replays the log: for each block, the floor is the seq of
 * the last durable write to it (0: none).  A block must hold either a
 * write logged as issued to that block with seq >= floor, or, when the
 * floor is 0, its initial content.  Acknowledged but unflushed writes
 * that are missing are counted, not failed: a flush was not asked for.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#include <libnbd.h>
#include <xxhash.h>

#include "le.h"
#include "monotonic.h"

#define DEPTH 8                 /* writes in flight */
#define FLUSH_EVERY 48          /* acknowledgements between flushes */
#define MAX_REPORTED 20         /* violations printed in full */

static const char write_magic[8] = "FLCWRITE";
static const char init_magic[8] = "FLCINIT_";

enum rec_type {
  REC_START = 'S',
  REC_INTENT = 'I',
  REC_ACK = 'A',
  REC_DURABLE = 'D',
  REC_END = 'E',
};

struct rec {
  uint32_t type;
  uint32_t block;
  uint64_t n;
};

/* ---- blocks ---- */

static uint64_t
splitmix64 (uint64_t *state)
{
  uint64_t z = (*state += UINT64_C (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * UINT64_C (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

/* Fill buf with the content of write seq to block, or with the initial
 * content of block when seq is 0.
 */
static void
block_make (uint8_t *buf, uint32_t bs, uint64_t seq, uint64_t block)
{
  uint64_t state = seq ? seq : block | UINT64_C (1) << 63;
  uint64_t v;
  uint32_t i;

  memcpy (buf, seq ? write_magic : init_magic, 8);
  v = htole64 (seq);
  memcpy (buf + 8, &v, 8);
  v = htole64 (block);
  memcpy (buf + 16, &v, 8);
  memset (buf + 24, 0, 8);
  for (i = 32; i < bs; i += 8) {
    v = splitmix64 (&state);
    memcpy (buf + i, &v, 8);
  }
  v = htole64 (XXH64 (buf, bs, 0));
  memcpy (buf + 24, &v, 8);
}

/* Does buf hold a well-formed block (magic, checksum)?  Sets *seq and
 * *block from its header whatever the answer.
 */
static bool
block_parse (uint8_t *buf, uint32_t bs, uint64_t *seq, uint64_t *block)
{
  uint64_t sum = get_u64 (buf + 24), zero = 0, v = htole64 (sum);
  bool ok;

  *seq = get_u64 (buf + 8);
  *block = get_u64 (buf + 16);
  if (memcmp (buf, write_magic, 8) != 0 && memcmp (buf, init_magic, 8) != 0)
    return false;
  memcpy (buf + 24, &zero, 8);
  ok = XXH64 (buf, bs, 0) == sum;
  memcpy (buf + 24, &v, 8);
  return ok && (*seq == 0) == (memcmp (buf, init_magic, 8) == 0);
}

/* ---- the log ---- */

static void
log_rec (int fd, uint32_t type, uint32_t block, uint64_t n)
{
  struct rec r = { .type = type, .block = block, .n = n };
  ssize_t w = write (fd, &r, sizeof r);

  if (w != (ssize_t) sizeof r) {
    if (w == -1)
      perror ("crash-writer: write: log");
    else
      fprintf (stderr, "crash-writer: write: log: short write\n");
    exit (EXIT_FAILURE);
  }
}

/* Read the whole log; *n records.  A missing log is empty. */
static struct rec *
log_read (const char *path, size_t *n)
{
  struct rec *recs = NULL;
  struct stat st;
  size_t done = 0;
  int fd;

  *n = 0;
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    if (errno == ENOENT)
      return NULL;
    fprintf (stderr, "crash-writer: open: %s: %m\n", path);
    exit (EXIT_FAILURE);
  }
  if (fstat (fd, &st) == -1 || st.st_size % sizeof (struct rec) != 0) {
    fprintf (stderr, "crash-writer: %s: not a log of %zu-byte records\n",
             path, sizeof (struct rec));
    exit (EXIT_FAILURE);
  }
  if (st.st_size > 0 && (recs = malloc (st.st_size)) == NULL) {
    perror ("crash-writer: malloc");
    exit (EXIT_FAILURE);
  }
  while (done < (size_t) st.st_size) {
    ssize_t r = read (fd, (char *) recs + done, st.st_size - done);
    if (r <= 0) {
      fprintf (stderr, "crash-writer: read: %s: %s\n", path,
               r == 0 ? "unexpected end of file" : strerror (errno));
      exit (EXIT_FAILURE);
    }
    done += r;
  }
  close (fd);
  *n = st.st_size / sizeof (struct rec);
  return recs;
}

/* ---- init ---- */

static int
do_init (const char *path, uint32_t bs)
{
  uint8_t *buf = malloc (bs);
  struct stat st;
  uint64_t b;
  int fd = open (path, O_WRONLY | O_CLOEXEC);

  if (buf == NULL || fd == -1 || fstat (fd, &st) == -1) {
    fprintf (stderr, "crash-writer: %s: %m\n", path);
    return EXIT_FAILURE;
  }
  for (b = 0; b < (uint64_t) st.st_size / bs; b++) {
    block_make (buf, bs, 0, b);
    if (pwrite (fd, buf, bs, b * bs) != (ssize_t) bs) {
      fprintf (stderr, "crash-writer: pwrite: %s: %m\n", path);
      return EXIT_FAILURE;
    }
  }
  free (buf);
  if (close (fd) == -1) {
    fprintf (stderr, "crash-writer: close: %s: %m\n", path);
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}

/* ---- write ---- */

struct writer;

struct slot {
  struct writer *w;
  uint8_t *buf;
  uint64_t seq;
  uint32_t block;
  bool busy;
};

struct writer {
  /* Set up once. */
  struct nbd_handle *nbd;
  int logfd;
  uint32_t bs;
  uint64_t nblocks;
  uint64_t rng;
  uint64_t burst_ns;            /* RATE: time between bursts, 0: none */
  uint8_t *block_busy;          /* per block: a write to it is in flight */
  struct slot slots[DEPTH];

  /* Changed by the loop and the completion callbacks (one thread). */
  uint64_t next_seq;
  uint64_t issued, acked, durable;
  bool flushing;
  uint64_t acked_at_flush;      /* acked when the flush in flight was sent */
  int error;                    /* first error a completion reported */
  uint64_t next_burst;          /* RATE: when the next burst may go */
};

static int
write_done (void *user_data, int *error)
{
  struct slot *s = user_data;
  struct writer *w = s->w;

  if (*error) {
    if (!w->error)
      w->error = *error;
  }
  else {
    log_rec (w->logfd, REC_ACK, s->block, s->seq);
    w->acked++;
  }
  w->block_busy[s->block] = 0;
  s->busy = false;
  return 1;
}

static int
flush_done (void *user_data, int *error)
{
  struct writer *w = user_data;

  if (*error) {
    if (!w->error)
      w->error = *error;
  }
  else {
    log_rec (w->logfd, REC_DURABLE, 0, w->acked_at_flush);
    w->durable = w->acked_at_flush;
  }
  w->flushing = false;
  return 1;
}

/* Issue one write from slot s to a random block with no write in flight. */
static int
write_issue (struct writer *w, struct slot *s)
{
  uint64_t b;

  do
    b = splitmix64 (&w->rng) % w->nblocks;
  while (w->block_busy[b]);
  s->seq = w->next_seq++;
  s->block = b;
  s->busy = true;
  w->block_busy[b] = 1;
  block_make (s->buf, w->bs, s->seq, b);
  log_rec (w->logfd, REC_INTENT, b, s->seq);
  w->issued++;
  if (nbd_aio_pwrite (w->nbd, s->buf, w->bs, b * w->bs,
                      (nbd_completion_callback) { .callback = write_done,
                                                  .user_data = s },
                      0) == -1)
    return -1;
  return 0;
}

static int
flush_issue (struct writer *w)
{
  w->flushing = true;
  w->acked_at_flush = w->acked;
  if (nbd_aio_flush (w->nbd,
                     (nbd_completion_callback) { .callback = flush_done,
                                                 .user_data = w },
                     0) == -1)
    return -1;
  return 0;
}

/* Did the connection die?  libnbd retires what was in flight on a dead
 * connection with one of these errors, sometimes before the handle
 * reads as dead.
 */
static bool
lost (struct nbd_handle *h, int error)
{
  switch (error) {
  case ENOTCONN: case ESHUTDOWN: case ECONNRESET: case ECONNABORTED:
  case EPIPE:
    return true;
  default:
    return nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
  }
}

/* May writes be issued now?  Without RATE, to every free slot; with
 * RATE, a burst of DEPTH once every slot is free and the time came.
 * *timeout is how long nbd_poll may wait (ms, -1: until an event).
 */
static bool
write_may_issue (struct writer *w, int *timeout)
{
  uint64_t now;
  size_t i;

  *timeout = -1;
  if (w->burst_ns == 0)
    return true;
  for (i = 0; i < DEPTH; i++)
    if (w->slots[i].busy)
      return false;
  now = monotonic_ns ();
  if (now < w->next_burst) {
    *timeout = (w->next_burst - now + 999999) / 1000000;
    return false;
  }
  w->next_burst += w->burst_ns;
  if (w->next_burst < now)      /* fell behind: no catching up */
    w->next_burst = now + w->burst_ns;
  return true;
}

static volatile sig_atomic_t stop_requested;

static void
on_sigterm (int sig)
{
  (void) sig;
  stop_requested = 1;
}

/* nbd_poll, where a signal that interrupted the poll is no error. */
static int
poll_once (struct nbd_handle *h, int timeout)
{
  if (nbd_poll (h, timeout) == -1 && nbd_get_errno () != EINTR)
    return -1;
  return 0;
}

/* SIGTERM came: wait for every write in flight and the flush in flight,
 * flush what was acknowledged since, and disconnect.  Returns 1, or -1
 * as write_loop does.
 */
static int
write_stop (struct writer *w)
{
  while (nbd_aio_in_flight (w->nbd) > 0)
    if (poll_once (w->nbd, -1) == -1 || w->error)
      return -1;
  if (w->durable < w->acked) {
    if (flush_issue (w) == -1)
      return -1;
    while (w->flushing)
      if (poll_once (w->nbd, -1) == -1 || w->error)
        return -1;
  }
  if (nbd_shutdown (w->nbd, 0) == -1)
    return -1;
  return 1;
}

/* Write until the server dies (returns 0) or SIGTERM (returns 1, having
 * stopped cleanly).  Returns -1 on any other error.
 */
static int
write_loop (struct writer *w)
{
  uint64_t next_flush = FLUSH_EVERY;
  int timeout, r;
  size_t i;

  w->next_burst = monotonic_ns ();
  for (;;) {
    if (stop_requested) {
      if ((r = write_stop (w)) == 1)
        return r;
      goto out;
    }
    if (write_may_issue (w, &timeout))
      for (i = 0; i < DEPTH; i++)
        if (!w->slots[i].busy && write_issue (w, &w->slots[i]) == -1)
          goto out;
    if (!w->flushing && w->acked >= next_flush) {
      if (flush_issue (w) == -1)
        goto out;
      next_flush = w->acked + FLUSH_EVERY;
    }
    if (nbd_aio_in_flight (w->nbd) > 0)
      timeout = -1;
    if (poll_once (w->nbd, timeout) == -1 || w->error)
      goto out;
  }

 out:
  if (lost (w->nbd, w->error ? w->error : nbd_get_errno ()))
    return 0;
  if (w->error)
    fprintf (stderr, "crash-writer: a request failed while the connection "
             "was up: %s\n", strerror (w->error));
  else
    fprintf (stderr, "crash-writer: %s\n", nbd_get_error ());
  return -1;
}

/* The first seq of a new session: after every seq in the log. */
static uint64_t
log_next_seq (const char *path)
{
  size_t n, i;
  struct rec *recs = log_read (path, &n);
  uint64_t next = 1;

  for (i = 0; i < n; i++)
    if (recs[i].type == REC_INTENT && recs[i].n >= next)
      next = recs[i].n + 1;
  free (recs);
  return next;
}

static int
do_write (const char *uri, const char *logpath, uint32_t bs, uint64_t seed,
          uint64_t rate)
{
  struct writer w = { .bs = bs, .rng = seed,
                      .burst_ns = rate ? DEPTH * UINT64_C (1000000000) / rate
                                       : 0 };
  int64_t size;
  size_t i;
  int r = EXIT_FAILURE, stopped;
  struct sigaction sa = { .sa_handler = on_sigterm };

  /* No SA_RESTART: the poll returns, and the loop sees the request. */
  sigemptyset (&sa.sa_mask);
  if (sigaction (SIGTERM, &sa, NULL) == -1) {
    perror ("crash-writer: sigaction: SIGTERM");
    return EXIT_FAILURE;
  }
  w.next_seq = log_next_seq (logpath);
  w.logfd = open (logpath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (w.logfd == -1) {
    fprintf (stderr, "crash-writer: open: %s: %m\n", logpath);
    return EXIT_FAILURE;
  }
  w.nbd = nbd_create ();
  if (w.nbd == NULL || nbd_connect_uri (w.nbd, uri) == -1 ||
      (size = nbd_get_size (w.nbd)) == -1) {
    fprintf (stderr, "crash-writer: %s: %s\n", uri, nbd_get_error ());
    goto out;
  }
  w.nblocks = size / bs;
  if (w.nblocks < 2 * DEPTH || w.nblocks > UINT32_MAX) {
    fprintf (stderr, "crash-writer: %s: %" PRIi64 " bytes: need 16 to 2^32 "
             "blocks of %" PRIu32 "\n", uri, size, bs);
    goto out;
  }
  w.block_busy = calloc (w.nblocks, 1);
  for (i = 0; i < DEPTH; i++) {
    w.slots[i].w = &w;
    w.slots[i].buf = malloc (bs);
    if (w.slots[i].buf == NULL)
      break;
  }
  if (w.block_busy == NULL || i < DEPTH) {
    perror ("crash-writer: malloc");
    goto out;
  }
  log_rec (w.logfd, REC_START, 0, w.next_seq);
  if ((stopped = write_loop (&w)) >= 0) {
    log_rec (w.logfd, REC_END, 0, w.acked);
    fprintf (stderr, "crash-writer: %s after %" PRIu64
             " writes issued, %" PRIu64 " acknowledged, %" PRIu64
             " flushed (seq %" PRIu64 "..%" PRIu64 ")\n",
             stopped ? "stopped by SIGTERM" : "connection lost",
             w.issued, w.acked, w.durable, w.next_seq - w.issued,
             w.next_seq - 1);
    r = EXIT_SUCCESS;
  }

 out:
  if (w.nbd)
    nbd_close (w.nbd);
  for (i = 0; i < DEPTH; i++)
    free (w.slots[i].buf);
  free (w.block_busy);
  close (w.logfd);
  return r;
}

/* ---- verify ---- */

struct replay {
  uint64_t nblocks;
  uint64_t *floor;              /* per block: last durable seq, 0 if none */
  uint64_t *last_ack;           /* per block: last acknowledged seq */
  uint32_t *target;             /* per seq: its block, UINT32_MAX if none */
  uint64_t nseq;
  uint64_t issued, acked, durable, sessions;
};

/* Replay the log into r.  Returns -1 if the log is malformed. */
static int
replay_log (struct replay *r, const struct rec *recs, size_t n)
{
  size_t i, j, session_acks = 0, durable_upto = 0;
  struct rec *acks;

  for (i = 0; i < n; i++)
    if (recs[i].type == REC_INTENT && recs[i].n >= r->nseq)
      r->nseq = recs[i].n + 1;
  r->target = malloc ((r->nseq ? r->nseq : 1) * sizeof *r->target);
  acks = malloc ((n ? n : 1) * sizeof *acks);
  if (r->target == NULL || acks == NULL) {
    perror ("crash-writer: malloc");
    free (acks);
    return -1;
  }
  memset (r->target, 0xff, r->nseq * sizeof *r->target);
  for (i = 0; i < n; i++) {
    const struct rec *e = &recs[i];
    if (e->type != REC_START && e->block >= r->nblocks)
      goto bad;
    switch (e->type) {
    case REC_START:
      r->sessions++;
      session_acks = durable_upto = 0;
      break;
    case REC_INTENT:
      if (r->target[e->n] != UINT32_MAX)
        goto bad;
      r->target[e->n] = e->block;
      r->issued++;
      break;
    case REC_ACK:
      if (e->n >= r->nseq || r->target[e->n] != e->block)
        goto bad;
      acks[session_acks++] = *e;
      r->last_ack[e->block] = e->n;
      r->acked++;
      break;
    case REC_DURABLE:
      if (e->n > session_acks || e->n < durable_upto)
        goto bad;
      for (j = durable_upto; j < e->n; j++)
        if (acks[j].n > r->floor[acks[j].block])
          r->floor[acks[j].block] = acks[j].n;
      r->durable += e->n - durable_upto;
      durable_upto = e->n;
      break;
    case REC_END:
      break;
    default:
      goto bad;
    }
  }
  free (acks);
  return 0;

 bad:
  fprintf (stderr, "crash-writer: log record %zu is invalid (type %" PRIu32
           ", block %" PRIu32 ", n %" PRIu64 ")\n",
           i, recs[i].type, recs[i].block, recs[i].n);
  free (acks);
  return -1;
}

/* What is wrong with block b holding buf (its header says seq, blk), or
 * NULL.  want is scratch space.
 */
static const char *
block_check (const struct replay *r, uint64_t b, uint8_t *buf,
             uint8_t *want, uint32_t bs, uint64_t *seq, uint64_t *blk)
{
  if (!block_parse (buf, bs, seq, blk))
    return "garbage (bad magic or checksum)";
  if (*blk != b)
    return "a block written to another block number";
  if (*seq == 0 && r->floor[b] > 0)
    return "the initial content";
  if (*seq > 0 && (*seq >= r->nseq || r->target[*seq] != b))
    return "a write never issued to this block";
  if (*seq < r->floor[b])
    return "a write older than the last durable one";
  block_make (want, bs, *seq, b);
  if (memcmp (buf, want, bs) != 0)
    return "a block whose payload differs from its write's";
  return NULL;
}

/* A disk image checked against the log: the log replayed, the image
 * open, one block's buffers.
 */
struct check {
  const char *path;
  uint32_t bs;
  struct replay r;
  struct rec *recs;
  size_t n;                     /* records */
  int fd;
  uint8_t *buf, *want;
};

static int
check_open (struct check *c, const char *path, const char *logpath,
            uint32_t bs)
{
  struct stat st;

  memset (c, 0, sizeof *c);
  c->path = path;
  c->bs = bs;
  c->recs = log_read (logpath, &c->n);
  c->buf = malloc (bs);
  c->want = malloc (bs);
  c->fd = open (path, O_RDONLY | O_CLOEXEC);
  if (c->buf == NULL || c->want == NULL || c->fd == -1 ||
      fstat (c->fd, &st) == -1) {
    fprintf (stderr, "crash-writer: %s: %m\n", path);
    return -1;
  }
  c->r.nblocks = st.st_size / bs;
  c->r.floor = calloc (c->r.nblocks, sizeof *c->r.floor);
  c->r.last_ack = calloc (c->r.nblocks, sizeof *c->r.last_ack);
  if (c->r.floor == NULL || c->r.last_ack == NULL) {
    perror ("crash-writer: calloc");
    return -1;
  }
  return replay_log (&c->r, c->recs, c->n);
}

/* Block b into c->buf. */
static int
check_read (struct check *c, uint64_t b)
{
  if (pread (c->fd, c->buf, c->bs, b * c->bs) != (ssize_t) c->bs) {
    fprintf (stderr, "crash-writer: pread: %s: block %" PRIu64 ": %m\n",
             c->path, b);
    return -1;
  }
  return 0;
}

/* The violations not printed in full; the exit status. */
static int
check_close (struct check *c, uint64_t violations, bool completed)
{
  if (violations > MAX_REPORTED)
    fprintf (stderr, "crash-writer: ... and %" PRIu64 " more violations\n",
             violations - MAX_REPORTED);
  if (c->fd >= 0)
    close (c->fd);
  free (c->recs);
  free (c->buf);
  free (c->want);
  free (c->r.floor);
  free (c->r.last_ack);
  free (c->r.target);
  return completed && violations == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

static int
do_verify (const char *path, const char *logpath, uint32_t bs)
{
  struct check c;
  const struct replay *r = &c.r;
  uint64_t b, seq, blk, violations = 0, initial = 0, written = 0;
  uint64_t lost_acks = 0, floors = 0;

  if (check_open (&c, path, logpath, bs) == -1)
    return check_close (&c, 0, false);
  for (b = 0; b < r->nblocks; b++) {
    const char *why;

    if (check_read (&c, b) == -1)
      return check_close (&c, violations, false);
    floors += r->floor[b] > 0;
    why = block_check (r, b, c.buf, c.want, bs, &seq, &blk);
    if (why) {
      if (++violations <= MAX_REPORTED)
        fprintf (stderr, "crash-writer: VIOLATION: block %" PRIu64
                 ": last durable write seq %" PRIu64 " (0: none), found "
                 "%s: seq %" PRIu64 ", block %" PRIu64 "\n",
                 b, r->floor[b], why, seq, blk);
      continue;
    }
    if (seq == 0)
      initial++;
    else
      written++;
    if (seq < r->last_ack[b])
      lost_acks++;
  }
  printf ("crash-writer verify: %" PRIu64 " blocks checked (%" PRIu64
          " initial, %" PRIu64 " written, %" PRIu64 " with a durable "
          "floor); log: %" PRIu64 " sessions, %" PRIu64 " writes issued, %"
          PRIu64 " acknowledged, %" PRIu64 " durable; %" PRIu64
          " blocks lost an acknowledged unflushed write; %" PRIu64
          " violations\n",
          r->nblocks, initial, written, floors, r->sessions, r->issued,
          r->acked, r->durable, lost_acks, violations);
  return check_close (&c, violations, true);
}

/* ---- snapcheck ---- */

/* Is FILE, a pull of a snapshot created while the writer ran, the disk
 * at one instant between the create's request and its reply?  BEFORE
 * and AFTER are the log's length in records when the create was sent and
 * when it returned (or when the server died, for a create the crash cut).
 * Every block must hold a write issued to it, or its initial content;
 * not older than the last write to it acknowledged before the create was
 * sent (it was on the disk then), and not a write sent after the create
 * returned.  A snapshot that fails this read data written after it was
 * taken, or lost data it had: a check that does not need a reference
 * pulled before a crash.
 */
static const char *
snap_block_check (struct check *c, uint64_t b, const uint64_t *low,
                  const uint64_t *sent_at, uint64_t after, uint64_t *seq)
{
  uint64_t blk;

  if (!block_parse (c->buf, c->bs, seq, &blk))
    return "garbage (bad magic or checksum)";
  if (blk != b)
    return "a block written to another block number";
  if (*seq > 0 && (*seq >= c->r.nseq || c->r.target[*seq] != b))
    return "a write never issued to this block";
  if (*seq < low[b])
    return "data older than a write acknowledged before the create was "
      "sent";
  if (*seq > 0 && sent_at[*seq] >= after)
    return "a write sent after the create returned";
  block_make (c->want, c->bs, *seq, b);
  if (memcmp (c->buf, c->want, c->bs) != 0)
    return "a block whose payload differs from its write's";
  return NULL;
}

static int
do_snapcheck (const char *path, const char *logpath, uint32_t bs,
              uint64_t before, uint64_t after)
{
  struct check c;
  uint64_t b, seq, violations = 0, *low = NULL, *sent_at = NULL;
  bool completed = false;
  size_t i;

  if (check_open (&c, path, logpath, bs) == -1)
    goto out;
  if (before > after || after > c.n) {
    fprintf (stderr, "crash-writer: snapcheck: marks %" PRIu64 "..%" PRIu64
             " are not within the log's %zu records\n", before, after, c.n);
    goto out;
  }
  low = calloc (c.r.nblocks ? c.r.nblocks : 1, sizeof *low);
  sent_at = malloc ((c.r.nseq ? c.r.nseq : 1) * sizeof *sent_at);
  if (low == NULL || sent_at == NULL) {
    perror ("crash-writer: malloc");
    goto out;
  }
  for (i = 0; i < c.n; i++) {
    const struct rec *e = &c.recs[i];
    if (e->type == REC_INTENT)
      sent_at[e->n] = i;
    else if (e->type == REC_ACK && i < before && e->n > low[e->block])
      low[e->block] = e->n;
  }
  for (b = 0; b < c.r.nblocks; b++) {
    const char *why;

    if (check_read (&c, b) == -1)
      goto out;
    why = snap_block_check (&c, b, low, sent_at, after, &seq);
    if (why && ++violations <= MAX_REPORTED)
      fprintf (stderr, "crash-writer: SNAPSHOT VIOLATION: block %" PRIu64
               " (byte %" PRIu64 "): %s: seq %" PRIu64
               " (sent at log record %" PRIu64 "), the last acknowledged "
               "before the create: seq %" PRIu64 "; create sent at record %"
               PRIu64 ", returned at %" PRIu64 "\n", b, b * bs, why,
               seq, seq > 0 && seq < c.r.nseq ? sent_at[seq] : 0, low[b],
               before, after);
  }
  printf ("crash-writer snapcheck: %" PRIu64 " blocks, %" PRIu64
          " violations\n", c.r.nblocks, violations);
  completed = true;
 out:
  free (low);
  free (sent_at);
  return check_close (&c, violations, completed);
}

/* ---- main ---- */

static uint32_t
parse_bs (const char *s)
{
  char *end;
  unsigned long v = strtoul (s, &end, 10);

  if (*end || v < 64 || v > 1 << 24 || v % 8 != 0) {
    fprintf (stderr, "crash-writer: block size %s: expected a multiple of "
             "8 from 64 to 16M\n", s);
    exit (EXIT_FAILURE);
  }
  return v;
}

int
main (int argc, char *argv[])
{
  if (argc == 4 && strcmp (argv[1], "init") == 0)
    return do_init (argv[2], parse_bs (argv[3]));
  if ((argc == 6 || argc == 7) && strcmp (argv[1], "write") == 0)
    return do_write (argv[2], argv[3], parse_bs (argv[4]),
                     strtoull (argv[5], NULL, 0),
                     argc == 7 ? strtoull (argv[6], NULL, 0) : 0);
  if (argc == 5 && strcmp (argv[1], "verify") == 0)
    return do_verify (argv[2], argv[3], parse_bs (argv[4]));
  if (argc == 7 && strcmp (argv[1], "snapcheck") == 0)
    return do_snapcheck (argv[2], argv[3], parse_bs (argv[4]),
                         strtoull (argv[5], NULL, 10),
                         strtoull (argv[6], NULL, 10));
  fprintf (stderr,
           "usage: crash-writer init DISKFILE BLOCKSIZE\n"
           "       crash-writer write URI LOG BLOCKSIZE SEED [RATE]\n"
           "       crash-writer verify DISKFILE LOG BLOCKSIZE\n"
           "       crash-writer snapcheck FILE LOG BLOCKSIZE BEFORE AFTER\n");
  return EXIT_FAILURE;
}
