#!/usr/bin/env bash
# Compares two pipeline bench reports (target/bench/pipeline*.json), room by
# room: the CPU time per event of the binary and of the bare loop, their
# ratio, throughput against the limit, and p99, with the change in percent;
# or two engine micro-bench reports (target/bench/engine.json): time and
# allocations per event. A regression shows as a number, not as a feeling.
#   scripts/bench-compare.sh OLD.json NEW.json
#   cp target/bench/pipeline.json /tmp/before.json; <change>; scripts/bench.sh pipeline;
#   scripts/bench-compare.sh /tmp/before.json target/bench/pipeline.json
# Exits 1 when a room's CPU per event (or the engine's time or allocations
# per event) grew by more than BENCH_TOLERANCE percent (default 15, above
# this host's run-to-run noise for CPU time).
set -euo pipefail
if [ "$#" -ne 2 ]; then
  echo "usage: scripts/bench-compare.sh OLD.json NEW.json" >&2
  exit 2
fi
exec python3 - "$1" "$2" "${BENCH_TOLERANCE:-15}" <<'PY'
import json, sys

old_path, new_path, tolerance = sys.argv[1], sys.argv[2], float(sys.argv[3])
old, new = (json.load(open(p)) for p in (old_path, new_path))

def change(a, b):
    if a in (None, 0) or b is None:
        return "   n/a"
    return f"{(b - a) / a * 100:+6.1f}%"

if new.get("bench") == "engine":
    worse = []
    print(f"{'engine figure':<28} {'before':>10} {'after':>10} {'change':>8}")
    for key, label in [
        ("route_ns_per_event", "route ns/event"),
        ("full_path_ns_per_event", "full path ns/event"),
        ("allocations_per_event", "allocations/event"),
        ("bytes_allocated_per_event", "bytes allocated/event"),
    ]:
        a, b = old.get(key), new.get(key)
        shown = lambda v: "-" if v is None else f"{v:.1f}"
        print(f"{label:<28} {shown(a):>10} {shown(b):>10} {change(a, b):>8}")
        if a and b and (b - a) / a * 100 > tolerance:
            worse.append(f"{label}: {a:.1f} -> {b:.1f}")
    if worse:
        print(f"grew by more than {tolerance:.0f}%: " + "; ".join(worse))
        sys.exit(1)
    sys.exit(0)

rooms_old = {r["room"]: r for r in old["rooms"]}

fields = [
    ("room_cpu_us_per_event", "CPU µs/event, room"),
    ("limit_cpu_us_per_event", "CPU µs/event, loop"),
    ("cpu_ratio", "room/loop CPU"),
    ("room_cpu_us_per_event_paced", "CPU µs/event, room, half"),
    ("cpu_ratio_paced", "room/loop CPU, half"),
    ("ratio_with_echoes", "room/limit (echoes)"),
    ("latency_p99_ms", "p99 ms"),
]
print(f"{old.get('git_sha') or old_path} -> {new.get('git_sha') or new_path}")
print(f"{'room':<10} {'figure':<22} {'before':>10} {'after':>10} {'change':>8}")
worse = []
for room in new["rooms"]:
    before = rooms_old.get(room["room"])
    if before is None:
        continue
    for key, label in fields:
        a, b = before.get(key), room.get(key)
        shown = lambda v: "-" if v is None else f"{v:.2f}"
        print(f"{room['room']:<10} {label:<22} {shown(a):>10} {shown(b):>10} {change(a, b):>8}")
    a, b = before.get("room_cpu_us_per_event"), room.get("room_cpu_us_per_event")
    if a and b and (b - a) / a * 100 > tolerance:
        worse.append(f"{room['room']}: {a:.0f} -> {b:.0f} µs/event")
if worse:
    print(f"CPU per event grew by more than {tolerance:.0f}%: " + "; ".join(worse))
    sys.exit(1)
PY
