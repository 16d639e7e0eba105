/* The control service: QMP-shaped JSON over a Unix socket
 * (docs/control-protocol.md).
 *
 * Requests.  ctl_handle_line turns one request line into one reply line
 * and touches no socket, so that the tests and the fuzzer drive it
 * directly.  Commands live in one flat table (name, handler, parameters,
 * description); the dispatcher checks the request's shape and every
 * argument against the table before a handler runs, so a handler only
 * reads arguments it declared, with the type it declared.  Every error,
 * the dispatcher's and the engine's, is recorded with fl_error and the
 * reply carries fleece_last_error(): the client sees the engine's own
 * words.
 *
 * Service.  One thread runs a poll() loop over a self-pipe, the listening
 * socket and at most CTL_MAX_CLIENTS clients, all non-blocking, so that
 * nothing one client does can stall another:
 *   - Input goes to a buffer of CTL_MAX_LINE + 1 bytes.  A line that does
 *     not fit is answered with one error and the rest of it is discarded
 *     as it arrives: a line of megabytes costs no memory.
 *   - Replies and events go to a per-client output buffer, written as the
 *     socket accepts them.  While more than CTL_OUT_HIGH bytes wait, the
 *     client's next requests wait too (a client that pipelines without
 *     reading slows only itself).  Events cannot wait: a client whose
 *     buffer would grow beyond CTL_OUT_MAX is dropped.
 *   - Commands run on the service thread.  The slowest is snapshot
 *     creation, which waits for the live writes in flight: other clients
 *     wait that long, never longer.
 *
 * Events.  The engine calls ctl_event with its locks held, from an I/O
 * thread.  It copies the event into one allocation, appends it to a
 * queue bounded by CTL_MAX_EVENTS (beyond that events are dropped and
 * counted, never waited for) and writes a byte to the self-pipe; the
 * service thread formats the event and sends it to every client.  Events
 * are not kept for clients that connect later.
 *
 * Lifetime.  ctl_open runs before nbdkit forks: it creates the socket,
 * the self-pipe and registers the listener, but starts no thread (threads
 * do not survive fork).  ctl_start starts the service thread with every
 * signal blocked, so signals go to nbdkit's threads.  ctl_close
 * unregisters the listener, stops the thread through the self-pipe, joins
 * it, and unlinks the socket only if it is still the one it created.
 */

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <jansson.h>

#include "fleece-control.h"
#include "internal.h"

#define CTL_IN_SIZE    (CTL_MAX_LINE + 1)
#define CTL_OUT_HIGH   (1024 * 1024)     /* stop reading requests above */
#define CTL_OUT_MAX    (8 * 1024 * 1024) /* drop the client above */
#define CTL_MAX_EVENTS 1024              /* queued, not yet delivered */
#define CTL_ACCEPT_PAUSE_NS (100 * 1000 * 1000)

/* An event from the engine, strings in the same allocation. */
struct ctl_event {
  struct ctl_event *next;
  struct timespec ts;
  const char *event, *snapshot, *reason;
  char strings[];
};

/* A connected client.  Only the service thread touches it. */
struct ctl_client {
  int fd;
  uint64_t since_ns;            /* connected, or its last request */
  bool requested;               /* it has sent a complete request */
  bool subscribed;              /* subscribe-events: kept however idle */
  bool eof;                     /* the client shut down its side */
  bool dead;                    /* close at the end of this round */
  bool discarding;              /* skipping the rest of a too-long line */
  char *out;                    /* bytes [outoff, outlen) wait to be sent */
  size_t outoff, outlen, outcap;
  size_t inlen;
  char in[CTL_IN_SIZE];
};

struct ctl {
  /* Set by ctl_open, then constant. */
  struct fleece *fl;
  char *path;
  dev_t dev;                    /* the socket ctl_open created */
  ino_t ino;
  int listen_fd;
  int wake_rd, wake_wr;         /* self-pipe */
  char *on_cbw_error;
  bool persistent;
  uint64_t opened_ns;
  char *greeting;

  /* Owned by the service thread, and by ctl_close once it is joined. */
  pthread_t thread;
  bool started;
  struct ctl_client *clients[CTL_MAX_CLIENTS];
  size_t nclients;
  struct ctl_client *current;   /* whose request runs; NULL outside the
                                   service (tests, fuzzer) */
  uint64_t accept_paused_until;

  /* Protected by ev_lock. */
  pthread_mutex_t ev_lock;
  struct ctl_event *ev_head, **ev_tail;
  size_t nevents;
  uint64_t events_dropped;
  bool stopping;
};

/* ---- JSON helpers ---- */

static const char *
json_type_name (const json_t *v)
{
  switch (json_typeof (v)) {
  case JSON_OBJECT:  return "object";
  case JSON_ARRAY:   return "array";
  case JSON_STRING:  return "string";
  case JSON_INTEGER: return "integer";
  case JSON_REAL:    return "number";
  case JSON_TRUE:
  case JSON_FALSE:   return "boolean";
  default:           return "null";
  }
}

/* A JSON string from text that may not be valid UTF-8 (a path, a message
 * truncated in the middle of a character): bytes above 0x7f become '?'
 * rather than fail the reply.
 */
static json_t *
ctl_str (const char *s)
{
  json_t *v = json_string (s);
  char *copy;
  size_t i;

  if (v != NULL || s == NULL)
    return v;
  copy = strdup (s);
  if (copy == NULL)
    return NULL;
  for (i = 0; copy[i]; i++)
    if ((unsigned char) copy[i] >= 0x80)
      copy[i] = '?';
  v = json_string (copy);
  free (copy);
  return v;
}

/* A handler's result: out of memory if jansson could not build it. */
static json_t *
checked (json_t *v, const char *cmd)
{
  if (v == NULL)
    fl_error (ENOMEM, "%s: out of memory building the reply", cmd);
  return v;
}

static char *
dump (json_t *v)
{
  char *s = v ? json_dumps (v, JSON_COMPACT) : NULL;

  json_decref (v);
  return s;
}

/* A reply line: {"return":ret} when ret is not NULL (ret is consumed),
 * else {"error":{"class":class,"desc":desc}}; then "id" if given.
 */
