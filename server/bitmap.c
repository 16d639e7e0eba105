/* Dirty bitmaps and checkpoints.
 *
 * A bitmap has one bit per cluster; every live write, zero and trim sets
 * the bits of the clusters it touches in every enabled bitmap.  Writers
 * do not look at the list of bitmaps: inside the write gate they load one
 * pointer, fl->dirty, to an immutable set of the enabled bitmaps (NULL
 * when there is none: then the whole cost is that load, invariant 4), and
 * set bits with an atomic OR that is skipped when the bits are already
 * set.  The set is only replaced with the gate closed, so a write lands
 * entirely before or entirely after an enable, a disable or a checkpoint,
 * and an old set (or a removed bitmap) can be freed as soon as the gate
 * opens again: no writer can still hold it.
 *
 * States.  enabled: recording.  disabled: kept, not recording.  frozen:
 * closed by a checkpoint, read-only for good (it may be exported, merged
 * into another bitmap, or removed).  inconsistent: must not be trusted
 * for an incremental pull.  Only loading a store whose log is damaged
 * sets it (a DIRTY record may be lost: bitmap_distrust_recording);
 * clearing a bitmap resets it.
 *
 * Persistence: every change of the list or of a bitmap's state writes an
 * image of the whole state (meta.c), which holds every bitmap's bits, and
 * before a live write reaches the disk its clusters are marked in every
 * recording bitmap on stable storage (bitmap_intent: DIRTY records), so
 * that after a crash a recording bitmap still covers every write.
 *
 * checkpoint-create NAME does in one gate closure what QEMU's
 * successor/abdicate does for a backup job: snapshot NAME is created, the
 * bitmap of the previous checkpoint stops recording and is frozen (it now
 * holds exactly the clusters changed between that checkpoint and NAME),
 * and a new enabled bitmap NAME starts.  Removing the frozen bitmap once a
 * pull succeeded is the client's business; after a failed pull it stays,
 * and bitmap-merge can fold it into a later one.
 *
 * All of the list and the flags are protected by fl->admin_lock.
 */

#include <config.h>

#include <endian.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xxhash.h>

#include "fleece-wire.h"
#include "cleanup.h"
#include "internal.h"

struct bitmap {
  /* Set at creation, then constant. */
  char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
  int64_t created;
  bool checkpoint;
  _Atomic uint64_t *bits;       /* nwords words, set by writers */
  uint64_t nwords;

  /* Protected by admin_lock. */
  bool enabled, frozen, inconsistent;
  char frozen_by[FLEECE_SNAPSHOT_NAME_MAX + 1];
  char inconsistent_reason[256];
};

struct bitmap_set {
  size_t n;
  struct bitmap *b[];
};

struct fleece_bitmap_export {
  char *data;                   /* header, bits, zero padding */
  uint64_t size;
};

/* ---- the write path ---- */

static void
set_bits (struct bitmap *bm, uint64_t c0, uint64_t c1)
{
  uint64_t c = c0;

  while (c <= c1) {
    uint64_t w = c / 64, lo = c % 64;
    uint64_t hi = (c1 / 64 == w) ? c1 % 64 : 63;
    uint64_t mask = (hi - lo == 63) ? UINT64_MAX
      : ((UINT64_C (1) << (hi - lo + 1)) - 1) << lo;
    if ((atomic_load_explicit (&bm->bits[w], memory_order_relaxed) & mask)
        != mask)
      atomic_fetch_or_explicit (&bm->bits[w], mask, memory_order_relaxed);
    c = w * 64 + hi + 1;
  }
}

/* Called inside the write gate by every live write, zero and trim. */
void
bitmap_mark (struct fleece *fl, uint64_t offset, uint64_t count)
{
  struct bitmap_set *set = atomic_load_explicit (&fl->dirty,
                                                 memory_order_acquire);
  uint64_t c0, c1;
  size_t i;

  if (set == NULL)
    return;
  c0 = offset >> fl->cluster_bits;
  c1 = (offset + count - 1) >> fl->cluster_bits;
  for (i = 0; i < set->n; i++)
    set_bits (set->b[i], c0, c1);
}

