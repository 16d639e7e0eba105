/* Test the control service's request handling (server/control.c).
 *
 * Most checks call ctl_handle_line directly, as the fuzzer does, and parse
 * the reply with jansson: every reply must be one line of JSON, carry the
 * request's id when it had one, and for errors the expected class and a
 * description that says what went wrong.  The last checks go through the
 * socket: greeting, one request, and a SNAPSHOT_BROKEN event caused by an
 * injected store failure.
 *
 * TAP output (tap.h); the plan is printed at the end.
 */

#include <config.h>

#undef NDEBUG

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <jansson.h>

#include "fleece.h"
#include "fleece-control.h"
#include "tap.h"

#define DISK_SIZE (64 * 1024 * 1024)

static char dir[] = "/tmp/fleece-ctl-XXXXXX";
static char disk_path[64], store_path[64], sock_path[64];
static struct ctl *ctl;

/* Send len bytes of line, return the parsed reply (never NULL: a reply
 * that is not one line of JSON fails the test run).
 */
static json_t *
ask_len (const char *line, size_t len)
{
  char *reply = ctl_handle_line (ctl, line, len);
  json_error_t jerr;
  json_t *v;

  assert (reply != NULL);
  if (strchr (reply, '\n'))
    diag ("reply contains a newline: %s", reply);
  assert (strchr (reply, '\n') == NULL);
  v = json_loads (reply, 0, &jerr);
  if (v == NULL || !json_is_object (v))
    diag ("reply is not a JSON object: %s", reply);
  assert (v != NULL && json_is_object (v));
  free (reply);
  return v;
}

static json_t *
ask (const char *line)
{
  return ask_len (line, strlen (line));
}

/* Expect success; returns the "return" value (a new reference). */
static json_t *
expect_ok (const char *line, const char *what)
{
  json_t *reply = ask (line), *ret = json_object_get (reply, "return");
  const char *desc = "";

  json_unpack (reply, "{s:{s:s}}", "error", "desc", &desc);
  ok (ret != NULL && json_object_get (reply, "error") == NULL,
      "%s succeeds%s%s", what, *desc ? ": unexpected error: " : "", desc);
  json_incref (ret);
  json_decref (reply);
  return ret;
}

/* Expect an error of class cls whose description contains substr. */
static void
expect_error (const char *line, size_t len, const char *cls,
              const char *substr, const char *what)
{
  json_t *reply = ask_len (line, len);
  const char *c = "", *desc = "";
  bool shaped;

  shaped = json_unpack (reply, "{s:{s:s,s:s}}", "error", "class", &c,
                        "desc", &desc) == 0 &&
    json_object_get (reply, "return") == NULL;
  ok (shaped && strcmp (c, cls) == 0 && strstr (desc, substr) != NULL,
      "%s: %s \"%s\" (got %s \"%s\")", what, cls, substr, c, desc);
  json_decref (reply);
}

static void
expect_error_str (const char *line, const char *cls, const char *substr,
                  const char *what)
{
  expect_error (line, strlen (line), cls, substr, what);
}

static bool
int_member_is (json_t *obj, const char *key, json_int_t want)
{
  json_t *v = json_object_get (obj, key);

  return json_is_integer (v) && json_integer_value (v) == want;
}

static bool
str_member_is (json_t *obj, const char *key, const char *want)
{
  const char *s = json_string_value (json_object_get (obj, key));

  return s && strcmp (s, want) == 0;
}

/* ---- Happy paths ---- */