static char *
make_reply (json_t *ret, const char *class, const char *desc,
            json_t *id)
{
  json_t *reply;

  if (ret)
    reply = json_pack ("{s:o}", "return", ret);
  else
    reply = json_pack ("{s:{s:s,s:o}}", "error", "class", class,
                       "desc", ctl_str (desc));
  if (reply && id && json_object_set (reply, "id", id) == -1) {
    json_decref (reply);
    return NULL;
  }
  return dump (reply);
}

/* ---- Commands ---- */

enum ctl_type { CTL_STRING, CTL_INT, CTL_BOOL, CTL_ARRAY, CTL_OBJECT };

struct ctl_param {
  const char *name;
  enum ctl_type type;
  bool optional;
};

struct ctl_command {
  const char *name;
  /* Returns the "return" value, or NULL after fl_error. */
  json_t *(*fn) (struct ctl *ctl, json_t *args);
  const struct ctl_param *params;       /* ends with name == NULL */
  const char *description;
};

static json_t *
cmd_qmp_capabilities (struct ctl *ctl, json_t *args)
{
  return checked (json_object (), "qmp_capabilities");
}

static json_t *
cmd_subscribe_events (struct ctl *ctl, json_t *args)
{
  if (ctl->current)
    ctl->current->subscribed = true;
  return checked (json_object (), "subscribe-events");
}

static const char *
cbw_error_name (struct ctl *ctl)
{
  if (ctl->on_cbw_error)
    return ctl->on_cbw_error;
  return ctl->fl->on_cbw_error == FLEECE_CBW_FAIL_WRITE ? "fail-write"
    : "break-snapshot";
}

static json_t *
cmd_query_status (struct ctl *ctl, json_t *args)
{
  struct fleece_stats st;
  uint64_t uptime = (monotonic_ns () - ctl->opened_ns) / 1000000000;

  fleece_get_stats (ctl->fl, &st);
  return checked (json_pack ("{s:s,s:s,s:o,s:I,s:I,s:o,s:s,s:b,s:I,s:I,"
                             "s:I,s:I,s:s}",
                             "status", "running",
                             "version", PACKAGE_VERSION,
                             "disk", ctl_str (fleece_disk_path (ctl->fl)),
                             "disk-size", (json_int_t) st.disk_size,
                             "cluster-size", (json_int_t) st.cluster_size,
                             "store",
                             ctl_str (fleece_store_path (ctl->fl)),
                             "on-cbw-error", cbw_error_name (ctl),
                             "persistent", (int) ctl->persistent,
                             "snapshots", (json_int_t) st.snapshots,
                             "generation", (json_int_t) st.generation,
                             "uptime", (json_int_t) uptime,
                             "store-max", (json_int_t) st.store_max_bytes,
                             "locking", fleece_locking_state (ctl->fl)),
                  "query-status");
}

/* Every field of struct fleece_stats, in order, with its wire name. */
#define STAT(field, name) \
  { name, offsetof (struct fleece_stats, field), \
    sizeof ((struct fleece_stats *) 0)->field }
static const struct {
  const char *name;
  size_t offset, size;
} stat_fields[] = {
  STAT (disk_size, "disk-size"),
  STAT (cluster_size, "cluster-size"),
  STAT (generation, "generation"),
  STAT (snapshots, "snapshots"),
  STAT (bytes_written, "bytes-written"),
  STAT (cbw_clusters, "cbw-clusters"),
  STAT (cbw_zero_clusters, "cbw-zero-clusters"),
  STAT (bytes_copied, "bytes-copied"),
  STAT (cbw_errors, "cbw-errors"),
  STAT (store_clusters_used, "store-clusters-used"),
  STAT (store_clusters_total, "store-clusters-total"),
  STAT (store_bytes_used, "store-bytes-used"),
  STAT (store_file_bytes, "store-file-bytes"),
  STAT (store_max_bytes, "store-max-bytes"),
  STAT (copies, "copies"),
  STAT (cbw_wait_ns, "cbw-wait-ns"),
  STAT (max_drain_ns, "max-drain-ns"),
  STAT (last_drain_ns, "last-drain-ns"),
};
#undef STAT

static json_int_t
stat_value (const struct fleece_stats *st, size_t i)
{
  const char *p = (const char *) st + stat_fields[i].offset;
  uint32_t v32;
  uint64_t v64;

  if (stat_fields[i].size == sizeof v32) {
    memcpy (&v32, p, sizeof v32);
    return v32;
  }
  memcpy (&v64, p, sizeof v64);
  return v64;
}

/* Snapshot lists, built from fleece_list_snapshots's callback (called
 * with the engine's snapshot list locked: no engine call in here).
 */
struct snap_list {
  json_t *array;
  bool full;                    /* query-snapshots, else clusters only */
  bool failed;
};

static json_t *
snap_json (const struct fleece_snap_info *info, bool full)
{
  char export[FLEECE_SNAPSHOT_NAME_MAX + 16];
  json_t *v, *counts;

  if (!full)
    return json_pack ("{s:o,s:I,s:I}", "name", ctl_str (info->name),
                      "clusters-held", (json_int_t) info->clusters_held,
                      "clusters-released",
                      (json_int_t) info->clusters_released);
  snprintf (export, sizeof export, "snapshot/%s", info->name);
  v = json_pack ("{s:o,s:o,s:I,s:I,s:b}", "name", ctl_str (info->name),
                 "export", ctl_str (export),
                 "generation", (json_int_t) info->generation,
                 "created", (json_int_t) info->created,
                 "broken", (int) info->broken);
  counts = json_pack ("{s:I,s:I,s:I}",
                      "clusters-held", (json_int_t) info->clusters_held,
                      "clusters-released",
                      (json_int_t) info->clusters_released,
                      "readers", (json_int_t) info->readers);
  /* "broken-reason" only when broken, between "broken" and the counts. */
  if (v == NULL || counts == NULL ||
      (info->broken &&
       json_object_set_new (v, "broken-reason",
                            ctl_str (info->broken_reason)) == -1) ||
      json_object_update (v, counts) == -1) {
    json_decref (v);
    v = NULL;
  }
  json_decref (counts);
  return v;
}

static void
snap_list_one (void *opaque, const struct fleece_snap_info *info)
{
  struct snap_list *l = opaque;

  if (!l->failed &&
      json_array_append_new (l->array, snap_json (info, l->full)) == -1)
    l->failed = true;
}

