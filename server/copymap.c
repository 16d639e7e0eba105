/* The copy map: for each copied cluster, where its old data is.
 *
 * A cluster may have several copies, one per generation range: the copy
 * made before the first write in generation hi serves the snapshots
 * created in (lo, hi], lo being the generation of the write before it.
 * A lookup for (cluster, g) finds the copy whose range holds g.
 *
 * Memory is what docs/design.md budgets: a copy is 16 bytes and the tables are
 * open-addressed with linear probing at most 3/4 full, so about 21 bytes
 * per copied cluster, and nothing for clusters never copied.  The map is
 * split in COPYMAP_SHARDS shards by cluster number, each with its own
 * mutex, so concurrent snapshot readers and copiers rarely meet.  A
 * cluster's copies are all in one shard; removal shifts entries back
 * rather than leaving tombstones, so probe chains stay short.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define EMPTY UINT32_MAX

static uint32_t
hash (uint32_t x)
{
  x /= COPYMAP_SHARDS;
  x ^= x >> 16;
  x *= 0x85ebca6b;
  x ^= x >> 13;
  x *= 0xc2b2ae35;
  x ^= x >> 16;
  return x;
}

static struct copymap_shard *
shard_of (struct copymap *m, uint32_t cluster)
{
  return &m->shard[cluster % COPYMAP_SHARDS];
}

void
copymap_init (struct copymap *m)
{
  int i;

  memset (m, 0, sizeof *m);
  for (i = 0; i < COPYMAP_SHARDS; i++)
    pthread_mutex_init (&m->shard[i].lock, NULL);
}

void
copymap_destroy (struct copymap *m)
{
  int i;

  for (i = 0; i < COPYMAP_SHARDS; i++) {
    pthread_mutex_destroy (&m->shard[i].lock);
    free (m->shard[i].tab);
  }
}

static void
place (struct copymap_shard *sh, const struct copy *c)
{
  uint32_t mask = sh->cap - 1, i = hash (c->cluster) & mask;

  while (sh->tab[i].cluster != EMPTY)
    i = (i + 1) & mask;
  sh->tab[i] = *c;
  sh->n++;
}

static int
resize (struct copymap_shard *sh, uint32_t cap)
{
  struct copy *old = sh->tab;
  uint32_t i, oldcap = sh->cap;

  sh->tab = malloc ((size_t) cap * sizeof *sh->tab);
  if (sh->tab == NULL) {
    sh->tab = old;
    return fl_error (ENOMEM, "copymap: malloc: out of memory");
  }
  for (i = 0; i < cap; i++)
    sh->tab[i].cluster = EMPTY;
  sh->cap = cap;
  sh->n = 0;
  for (i = 0; i < oldcap; i++)
    if (old[i].cluster != EMPTY)
      place (sh, &old[i]);
  free (old);
  return 0;
}

int
copymap_insert (struct copymap *m, const struct copy *c)
{
  struct copymap_shard *sh = shard_of (m, c->cluster);

  assert (c->cluster != EMPTY && c->lo < c->hi);
  pthread_mutex_lock (&sh->lock);
  if ((uint64_t) (sh->n + 1) * 4 > (uint64_t) sh->cap * 3 &&
      resize (sh, sh->cap ? sh->cap * 2 : 64) == -1) {
    pthread_mutex_unlock (&sh->lock);
    return -1;
  }
  place (sh, c);
  pthread_mutex_unlock (&sh->lock);
  return 0;
}

bool
copymap_overlap (struct copymap *m, uint32_t cluster, uint32_t lo,
                 uint32_t hi, struct copy *out)
{
  struct copymap_shard *sh = shard_of (m, cluster);
  bool found = false;
  uint32_t mask, i;

  pthread_mutex_lock (&sh->lock);
  if (sh->cap > 0) {
    mask = sh->cap - 1;
    for (i = hash (cluster) & mask; sh->tab[i].cluster != EMPTY;
         i = (i + 1) & mask) {
      const struct copy *c = &sh->tab[i];
      if (c->cluster == cluster && c->lo < hi && lo < c->hi) {
        *out = *c;
        found = true;
        break;
      }
    }
  }
  pthread_mutex_unlock (&sh->lock);
  return found;
}

/* The copy serving generation gen (>= 1): the one whose range meets
 * (gen - 1, gen].
 */
bool
copymap_lookup (struct copymap *m, uint32_t cluster, uint32_t gen,
                struct copy *out)
{
  return copymap_overlap (m, cluster, gen - 1, gen, out);
}

/* Remove tab[i] and shift back the entries of its probe chain that would
 * otherwise become unreachable.
 */
static void
remove_at (struct copymap_shard *sh, uint32_t i)
{
  uint32_t mask = sh->cap - 1, j = i, home;

  for (;;) {
    j = (j + 1) & mask;
    if (sh->tab[j].cluster == EMPTY)
      break;
    home = hash (sh->tab[j].cluster) & mask;
    if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
      continue;                 /* still reachable from its home */
    sh->tab[i] = sh->tab[j];
    i = j;
  }
  sh->tab[i].cluster = EMPTY;
  sh->n--;
}

static void
prune_shard (struct copymap_shard *sh, uint32_t cluster,
             bool (*keep) (void *, const struct copy *),
             void (*drop) (void *, const struct copy *), void *opaque)
{
  uint32_t i, steps, mask;

  if (sh->cap == 0)
    return;
  mask = sh->cap - 1;
  i = cluster == EMPTY ? 0 : hash (cluster) & mask;
  for (steps = 0; steps < sh->cap; ) {
    struct copy c = sh->tab[i];
    if (c.cluster == EMPTY) {
      if (cluster != EMPTY)
        return;                 /* end of the probe chain */
    }
    else if ((cluster == EMPTY || c.cluster == cluster) &&
             !keep (opaque, &c)) {
      remove_at (sh, i);
      drop (opaque, &c);
      continue;                 /* tab[i] now holds a shifted entry */
    }
    i = (i + 1) & mask;
    steps++;
  }
}

void
copymap_prune (struct copymap *m, uint32_t cluster,
               bool (*keep) (void *, const struct copy *),
               void (*drop) (void *, const struct copy *), void *opaque)
{
  int k;

  for (k = 0; k < COPYMAP_SHARDS; k++) {
    struct copymap_shard *sh = &m->shard[k];
    if (cluster != EMPTY && sh != shard_of (m, cluster))
      continue;
    pthread_mutex_lock (&sh->lock);
    prune_shard (sh, cluster, keep, drop, opaque);
    pthread_mutex_unlock (&sh->lock);
  }
}

int
copymap_foreach (struct copymap *m, int (*fn) (void *, const struct copy *),
                 void *opaque)
{
  uint32_t i;
  int k, r = 0;

  for (k = 0; k < COPYMAP_SHARDS && r == 0; k++) {
    struct copymap_shard *sh = &m->shard[k];
    pthread_mutex_lock (&sh->lock);
    for (i = 0; i < sh->cap && r == 0; i++)
      if (sh->tab[i].cluster != EMPTY)
        r = fn (opaque, &sh->tab[i]);
    pthread_mutex_unlock (&sh->lock);
  }
  return r;
}

uint64_t
copymap_count (struct copymap *m)
{
  uint64_t n = 0;
  int k;

  for (k = 0; k < COPYMAP_SHARDS; k++) {
    pthread_mutex_lock (&m->shard[k].lock);
    n += m->shard[k].n;
    pthread_mutex_unlock (&m->shard[k].lock);
  }
  return n;
}