/* Persistent stores: before a live write, its clusters are recorded as
 * dirty on stable storage (a DIRTY record) unless every recording bitmap
 * already has them, so that a bitmap that was recording at a crash is
 * still a superset of the writes.
 *
 * Called inside the write gate, where the set of recording bitmaps and
 * their bits cannot change under the caller (engine.c).  It never waits
 * there, so a commit never holds up a checkpoint's drain: it appends the
 * record and sets the bits in memory together under the meta lock (an
 * image's cut never separates them), and returns in *wait the record the
 * caller must see stable, outside the gate, before it comes back.
 * dirty_seq is stored before the bits, so that a writer that finds the
 * bits set finds the record to wait for.
 */
struct intent {
  struct fleece *fl;
  struct bitmap_set *set;
  uint64_t c0, c1;
};

static void
intent_set (void *opaque, uint64_t seq)
{
  struct intent *in = opaque;
  size_t i;

  atomic_store (&in->fl->dirty_seq, seq);
  /* set_bits is relaxed: the fence makes the store above visible to a
   * writer whose acquire load finds the bits (x86 orders it anyway).
   */
  atomic_thread_fence (memory_order_release);
  for (i = 0; i < in->set->n; i++)
    set_bits (in->set->b[i], in->c0, in->c1);
}

int
bitmap_intent (struct fleece *fl, uint64_t offset, uint64_t count,
               uint64_t *wait)
{
  struct intent in = { .fl = fl };
  uint64_t c, seq;
  struct wbuf b = { 0 };
  size_t i;

  *wait = 0;
  in.set = atomic_load_explicit (&fl->dirty, memory_order_acquire);
  if (in.set == NULL)
    return 0;
  in.c0 = offset >> fl->cluster_bits;
  in.c1 = (offset + count - 1) >> fl->cluster_bits;
  for (i = 0; i < in.set->n; i++)
    for (c = in.c0; c <= in.c1; c++)
      if (!((atomic_load_explicit (&in.set->b[i]->bits[c / 64],
                                   memory_order_acquire) >> (c % 64)) & 1))
        goto record;
  /* All set: by a record that may not be stable yet. */
  seq = atomic_load (&fl->dirty_seq);
  if (seq > atomic_load (&fl->meta.durable_pub))
    *wait = seq;
  return 0;
 record:
  rec_put_dirty (&b, in.c0, in.c1 - in.c0 + 1);
  seq = meta_append_with (fl, REC_DIRTY, &b, false, intent_set, &in);
  free (b.p);
  if (seq == 0)
    return -1;
  *wait = seq;
  return 0;
}

/* Loading: a DIRTY record marks its clusters in every recording bitmap. */
int
bitmap_apply_dirty (struct fleece *fl, uint32_t first, uint32_t count)
{
  size_t i;

  if (first >= fl->nclusters || count == 0 ||
      count > fl->nclusters - first)
    return fl_error (EINVAL, "store: %s: a DIRTY record is out of range: "
                     "the metadata is damaged", fl->store.path);
  for (i = 0; i < fl->nbitmaps; i++)
    if (fl->bitmaps[i]->enabled && !fl->bitmaps[i]->frozen)
      set_bits (fl->bitmaps[i], first, (uint64_t) first + count - 1);
  return 0;
}

/* Loading a damaged store: a DIRTY record may be lost, so no bitmap that
 * was recording can be trusted for an incremental pull.  Called before
 * the engine serves anything.
 */
void
bitmap_distrust_recording (struct fleece *fl, const char *reason)
{
  size_t i;

  for (i = 0; i < fl->nbitmaps; i++) {
    struct bitmap *bm = fl->bitmaps[i];
    if (!bm->enabled || bm->frozen || bm->inconsistent)
      continue;
    bm->inconsistent = true;
    snprintf (bm->inconsistent_reason, sizeof bm->inconsistent_reason, "%s",
              reason);
    fl_warn ("store: %s: bitmap '%s' is marked inconsistent (not to be "
             "trusted for an incremental pull until it is cleared): %s",
             fl->store.path, bm->name, reason);
  }
}

