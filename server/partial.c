/* Partly copied clusters: the per-block state of sub-cluster
 * copy-before-write (cbw.c, subcluster=true).
 *
 * A write that covers only some blocks of a cluster copies only those
 * blocks.  Until every block of the cluster is copied, the cluster has no
 * entry in the copy map and cgen[c] keeps its old value lo; instead it
 * has one entry here: (cluster, lo, hi, slot) and two block bitmaps,
 * "copied" and "zero" (copied, all zero, not written to the slot).  It
 * serves the snapshots with lo < g <= hi: a copied block from the slot
 * (or as zeroes), any other block from the live disk, which nobody has
 * written since the snapshot was created (a write to it would have
 * copied it first).  When the last block is copied the entry becomes an
 * ordinary copy (copymap.c), cgen[c] = hi is published and the entry is
 * removed, in that order, so that a reader always finds one of the two.
 *
 * Only clusters partly copied have an entry, so memory is bounded by
 * them, not by the disk: an entry is a 24-byte header plus two bits per
 * block rounded up to 64-bit words (40 bytes with 64 KiB clusters and
 * 4 KiB blocks), plus one bucket pointer; with a persistent store one
 * more word, the sequence number of the entry's newest PARTIAL record
 * (cbw.c).  docs/design.md gives the measured figures.  An entry of an
 * older generation is finished (its missing blocks copied) by the next
 * write to its cluster, or dropped once no snapshot needs it (snapshot
 * deletion).
 *
 * Locking.  Entries change only under the cluster's range lock (cbw.c,
 * or snapshot deletion with snaps_lock held for writing, which excludes
 * copiers); each shard's mutex is a leaf lock that also guards the
 * entries' bits, so that readers, which take no range lock, copy an
 * entry out whole.  The count of entries is an atomic so that readers
 * skip the lookup while there are none.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct partial {
  struct partial *next;         /* in its bucket */
  struct partial_view v;
};

#define PARTIAL_SHARD(pt, c) (&(pt)->shard[(c) % PARTIAL_SHARDS])

/* The words of an entry: the two bitmaps, then the seq word of a
 * persistent store (partial_view.seq).
 */
static size_t
entry_words (const struct partials *pt)
{
  return 2 * pt->words + pt->has_seq;
}

static uint64_t *
seq_word (const struct partials *pt, struct partial *p)
{
  return pt->has_seq ? &p->v.bits[2 * pt->words] : NULL;
}

static void
set_seq (const struct partials *pt, struct partial *p, uint64_t seq)
{
  uint64_t *w = seq_word (pt, p);

  if (w)
    *w = seq;
}

/* Copy entry p out whole into out (shard lock held). */
static void
view_out (const struct partials *pt, struct partial *p,
          struct partial_view *out)
{
  uint64_t *w = seq_word (pt, p);

  memcpy (out, &p->v, offsetof (struct partial_view, bits) +
          2 * pt->words * sizeof (uint64_t));
  memset (out->bits + 2 * pt->words, 0,
          (2 * PARTIAL_WORDS_MAX + 1 - 2 * pt->words) * sizeof (uint64_t));
  out->seq = w ? *w : 0;
}

void
partial_init (struct partials *pt, uint32_t blocks, bool has_seq)
{
  int i;

  memset (pt, 0, sizeof *pt);
  pt->blocks = blocks;
  pt->words = (blocks + 63) / 64;
  pt->has_seq = has_seq;
  assert (pt->words <= PARTIAL_WORDS_MAX);
  for (i = 0; i < PARTIAL_SHARDS; i++)
    pthread_mutex_init (&pt->shard[i].lock, NULL);
}

/* fleece_close: free every entry (the slots go with the store). */
void
partial_destroy (struct partials *pt)
{
  int i;
  uint32_t b;

  for (i = 0; i < PARTIAL_SHARDS; i++) {
    struct partial_shard *sh = &pt->shard[i];
    for (b = 0; b < sh->nbuckets; b++)
      while (sh->bucket[b]) {
        struct partial *p = sh->bucket[b];
        sh->bucket[b] = p->next;
        free (p);
      }
    free (sh->bucket);
    pthread_mutex_destroy (&sh->lock);
  }
}

