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
 * record at the start of the other half, sync.  Loading picks the half
 * whose STATE has the higher sequence, reads its image, and applies the
 * records that follow it up to the first one whose magic, checksum or
 * sequence is wrong.  That end is judged (tail_verdict): a write torn by
 * a crash, which was never acknowledged and is ignored, or damage, which
 * breaks every snapshot and makes every recording bitmap inconsistent,
 * loudly (fl_warn).  Telling them apart relies on everything past the end
 * of the log being zero: making a half active zeroes what an earlier use
 * of it left.  A copy whose slot the store file no longer holds whole (a
 * truncation) breaks only the snapshots that read it.
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
 * still see a stable record for them.  Records appended after the cut go into the new half.  Loading
 * tolerates a record that repeats what the image holds.
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
 * lock; the meta lock is never held across I/O.  Waiting for a commit never happens with
 * snaps_lock or a snapshot's io_lock held: the compactor, which writes
 * the image when the log is full, takes admin_lock, and an admin
 * operation may wait for those locks.
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
#include "internal.h"

#define HALF_SIZE     (FLEECE_STORE_META_SIZE / 2)
#define REC_HDR_SIZE  32
#define REC_MAGIC     "FLMR"
#define IMAGE_MAGIC   "FLIMAGE1"
#define STATE_PAYLOAD 32
/* Generations stay below this: a new snapshot takes the next one. */
#define GEN_LIMIT     (UINT32_MAX - 1)

/* ---- buffers ---- */

void
wb_bytes (struct wbuf *b, const void *p, size_t n)
{
  if (b->failed)
    return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    char *q;
    while (cap < b->len + n)
      cap *= 2;
    q = realloc (b->p, cap);
    if (q == NULL) {
      b->failed = true;
      return;
    }
    b->p = q;
    b->cap = cap;
  }
  memcpy (b->p + b->len, p, n);
  b->len += n;
}

void wb_u16 (struct wbuf *b, uint16_t v)
{ v = htole16 (v); wb_bytes (b, &v, 2); }
void wb_u32 (struct wbuf *b, uint32_t v)
{ v = htole32 (v); wb_bytes (b, &v, 4); }
void wb_u64 (struct wbuf *b, uint64_t v)
{ v = htole64 (v); wb_bytes (b, &v, 8); }

void
wb_str (struct wbuf *b, const char *s)
{
  size_t n = strlen (s);

  assert (n <= UINT16_MAX);
  wb_u16 (b, n);
  wb_bytes (b, s, n);
}

void
wb_words (struct wbuf *b, _Atomic uint64_t *w, uint64_t n)
{
  uint64_t i;

  for (i = 0; i < n; i++)
    wb_u64 (b, atomic_load_explicit (&w[i], memory_order_relaxed));
}

static const void *
rb_take (struct rbuf *b, size_t n)
{
  const void *p;

  if (b->bad || n > b->len - b->pos) {
    b->bad = true;
    return NULL;
  }
  p = b->p + b->pos;
  b->pos += n;
  return p;
}

uint16_t
rb_u16 (struct rbuf *b)
{
  uint16_t v = 0;
  const void *p = rb_take (b, 2);
  if (p)
    memcpy (&v, p, 2);
  return le16toh (v);
}

uint32_t
rb_u32 (struct rbuf *b)
{
  uint32_t v = 0;
  const void *p = rb_take (b, 4);
  if (p)
    memcpy (&v, p, 4);
  return le32toh (v);
}

uint64_t
rb_u64 (struct rbuf *b)
{
  uint64_t v = 0;
  const void *p = rb_take (b, 8);
  if (p)
    memcpy (&v, p, 8);
  return le64toh (v);
}

void
rb_str (struct rbuf *b, char *out, size_t max)
{
  uint16_t n = rb_u16 (b);
  const char *p;

  out[0] = '\0';
  if (n > max) {
    b->bad = true;
    return;
  }
  p = rb_take (b, n);
  if (p == NULL)
    return;
  memcpy (out, p, n);
  out[n] = '\0';
  if (strlen (out) != n)        /* an embedded NUL */
    b->bad = true;
}