static void
test_commands (void)
{
  static const char *const names[] = {
    "qmp_capabilities", "query-commands", "subscribe-events",
    "query-status", "query-stats", "snapshot-create", "snapshot-delete",
    "query-snapshots", NULL
  };
  json_t *ret, *e;
  size_t i, j, found;

  ret = expect_ok ("{\"execute\":\"qmp_capabilities\"}", "qmp_capabilities");
  ok (json_is_object (ret) && json_object_size (ret) == 0,
      "qmp_capabilities returns {}");
  json_decref (ret);

  /* Without a socket there is no connection to keep: it just answers. */
  ret = expect_ok ("{\"execute\":\"subscribe-events\"}", "subscribe-events");
  ok (json_is_object (ret) && json_object_size (ret) == 0,
      "subscribe-events returns {}");
  json_decref (ret);

  ret = expect_ok ("{\"execute\":\"query-commands\"}", "query-commands");
  for (i = found = 0; names[i]; i++)
    json_array_foreach (ret, j, e)
      if (str_member_is (e, "name", names[i]))
        found++;
  ok (json_is_array (ret) && found == i,
      "query-commands lists all %zu commands", i);
  json_decref (ret);
}

static void
test_status (void)
{
  json_t *ret = expect_ok ("{\"execute\":\"query-status\"}", "query-status");

  ok (str_member_is (ret, "status", "running") &&
      str_member_is (ret, "version", PACKAGE_VERSION) &&
      str_member_is (ret, "disk", disk_path) &&
      str_member_is (ret, "store", store_path) &&
      int_member_is (ret, "disk-size", DISK_SIZE) &&
      int_member_is (ret, "cluster-size", 65536) &&
      str_member_is (ret, "on-cbw-error", "break-snapshot") &&
      json_is_false (json_object_get (ret, "persistent")) &&
      json_is_true (json_object_get (ret, "subcluster")) &&
      int_member_is (ret, "copy-block-size", 4096) &&
      int_member_is (ret, "snapshots", 0) &&
      int_member_is (ret, "generation", 0) &&
      json_is_integer (json_object_get (ret, "uptime")),
      "query-status returns every field with the right value");
  json_decref (ret);
}

static void
test_stats (const char *snapshot)
{
  static const char *const fields[] = {
    "disk-size", "cluster-size", "generation", "snapshots", "bytes-written",
    "cbw-clusters", "cbw-zero-clusters", "bytes-copied", "cbw-errors",
    "store-clusters-used", "store-clusters-total", "store-bytes-used",
    "store-file-bytes", "copies", "partial-clusters", "cbw-wait-ns", "max-drain-ns",
    "last-drain-ns", NULL
  };
  json_t *ret = expect_ok ("{\"execute\":\"query-stats\"}", "query-stats");
  json_t *sc = json_object_get (ret, "snapshot-clusters");
  size_t i;
  bool all = true;

  for (i = 0; fields[i]; i++)
    if (!json_is_integer (json_object_get (ret, fields[i]))) {
      diag ("query-stats: no integer '%s'", fields[i]);
      all = false;
    }
  ok (all && int_member_is (ret, "disk-size", DISK_SIZE),
      "query-stats returns every counter");
  if (snapshot)
    ok (json_array_size (sc) == 1 &&
        str_member_is (json_array_get (sc, 0), "name", snapshot) &&
        int_member_is (json_array_get (sc, 0), "clusters-held", 0) &&
        int_member_is (json_array_get (sc, 0), "clusters-released", 0),
        "query-stats snapshot-clusters lists '%s'", snapshot);
  else
    ok (json_is_array (sc) && json_array_size (sc) == 0,
        "query-stats snapshot-clusters is empty");
  json_decref (ret);
}