/* ---- the list ---- */

static struct bitmap *
find_bitmap (struct fleece *fl, const char *name)
{
  size_t i;

  for (i = 0; i < fl->nbitmaps; i++)
    if (strcmp (fl->bitmaps[i]->name, name) == 0)
      return fl->bitmaps[i];
  return NULL;
}

static struct bitmap *
lookup (struct fleece *fl, const char *name)
{
  struct bitmap *bm;

  if (fleece_check_name ("bitmap", name) == -1)
    return NULL;
  bm = find_bitmap (fl, name);
  if (bm == NULL)
    fl_error (ENOENT, "bitmap '%s' does not exist", name);
  return bm;
}

static void
bitmap_free (struct bitmap *bm)
{
  if (bm) {
    free ((void *) bm->bits);
    free (bm);
  }
}

static struct bitmap *
bitmap_new (struct fleece *fl, const char *name, bool enabled)
{
  struct bitmap *bm;

  if (fl->nbitmaps >= FLEECE_BITMAPS_MAX) {
    fl_error (ENOSPC, "bitmap '%s': there are already %d bitmaps", name,
              FLEECE_BITMAPS_MAX);
    return NULL;
  }
  bm = calloc (1, sizeof *bm);
  if (bm)
    bm->nwords = (fl->nclusters + 63) / 64;
  if (bm == NULL || (bm->bits = calloc (bm->nwords, 8)) == NULL) {
    free (bm);
    fl_error (ENOMEM, "bitmap '%s': out of memory", name);
    return NULL;
  }
  strcpy (bm->name, name);
  bm->created = time (NULL);
  bm->enabled = enabled;
  return bm;
}

/* The set of enabled bitmaps as the list says, minus skip, plus add.
 * *out is NULL when it is empty.
 */
static int
build_set (struct fleece *fl, struct bitmap *skip, struct bitmap *add,
           struct bitmap_set **out)
{
  struct bitmap_set *set;
  size_t i;

  set = malloc (sizeof *set + (fl->nbitmaps + 1) * sizeof set->b[0]);
  if (set == NULL)
    return fl_error (ENOMEM, "bitmaps: out of memory");
  set->n = 0;
  for (i = 0; i < fl->nbitmaps; i++)
    if (fl->bitmaps[i] != skip && fl->bitmaps[i]->enabled &&
        !fl->bitmaps[i]->frozen)
      set->b[set->n++] = fl->bitmaps[i];
  if (add)
    set->b[set->n++] = add;
  if (set->n == 0) {
    free (set);
    set = NULL;
  }
  *out = set;
  return 0;
}

/* Install a new set; called with the gate closed.  Returns the old one,
 * to be freed once the gate is open again.
 */
static struct bitmap_set *
swap_set (struct fleece *fl, struct bitmap_set *set)
{
  return atomic_exchange_explicit (&fl->dirty, set, memory_order_acq_rel);
}

/* Rebuild the set from the list, with a gate closure. */
static int
republish (struct fleece *fl)
{
  struct bitmap_set *set, *old;

  if (build_set (fl, NULL, NULL, &set) == -1)
    return -1;
  gate_close (&fl->gate);
  old = swap_set (fl, set);
  gate_open (&fl->gate);
  free (old);
  return 0;
}

static int
check_not_frozen (const struct bitmap *bm, const char *what)
{
  if (bm->frozen)
    return fl_error (EBUSY, "%s: bitmap '%s' is frozen by checkpoint '%s': "
                     "it can only be exported, merged into another bitmap "
                     "or removed", what, bm->name, bm->frozen_by);
  return 0;
}

static int
add_locked (struct fleece *fl, const char *name, bool disabled)
{
  struct bitmap *bm;

  if (find_bitmap (fl, name))
    return fl_error (EEXIST, "bitmap '%s' already exists", name);
  bm = bitmap_new (fl, name, !disabled);
  if (bm == NULL)
    return -1;
  fl->bitmaps[fl->nbitmaps++] = bm;
  if (!disabled && republish (fl) == -1) {
    fl->nbitmaps--;
    bitmap_free (bm);
    return -1;
  }
  return 0;
}