void
rb_words (struct rbuf *b, _Atomic uint64_t *w, uint64_t n)
{
  uint64_t i;

  if (n > (b->len - b->pos) / 8) {
    b->bad = true;
    return;
  }
  for (i = 0; i < n; i++)
    atomic_store_explicit (&w[i], rb_u64 (b), memory_order_relaxed);
}

/* ---- records ---- */

static uint64_t
half_offset (int half)
{
  return FLEECE_STORE_HEADER_SIZE + (uint64_t) half * HALF_SIZE;
}

static size_t
rec_size (size_t payload)
{
  return REC_HDR_SIZE + ((payload + 7) & ~(size_t) 7);
}

/* Encode one record into out. */
static void
encode (struct wbuf *out, uint16_t type, uint64_t seq, const void *payload,
        size_t len)
{
  static const char zero[8];
  size_t start = out->len;
  XXH64_state_t *h;

  wb_bytes (out, REC_MAGIC, 4);
  wb_u16 (out, type);
  wb_u16 (out, 0);
  wb_u32 (out, len);
  wb_u32 (out, 0);
  wb_u64 (out, seq);
  if (out->failed)
    return;
  h = XXH64_createState ();
  if (h == NULL) {
    out->failed = true;
    return;
  }
  XXH64_reset (h, 0);
  XXH64_update (h, out->p + start, 24);
  XXH64_update (h, payload, len);
  wb_u64 (out, XXH64_digest (h));
  XXH64_freeState (h);
  wb_bytes (out, payload, len);
  wb_bytes (out, zero, ((len + 7) & ~(size_t) 7) - len);
}

struct rec {
  uint16_t type;
  uint64_t seq;
  struct rbuf payload;
};

/* Decode the record at p (avail bytes); returns its size, or 0 if there
 * is no valid record there.
 */
static size_t
decode (const char *p, size_t avail, struct rec *r)
{
  uint32_t len;
  uint64_t sum;
  XXH64_state_t *h;

  if (avail < REC_HDR_SIZE || memcmp (p, REC_MAGIC, 4) != 0)
    return 0;
  memcpy (&len, p + 8, 4);
  len = le32toh (len);
  if (len > avail - REC_HDR_SIZE || rec_size (len) > avail)
    return 0;
  memcpy (&sum, p + 24, 8);
  h = XXH64_createState ();
  if (h == NULL)
    return 0;
  XXH64_reset (h, 0);
  XXH64_update (h, p, 24);
  XXH64_update (h, p + REC_HDR_SIZE, len);
  if (XXH64_digest (h) != le64toh (sum)) {
    XXH64_freeState (h);
    return 0;
  }
  XXH64_freeState (h);
  memcpy (&r->type, p + 4, 2);
  r->type = le16toh (r->type);
  memcpy (&r->seq, p + 16, 8);
  r->seq = le64toh (r->seq);
  r->payload = (struct rbuf) { .p = p + REC_HDR_SIZE, .len = len };
  return rec_size (len);
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
  int r = 0;

  if (!m->on)
    return 0;
  pthread_mutex_lock (&m->lock);
  if (m->err)
    r = sticky_error (m);
  pthread_mutex_unlock (&m->lock);
  return r;
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
  encode (&m->pend, type, seq, payload->p, payload->len);
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
    if (m->ndeferred + n > m->capdeferred) {
      size_t cap = m->capdeferred ? m->capdeferred : 256;
      uint32_t *p;
      while (cap < m->ndeferred + n)
        cap *= 2;
      p = realloc (m->deferred, cap * sizeof *p);
      if (p == NULL) {
        /* Keep the slots allocated: a leak until restart, never a reuse
         * before the record that freed them is stable.
         */
        pthread_mutex_unlock (&m->lock);
        return;
      }
      m->deferred = p;
      m->capdeferred = cap;
    }
    memcpy (m->deferred + m->ndeferred, slots, n * sizeof *slots);
    m->ndeferred += n;
    pthread_mutex_unlock (&m->lock);
    return;
  }
  store_free_slots (&fl->store, slots, n);
}

/* ---- the image ---- */

static int
put_copy (void *opaque, const struct copy *cp)
{
  struct wbuf *b = opaque;

  wb_u32 (b, cp->cluster);
  wb_u32 (b, cp->lo);
  wb_u32 (b, cp->hi);
  wb_u32 (b, cp->slot);
  return b->failed ? -1 : 0;
}

