/* fleece-backup: running QEMU's programs.
 *
 * Fleece never reads or writes qcow2 itself: qemu-img creates, checks
 * and commits points, and qemu-nbd serves a point (or a new overlay) as
 * an NBD export on a Unix socket in a private temporary directory, which
 * the pull reads or writes with libnbd like any other NBD end.
 *
 * qemu-nbd is started with systemd socket activation on a socket this
 * process has already bound and listens on, so that the export can be
 * connected to as soon as the child exists (no waiting for a socket
 * file).  Without --persistent it exits when its one client (the pull)
 * disconnects; qemu_nbd_wait checks that it then exited with status 0,
 * having closed the image.  If the program dies first, an atexit
 * handler stops it (SIGTERM, then waits) and removes the directory.
 *
 * A point is named to QEMU as "-f qcow2 FILE", or, when it is encrypted
 * (--encrypt-key-file: qcow2 LUKS) or written compressed (--compress),
 * by --image-opts: the key is a secret object read from the key file by
 * QEMU, given to the point and to each backing file below it (QEMU asks
 * for the key of each level of a chain), and a compress filter on top
 * makes every data write a compressed cluster.
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cleanup.h"
#include "repo.h"

#define SECRET_ID "fleecekey"

const char *repo_key_file;

static struct {
  pid_t pid;                    /* qemu-nbd, or 0 */
  char dir[64];                 /* its private directory, or "" */
  char sock[128];
} qn;

static void
command_line (const char *const argv[], char *buf, size_t n)
{
  size_t len = 0;
  int i;

  buf[0] = '\0';
  for (i = 0; argv[i] && len < n; i++)
    len += snprintf (buf + len, n - len, "%s%s", i ? " " : "", argv[i]);
}

/* Run a program and wait for it; returns its exit status (or 128 +
 * signal).  quiet: QUIET_OUT, its standard output goes to /dev/null;
 * QUIET_ERR, its standard error too.
 */
int
qemu_run (const char *const argv[], int quiet)
{
  int status;
  pid_t pid;

  fflush (NULL);
  pid = fork ();
  if (pid == -1)
    die ("fork: %m");
  if (pid == 0) {
    if ((quiet & QUIET_OUT) && freopen ("/dev/null", "w", stdout) == NULL)
      _exit (126);
    if ((quiet & QUIET_ERR) && freopen ("/dev/null", "w", stderr) == NULL)
      _exit (126);
    execvp (argv[0], (char **) argv);
    fprintf (stderr, "fleece-backup: exec: %s: %m\n", argv[0]);
    _exit (127);
  }
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR)
      die ("waitpid: %s: %m", argv[0]);
  if (WIFSIGNALED (status))
    return 128 + WTERMSIG (status);
  return WEXITSTATUS (status);
}

void
qemu_run_ok (const char *const argv[])
{
  char cmd[1024];
  int st = qemu_run (argv, QUIET_OUT);

  if (st != 0) {
    command_line (argv, cmd, sizeof cmd);
    die ("'%s' failed with status %d", cmd, st);
  }
}

/* s with every ',' doubled, as QEMU's option syntax wants. */
static char *
qemu_escape (const char *s)
{
  size_t n = strlen (s) + 1, i, j = 0;
  char *e;

  for (i = 0; s[i]; i++)
    n += s[i] == ',';
  e = xmalloc (n);
  for (i = 0; s[i]; i++) {
    e[j++] = s[i];
    if (s[i] == ',')
      e[j++] = ',';
  }
  e[j] = '\0';
  return e;
}

/* The secret object holding the key (--object's argument). */
char *
qemu_secret (void)
{
  CLEANUP_FREE char *f = qemu_escape (repo_key_file);
  char *o;

  if (asprintf (&o, "secret,id=" SECRET_ID ",file=%s,format=raw", f) == -1)
    die ("asprintf: %m");
  return o;
}

void
args_add (struct args *a, const char *s)
{
  char *d = NULL;

  if (s && (d = strdup (s)) == NULL)
    die ("strdup: %m");
  args_push (a, d);
}

/* Append s (or NULL, the end), which a now owns. */
void
args_push (struct args *a, char *s)
{
  if (string_vector_append (&a->v, s) == -1)
    die ("realloc: %m");
}

void
args_free (struct args *a)
{
  size_t i;

  for (i = 0; i < a->v.len; i++)
    free (a->v.ptr[i]);
  string_vector_reset (&a->v);
}

/* Append to a the arguments that name image q. */
void
qemu_image_args (struct args *a, const struct qimg *q)
{
  CLEANUP_FREE char *path = NULL;
  const char *pre = q->compress ? "file." : "";
  char *o, *o2, backing[8 * 64 + 1] = "";
  unsigned i;

  if (!q->encrypted && !q->compress) {
    args_add (a, "-f");
    args_add (a, "qcow2");
    args_add (a, q->path);
    return;
  }
  if (q->encrypted) {
    args_add (a, "--object");
    args_push (a, qemu_secret ());
  }
  if (q->depth > 64)
    die ("%s: a chain of %u backing files is too deep to give each its "
         "key; prune the repository", q->path, q->depth);
  path = qemu_escape (q->path);
  if (asprintf (&o, "%sdriver=qcow2,%sfile.driver=file,%sfile.filename=%s",
                q->compress ? "driver=compress,file." : "", pre, pre,
                path) == -1)
    die ("asprintf: %m");
  /* The key for the image and for each backing file below it. */
  for (i = 0; q->encrypted && i <= q->depth; i++) {
    if (asprintf (&o2, "%s,%s%sencrypt.key-secret=" SECRET_ID, o, pre,
                  backing) == -1)
      die ("asprintf: %m");
    free (o);
    o = o2;
    strcat (backing, "backing.");
  }
  args_add (a, "--image-opts");
  args_push (a, o);
}