static json_t *
list_snapshots (struct ctl *ctl, bool full)
{
  struct snap_list l = { .array = json_array (), .full = full };

  if (l.array == NULL)
    return NULL;
  fleece_list_snapshots (ctl->fl, snap_list_one, &l);
  if (l.failed) {
    json_decref (l.array);
    return NULL;
  }
  return l.array;
}

static json_t *
cmd_query_stats (struct ctl *ctl, json_t *args)
{
  struct fleece_stats st;
  json_t *v = json_object ();
  size_t i;

  fleece_get_stats (ctl->fl, &st);
  for (i = 0; v && i < sizeof stat_fields / sizeof stat_fields[0]; i++) {
    if (json_object_set_new (v, stat_fields[i].name,
                             json_integer (stat_value (&st, i))) == -1) {
      json_decref (v);
      v = NULL;
    }
  }
  if (v && json_object_set_new (v, "snapshot-clusters",
                                list_snapshots (ctl, false)) == -1) {
    json_decref (v);
    v = NULL;
  }
  return checked (v, "query-stats");
}

static json_t *
cmd_query_snapshots (struct ctl *ctl, json_t *args)
{
  return checked (list_snapshots (ctl, true), "query-snapshots");
}

static json_t *
cmd_snapshot_create (struct ctl *ctl, json_t *args)
{
  const char *name = json_string_value (json_object_get (args, "name"));
  struct fleece_snap_info info;

  if (fleece_snapshot_create (ctl->fl, name) == -1 ||
      fleece_snapshot_info (ctl->fl, name, &info) == -1)
    return NULL;
  return checked (json_pack ("{s:o,s:I}", "name", ctl_str (info.name),
                             "generation", (json_int_t) info.generation),
                  "snapshot-create");
}

static json_t *
cmd_snapshot_delete (struct ctl *ctl, json_t *args)
{
  const char *name = json_string_value (json_object_get (args, "name"));

  if (fleece_snapshot_delete (ctl->fl, name) == -1)
    return NULL;
  return checked (json_object (), "snapshot-delete");
}

/* ---- Dirty bitmaps and checkpoints ---- */

static const char *
arg_name (json_t *args, const char *key)
{
  return json_string_value (json_object_get (args, key));
}

static json_t *
cmd_bitmap_add (struct ctl *ctl, json_t *args)
{
  json_t *d = json_object_get (args, "disabled");

  if (fleece_bitmap_add (ctl->fl, arg_name (args, "name"),
                         d && json_is_true (d)) == -1)
    return NULL;
  return checked (json_object (), "bitmap-add");
}

/* The commands that take one bitmap name and return {}. */
#define BITMAP_NAME_COMMAND(fn, engine_fn, cmd)                        \
  static json_t *                                                       \
  fn (struct ctl *ctl, json_t *args)                                    \
  {                                                                     \
    if (engine_fn (ctl->fl, arg_name (args, "name")) == -1)             \
      return NULL;                                                      \
    return checked (json_object (), cmd);                              \
  }
BITMAP_NAME_COMMAND (cmd_bitmap_remove, fleece_bitmap_remove, "bitmap-remove")
BITMAP_NAME_COMMAND (cmd_bitmap_clear, fleece_bitmap_clear, "bitmap-clear")
BITMAP_NAME_COMMAND (cmd_bitmap_enable, fleece_bitmap_enable, "bitmap-enable")
BITMAP_NAME_COMMAND (cmd_bitmap_disable, fleece_bitmap_disable,
                     "bitmap-disable")

static json_t *
cmd_bitmap_merge (struct ctl *ctl, json_t *args)
{
  json_t *sources = json_object_get (args, "sources");
  size_t i, n = json_array_size (sources);
  const char **names;
  int r;

  if (n == 0) {
    fl_error (EINVAL, "Parameter 'sources' must list at least one bitmap");
    return NULL;
  }
  names = calloc (n, sizeof *names);
  if (names == NULL) {
    fl_error (ENOMEM, "bitmap-merge: out of memory");
    return NULL;
  }
  for (i = 0; i < n; i++) {
    names[i] = json_string_value (json_array_get (sources, i));
    if (names[i] == NULL) {
      free (names);
      fl_error (EINVAL, "Parameter 'sources' expects an array of strings");
      return NULL;
    }
  }
  r = fleece_bitmap_merge (ctl->fl, arg_name (args, "target"), names, n);
  free (names);
  return r == -1 ? NULL : checked (json_object (), "bitmap-merge");
}

struct bitmap_list {
  json_t *array;
  bool failed;
};

static void
bitmap_list_one (void *opaque, const struct fleece_bitmap_info *info)
{
  struct bitmap_list *l = opaque;
  json_t *o = json_pack ("{s:o,s:I,s:I,s:I,s:b,s:b,s:b,s:b,s:I}",
                         "name", ctl_str (info->name),
                         "granularity", (json_int_t) info->granularity,
                         "count", (json_int_t) info->count,
                         "bit-count", (json_int_t) info->bit_count,
                         "enabled", info->enabled,
                         "frozen", info->frozen,
                         "inconsistent", info->inconsistent,
                         "checkpoint", info->checkpoint,
                         "created", (json_int_t) info->created);

  if (o && info->frozen &&
      json_object_set_new (o, "frozen-by", ctl_str (info->frozen_by)) == -1) {
    json_decref (o);
    o = NULL;
  }
  if (o && info->inconsistent &&
      json_object_set_new (o, "inconsistent-reason",
                           ctl_str (info->inconsistent_reason)) == -1) {
    json_decref (o);
    o = NULL;
  }
  if (o && json_object_set_new (o, "export", json_sprintf ("bitmap/%s",
                                                           info->name)) == -1) {
    json_decref (o);
    o = NULL;
  }
  if (o == NULL || json_array_append_new (l->array, o) == -1)
    l->failed = true;
}

static json_t *
cmd_query_bitmaps (struct ctl *ctl, json_t *args)
{
  struct bitmap_list l = { .array = json_array () };

  if (l.array)
    fleece_list_bitmaps (ctl->fl, bitmap_list_one, &l);
  if (l.failed) {
    json_decref (l.array);
    l.array = NULL;
  }
  return checked (l.array, "query-bitmaps");
}

