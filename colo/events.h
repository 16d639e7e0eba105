/* fleece-colod: events and failover states (events.c). */

#ifndef COLO_EVENTS_H
#define COLO_EVENTS_H

#include <stdbool.h>

#include <jansson.h>

#include "colod.h"

/* Send an event to every subscriber and log it; data is consumed. */
extern void colod_event (const char *name, json_t *data);

/* The control socket's clients that asked for events (subscribe-events):
 * add one (false when the table is full), remove one, and, with
 * colod.lock held, shut them all down (the daemon stops).
 */
extern bool colod_events_subscribe (int fd);
extern void colod_events_unsubscribe (int fd);
extern void colod_events_shutdown_all (void);

/* One JSON value as a line to a control client, without blocking: a
 * client that does not read loses the rest of the line.
 */
extern void colod_send_line (int fd, json_t *v);

/* Move to failover state f (under colod.lock, waking its waiters) and
 * raise FAILOVER_STATE if it changed.
 */
extern void colod_set_failover (enum colod_failover f, const char *why);

#endif /* COLO_EVENTS_H */