int
fleece_bitmap_add (struct fleece *fl, const char *name, bool disabled)
{
  int r;

  if (fleece_check_new_name ("bitmap", name) == -1)
    return -1;
  pthread_mutex_lock (&fl->admin_lock);
  r = add_locked (fl, name, disabled);
  if (r == 0)
    r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  return r;
}

static int
remove_locked (struct fleece *fl, const char *name)
{
  struct bitmap *bm = lookup (fl, name);
  size_t i;

  if (bm == NULL)
    return -1;
  for (i = 0; fl->bitmaps[i] != bm; i++)
    ;
  fl->bitmaps[i] = fl->bitmaps[--fl->nbitmaps];
  if (bm->enabled && !bm->frozen && republish (fl) == -1) {
    fl->bitmaps[fl->nbitmaps++] = bm;
    return -1;
  }
  if (fl->checkpoint_active == bm)
    fl->checkpoint_active = NULL;
  bitmap_free (bm);             /* no writer can hold it: see above */
  return 0;
}

int
fleece_bitmap_remove (struct fleece *fl, const char *name)
{
  int r;

  pthread_mutex_lock (&fl->admin_lock);
  r = remove_locked (fl, name);
  if (r == 0)
    r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  return r;
}

/* Clearing drains the writes in flight first, so that a write racing
 * the clear is either forgotten with the rest or recorded afterwards.
 */
int
fleece_bitmap_clear (struct fleece *fl, const char *name)
{
  struct bitmap *bm;
  uint64_t i;
  int r = -1;

  pthread_mutex_lock (&fl->admin_lock);
  bm = lookup (fl, name);
  if (bm && check_not_frozen (bm, "bitmap-clear") == 0) {
    gate_close (&fl->gate);
    for (i = 0; i < bm->nwords; i++)
      atomic_store_explicit (&bm->bits[i], 0, memory_order_relaxed);
    gate_open (&fl->gate);
    /* Empty and recording from now on: nothing left to distrust. */
    bm->inconsistent = false;
    bm->inconsistent_reason[0] = '\0';
    r = meta_image (fl);
  }
  pthread_mutex_unlock (&fl->admin_lock);
  return r;
}

static int
set_enabled (struct fleece *fl, const char *name, bool enabled)
{
  struct bitmap *bm;
  int r = -1;

  pthread_mutex_lock (&fl->admin_lock);
  bm = lookup (fl, name);
  if (bm && check_not_frozen (bm, enabled ? "bitmap-enable"
                              : "bitmap-disable") == 0) {
    bool was = bm->enabled;
    bm->enabled = enabled;
    r = was == enabled ? 0 : republish (fl);
    if (r == -1)
      bm->enabled = was;
    else if (was != enabled)
      r = meta_image (fl);
  }
  pthread_mutex_unlock (&fl->admin_lock);
  return r;
}

int
fleece_bitmap_enable (struct fleece *fl, const char *name)
{
  return set_enabled (fl, name, true);
}

int
fleece_bitmap_disable (struct fleece *fl, const char *name)
{
  return set_enabled (fl, name, false);
}

int
fleece_bitmap_merge (struct fleece *fl, const char *target,
                     const char *const *sources, size_t n)
{
  struct bitmap *t, *src;
  uint64_t w;
  size_t i;
  bool hold;
  int r = -1;

  pthread_mutex_lock (&fl->admin_lock);
  t = lookup (fl, target);
  if (t == NULL || check_not_frozen (t, "bitmap-merge") == -1)
    goto out;
  for (i = 0; i < n; i++)       /* check them all before changing t */
    if (lookup (fl, sources[i]) == NULL)
      goto out;
  /* Persistent, recording target: a writer that finds its bits set by
   * the merge records no intent, so the merge is stable before any
   * writer can see it.  Merges are rare; the gate stays closed across
   * the image.
   */
  hold = fl->meta.on && t->enabled;
  if (hold)
    gate_close (&fl->gate);
  for (i = 0; i < n; i++) {
    src = find_bitmap (fl, sources[i]);
    for (w = 0; src != t && w < t->nwords; w++) {
      uint64_t v = atomic_load_explicit (&src->bits[w], memory_order_relaxed);
      if (v)
        atomic_fetch_or_explicit (&t->bits[w], v, memory_order_relaxed);
    }
  }
  r = meta_image (fl);
  if (hold)
    gate_open (&fl->gate);
 out:
  pthread_mutex_unlock (&fl->admin_lock);
  return r;
}