static json_t *
cmd_checkpoint_create (struct ctl *ctl, json_t *args)
{
  const char *name = arg_name (args, "name");
  struct fleece_snap_info info;

  if (fleece_checkpoint_create (ctl->fl, name) == -1 ||
      fleece_snapshot_info (ctl->fl, name, &info) == -1)
    return NULL;
  return checked (json_pack ("{s:o,s:o,s:o,s:I}", "name", ctl_str (name),
                             "snapshot", ctl_str (name),
                             "bitmap", ctl_str (name),
                             "generation", (json_int_t) info.generation),
                  "checkpoint-create");
}

static json_t *cmd_query_commands (struct ctl *ctl, json_t *args);

static const struct ctl_param no_params[] = { { NULL } };
static const struct ctl_param name_param[] = {
  { "name", CTL_STRING, false },
  { NULL }
};

/* The commands, in the order query-commands lists them.  To add one:
 * write its handler above, add a line here, document it in
 * docs/control-protocol.md and test it in tests/test-control-handle.c.
 */
static const struct ctl_param bitmap_add_params[] = {
  { "name", CTL_STRING, false },
  { "disabled", CTL_BOOL, true },
  { NULL }
};
static const struct ctl_param bitmap_merge_params[] = {
  { "target", CTL_STRING, false },
  { "sources", CTL_ARRAY, false },
  { NULL }
};

static const struct ctl_command commands[] = {
  { "qmp_capabilities", cmd_qmp_capabilities, no_params,
    "End capabilities negotiation (accepted, not required)" },
  { "query-commands", cmd_query_commands, no_params,
    "List the commands this server understands" },
  { "subscribe-events", cmd_subscribe_events, no_params,
    "Keep this connection open however long it is idle, for events" },
  { "query-status", cmd_query_status, no_params,
    "Show the server, disk and store configuration" },
  { "query-stats", cmd_query_stats, no_params,
    "Show the engine's counters" },
  { "snapshot-create", cmd_snapshot_create, name_param,
    "Create snapshot NAME of the live disk" },
  { "snapshot-delete", cmd_snapshot_delete, name_param,
    "Delete snapshot NAME and free its copies" },
  { "query-snapshots", cmd_query_snapshots, no_params,
    "List the snapshots, oldest first" },
  { "bitmap-add", cmd_bitmap_add, bitmap_add_params,
    "Add dirty bitmap NAME, recording unless disabled is true" },
  { "bitmap-remove", cmd_bitmap_remove, name_param,
    "Remove dirty bitmap NAME" },
  { "bitmap-clear", cmd_bitmap_clear, name_param,
    "Clear every bit of dirty bitmap NAME" },
  { "bitmap-enable", cmd_bitmap_enable, name_param,
    "Make dirty bitmap NAME record writes" },
  { "bitmap-disable", cmd_bitmap_disable, name_param,
    "Make dirty bitmap NAME stop recording writes" },
  { "bitmap-merge", cmd_bitmap_merge, bitmap_merge_params,
    "Set in bitmap TARGET every bit set in the SOURCES" },
  { "query-bitmaps", cmd_query_bitmaps, no_params,
    "List the dirty bitmaps" },
  { "checkpoint-create", cmd_checkpoint_create, name_param,
    "Atomically create snapshot NAME, freeze the previous checkpoint's "
    "bitmap and start bitmap NAME" },
  { NULL }
};

static json_t *
cmd_query_commands (struct ctl *ctl, json_t *args)
{
  json_t *list = json_array ();
  const struct ctl_command *cmd;

  for (cmd = commands; list && cmd->name; cmd++) {
    if (json_array_append_new (list,
                               json_pack ("{s:s,s:s}", "name", cmd->name,
                                          "description",
                                          cmd->description)) == -1) {
      json_decref (list);
      list = NULL;
    }
  }
  return checked (list, "query-commands");
}

/* ---- Dispatch ---- */

static const struct ctl_command *
find_command (const char *name)
{
  const struct ctl_command *cmd;

  for (cmd = commands; cmd->name; cmd++)
    if (strcmp (cmd->name, name) == 0)
      return cmd;
  return NULL;
}

static bool
type_ok (enum ctl_type type, const json_t *v)
{
  switch (type) {
  case CTL_STRING: return json_is_string (v);
  case CTL_INT:    return json_is_integer (v);
  case CTL_BOOL:   return json_is_boolean (v);
  case CTL_ARRAY:  return json_is_array (v);
  default:         return json_is_object (v);
  }
}

static const char *const type_desc[] = {
  [CTL_STRING] = "a string", [CTL_INT] = "an integer",
  [CTL_BOOL] = "a boolean", [CTL_ARRAY] = "an array",
  [CTL_OBJECT] = "an object",
};

/* Check args against cmd's parameters. */
static int
check_args (const struct ctl_command *cmd, json_t *args)
{
  const struct ctl_param *p;
  const char *key;
  json_t *value;

  json_object_foreach (args, key, value) {
    for (p = cmd->params; p->name; p++)
      if (strcmp (p->name, key) == 0)
        break;
    if (p->name == NULL)
      return fl_error (EINVAL, "Parameter '%s' is unexpected", key);
    if (!type_ok (p->type, value))
      return fl_error (EINVAL, "Parameter '%s' expects %s", key,
                       type_desc[p->type]);
  }
  for (p = cmd->params; p->name; p++)
    if (!p->optional && json_object_get (args, p->name) == NULL)
      return fl_error (EINVAL, "Parameter '%s' is missing", p->name);
  return 0;
}

/* Check the request's shape; on success *name is the command and *args
 * its arguments (NULL if none).
 */
static int
check_request (json_t *req, const char **name, json_t **args)
{
  const char *key;
  json_t *value, *exec;

  if (!json_is_object (req))
    return fl_error (EINVAL, "request is a JSON %s, not an object",
                     json_type_name (req));
  json_object_foreach (req, key, value)
    if (strcmp (key, "execute") && strcmp (key, "arguments") &&
        strcmp (key, "id"))
      return fl_error (EINVAL, "request member '%s' is unexpected", key);
  exec = json_object_get (req, "execute");
  if (exec == NULL)
    return fl_error (EINVAL, "request has no 'execute' member");
  if (!json_is_string (exec))
    return fl_error (EINVAL, "request member 'execute' is a JSON %s, "
                     "not a string", json_type_name (exec));
  *name = json_string_value (exec);
  *args = json_object_get (req, "arguments");
  if (*args && !json_is_object (*args))
    return fl_error (EINVAL, "'arguments' of %s is a JSON %s, not an object",
                     *name, json_type_name (*args));
  return 0;
}

