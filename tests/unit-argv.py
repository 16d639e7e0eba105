#!/usr/bin/env python3
# unit-argv.py UNIT INSTANCE [FROM=TO ...]: what systemd would run for
# the instance INSTANCE of the template UNIT, printed for bash's eval:
#   unit_type       Type= (simple when not set)
#   unit_env        the environment the unit sets: Environment= lines,
#                   then the EnvironmentFile= (a later one wins)
#   unit_argv       ExecStart= with the specifiers (%i, %%) replaced and
#                   the variables expanded as systemd.service(5) says: a
#                   word "$VAR" becomes the words of VAR's value split at
#                   white space, "${VAR}" one word (also within a word)
#   unit_listen     the ListenStream= of a .socket unit
# Each FROM=TO first replaces the path prefix FROM in the unit's text:
# the test's stand-ins for /etc/fleece, /run/fleece, /var/lib/fleece and
# the directory of the installed programs.  Only the syntax Fleece's
# units use is understood: one value a line, no continuation lines.
import re
import shlex
import sys

unit, instance, maps = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(unit).read()
for m in maps:
    src, dst = m.split("=", 1)
    text = text.replace(src, dst)
text = re.sub(r"%([i%])", lambda m: instance if m.group(1) == "i" else "%",
              text)

keys = {}
for line in text.splitlines():
    line = line.strip()
    if not line or line[0] in "#;[" or "=" not in line:
        continue
    k, v = line.split("=", 1)
    keys.setdefault(k.strip(), []).append(v.strip())


def env_file_value(v):
    # KEY=VALUE as systemd.exec(5) reads it: one pair of quotes removed.
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    return v


env = {}
for v in keys.get("Environment", []):
    for word in shlex.split(v):
        k, val = word.split("=", 1)
        env[k] = val
for path in keys.get("EnvironmentFile", []):
    for line in open(path.lstrip("-")):
        line = line.strip()
        if line and line[0] not in "#;" and "=" in line:
            k, val = line.split("=", 1)
            env[k.strip()] = env_file_value(val.strip())

argv = []
for exe in keys.get("ExecStart", [])[:1]:
    for word in shlex.split(exe):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda m: env.get(m.group(1), ""), word))


def array(name, words):
    print("%s=(%s)" % (name, " ".join(shlex.quote(w) for w in words)))


print("unit_type=%s" % shlex.quote(keys.get("Type", ["simple"])[-1]))
array("unit_env", ["%s=%s" % kv for kv in env.items()])
array("unit_argv", argv)
array("unit_listen", keys.get("ListenStream", []))
