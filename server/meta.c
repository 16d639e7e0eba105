/* The metadata log of a persistent store (persistent=true).
 *
 * docs/store-format.md describes the format and docs/durability.md what
 * it guarantees; in short:
 *
 * The 4 MiB region after the superblock holds two halves.  The active
 * half starts with a STATE record naming an image: the whole state
 * (snapshots, bitmaps with their bits, copy records) written in data-area
 * slots, checksummed.  After it come the records of what changed since:
 * COPY (new copies), RELEASE (a client trimmed clusters of a snapshot),
 * BROKEN (a snapshot lost a copy), DIRTY (clusters about to be written,
 * for the recording bitmaps).  Every admin operation (snapshot or
 * bitmap change, checkpoint) and a full half write a new image and switch
 * halves: build the image, write it to fresh slots, sync, write the STATE
 * record at the start of the other half, sync.  Making a half active
 * zeroes what an earlier use of it left, so that everything past the end
 * of the log is zero: that is how loading (meta-load.c) tells a write
 * torn by a crash from damage.  Each record is encoded in record.c; the
 * image holds a header and the copy table (record.c), the snapshots
 * (snapshot.c) and the bitmaps (bitmap.c), each serialised by its owner.
 *
 * Group commit.  A writer appends its record to a pending buffer and
 * waits for it to be stable; the first waiter to find no commit running
 * becomes the leader and writes everything pending with one pwrite
 * between two fdatasyncs (the first makes the copied data stable before
 * the records that point at it, when there is any), so concurrent writers
 * share the syncs.
 *
 * An image cuts the log: records appended before the cut and not yet
 * written are dropped, because the state they describe was already in
 * memory when the image was built (every change is made in memory before
 * its record is appended, or with it under the meta lock); their waiters
 * are released once the image is stable.  DIRTY records are carried over
 * after the new STATE instead: a writer may find its bits set and must
 * still see a stable record for them.  Records appended after the cut
 * go into the new half.  Loading tolerates a record that repeats what the
 * image holds.
 *
 * A failed write of the log is sticky: nothing more can be made durable,
 * so every operation that needs a record fails from then on (the live
 * disk stays writable where no copy is needed).
 *
 * Threads.  One compactor thread writes the image when the active half
 * is full.  It starts in fleece_start, never in fleece_open: nbdkit opens
 * the engine before it forks into the background, and the process that
 * serves would inherit no compactor (its writers waiting forever for an
 * image) and a condition variable with a waiter that never leaves (its
 * pthread_cond_destroy waiting forever).  Without a compactor, a writer
 * that finds the log full fails instead of waiting.  meta_close writes the
 * last image whether or not the compactor ever ran.
 *
 * Lock order: admin_lock, then snaps_lock, then break_lock, then meta
 * lock; the meta lock is never held across I/O.  Waiting for a commit
 * never happens with snaps_lock or a snapshot's io_lock held: the
 * compactor, which writes the image when the log is full, takes
 * admin_lock, and an admin operation may wait for those locks.
 */

#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "cleanup.h"
#include "internal.h"

#define HALF_SIZE     META_HALF_SIZE

static uint64_t
half_offset (int half)
{
  return FLEECE_STORE_HEADER_SIZE + (uint64_t) half * HALF_SIZE;
}

/* ---- group commit ---- */

static int
sticky_error (struct meta *m)
{
  return fl_error (m->err, "%s", m->errmsg);
}

static void
set_sticky (struct meta *m, const char *what)
{
  m->err = errno ? errno : EIO;
  snprintf (m->errmsg, sizeof m->errmsg, "persistent store: %s failed, "
            "nothing more can be recorded: %s", what, fleece_last_error ());
}

int
meta_check (struct fleece *fl)
{
  struct meta *m = &fl->meta;

  if (!m->on)
    return 0;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&m->lock);
  return m->err ? sticky_error (m) : 0;
}

uint64_t
meta_append (struct fleece *fl, uint16_t type, const struct wbuf *payload,
             bool data)
{
  return meta_append_with (fl, type, payload, data, NULL, NULL);
}

/* meta_append, and fn (opaque, seq) called under the meta lock once the
 * record is appended: what fn changes in memory is on the same side of
 * an image's cut as the record.
 */