/* Build the image; admin_lock held. */
static int
build_image (struct fleece *fl, struct wbuf *b)
{
  uint64_t nwords = (fl->nclusters + 63) / 64;
  size_t i, ncopies_at;
  uint64_t ncopies;

  pthread_rwlock_rdlock (&fl->snaps_lock);
  /* A snapshot being broken appends its BROKEN record before it sets
   * broken, both under break_lock: if the record fell before the cut, the
   * flag is set by the time this lock is ours.
   */
  pthread_mutex_lock (&fl->break_lock);
  wb_bytes (b, IMAGE_MAGIC, 8);
  wb_u32 (b, fl->cluster_size);
  wb_u32 (b, 0);
  wb_u64 (b, fl->disk.size);
  wb_u32 (b, state_gen (atomic_load (&fl->state)));
  wb_u32 (b, fl->nsnaps);
  wb_u32 (b, bitmap_count_all (fl));
  wb_u32 (b, 0);
  ncopies_at = b->len;
  wb_u64 (b, 0);                /* copies, patched below */
  for (i = 0; i < fl->nsnaps; i++) {
    struct fleece_snap *s = fl->snaps[i];
    _Atomic uint64_t *rel = atomic_load (&s->released);
    bool broken = atomic_load (&s->broken);

    wb_u32 (b, s->gen);
    wb_u32 (b, (broken ? 1 : 0) | (rel ? 2 : 0));
    wb_u64 (b, (uint64_t) s->created);
    wb_str (b, s->name);
    wb_str (b, broken ? s->broken_reason : "");
    if (rel)
      wb_words (b, rel, nwords);
  }
  pthread_mutex_unlock (&fl->break_lock);
  bitmap_image_put (fl, b);
  ncopies = b->len;
  copymap_foreach (&fl->copies, put_copy, b);
  ncopies = (b->len - ncopies) / 16;
  pthread_rwlock_unlock (&fl->snaps_lock);
  if (b->failed)
    return fl_error (ENOMEM, "persistent store: out of memory for the "
                     "image");
  ncopies = htole64 (ncopies);
  memcpy (b->p + ncopies_at, &ncopies, 8);
  return 0;
}

