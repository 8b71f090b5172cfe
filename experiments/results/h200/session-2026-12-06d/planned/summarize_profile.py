"""Per frame of a py-spy raw profile (``--format raw``): the share of samples it is on the stack
(inclusive) and at the top (self), main thread only, after the warm-up. Usage: summarize_profile.py RAW [N]"""
import collections
import sys

inclusive, own = collections.Counter(), collections.Counter()
total = 0
for line in open(sys.argv[1]):
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if "timed_loop (" not in stack:
        continue  # another thread, or the setup
    frames = [f.split(" (")[0] if "0x" not in f else f.split(" ")[-1] for f in stack.split(";")]
    n = int(count)
    total += n
    for frame in set(frames):
        inclusive[frame] += n
    own[frames[-1]] += n
top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
print(f"{total} samples in the timed loop")
print("inclusive:")
for frame, n in inclusive.most_common(top):
    print(f"  {100 * n / total:5.1f}%  {frame}")
print("self:")
for frame, n in own.most_common(top // 2):
    print(f"  {100 * n / total:5.1f}%  {frame}")
