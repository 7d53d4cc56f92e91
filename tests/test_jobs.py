"""``rlflow submit|status|logs|stop|jobs`` against a real local Ray head and a real MLflow server."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from rlflow.cli import main
from rlflow.config import ConfigError
from rlflow.jobs import list_jobs
from rlflow.tracking import start_server, stop_server, wait_for_server

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONFIG = str(REPO / "configs" / "toy_shapes_dppo.yaml")
HEAD: dict[str, str] = {}  # the running head's GCS address, for `rlflow train --address`

# a run of seconds on the shipped shapes base model (as in test_trainer.py)
TINY = [
    "name=jobtest",
    "sampling.prompts_per_step=2",
    "sampling.group_size=4",
    "sampling.chunk_size=4",
    "sampling.num_steps=6",
    "sampling.sde_range=[0, 4]",
    "data.eval_per_kind=2",
    "train.steps=2",
    "train.eval_steps=4",
    "train.eval_every=0",
    "train.log_images_every=0",
    "train.checkpoint_every=50",
    "train.threads=1",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _procs_of(temp_dir: str) -> list[psutil.Process]:
    """Processes of the Ray cluster rooted at ``temp_dir`` (named in their command line or running in it)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            cwd = p.info["cwd"] or ""
        except (psutil.Error, TypeError):
            continue
        if p.pid != os.getpid() and (temp_dir in cmd or cwd.startswith(temp_dir)):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (4 logical CPUs, dashboard/job server on a free loopback port); yields the job server URL."""
    ports = _free_ports(9)
    temp_dir = f"/tmp/rlfj-{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # token auth with a token of its own (Ray >= 2.59 turns auth on for local clusters whenever
    # ~/.ray/auth_token exists, and any local ray.init may rewrite that file): the job's driver inherits
    # both variables; rlflow's client finds the token in $RAY_AUTH_TOKEN, as a user's would
    token = secrets.token_hex(16)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_TOKEN", token)
    mp.delenv("RAY_AUTH_MODE", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    dash = ports[1]
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={ports[0]}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={ports[2]}",
        f"--node-manager-port={ports[3]}",
        f"--object-manager-port={ports[4]}",
        f"--dashboard-agent-listen-port={ports[5]}",
        f"--dashboard-agent-grpc-port={ports[6]}",
        f"--runtime-env-agent-port={ports[7]}",
        f"--metrics-export-port={ports[8]}",
        # logical CPUs, not cores: enough for the Ray runtime's default actors (sampler + learner bundle and
        # a reward server, 3 CPUs) as well as for the in-process loop; they take turns on the 2 cores
        "--num-cpus=4",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(tmp_path_factory.mktemp("ray_head") / "ray.log", "wb")  # closed at teardown
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{Path(log.name).read_text()[-4000:]}")
            try:
                list_jobs(address)
                break
            except ConfigError as err:
                if time.monotonic() - t0 > 90:
                    raise TimeoutError(
                        f"Ray job server at {address} did not answer within 90 s: {err}\n"
                        f"{Path(log.name).read_text()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        print(f"\nray head ready in {time.monotonic() - t0:.1f} s at {address}")
        HEAD["gcs"] = f"127.0.0.1:{ports[0]}"
        yield address
    finally:
        # SIGTERM to `ray start --block` alone: it drains the node and stops its processes in order (about
        # 2 s); a SIGTERM to the whole group would kill the GCS first and leave it waiting 30 s for it
        t_down = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # raylet, gcs, workers and job drivers may outlive `ray start --block` for a moment
        deadline = time.monotonic() + 20
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (nothing, normally)
        except ProcessLookupError:
            pass
        left = _procs_of(temp_dir)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = _procs_of(temp_dir)
        stray = []
        for p in left:
            try:
                stray.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                p.kill()
            except psutil.Error:  # gone meanwhile
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        mp.undo()
        print(f"\nray head stopped in {time.monotonic() - t_down:.1f} s")
        assert not stray, f"Ray processes of {temp_dir} left after teardown: {stray}"


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """A real ``mlflow server`` on a free loopback port (sqlite backend, proxied artifacts)."""
    root = tmp_path_factory.mktemp("jobs_mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    proc = start_server(f"sqlite:///{(root / 'mlflow.db').as_posix()}", root / "artifacts", port, log_file=log)
    try:
        try:
            wait_for_server(url, timeout=90, proc=proc)
        except (TimeoutError, RuntimeError) as e:
            raise RuntimeError(f"{e}\n--- server log ---\n{log.read_text()[-4000:]}") from e
        yield url
    finally:
        stop_server(proc)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


def _submit(capsys, address: str, *overrides: str) -> str:
    code, out, err = _cli(
        capsys, "submit", CONFIG, "--address", address, "--working-dir", str(REPO),
        *[a for o in overrides for a in ("--set", o)],
    )  # fmt: skip
    assert code == 0, err
    m = re.search(r"^job id: (\S+)$", out, re.M)
    assert m, out
    assert re.fullmatch(r"rlflow-jobtest-\d{8}-\d{6}-[0-9a-f]{4}", m.group(1))
    assert f"rlflow logs {m.group(1)} --address {address} --follow" in out
    return m.group(1)


def _wait_status(capsys, job: str, address: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        code, out, err = _cli(capsys, "status", job, "--address", address)
        assert code == 0, err
        status = out.splitlines()[0]
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def _job_logs(capsys, job: str, address: str) -> str:
    code, out, err = _cli(capsys, "logs", job, "--address", address)
    assert code == 0, err
    return out


def test_submit_runs_to_success_with_mlflow_run(ray_head, mlflow_url, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    t0 = time.monotonic()
    job = _submit(capsys, ray_head, *TINY, f"output_dir={out_dir}", f"tracking.tracking_uri={mlflow_url}")
    status = _wait_status(capsys, job, ray_head, timeout=240)
    elapsed = time.monotonic() - t0
    logs = _job_logs(capsys, job, ray_head)
    with capsys.disabled():
        print(f"\njob {job}: {status} {elapsed:.1f} s after submit")
    assert status == "SUCCEEDED", logs[-4000:]

    code, out, _ = _cli(capsys, "status", job, "--address", ray_head)
    assert code == 0 and out.splitlines()[0] == "SUCCEEDED"
    assert "rlflow run summary" in logs
    assert "steps 2," in logs

    client = MlflowClient(tracking_uri=mlflow_url)
    runs = client.search_runs(
        [client.get_experiment_by_name("toy_shapes").experiment_id], f"tags.`rlflow.ray_job_id` = '{job}'"
    )
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rlflow.ray_job_id"] == job
    assert run.data.tags["rlflow.ray_address"] == ray_head
    assert run.data.tags["rlflow.config"] == CONFIG
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2]
    assert run.data.params["train.steps"] == "2"
    assert run.data.params["output_dir"] == str(out_dir)
    assert run.info.run_id in logs  # the job re-opened the run created at submit time
    assert list(out_dir.glob("jobtest-*/summary.json"))  # written at the absolute output_dir

    code, out, _ = _cli(capsys, "jobs", "--address", ray_head)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(job))
    assert "SUCCEEDED" in row and f"mlflow:{run.info.run_id[:8]}" in row

    code, out, _ = _cli(capsys, "logs", job, "--address", ray_head, "--follow")  # an ended job: all, then exit
    assert code == 0
    assert "rlflow run summary" in out and out.rstrip().endswith(f"job {job}: SUCCEEDED (Job finished successfully.)")


def test_train_joins_a_cluster_and_ships_the_working_dir(ray_head, tmp_path):
    """`rlflow train --address GCS --working-dir DIR`: the driver runs here, the actors on the cluster, and a
    reward plug-in that exists only in DIR imports in the cluster's reward server."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "shipped_judge.py").write_text(  # 1.0 when imported from the copy Ray unpacked on the cluster
        "import torch\n"
        "def score(images, prompts):\n"
        "    return torch.full((len(images),), float('runtime_resources' in __file__))\n"
    )
    sets = [*TINY, f"output_dir={tmp_path / 'runs'}", "reward.name=shipped_judge:score"]
    cmd = [str(VENV_BIN / "rlflow"), "train", CONFIG, "--address", HEAD["gcs"], "--working-dir", str(plugins),
           *[a for o in sets for a in ("--set", o)]]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # a driver joining a token-auth cluster (token: RAY_AUTH_TOKEN)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(rf"^ray: joined \S+:{HEAD['gcs'].rsplit(':', 1)[1]}$", done.stdout, re.M), done.stdout
    assert "steps 2," in done.stdout
    summary = json.loads(next((tmp_path / "runs").glob("jobtest-*/summary.json")).read_text())
    assert summary["train_reward_first10"] == 1.0, summary  # every score came from the shipped plug-in