uint64_t
meta_append_with (struct fleece *fl, uint16_t type,
                  const struct wbuf *payload, bool data,
                  void (*fn) (void *, uint64_t), void *opaque)
{
  struct meta *m = &fl->meta;
  uint64_t seq;

  if (!m->on)
    return 0;
  if (payload->failed) {
    fl_error (ENOMEM, "persistent store: out of memory for a record");
    return 0;
  }
  pthread_mutex_lock (&m->lock);
  if (m->err) {
    sticky_error (m);
    pthread_mutex_unlock (&m->lock);
    return 0;
  }
  seq = ++m->seq;
  rec_encode (&m->pend, type, seq, payload->p, payload->len);
  if (m->pend.failed) {
    errno = ENOMEM;
    fl_error (ENOMEM, "persistent store: out of memory for a record");
    set_sticky (m, "appending a record");
    pthread_mutex_unlock (&m->lock);
    return 0;
  }
  m->pend_data |= data;
  if (fn)
    fn (opaque, seq);
  pthread_mutex_unlock (&m->lock);
  return seq;
}

int
meta_wait (struct fleece *fl, uint64_t seq)
{
  struct meta *m = &fl->meta;
  int r = 0;

  if (!m->on || seq == 0)
    return 0;
  pthread_mutex_lock (&m->lock);
  for (;;) {
    struct wbuf batch;
    uint64_t last, off;
    bool data;

    if (m->durable >= seq)
      break;
    if (m->err) {
      r = sticky_error (m);
      break;
    }
    if (m->committing || m->imaging || m->pend.len == 0) {
      pthread_cond_wait (&m->cond, &m->lock);
      continue;
    }
    if (m->pos + m->pend.len > HALF_SIZE) {
      if (!m->compactor_started) {
        /* Waiting would be forever: fail, loudly, instead. */
        r = fl_error (EIO, "persistent store: %s: the metadata log is "
                      "full and no compactor runs in this process "
                      "(fleece_start was not called)", fl->store.path);
        break;
      }
      m->want_image = true;     /* the compactor writes an image */
      pthread_cond_broadcast (&m->cond);
      pthread_cond_wait (&m->cond, &m->lock);
      continue;
    }
    /* Lead: write everything pending. */
    batch = m->pend;
    memset (&m->pend, 0, sizeof m->pend);
    data = m->pend_data;
    m->pend_data = false;
    last = m->seq;
    off = half_offset (m->half) + m->pos;
    m->committing = true;
    pthread_mutex_unlock (&m->lock);

    r = 0;
    if (data)
      r = store_sync (&fl->store);
    if (r == 0)
      r = store_meta_pwrite (&fl->store, batch.p, batch.len, off);
    if (r == 0)
      r = store_sync (&fl->store);

    pthread_mutex_lock (&m->lock);
    m->committing = false;
    if (r == 0) {
      m->pos += batch.len;
      if (m->pos > m->used_end[m->half])
        m->used_end[m->half] = m->pos;
      m->durable = last;
      atomic_store (&m->durable_pub, last);
    }
    else
      set_sticky (m, "writing the metadata log");
    free (batch.p);
    pthread_cond_broadcast (&m->cond);
  }
  pthread_mutex_unlock (&m->lock);
  return r;
}

void
meta_free_slots (struct fleece *fl, uint32_t *slots, size_t n)
{
  struct meta *m = &fl->meta;

  if (n == 0)
    return;
  if (m->on) {
    pthread_mutex_lock (&m->lock);
    if (slot_vector_reserve (&m->deferred, n) == -1) {
      /* Keep the slots allocated: a leak until restart, never a reuse
       * before the record that freed them is stable.
       */
      pthread_mutex_unlock (&m->lock);
      return;
    }
    memcpy (m->deferred.ptr + m->deferred.len, slots, n * sizeof *slots);
    m->deferred.len += n;
    pthread_mutex_unlock (&m->lock);
    return;
  }
  store_free_slots (&fl->store, slots, n);
}

/* Are slots waiting for an image to be freed? */
bool
meta_has_deferred (struct fleece *fl)
{
  struct meta *m = &fl->meta;

  if (!m->on)
    return false;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&m->lock);
  return m->deferred.len > 0;
}

/* ---- the image ---- */