static void
test_snapshots (void)
{
  json_t *ret, *s;

  ret = expect_ok ("{\"execute\":\"snapshot-create\","
                   "\"arguments\":{\"name\":\"s1\"},\"id\":1}",
                   "snapshot-create s1");
  ok (str_member_is (ret, "name", "s1") &&
      int_member_is (ret, "generation", 1) && json_object_size (ret) == 2,
      "snapshot-create returns the name and generation 1");
  json_decref (ret);
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"s1\"}}", "GenericError",
                    "snapshot 's1' already exists", "duplicate name");

  ret = expect_ok ("{\"execute\":\"query-snapshots\"}", "query-snapshots");
  s = json_array_get (ret, 0);
  ok (json_array_size (ret) == 1 && str_member_is (s, "name", "s1") &&
      str_member_is (s, "export", "snapshot/s1") &&
      int_member_is (s, "generation", 1) &&
      json_is_integer (json_object_get (s, "created")) &&
      json_is_false (json_object_get (s, "broken")) &&
      json_object_get (s, "broken-reason") == NULL &&
      int_member_is (s, "clusters-held", 0) &&
      int_member_is (s, "clusters-released", 0) &&
      int_member_is (s, "readers", 0),
      "query-snapshots describes s1");
  json_decref (ret);
  test_stats ("s1");

  ret = expect_ok ("{\"execute\":\"snapshot-delete\","
                   "\"arguments\":{\"name\":\"s1\"}}", "snapshot-delete s1");
  ok (json_is_object (ret) && json_object_size (ret) == 0,
      "snapshot-delete returns {}");
  json_decref (ret);
  expect_error_str ("{\"execute\":\"snapshot-delete\","
                    "\"arguments\":{\"name\":\"s1\"}}", "GenericError",
                    "snapshot 's1' does not exist", "delete s1 twice");
  expect_error_str ("{\"execute\":\"snapshot-delete\","
                    "\"arguments\":{\"name\":\"unknown\"}}", "GenericError",
                    "snapshot 'unknown' does not exist", "delete unknown");
  ret = expect_ok ("{\"execute\":\"query-snapshots\"}", "query-snapshots");
  ok (json_is_array (ret) && json_array_size (ret) == 0,
      "query-snapshots is empty after delete");
  json_decref (ret);
}

static void
test_ids (void)
{
  static const char *const ids[] = {
    "1", "\"abc\"", "{\"a\":[1,null]}", "null", NULL
  };
  char line[128], *want;
  json_t *reply, *id;
  int i;

  for (i = 0; ids[i]; i++) {
    snprintf (line, sizeof line, "{\"id\":%s,\"execute\":\"%s\"}", ids[i],
              i % 2 ? "query-status" : "nope");
    reply = ask (line);
    id = json_object_get (reply, "id");
    want = id ? json_dumps (id, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
    ok (want && strcmp (want, ids[i]) == 0, "id %s is echoed in %s reply",
        ids[i], i % 2 ? "a return" : "an error");
    free (want);
    json_decref (reply);
  }
  reply = ask ("{\"execute\":\"query-status\"}");
  ok (json_object_get (reply, "id") == NULL, "no id when none was given");
  json_decref (reply);
}

/* ---- Errors ---- */

static void
test_names (void)
{
  char line[512], name[201];

  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"\"}}", "GenericError",
                    "snapshot name is empty", "empty name");
  memset (name, 'n', 200);
  name[200] = '\0';
  snprintf (line, sizeof line, "{\"execute\":\"snapshot-create\","
            "\"arguments\":{\"name\":\"%s\"}}", name);
  expect_error_str (line, "GenericError",
                    "snapshot name is 200 bytes long, the limit is 128",
                    "200-byte name");
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"a/b\"}}", "GenericError",
                    "contains '/'", "name with '/'");
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"a\\u0001b\"}}", "GenericError",
                    "control character 0x01 at byte 1",
                    "name with a control character");
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"a\\u007fb\"}}", "GenericError",
                    "control character 0x7f", "name with DEL");

  /* Refused for new snapshots, bitmaps and checkpoints alike. */
  {
    static const char *const cmds[] = {
      "snapshot-create", "bitmap-add", "checkpoint-create", NULL
    };
    static const struct { const char *json, *msg, *what; } bad[] = {
      { ".", "name '.' is refused: '.' and '..' are not names", "'.'" },
      { "..", "name '..' is refused", "'..'" },
      { " ", "name is only whitespace", "a space" },
      { "  \\u00a0\\u3000", "name is only whitespace",
        "spaces, NBSP and an ideographic space" },
      { "a\\u202eb", "bidirectional control character U+202E at byte 1",
        "RIGHT-TO-LEFT OVERRIDE" },
      { "\\u202aa", "bidirectional control character U+202A at byte 0",
        "LEFT-TO-RIGHT EMBEDDING" },
      { "ab\\u2066", "bidirectional control character U+2066 at byte 2",
        "LEFT-TO-RIGHT ISOLATE" },
      { "x\\u2069", "bidirectional control character U+2069",
        "POP DIRECTIONAL ISOLATE" },
    };
    size_t i, j;
    json_t *ret;

    for (i = 0; cmds[i]; i++)
      for (j = 0; j < sizeof bad / sizeof bad[0]; j++) {
        char desc[128];
        snprintf (line, sizeof line, "{\"execute\":\"%s\","
                  "\"arguments\":{\"name\":\"%s\"}}", cmds[i],
                  bad[j].json);
        snprintf (desc, sizeof desc, "%s: %s refused", cmds[i], bad[j].what);
        expect_error_str (line, "GenericError", bad[j].msg, desc);
      }
    /* Spaces, dots and other scripts inside a name are fine. */
    ret = expect_ok ("{\"execute\":\"snapshot-create\","
                     "\"arguments\":{\"name\":\" a. b\\u05d0 \"}}",
                     "a name with spaces, dots and Hebrew is accepted");
    json_decref (ret);
    ret = expect_ok ("{\"execute\":\"snapshot-delete\","
                     "\"arguments\":{\"name\":\" a. b\\u05d0 \"}}",
                     "... and deleted");
    json_decref (ret);
    ret = expect_ok ("{\"execute\":\"bitmap-add\","
                     "\"arguments\":{\"name\":\"...\"}}",
                     "bitmap '...' is accepted");
    json_decref (ret);
    ret = expect_ok ("{\"execute\":\"bitmap-remove\","
                     "\"arguments\":{\"name\":\"...\"}}",
                     "... and removed");
    json_decref (ret);
  }
}