/* The payloads (8 bytes each) of the DIRTY records in a pending buffer. */
static uint32_t
carry_dirty (const struct wbuf *pend, struct wbuf *carry)
{
  struct rec r;
  size_t pos = 0, n;
  uint32_t k = 0;

  while (pos < pend->len &&
         (n = decode (pend->p + pos, pend->len - pos, &r)) > 0) {
    if (r.type == REC_DIRTY && r.payload.len == 8) {
      wb_bytes (carry, r.payload.p, 8);
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
  uint32_t *deferred;
  size_t ndeferred;
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
  ndeferred = m->ndeferred;
  m->deferred = NULL;
  m->ndeferred = m->capdeferred = 0;
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
  wb_u32 (&payload, slot);
  wb_u32 (&payload, nslots);
  wb_u64 (&payload, img.len);
  wb_u64 (&payload, hash);
  wb_u32 (&payload, state_gen (atomic_load (&fl->state)));
  wb_u32 (&payload, 0);
  encode (&rec, REC_STATE, state_seq, payload.p, payload.len);
  for (i = 0; i < carried; i++)
    encode (&rec, REC_DIRTY, state_seq + 1 + i, carry.p + (size_t) i * 8, 8);
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
    for (i = 0; i < old_n; i++)
      store_free_meta (&fl->store, old_slot + i);
    store_free_slots (&fl->store, deferred, ndeferred);
  }
  free (deferred);
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

/* ---- loading ---- */

static int
damaged (struct fleece *fl, const char *what)
{
  return fl_error (EINVAL, "store: %s: %s: the metadata is damaged; the "
                   "store cannot be trusted (remove it to start afresh, "
                   "losing its snapshots and bitmaps)", fl->store.path, what);
}

/* Copies were written, and synced, before their records: a slot that a
 * record names and that is not wholly inside the store (up to the bytes
 * the copy uses: the disk's last cluster may be short) lost its data
 * since, to a truncation.  Its data is gone and is never read.
 */
static bool
copy_in_store (struct fleece *fl, const struct copy *cp)
{
  uint64_t need = fl->disk.size - (uint64_t) cp->cluster * fl->cluster_size;

  if (need > fl->cluster_size)
    need = fl->cluster_size;
  return fl->store.data_offset + (uint64_t) cp->slot * fl->cluster_size +
    need <= fl->meta.load_size;
}

/* Keep a lost copy aside: once every record is applied (a later RELEASE
 * may make it unneeded), the snapshots that still read it are broken
 * (break_lost).  cgen still counts it, so that the copy ranges of the
 * cluster stay disjoint.
 */
static int
lose_copy (struct fleece *fl, const struct copy *cp)
{
  struct meta *m = &fl->meta;

  if (m->nlost == m->caplost) {
    size_t cap = m->caplost ? m->caplost * 2 : 16;
    struct copy *p = realloc (m->lost, cap * sizeof *p);
    if (p == NULL)
      return fl_error (ENOMEM, "loading the store: out of memory");
    m->lost = p;
    m->caplost = cap;
  }
  m->lost[m->nlost++] = *cp;
  if (cp->hi > atomic_load (&fl->cgen[cp->cluster]))
    atomic_store (&fl->cgen[cp->cluster], cp->hi);
  return 0;
}

/* Break snapshot s at load, for reason, and say so whatever the debug
 * level: the operator must learn that a snapshot was lost.
 */
static void
break_at_load (struct fleece *fl, struct fleece_snap *s, const char *reason)
{
  if (atomic_load (&s->broken))
    return;
  snprintf (s->broken_reason, sizeof s->broken_reason, "%s", reason);
  /* Broken in memory only, no BROKEN record: keep its copies, which the
   * log still gives it (snap_keeps_copies), or the next load would find
   * their slots claimed twice.
   */
  atomic_store (&s->broken_unrecorded, true);
  atomic_store (&s->broken, true);
  fl_warn ("store: %s: snapshot '%s' is broken (its export fails every "
           "read): %s", fl->store.path, s->name, reason);
}

static void
break_lost (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  char reason[256];
  size_t i, j;

  for (i = 0; i < m->nlost; i++) {
    const struct copy *cp = &m->lost[i];
    for (j = 0; j < fl->nsnaps; j++) {
      if (!snap_reads_copy (fl->snaps[j], cp->cluster, cp->lo, cp->hi))
        continue;
      snprintf (reason, sizeof reason, "the store file ends before the end "
                "of slot %" PRIu32 ", which held the copy of cluster %"
                PRIu32 ": the store was truncated and the copy is lost",
                cp->slot, cp->cluster);
      break_at_load (fl, fl->snaps[j], reason);
    }
  }
}

static int
load_copy (struct fleece *fl, const struct copy *cp)
{
  struct copy have;

  if (cp->cluster >= fl->nclusters || cp->lo >= cp->hi ||
      cp->hi >= GEN_LIMIT ||
      (cp->slot != ZERO_SLOT && cp->slot >= UINT32_MAX - 1))
    return damaged (fl, "a copy record is out of range");
  /* A copy no snapshot reads any more (an image can hold one whose
   * release was pending) is skipped: its slot may have been reused.
   */
  if (!copy_needed (fl, cp))
    return 0;
  if (cp->slot != ZERO_SLOT && !copy_in_store (fl, cp))
    return lose_copy (fl, cp);
  if (copymap_overlap (&fl->copies, cp->cluster, cp->lo, cp->hi, &have)) {
    if (memcmp (&have, cp, sizeof have) == 0)
      return 0;                 /* repeated after an image: the same copy */
    return damaged (fl, "two copies of a cluster overlap");
  }
  if (cp->slot != ZERO_SLOT && store_claim (&fl->store, cp->slot, false) == -1)
    return -1;
  if (copymap_insert (&fl->copies, cp) == -1)
    return -1;
  if (cp->hi > atomic_load (&fl->cgen[cp->cluster]))
    atomic_store (&fl->cgen[cp->cluster], cp->hi);
  return 0;
}

static struct fleece_snap *
snap_by_gen (struct fleece *fl, uint32_t gen)
{
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    if (fl->snaps[i]->gen == gen)
      return fl->snaps[i];
  return NULL;
}

static int
load_image (struct fleece *fl, const char *p, size_t len, uint32_t *gen)
{
  struct rbuf b = { .p = p, .len = len };
  uint64_t nwords = (fl->nclusters + 63) / 64, ncopies, i;
  uint32_t nsnaps, nbitmaps, last_gen = 0;
  const char *magic = rb_take (&b, 8);
  uint32_t cs;
  uint64_t size;

  if (magic == NULL || memcmp (magic, IMAGE_MAGIC, 8) != 0)
    return damaged (fl, "the image has a bad magic");
  cs = rb_u32 (&b);
  rb_u32 (&b);
  size = rb_u64 (&b);
  if (cs != fl->cluster_size || size != fl->disk.size)
    return damaged (fl, "the image is of another geometry");
  *gen = rb_u32 (&b);
  if (*gen >= GEN_LIMIT)
    return damaged (fl, "the image's generation is out of range");
  nsnaps = rb_u32 (&b);
  nbitmaps = rb_u32 (&b);
  rb_u32 (&b);
  ncopies = rb_u64 (&b);
  if (b.bad || nsnaps > FLEECE_SNAPSHOTS_MAX)
    return damaged (fl, "the image header is not valid");
  for (i = 0; i < nsnaps; i++) {
    char name[FLEECE_SNAPSHOT_NAME_MAX + 1], reason[256];
    uint32_t sgen = rb_u32 (&b), flags = rb_u32 (&b);
    int64_t created = (int64_t) rb_u64 (&b);
    struct fleece_snap *s;

    rb_str (&b, name, FLEECE_SNAPSHOT_NAME_MAX);
    rb_str (&b, reason, sizeof reason - 1);
    if (b.bad || sgen <= last_gen || sgen > *gen || (flags & ~3u))
      return damaged (fl, "a snapshot in the image is not valid");
    last_gen = sgen;
    s = snap_restore (fl, name, sgen, created);
    if (s == NULL)
      return -1;
    if (flags & 2) {
      _Atomic uint64_t *bits;
      if (ensure_released_bits (s) == -1)
        return -1;
      bits = atomic_load (&s->released);
      rb_words (&b, bits, nwords);
      if (fl->nclusters % 64 &&
          (atomic_load (&bits[nwords - 1]) >> (fl->nclusters % 64)))
        b.bad = true;
    }
    if (flags & 1) {
      snprintf (s->broken_reason, sizeof s->broken_reason, "%s",
                reason[0] ? reason : "broken in an earlier run");
      atomic_store (&s->broken, true);
    }
  }
  if (b.bad)
    return damaged (fl, "a snapshot in the image is truncated");
  if (bitmap_image_get (fl, &b, nbitmaps) == -1)
    return -1;
  if (ncopies != (b.len - b.pos) / 16 || (b.len - b.pos) % 16)
    return damaged (fl, "the image's copy table has the wrong size");
  for (i = 0; i < ncopies; i++) {
    struct copy cp;
    cp.cluster = rb_u32 (&b);
    cp.lo = rb_u32 (&b);
    cp.hi = rb_u32 (&b);
    cp.slot = rb_u32 (&b);
    if (cp.hi > *gen)
      return damaged (fl, "a copy is newer than the image");
    if (load_copy (fl, &cp) == -1)
      return -1;
  }
  return 0;
}

static int
apply_record (struct fleece *fl, struct rec *r, uint32_t *gen)
{
  struct rbuf *b = &r->payload;

  switch (r->type) {
  case REC_COPY: {
    uint32_t n = rb_u32 (b), i;
    rb_u32 (b);
    if (b->bad || n != (b->len - b->pos) / 16)
      return damaged (fl, "a COPY record has the wrong size");
    for (i = 0; i < n; i++) {
      struct copy cp;
      cp.cluster = rb_u32 (b);
      cp.lo = rb_u32 (b);
      cp.hi = rb_u32 (b);
      cp.slot = rb_u32 (b);
      if (load_copy (fl, &cp) == -1)
        return -1;
      if (cp.hi > *gen)
        *gen = cp.hi;
    }
    return 0;
  }
  case REC_RELEASE: {
    uint32_t sgen = rb_u32 (b), first = rb_u32 (b), count = rb_u32 (b), c;
    struct fleece_snap *s;
    _Atomic uint64_t *bits;
    if (b->bad || first >= fl->nclusters || count > fl->nclusters - first)
      return damaged (fl, "a RELEASE record is out of range");
    s = snap_by_gen (fl, sgen);
    if (s == NULL)
      return 0;                 /* deleted since */
    if (ensure_released_bits (s) == -1)
      return -1;
    bits = atomic_load (&s->released);
    for (c = first; c < first + count; c++) {
      atomic_fetch_or (&bits[c / 64], UINT64_C (1) << (c % 64));
      /* Its slot may be reused by a later record. */
      copymap_prune (&fl->copies, c, copy_needed, copy_free, fl);
    }
    return 0;
  }
  case REC_BROKEN: {
    uint32_t sgen = rb_u32 (b);
    char reason[256];
    struct fleece_snap *s;
    rb_str (b, reason, sizeof reason - 1);
    if (b->bad)
      return damaged (fl, "a BROKEN record is not valid");
    s = snap_by_gen (fl, sgen);
    if (s && !atomic_load (&s->broken)) {
      snprintf (s->broken_reason, sizeof s->broken_reason, "%s", reason);
      atomic_store (&s->broken, true);
      /* Its copies were freed once this record was stable, and their
       * slots may be reused by later records.
       */
      copymap_prune (&fl->copies, UINT32_MAX, copy_needed, copy_free, fl);
    }
    return 0;
  }
  case REC_DIRTY: {
    uint32_t first = rb_u32 (b), count = rb_u32 (b);
    if (b->bad)
      return damaged (fl, "a DIRTY record is not valid");
    return bitmap_apply_dirty (fl, first, count);
  }
  default:
    return damaged (fl, "a record of an unknown type");
  }
}

/* What ends the log at pos, after the record of sequence prev
 * (docs/store-format.md, "Torn tail or damage").
 *
 * A write is torn only in whole sectors: a crash leaves each 512-byte
 * sector of a group commit's write either written or as it was, and the
 * page cache tears an interrupted pwrite at page boundaries.  Everything
 * past the end of the log was zero before the write (meta_image zeroes a
 * half when it becomes active).  So:
 *
 * - neither the record magic nor the next sequence number at pos: no
 *   record was written there (or its first sector was lost to a crash):
 *   the end of the log;
 * - a record there (its magic, or its sequence number) that fails to
 *   decode, lying within one sector: a torn write cannot do that, it is
 *   damaged;
 * - spanning sectors, one of them after its first all zero, holding at
 *   least 16 of the record's bytes (16 bytes of any record as written hold
 *   a non-zero byte: a sequence number, a checksum, a count, a generation
 *   or text): that sector was never written, the record is torn;
 * - spanning sectors, none of them zero: written whole, damaged;
 * - a zero sector holding fewer than 16 of its bytes, at its end: those
 *   bytes might have been written as zeroes; which it is cannot be told.
 */
enum { TAIL_END, TAIL_TORN, TAIL_DAMAGED, TAIL_UNSURE };
#define SECTOR 512

static int
tail_verdict (const char *half, size_t pos, uint64_t prev)
{
  size_t end, sec, s0, s1;
  uint64_t seq;
  uint32_t len;
  bool magic, unsure = false;
  struct rec r;

  /* A valid record that is not the next one: an earlier use of the half
   * (stores of earlier versions did not zero it), or a later record,
   * which load judges.
   */
  if (pos + 24 > HALF_SIZE || decode (half + pos, HALF_SIZE - pos, &r))
    return TAIL_END;
  magic = memcmp (half + pos, REC_MAGIC, 4) == 0;
  memcpy (&seq, half + pos + 16, 8);
  if (!magic && le64toh (seq) != prev + 1)
    return TAIL_END;
  memcpy (&len, half + pos + 8, 4);
  len = le32toh (len);
  end = magic && pos + REC_HDR_SIZE <= HALF_SIZE &&
    len <= HALF_SIZE - pos - REC_HDR_SIZE ? pos + REC_HDR_SIZE + len
    : pos + 24;
  for (sec = pos / SECTOR + 1; sec * SECTOR < end; sec++) {
    s0 = sec * SECTOR;
    s1 = s0 + SECTOR < HALF_SIZE ? s0 + SECTOR : HALF_SIZE;
    if (!fl_is_zero (half + s0, s1 - s0))
      continue;
    if ((end < s1 ? end : s1) - s0 >= 16)
      return TAIL_TORN;
    unsure = true;
  }
  return unsure ? TAIL_UNSURE : TAIL_DAMAGED;
}

/* What ends the log of half h at pos, after the record of sequence prev
 * (tail_verdict): damage, or doubt, breaks every snapshot and makes every
 * recording bitmap inconsistent, loudly.  Returns the highest sequence
 * number found in the half.
 */
static uint64_t
judge_end (struct fleece *fl, const char *half, int h, size_t pos,
           uint64_t prev)
{
  uint64_t newest = prev;
  int verdict = tail_verdict (half, pos, prev);
  char why[256];
  struct rec r;
  size_t q, i;

  /* A valid newer record past the end means a damaged record, not a torn
   * tail (or a tail torn out of order): records may be missing.
   */
  for (q = pos + 8; q + REC_HDR_SIZE <= HALF_SIZE; q += 8)
    if (decode (half + q, HALF_SIZE - q, &r) && r.seq > newest)
      newest = r.seq;
  if (newest > prev)
    snprintf (why, sizeof why, "the store's metadata log has a damaged "
              "record (sequence %" PRIu64 ") followed by valid ones: copies "
              "may be missing", prev + 1);
  else if (verdict == TAIL_DAMAGED)
    snprintf (why, sizeof why, "the last record of the store's metadata "
              "log (sequence %" PRIu64 ", offset %zu of half %d) is "
              "damaged, not torn (it was written whole): a copy may be "
              "missing", prev + 1, pos, h);
  else if (verdict == TAIL_UNSURE)
    snprintf (why, sizeof why, "the last record of the store's metadata "
              "log (sequence %" PRIu64 ", offset %zu of half %d) fails its "
              "checksum, and whether a crash tore it or it is damaged cannot "
              "be told: a copy may be missing", prev + 1, pos, h);
  else {
    if (verdict == TAIL_TORN)
      fl_debug ("store: %s: the log ends with a record torn by a crash "
                "(sequence %" PRIu64 "): it was never acknowledged, ignored",
                fl->store.path, prev + 1);
    return newest;
  }
  fl_warn ("store: %s: %s; every snapshot is marked broken, every "
           "recording bitmap inconsistent", fl->store.path, why);
  for (i = 0; i < fl->nsnaps; i++)
    break_at_load (fl, fl->snaps[i], why);
  bitmap_distrust_recording (fl, why);
  return newest;
}

/* Count, for each snapshot, the copies it reads. */
static int
count_held (void *opaque, const struct copy *cp)
{
  struct fleece *fl = opaque;
  size_t i;

  for (i = 0; i < fl->nsnaps; i++)
    if (snap_reads_copy (fl->snaps[i], cp->cluster, cp->lo, cp->hi) &&
        !atomic_load (&fl->snaps[i]->broken))
      atomic_fetch_add (&fl->snaps[i]->held, 1);
  return 0;
}

static int
load (struct fleece *fl)
{
  struct meta *m = &fl->meta;
  char *region = NULL, *img = NULL;
  struct rec st[2], r;
  size_t sz[2], pos;
  uint32_t slot, nslots, gen, i;
  uint64_t len, hash, prev, newest;
  int h, ret = -1;
  struct stat sb;
  const char *half;

  region = malloc (FLEECE_STORE_META_SIZE);
  if (region == NULL)
    return fl_error (ENOMEM, "loading the store: out of memory");
  if (store_meta_pread (&fl->store, region, FLEECE_STORE_META_SIZE,
                        FLEECE_STORE_HEADER_SIZE) == -1)
    goto out;
  for (h = 0; h < 2; h++) {
    sz[h] = decode (region + (size_t) h * HALF_SIZE, HALF_SIZE, &st[h]);
    if (sz[h] && (st[h].type != REC_STATE ||
                  st[h].payload.len != STATE_PAYLOAD))
      sz[h] = 0;
  }
  if (!sz[0] && !sz[1]) {
    damaged (fl, "neither half of the metadata log starts with a valid "
             "STATE record");
    goto out;
  }
  h = !sz[0] ? 1 : !sz[1] ? 0 : st[1].seq > st[0].seq;
  slot = rb_u32 (&st[h].payload);
  nslots = rb_u32 (&st[h].payload);
  len = rb_u64 (&st[h].payload);
  hash = rb_u64 (&st[h].payload);
  gen = rb_u32 (&st[h].payload);
  if (fstat (fl->store.fd, &sb) == -1) {
    fl_error (errno, "store: fstat: %s: %m", fl->store.path);
    goto out;
  }
  /* The image must be wholly inside the store: without it nothing can
   * be loaded.  A copy that is not loses only its snapshots (lose_copy).
   */
  m->load_size = sb.st_size;
  if (!fl->store.is_file &&
      fl_block_size (fl->store.fd, "store", fl->store.path,
                     &m->load_size) == -1)
    goto out;
  if (len == 0 || nslots != (len + fl->cluster_size - 1) / fl->cluster_size
      || slot >= UINT32_MAX - 1 || nslots >= UINT32_MAX - 1 - slot) {
    damaged (fl, "the STATE record points outside the store");
    goto out;
  }
  if (fl->store.data_offset + (uint64_t) slot * fl->cluster_size + len >
      m->load_size) {
    char what[200];
    snprintf (what, sizeof what, "the STATE record points outside the "
              "store: its image ends at byte %" PRIu64 ", the store has %"
              PRIu64 " (it was truncated)", fl->store.data_offset +
              (uint64_t) slot * fl->cluster_size + len, m->load_size);
    damaged (fl, what);
    goto out;
  }
  img = malloc (len);
  if (img == NULL) {
    fl_error (ENOMEM, "loading the store: out of memory for a %" PRIu64
              "-byte image", len);
    goto out;
  }
  if (store_read (&fl->store, slot, 0, img, len) == -1)
    goto out;
  if (XXH64 (img, len, 0) != hash) {
    damaged (fl, "the image's checksum is wrong");
    goto out;
  }
  for (i = 0; i < nslots; i++)
    if (store_claim (&fl->store, slot + i, true) == -1)
      goto out;
  m->img_slot = slot;
  m->img_nslots = nslots;
  if (load_image (fl, img, len, &gen) == -1)
    goto out;

  /* The records after the STATE, up to the end of the log. */
  prev = st[h].seq;
  half = region + (size_t) h * HALF_SIZE;
  for (pos = sz[h]; pos < HALF_SIZE; ) {
    size_t n = decode (half + pos, HALF_SIZE - pos, &r);
    if (n == 0 || r.seq != prev + 1)
      break;
    if (apply_record (fl, &r, &gen) == -1)
      goto out;
    prev = r.seq;
    pos += n;
  }
  newest = judge_end (fl, half, h, pos, prev);
  break_lost (fl);
  /* What each half holds that is not zero: zeroed when it is next made
   * active (meta_image).
   */
  for (i = 0; i < 2; i++) {
    const char *p = region + (size_t) i * HALF_SIZE;
    size_t e = HALF_SIZE;
    while (e > 0 && p[e - 1] == 0)
      e--;
    m->used_end[i] = e;
  }
  m->seq = newest;
  m->durable = newest;
  atomic_store (&m->durable_pub, newest);
  m->half = h;
  m->pos = pos;
  for (i = 0; i < fl->nsnaps; i++)
    if (fl->snaps[i]->gen > gen)
      gen = fl->snaps[i]->gen;
  atomic_store (&fl->state, ((uint64_t) gen << 32) | fl->nsnaps);

  /* Copies no unbroken snapshot reads any more (trimmed, deleted or
   * broken before the crash) go; the rest are counted.
   */
  copymap_prune (&fl->copies, UINT32_MAX, copy_needed, copy_free, fl);
  copymap_foreach (&fl->copies, count_held, fl);
  for (i = 0; i < fl->nsnaps; i++) {
    _Atomic uint64_t *bits = atomic_load (&fl->snaps[i]->released);
    uint64_t w, n = 0;
    for (w = 0; bits && w < (fl->nclusters + 63) / 64; w++)
      n += __builtin_popcountll (atomic_load (&bits[w]));
    atomic_store (&fl->snaps[i]->nreleased, n);
  }
  ret = 0;
 out:
  free (region);
  free (img);
  free (m->lost);
  m->lost = NULL;
  m->nlost = m->caplost = 0;
  return ret;
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
  r = load (fl);
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
  free (m->pend.p);
  free (m->deferred);
  m->pend.p = NULL;
  m->deferred = NULL;
  pthread_mutex_destroy (&m->lock);
  pthread_cond_destroy (&m->cond);
}