static uint32_t
bucket_of (const struct partial_shard *sh, uint32_t cluster)
{
  uint32_t x = cluster / PARTIAL_SHARDS;

  x *= 0x9e3779b1;
  return (x ^ (x >> 15)) & (sh->nbuckets - 1);
}

/* The entry of cluster, shard lock held; prev receives the link to it. */
static struct partial *
find_locked (struct partial_shard *sh, uint32_t cluster,
             struct partial ***prev)
{
  struct partial **pp, *p;

  if (sh->nbuckets == 0)
    return NULL;
  for (pp = &sh->bucket[bucket_of (sh, cluster)]; (p = *pp) != NULL;
       pp = &p->next)
    if (p->v.cluster == cluster) {
      if (prev)
        *prev = pp;
      return p;
    }
  return NULL;
}

bool
partial_find (struct partials *pt, uint32_t cluster, struct partial_view *out)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, cluster);
  struct partial *p;

  if (atomic_load_explicit (&pt->n, memory_order_acquire) == 0)
    return false;
  pthread_mutex_lock (&sh->lock);
  p = find_locked (sh, cluster, NULL);
  if (p)
    view_out (pt, p, out);      /* an entry is allocated to its size */
  pthread_mutex_unlock (&sh->lock);
  return p != NULL;
}

/* Double the buckets of a shard whose chains grew long. */
static void
grow_locked (struct partial_shard *sh)
{
  uint32_t n = sh->nbuckets ? sh->nbuckets * 2 : 16, b;
  struct partial **nb = calloc (n, sizeof *nb), *p;
  struct partial_shard tmp = { .bucket = nb, .nbuckets = n };

  if (nb == NULL)
    return;                     /* keep the longer chains */
  for (b = 0; b < sh->nbuckets; b++)
    while ((p = sh->bucket[b]) != NULL) {
      uint32_t i = bucket_of (&tmp, p->v.cluster);
      sh->bucket[b] = p->next;
      p->next = nb[i];
      nb[i] = p;
    }
  free (sh->bucket);
  sh->bucket = nb;
  sh->nbuckets = n;
}

/* A new entry, no block copied yet. */
int
partial_add (struct partials *pt, uint32_t cluster, uint32_t lo, uint32_t hi)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, cluster);
  size_t size = offsetof (struct partial, v.bits) +
    entry_words (pt) * sizeof (uint64_t);
  struct partial *p = calloc (1, size);
  uint32_t i;

  if (p == NULL)
    return fl_error (ENOMEM, "copy-before-write: out of memory for the "
                     "blocks of cluster %" PRIu32, cluster);
  p->v.cluster = cluster;
  p->v.lo = lo;
  p->v.hi = hi;
  p->v.slot = NO_SLOT;
  pthread_mutex_lock (&sh->lock);
  assert (find_locked (sh, cluster, NULL) == NULL);
  if (sh->n >= sh->nbuckets)
    grow_locked (sh);
  if (sh->nbuckets == 0) {
    pthread_mutex_unlock (&sh->lock);
    free (p);
    return fl_error (ENOMEM, "copy-before-write: out of memory for the "
                     "blocks of cluster %" PRIu32, cluster);
  }
  i = bucket_of (sh, cluster);
  p->next = sh->bucket[i];
  sh->bucket[i] = p;
  sh->n++;
  pthread_mutex_unlock (&sh->lock);
  atomic_fetch_add_explicit (&pt->n, 1, memory_order_release);
  return 0;
}

/* Blocks [first, first+n) of cluster are copied (zero: all zero, not
 * written), into slot if it was NO_SLOT.  Release order through the
 * shard lock: a reader that finds the bits set finds the data.
 */
void
partial_set (struct partials *pt, uint32_t cluster, uint32_t first,
             uint32_t n, bool zero, uint32_t slot)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, cluster);
  struct partial *p;
  uint32_t b;

  pthread_mutex_lock (&sh->lock);
  p = find_locked (sh, cluster, NULL);
  assert (p != NULL);
  if (slot != NO_SLOT)
    p->v.slot = slot;
  set_seq (pt, p, PARTIAL_UNRECORDED);
  for (b = first; b < first + n; b++) {
    p->v.bits[b / 64] |= UINT64_C (1) << (b % 64);
    if (zero)
      p->v.bits[pt->words + b / 64] |= UINT64_C (1) << (b % 64);
  }
  pthread_mutex_unlock (&sh->lock);
}