/* ---- checkpoints ---- */

int
fleece_checkpoint_create (struct fleece *fl, const char *name)
{
  struct fleece_snap *s;
  struct bitmap *bm, *prev;
  struct bitmap_set *set, *old;
  uint64_t t0;
  int r;

  if (fleece_check_new_name ("checkpoint", name) == -1)
    return -1;
  pthread_mutex_lock (&fl->admin_lock);
  if (find_bitmap (fl, name)) {
    fl_error (EEXIST, "checkpoint '%s': a bitmap of that name already "
              "exists", name);
    goto out_unlock;
  }
  s = snap_prepare (fl, name);
  if (s == NULL)
    goto out_unlock;
  bm = bitmap_new (fl, name, true);
  prev = fl->checkpoint_active;
  if (bm == NULL || build_set (fl, prev, bm, &set) == -1) {
    bitmap_free (bm);
    snap_discard (s);
    goto out_unlock;
  }
  bm->checkpoint = true;
  fl->bitmaps[fl->nbitmaps++] = bm;

  t0 = monotonic_ns ();
  gate_close (&fl->gate);
  snap_publish (fl, s);
  old = swap_set (fl, set);
  gate_open (&fl->gate);
  snap_record_drain (fl, monotonic_ns () - t0);

  if (prev) {
    prev->enabled = false;
    prev->frozen = true;
    strcpy (prev->frozen_by, name);
  }
  fl->checkpoint_active = bm;
  snap_before_image ();
  /* The frozen bitmap's bits are final: the image keeps them. */
  r = meta_image (fl);
  pthread_mutex_unlock (&fl->admin_lock);
  free (old);
  fl_debug ("checkpoint '%s' created%s%s", name, prev ? ", froze bitmap "
            : "", prev ? prev->name : "");
  return r;

 out_unlock:
  pthread_mutex_unlock (&fl->admin_lock);
  return -1;
}

/* ---- introspection ---- */

static uint64_t
count_bits (const struct bitmap *bm)
{
  uint64_t i, n = 0;

  for (i = 0; i < bm->nwords; i++)
    n += __builtin_popcountll (atomic_load_explicit (&bm->bits[i],
                                                     memory_order_relaxed));
  return n;
}

static void
fill_info (struct fleece *fl, const struct bitmap *bm,
           struct fleece_bitmap_info *info)
{
  memset (info, 0, sizeof *info);
  strcpy (info->name, bm->name);
  strcpy (info->frozen_by, bm->frozen_by);
  info->granularity = fl->cluster_size;
  info->count = count_bits (bm);
  info->bit_count = fl->nclusters;
  info->created = bm->created;
  info->enabled = bm->enabled;
  info->frozen = bm->frozen;
  info->inconsistent = bm->inconsistent;
  info->checkpoint = bm->checkpoint;
  strcpy (info->inconsistent_reason, bm->inconsistent_reason);
}

int
fleece_list_bitmaps (struct fleece *fl,
                     void (*fn) (void *, const struct fleece_bitmap_info *),
                     void *opaque)
{
  struct fleece_bitmap_info info;
  size_t i;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->admin_lock);
  for (i = 0; i < fl->nbitmaps; i++) {
    fill_info (fl, fl->bitmaps[i], &info);
    fn (opaque, &info);
  }
  return fl->nbitmaps;
}