/* Run a parsed request; NULL after fl_error, *class says which. */
static json_t *
dispatch (struct ctl *ctl, json_t *req, const char **class)
{
  const struct ctl_command *cmd;
  const char *name = NULL;
  json_t *args = NULL, *empty, *ret;

  if (check_request (req, &name, &args) == -1)
    return NULL;
  cmd = find_command (name);
  if (cmd == NULL) {
    *class = "CommandNotFound";
    fl_error (ENOENT, "The command %s has not been found", name);
    return NULL;
  }
  if (args)
    return check_args (cmd, args) == -1 ? NULL : cmd->fn (ctl, args);
  empty = json_object ();
  if (empty == NULL)
    return checked (NULL, name);
  ret = check_args (cmd, empty) == -1 ? NULL : cmd->fn (ctl, empty);
  json_decref (empty);
  return ret;
}

char *
ctl_handle_line (struct ctl *ctl, const char *line, size_t len)
{
  const char *class = "GenericError";
  json_error_t jerr;
  json_t *req, *ret = NULL, *id = NULL;
  char *reply;

  req = json_loadb (line, len, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES,
                    &jerr);
  if (req == NULL)
    fl_error (EINVAL, "malformed JSON at line %d column %d: %s",
              jerr.line, jerr.column, jerr.text);
  else {
    if (json_is_object (req))
      id = json_object_get (req, "id");
    ret = dispatch (ctl, req, &class);
  }
  reply = make_reply (ret, class, ret ? NULL : fleece_last_error (), id);
  json_decref (req);
  return reply;
}

/* ---- Clients ---- */

static size_t
pending (const struct ctl_client *c)
{
  return c->outlen - c->outoff;
}

/* Write what the socket accepts now. */
static void
client_flush (struct ctl_client *c)
{
  while (pending (c) > 0) {
    ssize_t n = send (c->fd, c->out + c->outoff, pending (c),
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n == -1) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        fl_debug ("control: send to client: %m: dropping the client");
        c->dead = true;
      }
      return;
    }
    c->outoff += n;
  }
  c->outoff = c->outlen = 0;
}

/* Queue line and a newline, then write what the socket accepts. */
static void
client_send (struct ctl_client *c, const char *line)
{
  size_t len = strlen (line);

  if (c->dead)
    return;
  if (pending (c) + len + 1 > CTL_OUT_MAX) {
    fl_debug ("control: client does not read its replies and events "
              "(%zu bytes pending): dropping it", pending (c));
    c->dead = true;
    return;
  }
  if (c->outlen + len + 1 > c->outcap) {
    size_t cap = c->outcap ? c->outcap : 4096;
    char *p;

    if (c->outoff > 0) {
      memmove (c->out, c->out + c->outoff, pending (c));
      c->outlen -= c->outoff;
      c->outoff = 0;
    }
    while (cap < c->outlen + len + 1)
      cap *= 2;
    p = cap == c->outcap ? c->out : realloc (c->out, cap);
    if (p == NULL) {
      fl_debug ("control: out of memory for a client's output: dropping it");
      c->dead = true;
      return;
    }
    c->out = p;
    c->outcap = cap;
  }
  memcpy (c->out + c->outlen, line, len);
  c->out[c->outlen + len] = '\n';
  c->outlen += len + 1;
  client_flush (c);
}

static void
client_send_error (struct ctl_client *c, const char *desc)
{
  char *line = make_reply (NULL, "GenericError", desc, NULL);

  client_send (c, line ? line : "{\"error\":{\"class\":\"GenericError\","
               "\"desc\":\"out of memory\"}}");
  free (line);
}

static bool
is_blank (const char *p, size_t len)
{
  size_t i;

  for (i = 0; i < len; i++)
    if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r')
      return false;
  return true;
}

static void
client_request (struct ctl *ctl, struct ctl_client *c, const char *line,
                size_t len)
{
  char *reply;

  if (is_blank (line, len))
    return;
  c->requested = true;
  c->since_ns = monotonic_ns ();
  ctl->current = c;
  reply = ctl_handle_line (ctl, line, len);
  ctl->current = NULL;
  if (reply == NULL) {
    client_send_error (c, "out of memory");
    return;
  }
  client_send (c, reply);
  free (reply);
}

/* Handle the complete lines in c->in while the client reads its replies;
 * deal with a line that is too long, and with end of input.
 */
static void
client_process (struct ctl *ctl, struct ctl_client *c)
{
  size_t start = 0;
  bool partial = false;         /* no newline in what is left */
  char *nl;

  while (!c->dead && pending (c) < CTL_OUT_HIGH) {
    nl = memchr (c->in + start, '\n', c->inlen - start);
    if (nl == NULL) {
      partial = true;
      break;
    }
    if (!c->discarding)
      client_request (ctl, c, c->in + start, nl - (c->in + start));
    c->discarding = false;
    start = nl - c->in + 1;
  }
  c->inlen -= start;
  memmove (c->in, c->in + start, c->inlen);
  if (!partial || c->dead)
    return;
  if (c->discarding)
    c->inlen = 0;
  else if (c->inlen > CTL_MAX_LINE) {
    char msg[64];
    snprintf (msg, sizeof msg, "request line too long: more than %d bytes",
              CTL_MAX_LINE);
    client_send_error (c, msg);
    c->discarding = true;
    c->inlen = 0;
  }
  else if (c->eof && c->inlen > 0) {
    /* The last line had no newline: answer it all the same. */
    client_request (ctl, c, c->in, c->inlen);
    c->inlen = 0;
  }
}

static void
client_read (struct ctl *ctl, struct ctl_client *c)
{
  ssize_t n;

  if (c->eof || c->inlen == CTL_IN_SIZE)
    return;
  n = recv (c->fd, c->in + c->inlen, CTL_IN_SIZE - c->inlen, 0);
  if (n == -1) {
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      fl_debug ("control: recv from client: %m: dropping the client");
      c->dead = true;
    }
    return;
  }
  if (n == 0)
    c->eof = true;
  c->inlen += n;
  client_process (ctl, c);
}

static void
client_free (struct ctl_client *c)
{
  close (c->fd);
  free (c->out);
  free (c);
}

/* Refuse a connection with one error line (the socket is new: its
 * buffer has room) and close it.
 */
