/* Fleece: a growable array of any type (header only).
 *
 * DEFINE_VECTOR_TYPE (name, type) defines
 *
 *   typedef struct { type *ptr; size_t len, cap; } name;
 *
 * with name_reserve (v, n) (room for n more elements), name_append (v,
 * elem) and name_reset (v) (free and empty).  An empty vector is all
 * zeroes, so it needs no constructor.  The capacity doubles, so n
 * appends cost O(n).  Growing returns -1 with errno set (ENOMEM, or
 * EOVERFLOW when the size would not fit a size_t) and leaves the vector
 * as it was: a caller that must not die (a libnbd callback) reports it,
 * another dies with its own message.
 */

#ifndef FLEECE_COMMON_VECTOR_H
#define FLEECE_COMMON_VECTOR_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_VECTOR_TYPE(name, type)                                  \
  typedef struct {                                                      \
    type *ptr;                                                          \
    size_t len, cap;                                                    \
  } name;                                                               \
                                                                        \
  static inline __attribute__ ((unused)) int                            \
  name##_reserve (name *v, size_t n)                                    \
  {                                                                     \
    size_t cap = v->cap ? v->cap : 16;                                  \
    type *p;                                                            \
                                                                        \
    if (n > SIZE_MAX / sizeof (type) - v->len) {                        \
      errno = EOVERFLOW;                                                \
      return -1;                                                        \
    }                                                                   \
    if (v->len + n <= v->cap)                                           \
      return 0;                                                         \
    while (cap < v->len + n)                                            \
      cap = cap > SIZE_MAX / sizeof (type) / 2 ? v->len + n : cap * 2;  \
    p = realloc (v->ptr, cap * sizeof (type));                          \
    if (p == NULL)                                                      \
      return -1;                                                        \
    v->ptr = p;                                                         \
    v->cap = cap;                                                       \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline __attribute__ ((unused)) int                            \
  name##_append (name *v, type elem)                                    \
  {                                                                     \
    if (name##_reserve (v, 1) == -1)                                    \
      return -1;                                                        \
    v->ptr[v->len++] = elem;                                            \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline __attribute__ ((unused)) void                           \
  name##_reset (name *v)                                                \
  {                                                                     \
    free (v->ptr);                                                      \
    v->ptr = NULL;                                                      \
    v->len = v->cap = 0;                                                \
  }

#endif /* FLEECE_COMMON_VECTOR_H */