static void
test_malformed (void)
{
  static const char nul[] = "{\"execute\":\0\"query-status\"}";

  expect_error_str ("{\"execute\":", "GenericError",
                    "malformed JSON at line 1 column", "truncated JSON");
  expect_error_str ("garbage", "GenericError",
                    "malformed JSON at line 1 column 7", "not JSON");
  expect_error_str ("", "GenericError", "malformed JSON", "empty line");
  expect_error_str ("{\"execute\":\"query-status\"} {}", "GenericError",
                    "malformed JSON", "two objects on one line");
  expect_error_str ("{\"execute\":\"x\",\"execute\":\"y\"}", "GenericError",
                    "duplicate object key", "duplicate member");
  expect_error (nul, sizeof nul - 1, "GenericError", "malformed JSON",
                "NUL byte in the line");
  expect_error_str ("{\"execute\":\"\xff\xfe\"}", "GenericError",
                    "malformed JSON", "invalid UTF-8");
  expect_error_str ("[1,2]", "GenericError",
                    "request is a JSON array, not an object", "array");
  expect_error_str ("42", "GenericError",
                    "request is a JSON integer, not an object", "number");
  expect_error_str ("\"query-status\"", "GenericError",
                    "request is a JSON string, not an object", "string");
  expect_error_str ("{}", "GenericError", "request has no 'execute' member",
                    "missing execute");
  expect_error_str ("{\"execute\":[\"query-status\"]}", "GenericError",
                    "request member 'execute' is a JSON array, not a string",
                    "execute not a string");
  expect_error_str ("{\"execute\":\"query-status\",\"arguments\":[]}",
                    "GenericError",
                    "'arguments' of query-status is a JSON array, not an "
                    "object", "arguments not an object");
  expect_error_str ("{\"execute\":\"query-status\",\"argument\":{}}",
                    "GenericError", "request member 'argument' is unexpected",
                    "unexpected request member");
}