/* Run "qemu-img SUB EXTRA... IMAGE"; returns its exit status. */
int
qemu_img (const char *sub, const char *const extra[], const struct qimg *q,
          int quiet)
{
  struct args a = { 0 };
  int st;
  size_t i;

  args_add (&a, "qemu-img");
  args_add (&a, sub);
  for (i = 0; extra && extra[i]; i++)
    args_add (&a, extra[i]);
  qemu_image_args (&a, q);
  args_push (&a, NULL);
  st = qemu_run ((const char *const *) a.v.ptr, quiet);
  args_free (&a);
  return st;
}

/* An encrypted point: does the key open it?  (QEMU checks the key only
 * when it reads.)
 */
void
qemu_key_check (const struct qimg *q, const char *point)
{
  struct args a = { 0 };
  int st;

  if (!q->encrypted)
    return;
  args_add (&a, "qemu-io");
  args_add (&a, "-r");
  args_add (&a, "-c");
  args_add (&a, "read 0 512");
  qemu_image_args (&a, q);
  args_push (&a, NULL);
  st = qemu_run ((const char *const *) a.v.ptr, QUIET_OUT | QUIET_ERR);
  args_free (&a);
  if (st != 0)
    die ("point %s: the key in %s does not open it (a wrong "
         "--encrypt-key-file?)", point, repo_key_file);
}

static void
qemu_nbd_cleanup (void)
{
  if (qn.pid > 0) {
    kill (qn.pid, SIGTERM);
    waitpid (qn.pid, NULL, 0);
    qn.pid = 0;
  }
  qemu_nbd_connected ();
}

static int
listen_unix (const char *path)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);

  if (fd == -1)
    die ("socket: %m");
  if (strlen (path) >= sizeof sa.sun_path)
    die ("socket path too long: %s", path);
  memcpy (sa.sun_path, path, strlen (path) + 1);
  if (bind (fd, (struct sockaddr *) &sa, sizeof sa) == -1)
    die ("bind: %s: %m", path);
  if (listen (fd, 8) == -1)
    die ("listen: %s: %m", path);
  return fd;
}

/* Serve image q with qemu-nbd; returns the export's NBD URI. */
char *
qemu_nbd_start (const struct qimg *q, bool readonly)
{
  static bool registered;
  const char *tmpdir = getenv ("TMPDIR");
  struct args a = { 0 };
  char *uri, pidbuf[32];
  int fd;

  assert (qn.pid == 0);
  if (!registered && atexit (qemu_nbd_cleanup) != 0)
    die ("atexit: failed");
  registered = true;
  args_add (&a, "qemu-nbd");
  args_add (&a, "--cache=writeback");
  args_add (&a, readonly ? "--read-only" : "--discard=unmap");
  qemu_image_args (&a, q);
  args_push (&a, NULL);
  snprintf (qn.dir, sizeof qn.dir, "%s/fleece-backup.XXXXXX",
            tmpdir && strlen (tmpdir) < 32 ? tmpdir : "/tmp");
  if (mkdtemp (qn.dir) == NULL)
    die ("mkdtemp: %s: %m", qn.dir);
  snprintf (qn.sock, sizeof qn.sock, "%s/nbd.sock", qn.dir);
  fd = listen_unix (qn.sock);
  fflush (NULL);
  qn.pid = fork ();
  if (qn.pid == -1)
    die ("fork: %m");
  if (qn.pid == 0) {
    if (fd != 3 && (dup2 (fd, 3) == -1 || close (fd) == -1))
      _exit (126);
    snprintf (pidbuf, sizeof pidbuf, "%d", (int) getpid ());
    setenv ("LISTEN_PID", pidbuf, 1);
    setenv ("LISTEN_FDS", "1", 1);
    execvp ("qemu-nbd", a.v.ptr);
    fprintf (stderr, "fleece-backup: exec: qemu-nbd: %m\n");
    _exit (127);
  }
  args_free (&a);
  close (fd);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", qn.sock) == -1)
    die ("asprintf: %m");
  return uri;
}

/* Once the client is connected, the socket's name is not needed any
 * more (a repository pull never reconnects): remove it now, so that a
 * run killed later leaves nothing in $TMPDIR.
 */
void
qemu_nbd_connected (void)
{
  if (qn.dir[0]) {
    unlink (qn.sock);
    rmdir (qn.dir);
    qn.dir[0] = '\0';
  }
}

/* After the client disconnected: qemu-nbd must exit, with status 0. */
void
qemu_nbd_wait (void)
{
  int status;

  while (waitpid (qn.pid, &status, 0) == -1)
    if (errno != EINTR)
      die ("waitpid: qemu-nbd: %m");
  qn.pid = 0;
  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0)
    die ("qemu-nbd exited with status %d after the pull: the image may "
         "not be closed cleanly", WIFEXITED (status)
         ? WEXITSTATUS (status) : 128 + WTERMSIG (status));
  qemu_nbd_cleanup ();
}
