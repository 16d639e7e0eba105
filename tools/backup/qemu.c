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

#include "repo.h"

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
 * signal).  quiet: its standard output goes to /dev/null.
 */
int
qemu_run (const char *const argv[], bool quiet)
{
  int status;
  pid_t pid;

  fflush (NULL);
  pid = fork ();
  if (pid == -1)
    die ("fork: %m");
  if (pid == 0) {
    if (quiet && freopen ("/dev/null", "w", stdout) == NULL)
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
  int st = qemu_run (argv, true);

  if (st != 0) {
    command_line (argv, cmd, sizeof cmd);
    die ("'%s' failed with status %d", cmd, st);
  }
}

static void
qemu_nbd_cleanup (void)
{
  if (qn.pid > 0) {
    kill (qn.pid, SIGTERM);
    waitpid (qn.pid, NULL, 0);
    qn.pid = 0;
  }
  if (qn.dir[0]) {
    unlink (qn.sock);
    rmdir (qn.dir);
    qn.dir[0] = '\0';
  }
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

/* Serve file (qcow2) with qemu-nbd; returns the export's NBD URI. */
char *
qemu_nbd_start (const char *file, bool readonly)
{
  static bool registered;
  const char *tmpdir = getenv ("TMPDIR");
  char *uri, pidbuf[32];
  int fd;

  assert (qn.pid == 0);
  if (!registered && atexit (qemu_nbd_cleanup) != 0)
    die ("atexit: failed");
  registered = true;
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
    execlp ("qemu-nbd", "qemu-nbd", "-f", "qcow2", "--cache=writeback",
            readonly ? "--read-only" : "--discard=unmap", file,
            (char *) NULL);
    fprintf (stderr, "fleece-backup: exec: qemu-nbd: %m\n");
    _exit (127);
  }
  close (fd);
  if (asprintf (&uri, "nbd+unix:///?socket=%s", qn.sock) == -1)
    die ("asprintf: %m");
  return uri;
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
