/* Fleece: little-endian fields at any alignment (header only): colo's
 * on-disk formats (journal, state files) and the tests that read the
 * store's bytes themselves (crash-writer.c, fuzz-store.c).
 */

#ifndef FLEECE_COMMON_LE_H
#define FLEECE_COMMON_LE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline void put_u32 (unsigned char *p, uint32_t v)
{ v = htole32 (v); memcpy (p, &v, 4); }
static inline void put_u64 (unsigned char *p, uint64_t v)
{ v = htole64 (v); memcpy (p, &v, 8); }
static inline uint32_t get_u32 (const unsigned char *p)
{ uint32_t v; memcpy (&v, p, 4); return le32toh (v); }
static inline uint64_t get_u64 (const unsigned char *p)
{ uint64_t v; memcpy (&v, p, 8); return le64toh (v); }

#endif /* FLEECE_COMMON_LE_H */