int
fleece_bitmap_info (struct fleece *fl, const char *name,
                    struct fleece_bitmap_info *info)
{
  struct bitmap *bm;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->admin_lock);
  bm = lookup (fl, name);
  if (bm == NULL)
    return -1;
  fill_info (fl, bm, info);
  return 0;
}

int
fleece_bitmap_test (struct fleece *fl, const char *name, uint64_t c)
{
  struct bitmap *bm;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&fl->admin_lock);
  bm = lookup (fl, name);
  if (bm == NULL)
    return -1;
  if (c >= fl->nclusters)
    return fl_error (EINVAL, "bitmap '%s': cluster %" PRIu64 " is beyond "
                     "the end", name, c);
  return (atomic_load (&bm->bits[c / 64]) >> (c % 64)) & 1;
}

/* ---- the export ---- */

static void
fill_header (struct fleece *fl, const struct bitmap *bm, uint64_t dirty,
             struct fleece_bitmap_header *h)
{
  memset (h, 0, sizeof *h);
  memcpy (h->magic, FLEECE_BITMAP_MAGIC, 8);
  h->version = htole32 (FLEECE_BITMAP_VERSION);
  h->flags = htole32 ((bm->enabled ? FLEECE_BM_ENABLED : 0) |
                      (bm->frozen ? FLEECE_BM_FROZEN : 0) |
                      (bm->inconsistent ? FLEECE_BM_INCONSISTENT : 0));
  h->granularity = htole32 (fl->cluster_size);
  h->header_size = htole32 (FLEECE_BITMAP_HEADER_SIZE);
  h->disk_size = htole64 (fl->disk.size);
  h->bit_count = htole64 (fl->nclusters);
  h->dirty_count = htole64 (dirty);
  strcpy (h->name, bm->name);
  strcpy (h->frozen_by, bm->frozen_by);
  h->checksum = htole64 (XXH64 (h, offsetof (struct fleece_bitmap_header,
                                             checksum), 0));
}

struct fleece_bitmap_export *
fleece_bitmap_export_open (struct fleece *fl, const char *name)
{
  struct fleece_bitmap_export *bx = NULL;
  struct bitmap *bm;
  uint64_t i, dirty = 0, bytes = (fl->nclusters + 7) / 8;

  pthread_mutex_lock (&fl->admin_lock);
  bm = lookup (fl, name);
  if (bm == NULL)
    goto out;
  bx = calloc (1, sizeof *bx);
  if (bx)
    bx->size = (FLEECE_BITMAP_HEADER_SIZE + bytes + 4095) & ~UINT64_C (4095);
  if (bx == NULL || (bx->data = calloc (1, bx->size)) == NULL) {
    free (bx);
    bx = NULL;
    fl_error (ENOMEM, "bitmap '%s': out of memory for its export", name);
    goto out;
  }
  for (i = 0; i < bm->nwords; i++) {
    uint64_t v = atomic_load_explicit (&bm->bits[i], memory_order_relaxed);
    uint64_t le = htole64 (v);
    uint64_t n = bytes - i * 8 < 8 ? bytes - i * 8 : 8;
    dirty += __builtin_popcountll (v);
    memcpy (bx->data + FLEECE_BITMAP_HEADER_SIZE + i * 8, &le, n);
  }
  fill_header (fl, bm, dirty, (void *) bx->data);
 out:
  pthread_mutex_unlock (&fl->admin_lock);
  return bx;
}

uint64_t
fleece_bitmap_export_size (const struct fleece_bitmap_export *bx)
{
  return bx->size;
}

int
fleece_bitmap_export_pread (const struct fleece_bitmap_export *bx,
                            void *buf, uint32_t count, uint64_t offset)
{
  if (offset + count > bx->size || offset + count < offset)
    return fl_error (EINVAL, "bitmap export: read beyond the end");
  memcpy (buf, bx->data + offset, count);
  return 0;
}

void
fleece_bitmap_export_close (struct fleece_bitmap_export *bx)
{
  if (bx) {
    free (bx->data);
    free (bx);
  }
}

/* ---- persistence (meta.c) ---- */