static int
put_copy (void *opaque, const struct copy *cp)
{
  struct wbuf *b = opaque;

  rec_put_copy (b, cp);
  return b->failed ? -1 : 0;
}

struct put_partials {
  struct wbuf *b;
  uint32_t words, n;
};

static int
put_partial (void *opaque, const struct partial_view *v)
{
  struct put_partials *pp = opaque;

  if (v->seq == PARTIAL_DONE)
    return 0;                   /* its copy is in the copy map */
  rec_put_partial (pp->b, v, pp->words);
  pp->n++;
  return pp->b->failed ? -1 : 0;
}

/* Build the image; admin_lock held. */
static int
build_image (struct fleece *fl, struct wbuf *b)
{
  struct rec_image im = {
    .cluster_size = fl->cluster_size,
    .disk_size = fl->disk.size,
  };
  struct put_partials pp = { .b = b, .words = fl->partials.words };
  size_t copies_at;

  pthread_rwlock_rdlock (&fl->snaps_lock);
  im.gen = state_gen (atomic_load (&fl->state));
  im.nsnaps = fl->nsnaps;
  im.nbitmaps = bitmap_count_all (fl);
  rec_put_image (b, &im);
  snap_image_put (fl, b);
  bitmap_image_put (fl, b);
  /* Partly copied clusters before the copies: an entry completed while
   * the image is built may be in both, and loading drops the entry when
   * its copy follows (meta-load.c).
   */
  partial_foreach (&fl->partials, put_partial, &pp);
  rec_image_partials (b, pp.n);
  copies_at = b->len;
  copymap_foreach (&fl->copies, put_copy, b);
  pthread_rwlock_unlock (&fl->snaps_lock);
  if (b->failed)
    return fl_error (ENOMEM, "persistent store: out of memory for the "
                     "image");
  rec_image_copies (b, copies_at);
  return 0;
}

/* The payloads (8 bytes each) of the DIRTY records in a pending buffer. */
static uint32_t
carry_dirty (const struct wbuf *pend, struct wbuf *carry)
{
  struct rec r;
  size_t pos = 0, n;
  uint32_t k = 0, first, count;

  while (pos < pend->len &&
         (n = rec_decode (pend->p + pos, pend->len - pos, &r)) > 0) {
    if (r.type == REC_DIRTY && r.payload.len == 8 &&
        rec_get_dirty (&r.payload, &first, &count)) {
      rec_put_dirty (carry, first, count);
      k++;
    }
    pos += n;
  }
  return k;
}

