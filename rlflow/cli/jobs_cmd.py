"""``rlflow submit|status|logs|stop|jobs``: run and manage training runs as Ray jobs (Ray Jobs API).

Ray is imported only inside the commands, so ``rlflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

STOP_WAIT_S = 30.0


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the Ray head's job server, http://HOST:PORT (default: $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


def _addr_flag(address: str) -> str:
    return f" --address {shlex.quote(address)}"


def cmd_submit(args: argparse.Namespace) -> int:
    from rlflow import jobs

    job = jobs.submit(
        args.config,
        args.address,
        args.set,
        working_dir=args.working_dir,
        python=args.python,
        entrypoint_num_cpus=args.num_cpus,
        job_id=args.job_id,
    )
    flag = _addr_flag(job.address)
    print(f"job id: {job.job_id}")
    print(f"mlflow run: {job.mlflow_run_url}")
    print(f"follow it:  rlflow logs {job.job_id}{flag} --follow")
    print(f"status:     rlflow status {job.job_id}{flag}")
    print(f"stop it:    rlflow stop {job.job_id}{flag}", flush=True)
    if not args.follow:
        return 0
    return _follow(job.job_id, job.address)


def _follow(job_id: str, address: str) -> int:
    from rlflow import jobs

    try:
        final = jobs.follow(job_id, address)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (rlflow stop {job_id}{_addr_flag(address)})")
        return 130
    state = jobs.status(job_id, address)
    jobs.close_mlflow_run(state)
    print(f"job {job_id}: {final}" + (f" ({state.message})" if state.message else ""))
    return 0 if final == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from rlflow import jobs

    state = jobs.status(args.job, args.address)
    print(state.status)
    if state.message:
        print(state.message)
    info = state.rlflow
    if info.get("mlflow_run_id"):
        print(f"mlflow run: {info['mlflow_run_id']} in {info.get('tracking_uri', '?')}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from rlflow import jobs

    if args.follow:
        return _follow(args.job, jobs.resolve_address(args.address))
    sys.stdout.write(jobs.logs(args.job, args.address))
    sys.stdout.flush()
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from rlflow import jobs

    address = jobs.resolve_address(args.address)
    if not jobs.stop(args.job, address):
        state = jobs.status(args.job, address)
        print(f"job {args.job} had already ended: {state.status}")
        return 0
    print(f"stop requested for job {args.job}", flush=True)
    deadline = time.monotonic() + STOP_WAIT_S
    state = jobs.status(args.job, address)
    while not state.done and time.monotonic() < deadline:
        time.sleep(0.5)
        state = jobs.status(args.job, address)
    if not state.done:
        print(f"job {args.job} is still {state.status} after {STOP_WAIT_S:.0f} s; it is being stopped")
        return 1
    closed = jobs.close_mlflow_run(state)
    print(f"job {args.job}: {state.status}" + (f" (mlflow run marked {closed})" if closed else ""))
    return 0


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_jobs(args: argparse.Namespace) -> int:
    from rlflow import jobs

    address = jobs.resolve_address(args.address)
    rows = jobs.list_jobs(address)
    if not rows:
        print(f"no jobs on the Ray cluster at {address}")
        return 0
    table = [("JOB ID", "STATUS", "STARTED", "RLFLOW", "ENTRYPOINT")]
    for j in rows:
        info = j.rlflow
        tag = f"{info.get('name', '')} mlflow:{info['mlflow_run_id'][:8]}" if info.get("mlflow_run_id") else "-"
        table.append((j.job_id, j.status, _when(j.start_time), tag, _short(j.entrypoint)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return 0


def register(sub: Any) -> None:
    """Add the job subcommands to the ``rlflow`` parser's subparsers."""
    s = sub.add_parser("submit", help="run a training config as a Ray job on a cluster")
    s.add_argument("config", help="YAML config (see configs/), validated here before submitting")
    _address_arg(s)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    s.add_argument("--working-dir", default=".", help="folder shipped to the job as its working dir (default: .)")
    s.add_argument("--python", default="python", help="the job's python command on the cluster (default: python)")
    s.add_argument("--num-cpus", type=float, default=0, help="CPUs reserved for the job's driver (default: 0)")
    s.add_argument("--job-id", help="submission id (default: rlflow-<name>-<time>-<hex>)")
    s.add_argument("--follow", action="store_true", help="stream the logs; exit 0 if the job succeeds, else 1")
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser("status", help="a Ray job's status")
    st.add_argument("job", help="job (submission) id")
    _address_arg(st)
    st.set_defaults(func=cmd_status)

    lg = sub.add_parser("logs", help="a Ray job's logs")
    lg.add_argument("job", help="job (submission) id")
    _address_arg(lg)
    lg.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 if it succeeded")
    lg.set_defaults(func=cmd_logs)

    sp = sub.add_parser("stop", help="stop a Ray job (its MLflow run is marked KILLED)")
    sp.add_argument("job", help="job (submission) id")
    _address_arg(sp)
    sp.set_defaults(func=cmd_stop)

    js = sub.add_parser("jobs", help="list the Ray cluster's jobs")
    _address_arg(js)
    js.set_defaults(func=cmd_jobs)