#define IMG_ENABLED       1u
#define IMG_FROZEN        2u
#define IMG_INCONSISTENT  4u
#define IMG_CHECKPOINT    8u
#define IMG_ACTIVE       16u

uint32_t
bitmap_count_all (struct fleece *fl)
{
  return fl->nbitmaps;
}

void
bitmap_image_put (struct fleece *fl, struct wbuf *b)
{
  size_t i;

  for (i = 0; i < fl->nbitmaps; i++) {
    struct bitmap *bm = fl->bitmaps[i];
    wb_u32 (b, (bm->enabled ? IMG_ENABLED : 0) |
            (bm->frozen ? IMG_FROZEN : 0) |
            (bm->inconsistent ? IMG_INCONSISTENT : 0) |
            (bm->checkpoint ? IMG_CHECKPOINT : 0) |
            (fl->checkpoint_active == bm ? IMG_ACTIVE : 0));
    wb_u32 (b, 0);
    wb_u64 (b, (uint64_t) bm->created);
    wb_str (b, bm->name);
    wb_str (b, bm->frozen_by);
    wb_str (b, bm->inconsistent_reason);
    wb_words (b, bm->bits, bm->nwords);
  }
}

/* Load n bitmaps.  A bitmap that was recording at a crash needs nothing
 * more: the DIRTY records that follow the image (meta-load.c) add every
 * write since.
 */
int
bitmap_image_get (struct fleece *fl, struct rbuf *b, uint32_t n)
{
  uint32_t i;

  if (n > FLEECE_BITMAPS_MAX)
    return fl_error (EINVAL, "store: %s: %" PRIu32 " bitmaps in the image: "
                     "the metadata is damaged", fl->store.path, n);
  for (i = 0; i < n; i++) {
    char name[FLEECE_SNAPSHOT_NAME_MAX + 1];
    uint32_t flags = rb_u32 (b);
    int64_t created;
    struct bitmap *bm;

    rb_u32 (b);
    created = (int64_t) rb_u64 (b);
    rb_str (b, name, FLEECE_SNAPSHOT_NAME_MAX);
    if (b->bad || (flags & ~31u) || fleece_check_name ("bitmap", name) == -1
        || find_bitmap (fl, name) ||
        ((flags & IMG_ACTIVE) && fl->checkpoint_active))
      return fl_error (EINVAL, "store: %s: bitmap %" PRIu32 " of the image "
                       "is not valid: the metadata is damaged",
                       fl->store.path, i);
    bm = bitmap_new (fl, name, flags & IMG_ENABLED);
    if (bm == NULL)
      return -1;
    fl->bitmaps[fl->nbitmaps++] = bm;
    bm->created = created;
    bm->frozen = flags & IMG_FROZEN;
    bm->inconsistent = flags & IMG_INCONSISTENT;
    bm->checkpoint = flags & IMG_CHECKPOINT;
    if (flags & IMG_ACTIVE)
      fl->checkpoint_active = bm;
    rb_str (b, bm->frozen_by, FLEECE_SNAPSHOT_NAME_MAX);
    rb_str (b, bm->inconsistent_reason, sizeof bm->inconsistent_reason - 1);
    rb_words (b, bm->bits, bm->nwords);
    if (b->bad || (fl->nclusters % 64 &&
                   atomic_load (&bm->bits[bm->nwords - 1]) >>
                   (fl->nclusters % 64)))
      return fl_error (EINVAL, "store: %s: bitmap '%s' of the image is "
                       "truncated: the metadata is damaged", fl->store.path,
                       name);
  }
  {
    struct bitmap_set *set;
    if (build_set (fl, NULL, NULL, &set) == -1)
      return -1;
    atomic_store (&fl->dirty, set);
  }
  return 0;
}

/* At fleece_close. */
void
bitmap_free_all (struct fleece *fl)
{
  size_t i;

  for (i = 0; i < fl->nbitmaps; i++)
    bitmap_free (fl->bitmaps[i]);
  fl->nbitmaps = 0;
  free (atomic_load (&fl->dirty));
}