int
meta_image (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  struct wbuf img = { 0 }, payload = { 0 }, rec = { 0 }, carry = { 0 };
  uint32_t cs = fl->cluster_size, slot = 0, nslots, old_slot, old_n, i;
  uint32_t carried;
  uint64_t state_seq, hash, zero_to;
  size_t rec_len = 0;
  slot_vector deferred;
  int half, r = -1;

  if (!m->on)
    return 0;
  pthread_mutex_lock (&m->lock);
  while (m->committing || m->imaging)
    pthread_cond_wait (&m->cond, &m->lock);
  if (m->err) {
    sticky_error (m);
    pthread_mutex_unlock (&m->lock);
    return -1;
  }
  /* The cut: what is pending is in memory, hence in the image, except
   * for DIRTY records (a writer sets its bits only once the record is
   * stable): those are carried over, written right after the STATE.
   */
  m->imaging = true;
  carried = carry_dirty (&m->pend, &carry);
  free (m->pend.p);
  memset (&m->pend, 0, sizeof m->pend);
  m->pend_data = false;
  state_seq = ++m->seq;
  m->seq += carried;
  half = !m->half;
  /* Slots freed so far are freed by records or deletions the image
   * reflects: free them once it is stable.
   */
  deferred = m->deferred;
  memset (&m->deferred, 0, sizeof m->deferred);
  pthread_mutex_unlock (&m->lock);

  if (build_image (fl, &img) == -1)
    goto out;
  nslots = (img.len + cs - 1) / cs;
  hash = XXH64 (img.p, img.len, 0);
  if (store_alloc_run (&fl->store, nslots, &slot) == -1)
    goto out;
  if (fl_pwrite_all (fl->store.fd, "store image", fl->store.path, img.p,
                     img.len, fl->store.data_offset + (uint64_t) slot * cs,
                     false) == -1 ||
      store_sync (&fl->store) == -1) {
    for (i = 0; i < nslots; i++)
      store_free_meta (&fl->store, slot + i);
    goto out;
  }
  rec_put_state (&payload, &(struct rec_state) {
      .slot = slot, .nslots = nslots, .len = img.len, .hash = hash,
      .gen = state_gen (atomic_load (&fl->state)),
    });
  rec_encode (&rec, REC_STATE, state_seq, payload.p, payload.len);
  for (i = 0; i < carried; i++)
    rec_encode (&rec, REC_DIRTY, state_seq + 1 + i,
                carry.p + (size_t) i * 8, 8);
  rec_len = rec.len;
  if (rec.failed || carry.failed) {
    fl_error (ENOMEM, "persistent store: out of memory");
    goto out;
  }
  /* Whatever an earlier use of the half left past the new records is
   * zeroed in the same write: everything past the end of the log is then
   * zero, which is what tells a torn write from damage at load
   * (tail_verdict).
   */
  pthread_mutex_lock (&m->lock);
  zero_to = m->used_end[half];
  pthread_mutex_unlock (&m->lock);
  if (zero_to > rec.len) {
    size_t n = zero_to - rec.len;
    char *z = calloc (1, n);
    if (z == NULL) {
      fl_error (ENOMEM, "persistent store: out of memory");
      goto out;
    }
    wb_bytes (&rec, z, n);
    free (z);
    if (rec.failed) {
      fl_error (ENOMEM, "persistent store: out of memory");
      goto out;
    }
  }
  if (store_meta_pwrite (&fl->store, rec.p, rec.len,
                         half_offset (half)) == -1 ||
      store_sync (&fl->store) == -1)
    goto out;
  rec.len = rec_len;
  r = 0;
 out:
  pthread_mutex_lock (&m->lock);
  m->imaging = false;
  old_slot = m->img_slot;
  old_n = m->img_nslots;
  if (r == 0) {
    m->half = half;
    m->pos = rec.len;
    m->used_end[half] = rec.len;
    m->durable = state_seq + carried;
    atomic_store (&m->durable_pub, m->durable);
    m->img_slot = slot;
    m->img_nslots = nslots;
  }
  else
    set_sticky (m, "writing an image of the state");
  pthread_cond_broadcast (&m->cond);
  pthread_mutex_unlock (&m->lock);
  if (r == 0) {
    if (old_n)
      store_free_meta_run (&fl->store, old_slot, old_n);
    store_free_slots (&fl->store, deferred.ptr, deferred.len);
  }
  slot_vector_reset (&deferred);
  free (img.p);
  free (payload.p);
  free (rec.p);
  free (carry.p);
  return r;
}

/* Writes an image when the active half is full. */
static void *
compactor (void *arg)
{
  struct fleece *fl = arg;
  struct meta *m = &fl->meta;

  pthread_mutex_lock (&m->lock);
  for (;;) {
    while (!m->want_image && !m->stopping)
      pthread_cond_wait (&m->cond, &m->lock);
    if (m->stopping)
      break;
    pthread_mutex_unlock (&m->lock);
    pthread_mutex_lock (&fl->admin_lock);
    pthread_mutex_lock (&m->lock);
    /* An admin operation may have written one meanwhile. */
    if (m->want_image && m->pos + m->pend.len > HALF_SIZE) {
      pthread_mutex_unlock (&m->lock);
      if (meta_image (fl) == -1)
        fl_debug ("compaction failed: %s", fleece_last_error ());
      pthread_mutex_lock (&m->lock);
    }
    m->want_image = false;
    pthread_cond_broadcast (&m->cond);
    pthread_mutex_unlock (&m->lock);
    pthread_mutex_unlock (&fl->admin_lock);
    pthread_mutex_lock (&m->lock);
  }
  pthread_mutex_unlock (&m->lock);
  return NULL;
}

