#!/usr/bin/env python3
# Strict check of a Prometheus text exposition (format 0.0.4), for the
# metrics tests: every line against the grammar, HELP and TYPE once per
# metric and before its samples, a metric's lines together, counters
# named *_total, histograms as cumulative _bucket{le} lines ending with
# +Inf then _sum and _count equal to the +Inf bucket, no sample twice.
#
#   prom-check.py FILE               check; exit 1 naming the bad line
#   prom-check.py FILE SAMPLE...     check, then print each SAMPLE's value
#                                    (SAMPLE as written: name{labels})

import math
import re
import sys

NAME = r'[a-zA-Z_:][a-zA-Z0-9_:]*'
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(r'^(%s)(\{(?:%s(?:,%s)*,?)?\})? (\S+)( -?[0-9]+)?$'
                    % (NAME, LABEL, LABEL))
HELP = re.compile(r'^# HELP (%s) ((?:[^\\\n]|\\[\\n])*)$' % NAME)
TYPE = re.compile(r'^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$'
                  % NAME)
LABELS = re.compile(r'(%s)="((?:[^"\\]|\\.)*)"' % r'[a-zA-Z_][a-zA-Z0-9_]*')


def fail(n, line, why):
    sys.exit('prom-check: line %d: %s: %r' % (n, why, line))


def value(n, line, s):
    if s in ('NaN', '+Inf', '-Inf'):
        return float(s.replace('+', ''))
    if not re.match(r'^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$',
                    s):
        fail(n, line, 'not a float: %s' % s)
    return float(s)


def family(name, types):
    """The metric a sample belongs to (histogram suffixes removed)."""
    for suf in ('_bucket', '_sum', '_count'):
        base = name[:-len(suf)]
        if name.endswith(suf) and types.get(base) == 'histogram':
            return base, suf
    return name, ''


def check(text):
    if not text.endswith('\n'):
        sys.exit('prom-check: the text does not end with a newline')
    helps, types, done, samples = {}, {}, set(), {}
    current = None
    hist = {}
    for n, line in enumerate(text.split('\n')[:-1], 1):
        if line == '':
            continue
        if line.startswith('# HELP '):
            m = HELP.match(line) or fail(n, line, 'bad HELP')
            name = m.group(1)
        elif line.startswith('# TYPE '):
            m = TYPE.match(line) or fail(n, line, 'bad TYPE')
            name = m.group(1)
        elif line.startswith('#'):
            continue
        else:
            m = SAMPLE.match(line) or fail(n, line, 'not a sample line')
            name = m.group(1)
        fam, suf = family(name, types)
        if fam != current:
            if fam in done:
                fail(n, line, 'lines of %s are not together' % fam)
            if current:
                done.add(current)
            current = fam
        if line.startswith('# HELP '):
            if fam in helps:
                fail(n, line, 'second HELP')
            helps[fam] = m.group(2)
            continue
        if line.startswith('# TYPE '):
            if fam in types:
                fail(n, line, 'second TYPE')
            if any(k[0] == fam for k in samples):
                fail(n, line, 'TYPE after a sample')
            types[fam] = m.group(2)
            if m.group(2) == 'counter' and not fam.endswith('_total'):
                fail(n, line, 'a counter whose name does not end in _total')
            if m.group(2) != 'counter' and fam.endswith('_total'):
                fail(n, line, 'a %s named *_total' % m.group(2))
            continue
        if fam not in helps or fam not in types:
            fail(n, line, 'a sample before its HELP and TYPE')
        labels = dict(LABELS.findall(m.group(2) or ''))
        key = (name, tuple(sorted(labels.items())))
        if key in samples:
            fail(n, line, 'the same sample twice')
        v = value(n, line, m.group(3))
        samples[key] = v
        t = types[fam]
        if t == 'counter' and not v >= 0:
            fail(n, line, 'a negative counter')
        if t == 'histogram':
            h = hist.setdefault(fam, {'le': [], 'sum': None, 'count': None})
            if suf == '_bucket':
                if 'le' not in labels or h['count'] is not None:
                    fail(n, line, 'a bucket without le, or after _count')
                le = value(n, line, labels['le'])
                if h['le'] and (le <= h['le'][-1][0] or v < h['le'][-1][1]):
                    fail(n, line, 'buckets not increasing and cumulative')
                h['le'].append((le, v))
            elif suf == '_sum':
                h['sum'] = v
            elif suf == '_count':
                h['count'] = v
            else:
                fail(n, line, 'a histogram sample that is not _bucket, '
                     '_sum or _count')
        elif suf:
            fail(n, line, 'suffix %s on a %s' % (suf, t))
    for fam, h in hist.items():
        if not h['le'] or not math.isinf(h['le'][-1][0]):
            sys.exit('prom-check: %s: no +Inf bucket' % fam)
        if h['count'] != h['le'][-1][1] or h['sum'] is None:
            sys.exit('prom-check: %s: _count %s is not the +Inf bucket %s, '
                     'or no _sum' % (fam, h['count'], h['le'][-1][1]))
    for fam in types:
        if fam not in helps:
            sys.exit('prom-check: %s: TYPE without HELP' % fam)
    return samples


def main():
    with open(sys.argv[1], encoding='utf-8') as f:
        samples = check(f.read())
    for want in sys.argv[2:]:
        m = re.match(r'^(%s)(?:\{(.*)\})?$' % NAME, want)
        key = (m.group(1), tuple(sorted(LABELS.findall(m.group(2) or ''))))
        if key not in samples:
            sys.exit('prom-check: no sample %s' % want)
        v = samples[key]
        print(int(v) if v == int(v) else v)


main()
