"""Runs compose.yaml as written, as processes on this machine (no Docker engine needed).

    nice -n 19 python scripts/compose_run.py --actors 48 --workdir /work/runs/compose48

Takes the `keys` service, the learner and the first --actors actor services from
compose.yaml and runs their commands unchanged except for what a container supplies:
the image's entrypoint (`python -m impala.experiment`) becomes this interpreter, the
volumes /keys and /logs become folders under --workdir, and the service name `learner`
with port 5555 becomes 127.0.0.1 and a free port pair (each container has its own
network namespace; processes here share one). It waits until the learner's metrics show
every actor sending unrolls, keeps going --after_all_s seconds, sends SIGTERM to every job
(what `docker compose down` does) and reports one JSON line: actors connected, frames/s,
learner and total memory, seconds until all actors were training, and each job's exit
status. tests/test_compose_run.py runs it with three actors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = [sys.executable, "-m", "impala.experiment"]  # the image's ENTRYPOINT
COMPOSE_PORT = 5555


def free_port_pair() -> int:
    """A port p such that p and p + 1 are free on this machine right now."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("", port + 1))
                return port
            except OSError:
                continue


def map_arg(arg: str, workdir: Path, port: int) -> str:
    """One argument of a service, with the container's paths, host name and port mapped."""
    arg = re.sub(r"(?<![\w.])/(keys|logs)\b", lambda m: str(workdir / m.group(1)), arg)
    arg = arg.replace(f"tcp://learner:{COMPOSE_PORT}", f"tcp://127.0.0.1:{port}")
    return arg.replace(f":{COMPOSE_PORT}", f":{port}")


def commands(compose: dict, actors: int, workdir: Path, port: int) -> dict[str, list[str]]:
    """Command lines of the keys service, the learner and actor-0 .. actor-(actors-1)."""
    services = compose["services"]
    keys = [map_arg(a, workdir, port) for a in services["keys"]["entrypoint"]]
    keys = [re.sub(r"\bpython\b", sys.executable, a) for a in keys]
    result = {"keys": keys}
    for name in ["learner", *(f"actor-{i}" for i in range(actors))]:
        result[name] = ENTRYPOINT + [map_arg(a, workdir, port) for a in services[name]["command"]]
    return result


def _rss_kb(pid: int, field: str) -> int:
    """VmRSS (from status) or Pss (from smaps_rollup) of one process, in kB; 0 once gone."""
    try:
        name = "smaps_rollup" if field == "Pss" else "status"
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _rows(workdir: Path) -> list[dict]:
    path = workdir / "logs" / "run" / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run(actors: int, workdir: Path, after_all_s: float, timeout_s: float) -> dict:
    """Runs the jobs; returns the report (see the module docstring)."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    cmds = commands(compose, actors, workdir, free_port_pair())
    subprocess.run(cmds.pop("keys"), cwd=ROOT, check=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs: dict[str, subprocess.Popen] = {}
    report: dict = {}
    start = time.monotonic()
    try:
        for name, cmd in cmds.items():  # learner first, as depends_on does not order them
            with open(workdir / f"{name}.log", "w") as log:
                jobs[name] = subprocess.Popen(
                    cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        all_training = None
        while time.monotonic() - start < timeout_s:
            time.sleep(1.0)
            dead = {n: p.returncode for n, p in jobs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"jobs ended early: {dead}")
            rows = _rows(workdir)
            full = [i for i, r in enumerate(rows) if r.get("connected_actors", 0) >= actors]
            if all_training is None and full:
                all_training = time.monotonic() - start
                first_full = full[0]  # the rows measured: from the first that had every actor
            if all_training is not None and time.monotonic() - start >= all_training + after_all_s:
                break
        else:
            raise RuntimeError(f"not all {actors} actors were training after {timeout_s}s")
        rows = _rows(workdir)[first_full:]
        learner_pids = _session_pids(jobs["learner"].pid)
        all_pids = [pid for p in jobs.values() for pid in _session_pids(p.pid)]
        report.update(
            {
                "actors": actors,
                "connected_actors": max((r["connected_actors"] for r in rows), default=None),
                "seconds_until_all_training": round(all_training, 1),
                "frames_per_s": round(sum(r["fps"] for r in rows) / len(rows), 1) if rows else None,
                "param_version": rows[-1]["param_version"] if rows else None,
                "learner_rss_mib": round(sum(_rss_kb(p, "VmRSS") for p in learner_pids) / 1024),
                "total_rss_mib": round(sum(_rss_kb(p, "VmRSS") for p in all_pids) / 1024),
                "total_pss_mib": round(sum(_rss_kb(p, "Pss") for p in all_pids) / 1024),
            }
        )
    finally:
        for p in jobs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        statuses = {}
        for name, p in jobs.items():
            try:
                statuses[name] = p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                statuses[name] = p.wait()
    report["exit_statuses"] = statuses
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=48, help="actor services of compose.yaml to run (its first N)")
    parser.add_argument("--workdir", type=Path, required=True, help="keys/, logs/ and one log per job")
    parser.add_argument(
        "--after_all_s", type=float, default=60.0, help="seconds to keep running once all actors are training"
    )
    parser.add_argument(
        "--timeout_s", type=float, default=1800.0, help="give up if not every actor is training by then"
    )
    args = parser.parse_args()
    print(json.dumps(run(args.actors, args.workdir, args.after_all_s, args.timeout_s)))


if __name__ == "__main__":
    main()