void
partial_recorded (struct partials *pt, uint32_t cluster, uint64_t seq)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, cluster);
  struct partial *p;

  pthread_mutex_lock (&sh->lock);
  p = find_locked (sh, cluster, NULL);
  if (p)
    set_seq (pt, p, seq);
  pthread_mutex_unlock (&sh->lock);
}

/* Loading (meta-load.c), single-threaded: v's bits replace those of
 * cluster's entry, which is added if there is none.
 */
int
partial_load (struct partials *pt, const struct partial_view *v)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, v->cluster);
  struct partial *p;

  p = find_locked (sh, v->cluster, NULL);
  if (p == NULL) {
    if (partial_add (pt, v->cluster, v->lo, v->hi) == -1)
      return -1;
    p = find_locked (sh, v->cluster, NULL);
  }
  memcpy (&p->v.lo, &v->lo, offsetof (struct partial_view, bits) -
          offsetof (struct partial_view, lo) +
          2 * pt->words * sizeof (uint64_t));
  set_seq (pt, p, v->seq);
  return 0;
}

int
partial_foreach (struct partials *pt,
                 int (*fn) (void *, const struct partial_view *),
                 void *opaque)
{
  struct partial_view v;
  struct partial *p;
  uint32_t b;
  int i, r = 0;

  for (i = 0; i < PARTIAL_SHARDS && r == 0; i++) {
    struct partial_shard *sh = &pt->shard[i];
    pthread_mutex_lock (&sh->lock);
    for (b = 0; b < sh->nbuckets && r == 0; b++)
      for (p = sh->bucket[b]; p && r == 0; p = p->next) {
        view_out (pt, p, &v);
        r = fn (opaque, &v);
      }
    pthread_mutex_unlock (&sh->lock);
  }
  return r;
}

void
partial_remove (struct partials *pt, uint32_t cluster)
{
  struct partial_shard *sh = PARTIAL_SHARD (pt, cluster);
  struct partial *p, **prev = NULL;

  pthread_mutex_lock (&sh->lock);
  p = find_locked (sh, cluster, &prev);
  if (p) {
    *prev = p->next;
    sh->n--;
  }
  pthread_mutex_unlock (&sh->lock);
  if (p) {
    atomic_fetch_sub_explicit (&pt->n, 1, memory_order_relaxed);
    free (p);
  }
}

/* Remove the entries for which keep returns false, then pass each to
 * drop, with no lock held (drop frees slots, which punches the store).
 * The caller excludes copiers (snaps_lock held for writing).
 */
void
partial_prune (struct partials *pt,
               bool (*keep) (void *, const struct partial_view *),
               void (*drop) (void *, const struct partial_view *),
               void *opaque)
{
  struct partial *gone = NULL, *p;
  int i;
  uint32_t b;

  for (i = 0; i < PARTIAL_SHARDS; i++) {
    struct partial_shard *sh = &pt->shard[i];
    pthread_mutex_lock (&sh->lock);
    for (b = 0; b < sh->nbuckets; b++) {
      struct partial **pp = &sh->bucket[b];
      while ((p = *pp) != NULL) {
        if (keep (opaque, &p->v)) {
          pp = &p->next;
          continue;
        }
        *pp = p->next;
        sh->n--;
        atomic_fetch_sub_explicit (&pt->n, 1, memory_order_relaxed);
        p->next = gone;
        gone = p;
      }
    }
    pthread_mutex_unlock (&sh->lock);
  }
  while ((p = gone) != NULL) {
    struct partial_view v;
    gone = p->next;
    view_out (pt, p, &v);
    drop (opaque, &v);
    free (p);
  }
}

/* Is block b of v copied (and all zero)? */
bool
partial_copied (const struct partials *pt, const struct partial_view *v,
                uint32_t b)
{
  (void) pt;
  return v->bits[b / 64] >> (b % 64) & 1;
}

bool
partial_zero (const struct partials *pt, const struct partial_view *v,
              uint32_t b)
{
  return v->bits[pt->words + b / 64] >> (b % 64) & 1;
}
