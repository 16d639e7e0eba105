/* fleece-colod: what the daemon tells systemd (notify.c). */

#ifndef COLO_NOTIFY_H
#define COLO_NOTIFY_H

/* Start telling systemd the daemon's state, if a Type=notify unit
 * started it (NOTIFY_SOCKET set); -1 (after saying why) only if the
 * thread cannot be started.  colod_notify_stop says STOPPING=1 if that
 * was not said yet and waits for the thread.
 */
extern int colod_notify_start (void);
extern void colod_notify_stop (void);

#endif /* COLO_NOTIFY_H */
