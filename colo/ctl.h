/* fleece-colod: the control socket, its service and its clients
 * (ctl.c).
 */

#ifndef COLO_CTL_H
#define COLO_CTL_H

#include <stdbool.h>

#include <jansson.h>

/* Start the control socket's thread on path; stop it, disconnecting
 * every client (it sets colod.stop).
 */
extern int colod_control_start (const char *path);
extern void colod_control_stop (void);

/* The client subcommands (status, checkpoint, promote) on
 * colod.opt.control: one request, its reply printed (as "key: value"
 * lines if human); args is consumed.  An exit status.
 */
extern int colod_ctl_client (const char *cmd, json_t *args, bool human);
/* events: subscribe and print every event line until the daemon goes. */
extern int colod_ctl_events (void);

#endif /* COLO_CTL_H */
