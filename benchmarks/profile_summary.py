"""Where a thread of a loaded server spends its samples: a py-spy raw (collapsed) profile → the functions that
hold most samples, counting each function once per sample (inclusive) and as the innermost frame (self).

    py-spy record --pid PID --duration 10 --native --threads --format raw -o prof.txt
    python benchmarks/profile_summary.py prof.txt --thread MainThread --out benchmarks/results/profile-....txt
"""
from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path


def summarize(lines: list[str], thread: str, top: int) -> str:
    inclusive: collections.Counter = collections.Counter()
    innermost: collections.Counter = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        if not frames or thread not in frames[0]:
            continue
        n = int(count)
        total += n
        names = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]
        innermost[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    out = [f"{total} samples of thread {thread!r}", "", "inclusive  share  function"]
    out += [f"{n:9d}  {100 * n / total:4.0f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", "    self   share  function"]
    out += [f"{n:9d}  {100 * n / total:4.0f}%  {name}" for name, n in innermost.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="py-spy record --format raw output")
    parser.add_argument("--thread", default="MainThread", help="the thread (py-spy's name; MainThread = event loop)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--title", default="", help="a first line saying what was measured, on what")
    parser.add_argument("--out")
    args = parser.parse_args()
    text = summarize(Path(args.profile).read_text().splitlines(), args.thread, args.top)
    text = (args.title + "\n\n" if args.title else "") + text
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
