/* The control service's commands: QMP-shaped JSON requests and replies
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
 * The service that reads the lines from the socket and writes the
 * replies and events back is control-socket.c's.
 */

#include <config.h>

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cleanup.h"
#include "control-internal.h"
#include "fleece-metrics.h"

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
json_t *
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

char *
ctl_dump (json_t *v)
{
  char *s = v ? json_dumps (v, JSON_COMPACT) : NULL;

  json_decref (v);
  return s;
}

/* A reply line: {"return":ret} when ret is not NULL (ret is consumed),
 * else {"error":{"class":class,"desc":desc}}; then "id" if given.
 */
char *
ctl_make_reply (json_t *ret, const char *class, const char *desc,
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
  return ctl_dump (reply);
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
  ctl_subscribe_current (ctl);
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
                             "s:I,s:I,s:s,s:b,s:I}",
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
                             "locking", fleece_locking_state (ctl->fl),
                             "subcluster",
                             fleece_copy_block_size (ctl->fl) != 0,
                             "copy-block-size", (json_int_t)
                             (fleece_copy_block_size (ctl->fl)
                              ? fleece_copy_block_size (ctl->fl)
                              : st.cluster_size)),
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
  STAT (partial_clusters, "partial-clusters"),
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

/* The Prometheus text (metrics.c), for fleecectl metrics. */
static json_t *
cmd_metrics (struct ctl *ctl, json_t *args)
{
  char *text = fleece_metrics (ctl->fl);
  json_t *v = text ? json_pack ("{s:s,s:s}", "content-type",
                                "text/plain; version=0.0.4", "text", text)
    : NULL;

  free (text);
  return checked (v, "metrics");
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
  CLEANUP_FREE const char **names = NULL;

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
      fl_error (EINVAL, "Parameter 'sources' expects an array of strings");
      return NULL;
    }
  }
  if (fleece_bitmap_merge (ctl->fl, arg_name (args, "target"), names,
                           n) == -1)
    return NULL;
  return checked (json_object (), "bitmap-merge");
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

static const struct ctl_param group_prepare_params[] = {
  { "group", CTL_STRING, false },
  { "name", CTL_STRING, false },
  { "checkpoint", CTL_BOOL, true },
  { "deadline-ms", CTL_INT, true },
  { NULL }
};
static const struct ctl_param group_params[] = {
  { "group", CTL_STRING, false },
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
  { "metrics", cmd_metrics, no_params,
    "The engine's metrics in Prometheus's text format" },
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
  { "group-prepare", ctl_group_prepare, group_prepare_params,
    "Hold the live writes for group GROUP, which will create NAME" },
  { "group-commit", ctl_group_commit, group_params,
    "Create the snapshot or checkpoint of group GROUP, then release" },
  { "group-abort", ctl_group_abort, group_params,
    "Release group GROUP, creating nothing" },
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
  reply = ctl_make_reply (ret, class, ret ? NULL : fleece_last_error (),
                          id);
  json_decref (req);
  return reply;
}
