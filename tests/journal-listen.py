#!/usr/bin/env python3
# A stand-in for journald's native socket, for the tests that check what
# a program sends with sd_journal_send: bind SOCKET (a datagram socket,
# as /run/systemd/journal/socket is), decode each datagram of the native
# protocol (KEY=VALUE lines, or KEY, a newline, a 64-bit little-endian
# length and the value, for values with newlines) and append it to OUT
# as one JSON object per line, until killed.  Datagrams too big for one
# sendmsg come as a memfd (SCM_RIGHTS), read the same way.
#
#   journal-listen.py SOCKET OUT
#   journal-listen.py --raw SOCKET OUT   each datagram as it is, one a
#                                        line (a stand-in for /dev/log)

import array
import json
import os
import socket
import struct
import sys


def decode(b):
    rec, i = {}, 0
    while i < len(b):
        nl = b.index(b'\n', i)
        line = b[i:nl]
        if b'=' in line:
            k, v = line.split(b'=', 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack('<Q', b[nl + 1:nl + 9])
            v = b[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        rec[k.decode()] = v.decode('utf-8', 'replace')
    return rec


def main():
    raw = sys.argv[1] == '--raw'
    path, out = sys.argv[1 + raw], sys.argv[2 + raw]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    with open(out, 'a', encoding='utf-8') as f:
        while True:
            fds = array.array('i')
            data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(4))
            for level, kind, extra in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(extra[:4])
            for fd in fds:
                data = os.pread(fd, 1 << 24, 0)
                os.close(fd)
            if raw:
                f.write(data.decode('utf-8', 'replace').rstrip('\n') + '\n')
            else:
                f.write(json.dumps(decode(data)) + '\n')
            f.flush()


main()
