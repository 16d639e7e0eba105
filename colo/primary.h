/* fleece-colod: the primary (primary.c). */

#ifndef COLO_PRIMARY_H
#define COLO_PRIMARY_H

/* fleece-colod primary: run until stopped; an exit status. */
extern int colod_run_primary (void);

#endif /* COLO_PRIMARY_H */
