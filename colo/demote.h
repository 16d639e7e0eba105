/* fleece-colod: demote (demote.c). */

#ifndef COLO_DEMOTE_H
#define COLO_DEMOTE_H

/* fleece-colod demote: record this former primary's diverged clusters,
 * every disk's of its group, for the secondary it becomes; an exit
 * status.
 */
extern int colod_demote (void);

#endif /* COLO_DEMOTE_H */