static void
refuse (int fd, const char *desc)
{
  char *line = make_reply (NULL, "GenericError", desc, NULL);

  fl_debug ("control: refusing a client: %s", desc);
  if (line) {
    size_t len = strlen (line);
    line[len] = '\n';           /* overwrites the terminating NUL */
    if (send (fd, line, len + 1, MSG_NOSIGNAL | MSG_DONTWAIT) == -1)
      fl_debug ("control: send to a refused client: %m");
    free (line);
  }
  close (fd);
}

/* ---- Idle clients ----
 *
 * A client that is not subscribed may be idle (no complete request) for
 * CTL_NEW_TIMEOUT_MS after it connects and CTL_IDLE_TIMEOUT_MS after each
 * request; then it is told why and closed.  And when CTL_MAX_CLIENTS are
 * connected, a new client takes the place of the one idle longest (at
 * least CTL_EVICT_IDLE_MS), so that forgotten or hostile connections
 * never lock fleecectl and fleece-colod out: a new client is answered at
 * once, not after a timeout.  Subscribers (fleecectl events) are never
 * closed for being idle.
 */

static void reap_clients (struct ctl *ctl);

static uint64_t
idle_limit_ns (const struct ctl_client *c)
{
  int ms = fleece_debug.ctl_idle_timeout_ms;

  if (ms <= 0)
    ms = c->requested ? CTL_IDLE_TIMEOUT_MS : CTL_NEW_TIMEOUT_MS;
  return (uint64_t) ms * 1000000;
}

/* Tell c why it goes (idle too long, or evicted to make room for a new
 * client), and close it at the end of this round.
 */
static void
client_drop_idle (struct ctl_client *c, uint64_t now, bool evicted)
{
  char msg[160];
  int n;

  n = snprintf (msg, sizeof msg, "closing the connection: %s for %" PRIu64
                " ms", c->requested ? "idle" : "no complete request",
                (now - c->since_ns) / 1000000);
  if (evicted && n > 0 && (size_t) n < sizeof msg)
    snprintf (msg + n, sizeof msg - n, ", and a new client needs its "
              "place (the limit is %d clients)", CTL_MAX_CLIENTS);
  fl_debug ("control: %s", msg);
  client_send_error (c, msg);
  c->dead = true;
}

/* Drop the clients idle too long; the milliseconds until the next one
 * is (for poll), or -1.
 */
static int
expire_clients (struct ctl *ctl)
{
  uint64_t now = monotonic_ns (), next = UINT64_MAX;
  size_t i;

  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    uint64_t end = c->since_ns + idle_limit_ns (c);

    if (c->subscribed || c->dead)
      continue;
    if (now >= end)
      client_drop_idle (c, now, false);
    else if (end < next)
      next = end;
  }
  reap_clients (ctl);
  if (next == UINT64_MAX)
    return -1;
  return (next - now) / 1000000 + 1;
}

/* All places taken: free the one of the client idle longest. */
static bool
evict_idle (struct ctl *ctl)
{
  uint64_t now = monotonic_ns ();
  struct ctl_client *v = NULL;
  size_t i;

  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    if (!c->subscribed && !c->dead &&
        now - c->since_ns >= (uint64_t) CTL_EVICT_IDLE_MS * 1000000 &&
        (v == NULL || c->since_ns < v->since_ns))
      v = c;
  }
  if (v == NULL)
    return false;
  client_drop_idle (v, now, true);
  reap_clients (ctl);
  return true;
}

/* May this connection become a client?  If not, says why in msg. */
static bool
client_allowed (struct ctl *ctl, int fd, char *msg, size_t size)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1) {
    snprintf (msg, size, "getsockopt: SO_PEERCRED: %s", strerror (errno));
    return false;
  }
  if (cred.uid != 0 && cred.uid != geteuid ()) {
    snprintf (msg, size, "permission denied: uid %u may not use this "
              "control socket", (unsigned) cred.uid);
    return false;
  }
  if (ctl->nclients >= CTL_MAX_CLIENTS && !evict_idle (ctl)) {
    snprintf (msg, size, "too many clients: the limit is %d",
              CTL_MAX_CLIENTS);
    return false;
  }
  return true;
}

static void
add_client (struct ctl *ctl, int fd)
{
  struct ctl_client *c;
  char msg[128];

  if (!client_allowed (ctl, fd, msg, sizeof msg)) {
    refuse (fd, msg);
    return;
  }
  c = calloc (1, sizeof *c);
  if (c == NULL) {
    refuse (fd, "out of memory");
    return;
  }
  c->fd = fd;
  c->since_ns = monotonic_ns ();
  ctl->clients[ctl->nclients++] = c;
  client_send (c, ctl->greeting);
}

static void
accept_clients (struct ctl *ctl)
{
  int fd;

  for (;;) {
    fd = accept4 (ctl->listen_fd, NULL, NULL,
                  SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) {
        /* EMFILE and friends: stop polling the socket for a while
         * rather than spin on it.
         */
        fl_debug ("control: accept: %s: %m", ctl->path);
        ctl->accept_paused_until = monotonic_ns () + CTL_ACCEPT_PAUSE_NS;
      }
      return;
    }
    add_client (ctl, fd);
  }
}

/* Close the clients that are dead or done. */
static void
reap_clients (struct ctl *ctl)
{
  size_t i = 0;

  while (i < ctl->nclients) {
    struct ctl_client *c = ctl->clients[i];
    if (c->eof && c->inlen == 0 && pending (c) == 0)
      c->dead = true;
    if (c->dead) {
      client_free (c);
      ctl->clients[i] = ctl->clients[--ctl->nclients];
    }
    else
      i++;
  }
}

/* ---- Events ---- */

static void
wake (struct ctl *ctl)
{
  /* A full pipe means the service is already woken. */
  if (write (ctl->wake_wr, "x", 1) == -1 && errno != EAGAIN)
    fl_debug ("control: write to the self-pipe: %m");
}

/* The engine's event listener: called with engine locks held, so it
 * only copies and queues.
 */
