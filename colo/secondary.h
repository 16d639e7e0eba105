/* fleece-colod: the secondary (secondary.c). */

#ifndef COLO_SECONDARY_H
#define COLO_SECONDARY_H

/* fleece-colod secondary: run until stopped; an exit status. */
extern int colod_run_secondary (void);

#endif /* COLO_SECONDARY_H */