static void
test_dispatch_errors (void)
{
  expect_error_str ("{\"execute\":\"foo\"}", "CommandNotFound",
                    "The command foo has not been found", "unknown command");
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":\"x\",\"x\":1}}", "GenericError",
                    "Parameter 'x' is unexpected", "unknown argument");
  expect_error_str ("{\"execute\":\"query-status\","
                    "\"arguments\":{\"verbose\":true}}", "GenericError",
                    "Parameter 'verbose' is unexpected",
                    "argument to a command that takes none");
  expect_error_str ("{\"execute\":\"snapshot-create\"}", "GenericError",
                    "Parameter 'name' is missing", "missing argument");
  expect_error_str ("{\"execute\":\"snapshot-delete\",\"arguments\":{}}",
                    "GenericError", "Parameter 'name' is missing",
                    "missing argument, empty arguments");
  expect_error_str ("{\"execute\":\"snapshot-create\","
                    "\"arguments\":{\"name\":1}}", "GenericError",
                    "Parameter 'name' expects a string", "integer name");
  expect_error_str ("{\"execute\":\"snapshot-delete\","
                    "\"arguments\":{\"name\":null}}", "GenericError",
                    "Parameter 'name' expects a string", "null name");
}

/* ---- Opening the socket ---- */

static void
test_open_errors (struct fleece *fl)
{
  char path[256];
  struct ctl *c2;
  int fd;

  c2 = ctl_open (fl, sock_path, NULL);
  ok (c2 == NULL && strstr (fleece_last_error (), "is in use by another "
                            "server"),
      "a live socket is refused: %s", fleece_last_error ());
  ctl_close (c2);

  snprintf (path, sizeof path, "%s/plain-file", dir);
  fd = open (path, O_CREAT | O_WRONLY, 0600);
  assert (fd >= 0);
  close (fd);
  c2 = ctl_open (fl, path, NULL);
  ok (c2 == NULL && strstr (fleece_last_error (), "is not a socket"),
      "a non-socket path is refused: %s", fleece_last_error ());
  ctl_close (c2);
  unlink (path);

  memset (path, 'p', 200);
  path[0] = '/';
  path[200] = '\0';
  c2 = ctl_open (fl, path, NULL);
  ok (c2 == NULL && strstr (fleece_last_error (), "the limit is"),
      "a path longer than sun_path is refused: %s", fleece_last_error ());
  ctl_close (c2);
}

/* ---- Through the socket ---- */

static int
connect_socket (void)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);

  assert (fd >= 0);
  strcpy (sun.sun_path, sock_path);
  if (connect (fd, (struct sockaddr *) &sun, sizeof sun) == -1)
    bail_out ("connect: %s: %s", sock_path, strerror (errno));
  return fd;
}

/* Read one line within 10 seconds, parsed; NULL on timeout or EOF. */
static json_t *
read_line (int fd)
{
  char buf[8192];
  size_t len = 0;
  struct pollfd pfd = { .fd = fd, .events = POLLIN };

  while (len < sizeof buf - 1) {
    if (poll (&pfd, 1, 10000) != 1 || read (fd, buf + len, 1) != 1)
      return NULL;
    if (buf[len] == '\n')
      break;
    len++;
  }
  buf[len] = '\0';
  return json_loads (buf, 0, NULL);
}

static void
test_socket_request (int fd)
{
  static const char req[] = "{\"execute\":\"query-status\",\"id\":9}\n";
  json_t *v;

  v = read_line (fd);
  ok (json_unpack (v, "{s:{s:{s:{s:i}}}}", "QMP", "version", "fleece",
                   "major", &(int) { 0 }) == 0, "greeting");
  json_decref (v);
  assert (write (fd, req, sizeof req - 1) == sizeof req - 1);
  v = read_line (fd);
  ok (int_member_is (v, "id", 9) &&
      str_member_is (json_object_get (v, "return"), "status", "running"),
      "query-status through the socket");
  json_decref (v);
}