static void
ctl_event (void *opaque, const char *event, const char *snapshot,
           const char *reason)
{
  struct ctl *ctl = opaque;
  size_t le, ls, lr;
  struct ctl_event *ev;

  snapshot = snapshot ? snapshot : "";
  reason = reason ? reason : "";
  le = strlen (event) + 1;
  ls = strlen (snapshot) + 1;
  lr = strlen (reason) + 1;
  ev = malloc (sizeof *ev + le + ls + lr);
  if (ev == NULL)
    return;
  ev->next = NULL;
  clock_gettime (CLOCK_REALTIME, &ev->ts);
  ev->event = memcpy (ev->strings, event, le);
  ev->snapshot = memcpy (ev->strings + le, snapshot, ls);
  ev->reason = memcpy (ev->strings + le + ls, reason, lr);
  pthread_mutex_lock (&ctl->ev_lock);
  if (ctl->nevents >= CTL_MAX_EVENTS) {
    ctl->events_dropped++;
    free (ev);
    ev = NULL;
  }
  else {
    *ctl->ev_tail = ev;
    ctl->ev_tail = &ev->next;
    ctl->nevents++;
  }
  pthread_mutex_unlock (&ctl->ev_lock);
  if (ev)
    wake (ctl);
}

static char *
event_line (const struct ctl_event *ev)
{
  json_t *data = json_pack ("{s:o}", "reason", ctl_str (ev->reason));

  /* Events about the store as a whole name no snapshot. */
  if (data && ev->snapshot[0] &&
      json_object_set_new (data, "snapshot", ctl_str (ev->snapshot)) == -1) {
    json_decref (data);
    data = NULL;
  }
  if (data == NULL)
    return NULL;
  return dump (json_pack ("{s:s,s:o,s:{s:I,s:I}}",
                          "event", ev->event,
                          "data", data,
                          "timestamp",
                          "seconds", (json_int_t) ev->ts.tv_sec,
                          "microseconds",
                          (json_int_t) (ev->ts.tv_nsec / 1000)));
}

/* Empty the self-pipe, send the queued events to every client.  Returns
 * true when ctl_close asks the service to stop.
 */
static bool
service_wake (struct ctl *ctl)
{
  char buf[64];
  struct ctl_event *ev, *next;
  uint64_t dropped;
  bool stop;
  size_t i;

  while (read (ctl->wake_rd, buf, sizeof buf) > 0)
    ;
  pthread_mutex_lock (&ctl->ev_lock);
  ev = ctl->ev_head;
  ctl->ev_head = NULL;
  ctl->ev_tail = &ctl->ev_head;
  ctl->nevents = 0;
  dropped = ctl->events_dropped;
  ctl->events_dropped = 0;
  stop = ctl->stopping;
  pthread_mutex_unlock (&ctl->ev_lock);
  if (dropped)
    fl_debug ("control: %" PRIu64 " events dropped: queue full", dropped);
  for (; ev; ev = next) {
    char *line = event_line (ev);
    next = ev->next;
    for (i = 0; line && i < ctl->nclients; i++)
      client_send (ctl->clients[i], line);
    free (line);
    free (ev);
  }
  return stop;
}

/* ---- The service thread ---- */

static nfds_t
setup_poll (struct ctl *ctl, struct pollfd *pfd, int *timeout)
{
  size_t i;

  pfd[0] = (struct pollfd) { .fd = ctl->wake_rd, .events = POLLIN };
  pfd[1] = (struct pollfd) { .fd = ctl->listen_fd, .events = POLLIN };
  *timeout = -1;
  if (ctl->accept_paused_until) {
    uint64_t now = monotonic_ns ();
    if (now < ctl->accept_paused_until) {
      pfd[1].fd = -1;
      *timeout = (ctl->accept_paused_until - now) / 1000000 + 1;
    }
    else
      ctl->accept_paused_until = 0;
  }
  for (i = 0; i < ctl->nclients; i++) {
    struct ctl_client *c = ctl->clients[i];
    short events = 0;
    if (!c->eof && c->inlen < CTL_IN_SIZE && pending (c) < CTL_OUT_HIGH)
      events |= POLLIN;
    if (pending (c) > 0)
      events |= POLLOUT;
    pfd[2 + i] = (struct pollfd) { .fd = c->fd, .events = events };
  }
  return 2 + ctl->nclients;
}

static void
client_poll (struct ctl *ctl, struct ctl_client *c, short revents)
{
  if (revents & POLLNVAL) {
    c->dead = true;
    return;
  }
  if (revents & (POLLOUT | POLLERR)) {
    client_flush (c);
    if (pending (c) < CTL_OUT_HIGH)
      client_process (ctl, c);
  }
  if (revents & (POLLIN | POLLHUP | POLLERR))
    client_read (ctl, c);
}

static void *
service (void *arg)
{
  struct ctl *ctl = arg;
  struct pollfd pfd[2 + CTL_MAX_CLIENTS];
  nfds_t n, i;
  int timeout;

  for (;;) {
    int idle = expire_clients (ctl);

    n = setup_poll (ctl, pfd, &timeout);
    if (idle >= 0 && (timeout < 0 || idle < timeout))
      timeout = idle;
    if (poll (pfd, n, timeout) == -1) {
      if (errno == EINTR || errno == ENOMEM || errno == EAGAIN)
        continue;
      fl_debug ("control: poll: %m: the control service stops");
      break;
    }
    if (pfd[0].revents && service_wake (ctl))
      break;
    for (i = 2; i < n; i++)
      if (pfd[i].revents)
        client_poll (ctl, ctl->clients[i - 2], pfd[i].revents);
    reap_clients (ctl);
    if (pfd[1].revents)
      accept_clients (ctl);
  }
  return NULL;
}

/* ---- Open, start, close ---- */