def test_stop_a_running_job(ray_head, mlflow_url, tmp_path, capsys):
    job = _submit(
        capsys, ray_head, *TINY, "train.steps=1000", f"output_dir={tmp_path}", f"tracking.tracking_uri={mlflow_url}"
    )
    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("toy_shapes").experiment_id
    run_id = client.search_runs([exp], f"tags.`rlflow.ray_job_id` = '{job}'")[0].info.run_id
    assert client.get_run(run_id).info.status == "SCHEDULED"
    # stop it once training has started (the job re-opened the MLflow run)
    deadline = time.monotonic() + 120
    while client.get_run(run_id).info.status == "SCHEDULED":
        assert time.monotonic() < deadline, _job_logs(capsys, job, ray_head)[-3000:]
        time.sleep(0.5)
    code, out, _ = _cli(capsys, "status", job, "--address", ray_head)
    assert out.splitlines()[0] == "RUNNING"

    t0 = time.monotonic()
    code, out, err = _cli(capsys, "stop", job, "--address", ray_head)
    assert code == 0, err
    assert _wait_status(capsys, job, ray_head, timeout=60) == "STOPPED"
    stopped_after = time.monotonic() - t0
    with capsys.disabled():
        print(f"\njob {job} STOPPED {stopped_after:.1f} s after `rlflow stop`")
    assert stopped_after < 60
    assert client.get_run(run_id).info.status == "KILLED"
    assert len(client.get_metric_history(run_id, "reward/mean")) < 1000

    code, out, _ = _cli(capsys, "stop", job, "--address", ray_head)  # already ended
    assert code == 0 and "already ended: STOPPED" in out
    code, out, _ = _cli(capsys, "logs", job, "--address", ray_head, "--follow")
    assert code == 1 and f"job {job}: STOPPED" in out