/* Called by fleece_open once the store is open. */
int
meta_init (struct fleece *fl, bool existing, bool *was_clean)
{
  struct meta *m = &fl->meta;
  char block[sizeof (struct fleece_superblock)];
  const struct fleece_superblock *sb = (void *) block;
  int r;

  memset (m, 0, sizeof *m);
  pthread_mutex_init (&m->lock, NULL);
  pthread_cond_init (&m->cond, NULL);
  m->on = fl->store.persistent;
  *was_clean = true;
  if (!m->on || !existing)
    return 0;
  if (store_meta_pread (&fl->store, block, sizeof block, 0) == -1)
    return -1;
  *was_clean = le32toh (sb->flags) & FLEECE_SB_CLEAN;
  fl->store.loading = true;
  r = meta_load (fl);
  fl->store.loading = false;
  return r;
}

/* After loading (or formatting): write a first image, so that the log
 * starts from a known state.  The superblock keeps saying clean until the
 * first live write (meta_dirty): an nbdkit that stops before serving a
 * write, cleanly or not, leaves nothing to distrust.
 */
int
meta_start (struct fleece *fl, bool existing, bool was_clean)
{
  struct meta *m = &fl->meta;
  int r;

  if (!m->on)
    return 0;
  /* A new store gets its superblock only after its first image: a crash
   * in between leaves a file that is formatted again, not a damaged one.
   */
  pthread_mutex_lock (&fl->admin_lock);
  r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  if (r == -1)
    return -1;
  /* Sub-cluster copies: the store may now hold PARTIAL records, which a
   * Fleece that does not know them must refuse (FLEECE_SB_PARTIAL), not
   * load as damage or without them.  Said before the first one.
   */
  if (fl->block_size && !(fl->store.features & FLEECE_SB_PARTIAL)) {
    fl->store.features |= FLEECE_SB_PARTIAL;
    if (existing &&
        store_write_superblock (&fl->store, &fl->disk, was_clean) == -1)
      return -1;
  }
  if (!existing) {
    if (store_write_superblock (&fl->store, &fl->disk, true) == -1)
      return -1;
    was_clean = true;
  }
  atomic_store (&m->sb_clean, was_clean);
  m->logging = true;
  return 0;
}

/* Called by fleece_start, in the process that serves: a thread created
 * before nbdkit forks into the background does not exist in the child
 * that serves, and the child would wait forever for its images.
 */
int
meta_start_compactor (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  int r;

  if (!m->on)
    return 0;
  r = pthread_create (&m->compactor, NULL, compactor, fl);
  if (r != 0)
    return fl_error (r, "persistent store: %s: pthread_create: the "
                     "metadata compactor: %s", fl->store.path,
                     strerror (r));
  pthread_mutex_lock (&m->lock);
  m->compactor_started = true;
  pthread_mutex_unlock (&m->lock);
  return 0;
}

int
meta_dirty (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  int r = 0;

  pthread_mutex_lock (&m->lock);
  if (m->err)
    r = sticky_error (m);
  else if (atomic_load (&m->sb_clean)) {
    r = store_write_superblock (&fl->store, &fl->disk, false);
    if (r == -1) {
      errno = errno ? errno : EIO;
      set_sticky (m, "marking the store in use");
    }
    else
      atomic_store (&m->sb_clean, false);
  }
  pthread_mutex_unlock (&m->lock);
  return r;
}

/* At fleece_close: record the final state, exact bitmaps included, and
 * mark the store clean.
 */
void
meta_close (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  int r;

  if (m->compactor_started) {
    pthread_mutex_lock (&m->lock);
    m->stopping = true;
    pthread_cond_broadcast (&m->cond);
    pthread_mutex_unlock (&m->lock);
    pthread_join (m->compactor, NULL);
    m->compactor_started = false;
  }
  /* Also when fleece_start never ran (nbdkit stopped before .after_fork):
   * the state is still worth a clean stop.
   */
  if (m->logging) {
    m->logging = false;
    pthread_mutex_lock (&fl->admin_lock);
    r = meta_image (fl);
    pthread_mutex_unlock (&fl->admin_lock);
    if (r == 0)
      r = store_write_superblock (&fl->store, &fl->disk, true);
    if (r == -1)
      fl_debug ("closing the persistent store: %s; it will load as after "
                "a crash", fleece_last_error ());
  }
  wb_free (&m->pend);
  slot_vector_reset (&m->deferred);
  pthread_mutex_destroy (&m->lock);
  pthread_cond_destroy (&m->cond);
}