/* A socket at path: replace it if no server answers, else refuse. */
static int
remove_stale (const char *path, const struct sockaddr_un *sun)
{
  struct stat st;
  int fd, r, err;

  if (lstat (path, &st) == -1)
    return errno == ENOENT ? 0
      : fl_error (errno, "control socket %s: %m", path);
  if (!S_ISSOCK (st.st_mode))
    return fl_error (EEXIST, "control socket %s exists and is not a socket",
                     path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    return fl_error (errno, "socket: %m");
  r = connect (fd, (const struct sockaddr *) sun, sizeof *sun);
  err = errno;
  close (fd);
  if (r == 0 || err == EAGAIN)
    return fl_error (EADDRINUSE, "control socket %s is in use by another "
                     "server", path);
  if (err == ENOENT)
    return 0;
  if (err != ECONNREFUSED)
    return fl_error (err, "connect: control socket %s: %m", path);
  fl_debug ("control: replacing stale socket %s", path);
  if (unlink (path) == -1 && errno != ENOENT)
    return fl_error (errno, "unlink: stale control socket %s: %m", path);
  return 0;
}

static int
socket_address (const char *path, struct sockaddr_un *sun)
{
  size_t len = strlen (path);

  if (len == 0)
    return fl_error (EINVAL, "control socket path is empty");
  if (len >= sizeof sun->sun_path)
    return fl_error (ENAMETOOLONG, "control socket %s: the path is %zu "
                     "bytes long, the limit is %zu", path, len,
                     sizeof sun->sun_path - 1);
  memset (sun, 0, sizeof *sun);
  sun->sun_family = AF_UNIX;
  memcpy (sun->sun_path, path, len);
  return 0;
}

/* Create the socket, mode 0600 from the start (umask), listening. */
static int
bind_socket (struct ctl *ctl)
{
  struct sockaddr_un sun;
  struct stat st;
  mode_t old_umask;
  int fd, r, err;

  if (socket_address (ctl->path, &sun) == -1 ||
      remove_stale (ctl->path, &sun) == -1)
    return -1;
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd == -1)
    return fl_error (errno, "socket: %m");
  old_umask = umask (0177);
  r = bind (fd, (struct sockaddr *) &sun, sizeof sun);
  err = errno;
  umask (old_umask);
  if (r == -1) {
    fl_error (err, "bind: control socket %s: %m", ctl->path);
    goto out_close;
  }
  if (chmod (ctl->path, 0600) == -1 || stat (ctl->path, &st) == -1) {
    fl_error (errno, "chmod: control socket %s: %m", ctl->path);
    goto out_unlink;
  }
  if (listen (fd, SOMAXCONN) == -1) {
    fl_error (errno, "listen: control socket %s: %m", ctl->path);
    goto out_unlink;
  }
  ctl->dev = st.st_dev;
  ctl->ino = st.st_ino;
  ctl->listen_fd = fd;
  return 0;

 out_unlink:
  unlink (ctl->path);
 out_close:
  close (fd);
  return -1;
}

static char *
make_greeting (void)
{
  int major = 0, minor = 0, micro = 0;

  sscanf (PACKAGE_VERSION, "%d.%d.%d", &major, &minor, &micro);
  return dump (json_pack ("{s:{s:{s:{s:i,s:i,s:i},s:s},s:[]}}",
                          "QMP", "version", "fleece",
                          "major", major, "minor", minor, "micro", micro,
                          "package", PACKAGE_NAME " " PACKAGE_VERSION,
                          "capabilities"));
}

static void
ctl_free (struct ctl *ctl)
{
  if (ctl->wake_rd >= 0)
    close (ctl->wake_rd);
  if (ctl->wake_wr >= 0)
    close (ctl->wake_wr);
  free (ctl->greeting);
  free (ctl->on_cbw_error);
  free (ctl->path);
  free (ctl);
}

struct ctl *
ctl_open (struct fleece *fl, const char *path, const struct ctl_info *info)
{
  struct ctl *ctl = calloc (1, sizeof *ctl);
  int pipefd[2];

  if (ctl == NULL) {
    fl_error (ENOMEM, "control socket %s: out of memory", path);
    return NULL;
  }
  ctl->fl = fl;
  ctl->listen_fd = ctl->wake_rd = ctl->wake_wr = -1;
  ctl->opened_ns = monotonic_ns ();
  ctl->ev_tail = &ctl->ev_head;
  ctl->persistent = info && info->persistent;
  ctl->path = strdup (path);
  ctl->greeting = make_greeting ();
  if (info && info->on_cbw_error)
    ctl->on_cbw_error = strdup (info->on_cbw_error);
  if (ctl->path == NULL || ctl->greeting == NULL ||
      (info && info->on_cbw_error && ctl->on_cbw_error == NULL)) {
    fl_error (ENOMEM, "control socket %s: out of memory", path);
    goto out_free;
  }
  if (pipe2 (pipefd, O_NONBLOCK | O_CLOEXEC) == -1) {
    fl_error (errno, "pipe2: control socket %s: %m", path);
    goto out_free;
  }
  ctl->wake_rd = pipefd[0];
  ctl->wake_wr = pipefd[1];
  if (bind_socket (ctl) == -1)
    goto out_free;
  pthread_mutex_init (&ctl->ev_lock, NULL);
  fleece_set_event_listener (fl, ctl_event, ctl);
  fl_debug ("control: listening on %s", path);
  return ctl;

 out_free:
  ctl_free (ctl);
  return NULL;
}

int
ctl_start (struct ctl *ctl)
{
  sigset_t all, old;
  int err;

  if (ctl->started)
    return fl_error (EINVAL, "control socket %s: the service is already "
                     "started", ctl->path);
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  err = pthread_create (&ctl->thread, NULL, service, ctl);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (err)
    return fl_error (err, "pthread_create: control service %s: %m",
                     ctl->path);
  ctl->started = true;
  return 0;
}

/* Unlink the socket unless another server has replaced it meanwhile. */
static void
unlink_socket (struct ctl *ctl)
{
  struct stat st;

  if (stat (ctl->path, &st) == 0 && st.st_dev == ctl->dev &&
      st.st_ino == ctl->ino && unlink (ctl->path) == -1)
    fl_debug ("control: unlink: %s: %m", ctl->path);
}

void
ctl_close (struct ctl *ctl)
{
  struct ctl_event *ev, *next;
  size_t i;

  if (ctl == NULL)
    return;
  /* After this no listener call is in flight. */
  fleece_set_event_listener (ctl->fl, NULL, NULL);
  if (ctl->started) {
    pthread_mutex_lock (&ctl->ev_lock);
    ctl->stopping = true;
    pthread_mutex_unlock (&ctl->ev_lock);
    wake (ctl);
    pthread_join (ctl->thread, NULL);
  }
  for (i = 0; i < ctl->nclients; i++)
    client_free (ctl->clients[i]);
  for (ev = ctl->ev_head; ev; ev = next) {
    next = ev->next;
    free (ev);
  }
  close (ctl->listen_fd);
  unlink_socket (ctl);
  pthread_mutex_destroy (&ctl->ev_lock);
  fl_debug ("control: closed %s", ctl->path);
  ctl_free (ctl);
}