def test_bad_config_never_reaches_the_cluster(ray_head, capsys, monkeypatch):
    before = len(list_jobs(ray_head))
    code, out, err = _cli(capsys, "submit", CONFIG, "--address", ray_head, "--set", "train.bogus_key=1")
    assert code == 2
    assert err.startswith("rlflow: error: ")
    assert "train.bogus_key: unknown key" in err
    assert "job id" not in out
    assert len(list_jobs(ray_head)) == before

    code, _, err = _cli(capsys, "status", "rlflow-no-such-job", "--address", ray_head)
    assert code == 2 and f"no job 'rlflow-no-such-job' on the Ray cluster at {ray_head}" in err

    mlflow_down = f"http://127.0.0.1:{_free_port()}"
    code, out, err = _cli(
        capsys, "submit", CONFIG, "--address", ray_head, "--set", f"tracking.tracking_uri={mlflow_down}"
    )
    assert code == 2 and f"rlflow: error: cannot reach the MLflow tracking server at {mlflow_down}" in err
    assert len(list_jobs(ray_head)) == before

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, _, err = _cli(capsys, "jobs", "--address", ray_head)
    assert code == 2 and f"rlflow: error: the Ray cluster at {ray_head} requires its auth token" in err


def test_unreachable_cluster_is_a_quick_clear_error(tmp_path, capsys, monkeypatch):
    port = _free_port()
    address = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    code, out, err = _cli(capsys, "submit", CONFIG, "--address", f"127.0.0.1:{port}", "--set", f"output_dir={tmp_path}")
    assert code == 2
    assert err.startswith(f"rlflow: error: cannot reach the Ray cluster at {address}")
    assert "job id" not in out
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no run folder
    monkeypatch.setenv("RAY_ADDRESS", address)  # the env var is used when --address is not given
    code, _, err = _cli(capsys, "jobs")
    assert code == 2 and f"cannot reach the Ray cluster at {address}" in err
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "submit", CONFIG, "--set", "output_dir=rel-runs")
    assert code == 2
    assert "rlflow: warning: output_dir 'rel-runs' is relative" in err and str(tmp_path / "rel-runs") in err
    assert f"rlflow: error: cannot reach the Ray cluster at {address}" in err
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - t0 < 15


def test_address_resolution(monkeypatch):
    from rlflow.jobs import DEFAULT_ADDRESS, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) == DEFAULT_ADDRESS == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "head.example:8265")
    assert resolve_address(None) == "http://head.example:8265"
    assert resolve_address("https://ray.example/") == "https://ray.example"
    assert resolve_address("10.0.0.5:9000") == "http://10.0.0.5:9000"