/* A store failure during copy-before-write breaks the snapshot: the
 * client connected on fd hears of it.
 */
static void
test_socket_event (struct fleece *fl, int fd)
{
  char *block = malloc (65536);
  const char *ev = "", *snap = "", *reason = "";
  json_int_t sec = 0, usec = -1;
  json_t *v;
  bool shaped;

  assert (block != NULL);
  memset (block, 0xa5, 65536);
  assert (fleece_live_pwrite (fl, block, 65536, 0, 0) == 0);
  json_decref (expect_ok ("{\"execute\":\"snapshot-create\","
                          "\"arguments\":{\"name\":\"doomed\"}}",
                          "snapshot-create doomed"));
  fleece_debug.fail_store_write = 1;
  memset (block, 0x5a, 65536);
  assert (fleece_live_pwrite (fl, block, 65536, 0, 0) == 0);
  fleece_debug.fail_store_write = 0;
  free (block);
  v = read_line (fd);
  shaped = json_unpack (v, "{s:s,s:{s:s,s:s},s:{s:I,s:I}}", "event", &ev,
                        "data", "snapshot", &snap, "reason", &reason,
                        "timestamp", "seconds", &sec,
                        "microseconds", &usec) == 0;
  ok (shaped && strcmp (ev, "SNAPSHOT_BROKEN") == 0 &&
      strcmp (snap, "doomed") == 0 && strstr (reason, "injected error") &&
      sec > 0 && usec >= 0 && usec < 1000000,
      "SNAPSHOT_BROKEN event: %s %s: %s", ev, snap, reason);
  json_decref (v);
  v = expect_ok ("{\"execute\":\"query-snapshots\"}", "query-snapshots");
  reason = json_string_value (json_object_get (json_array_get (v, 0),
                                               "broken-reason"));
  ok (json_is_true (json_object_get (json_array_get (v, 0), "broken")) &&
      reason && strstr (reason, "injected error"),
      "query-snapshots shows the snapshot broken, with the reason");
  json_decref (v);
}

int
main (void)
{
  struct fleece_config cfg = { 0 };
  struct ctl_info info = { .on_cbw_error = "break-snapshot" };
  struct fleece *fl;
  struct stat st;
  int fd;

  assert (mkdtemp (dir) != NULL);
  snprintf (disk_path, sizeof disk_path, "%s/disk", dir);
  snprintf (store_path, sizeof store_path, "%s/store", dir);
  snprintf (sock_path, sizeof sock_path, "%s/ctl.sock", dir);
  fd = open (disk_path, O_CREAT | O_RDWR, 0600);
  assert (fd >= 0 && ftruncate (fd, DISK_SIZE) == 0);
  close (fd);
  cfg.disk = disk_path;
  cfg.store = store_path;
  fl = fleece_open (&cfg);
  if (fl == NULL || fleece_start (fl) == -1)
    bail_out ("fleece_open: %s", fleece_last_error ());
  ctl = ctl_open (fl, sock_path, &info);
  if (ctl == NULL)
    bail_out ("ctl_open: %s", fleece_last_error ());
  ok (stat (sock_path, &st) == 0 && S_ISSOCK (st.st_mode) &&
      (st.st_mode & 0777) == 0600, "socket created with mode 0600");

  test_commands ();
  test_status ();
  test_stats (NULL);
  test_snapshots ();
  test_ids ();
  test_names ();
  test_malformed ();
  test_dispatch_errors ();
  test_open_errors (fl);
  ok (ctl_start (ctl) == 0, "ctl_start");
  fd = connect_socket ();
  test_socket_request (fd);
  test_socket_event (fl, fd);
  close (fd);

  ctl_close (ctl);
  ok (stat (sock_path, &st) == -1 && errno == ENOENT,
      "ctl_close removes the socket");
  fleece_close (fl);
  unlink (disk_path);
  unlink (store_path);
  rmdir (dir);
  return done ();
}
