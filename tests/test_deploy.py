"""Parse and field checks of deploy/: the KubeRay and MLflow manifests and the Dockerfiles.

No cluster, no docker, no network: the checks read the files and assert what KubeRay, Kubernetes,
MLflow and the torch/vllm install rules need. They are not a test against a live cluster.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from rlflow.config import apply_overrides, validate
from workers.placement import plan

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
CONFIGMAP = DEPLOY / "kuberay" / "configmap.yaml"
MLFLOW = DEPLOY / "mlflow" / "mlflow.yaml"
DOCKER = DEPLOY / "docker"
NAMESPACE = "rlflow"
TRACKING_URI = "http://mlflow:5000"
TORCH_PIN = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What the rlflow images may copy: the install metadata and the top-level packages.
IMAGE_SOURCES = {
    "pyproject.toml",
    "README.md",
    "constraints-cpu.txt",
    "rlflow",
    "workers",
    "rewards",
    "configs",
}


# ----------------------------------------------------------------------------- YAML helpers


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping: {d!r}"
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(template: dict[str, Any], where: str) -> dict[str, Any]:
    spec = template.get("spec")
    assert isinstance(spec, dict), f"{where}: template.spec missing"
    return spec


def containers(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    cs = pod_spec(template, where).get("containers")
    assert isinstance(cs, list) and cs, f"{where}: template.spec.containers must be a non-empty list"
    for c in cs:
        assert isinstance(c.get("name"), str) and c["name"], f"{where}: container without a name"
        assert isinstance(c.get("image"), str) and c["image"], (
            f"{where}: container {c['name']} without an image"
        )
    return cs


def env_values(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def secret_refs(template: dict[str, Any]) -> set[tuple[str, str]]:
    """(secret, key) of every non-optional secretKeyRef in the pod's (init) containers."""
    spec = template.get("spec", {})
    refs = set()
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional", False):
                refs.add((ref["name"], ref["key"]))
    return refs


def mounts(template: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there, for the first container of the pod."""
    spec = pod_spec(template, where)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in containers(template, where)[0].get("volumeMounts", []):
        assert m["name"] in volumes, f"{where}: volumeMount {m['name']} has no volume"
        out[m["mountPath"]] = volumes[m["name"]]
    return out


def group_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# ----------------------------------------------------------------------------- the RayCluster spec check


def check_ray_start_params(params: Any, where: str) -> None:
    assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
    for k, v in params.items():
        assert isinstance(k, str) and isinstance(v, str), f"{where}: rayStartParams {k}={v!r} must be strings"


def check_worker_group(group: dict[str, Any], where: str) -> None:
    assert isinstance(group.get("groupName"), str) and group["groupName"], f"{where}: groupName missing"
    counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
    for k, v in counts.items():
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{where}: {k} must be an int >= 0"
    assert counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"], (
        f"{where}: need minReplicas <= replicas <= maxReplicas, got {counts}"
    )
    check_ray_start_params(group.get("rayStartParams"), where)
    containers(group.get("template", {}), where)


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    """The fields KubeRay requires of a RayCluster spec (also a RayJob's rayClusterSpec), plus ours:
    a CPU head that takes no work, at least one GPU group, and the tracking URI on every pod."""
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec missing"
    params = head.get("rayStartParams")
    check_ray_start_params(params, f"{where}.headGroupSpec")
    assert params.get("dashboard-host") == "0.0.0.0", f"{where}: the dashboard must listen on 0.0.0.0"
    assert params.get("num-cpus") == "0", f"{where}: the head must take no Ray work (num-cpus '0')"
    head_containers = containers(head.get("template", {}), f"{where}.headGroupSpec")
    assert gpu_limit(head_containers[0]) == 0, f"{where}: the head group is CPU only"
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert 8265 in ports, f"{where}: the head must expose the dashboard port 8265"

    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs must be a non-empty list"
    names = [g.get("groupName") for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate groupName in {names}"
    for g in groups:
        check_worker_group(g, f"{where}.workerGroupSpecs[{g.get('groupName')}]")
    gpu_groups = [g for g in groups if gpu_limit(g["template"]["spec"]["containers"][0]) >= 1]
    assert gpu_groups, f"{where}: no worker group has an nvidia.com/gpu limit"

    for name, template in group_templates(spec):
        for c in containers(template, f"{where}[{name}]"):
            assert env_values(c).get("MLFLOW_TRACKING_URI") == TRACKING_URI, (
                f"{where}[{name}]: container {c['name']} needs MLFLOW_TRACKING_URI={TRACKING_URI}"
            )


def check_ray_resource(doc: dict[str, Any], kind: str) -> None:
    assert doc.get("apiVersion") == "ray.io/v1", f"{kind}: apiVersion must be ray.io/v1"
    assert doc.get("kind") == kind
    assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"]


# ----------------------------------------------------------------------------- every YAML file


ALL_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_the_expected_manifests_exist():
    assert {RAYCLUSTER, RAYJOB, CONFIGMAP, MLFLOW} <= set(ALL_YAML)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_parses_with_kind_name_and_namespace(path):
    for doc in load_docs(path):
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), path
        meta = doc.get("metadata", {})
        assert isinstance(meta.get("name"), str) and meta["name"], f"{path}: {doc['kind']} without a name"
        assert meta.get("namespace") == NAMESPACE, f"{path}: {doc['kind']} {meta['name']} not in {NAMESPACE}"


# ----------------------------------------------------------------------------- RayCluster / RayJob


def test_raycluster_has_the_fields_kuberay_requires():
    cluster = one(load_docs(RAYCLUSTER), "RayCluster")
    check_ray_resource(cluster, "RayCluster")
    check_ray_cluster_spec(cluster["spec"], "RayCluster")
    spec = cluster["spec"]
    head_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert head_image.endswith("/rlflow:cpu"), f"the head runs the CPU image, not {head_image}"
    for g in spec["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        if gpu_limit(c):
            assert c["image"].endswith("/rlflow:gpu"), f"GPU group {g['groupName']} runs {c['image']}"


def _broken(mutate) -> dict[str, Any]:
    spec = copy.deepcopy(one(load_docs(RAYCLUSTER), "RayCluster")["spec"])
    mutate(spec)
    return spec


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["workerGroupSpecs"][0]


BROKEN_SPECS = {
    "min above replicas": lambda s: _worker(s).update(minReplicas=_worker(s)["replicas"] + 1),
    "replicas above max": lambda s: _worker(s).update(replicas=_worker(s)["maxReplicas"] + 1),
    "replicas as string": lambda s: _worker(s).update(replicas="1"),
    "rayStartParams not strings": lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "work on the head": lambda s: s["headGroupSpec"]["rayStartParams"].pop("num-cpus"),
    "no gpu limit": lambda s: _worker(s)["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
        "nvidia.com/gpu"
    ),
    "no image": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
    "no groupName": lambda s: _worker(s).pop("groupName"),
    "no tracking uri": lambda s: _worker(s)["template"]["spec"]["containers"][0].update(env=[]),
}


@pytest.mark.parametrize("what", sorted(BROKEN_SPECS))
def test_the_cluster_check_rejects_a_broken_spec(what):
    with pytest.raises(AssertionError):
        check_ray_cluster_spec(_broken(BROKEN_SPECS[what]), what)


def rayjob() -> dict[str, Any]:
    return one(load_docs(RAYJOB), "RayJob")


def entrypoint_args(job: dict[str, Any]) -> tuple[str, list[str]]:
    """(config path, --set overrides) of a `rlflow train CONFIG --set k=v ...` entrypoint."""
    tokens = shlex.split(job["spec"]["entrypoint"])
    assert tokens[:2] == ["rlflow", "train"], f"entrypoint must run `rlflow train`, got {tokens[:2]}"
    config, rest = tokens[2], tokens[3:]
    assert len(rest) % 2 == 0 and all(flag == "--set" for flag in rest[::2]), f"unexpected arguments {rest}"
    return config, rest[1::2]


def test_rayjob_fields():
    job = rayjob()
    check_ray_resource(job, "RayJob")
    spec = job["spec"]
    assert "rlflow train" in spec["entrypoint"]
    assert spec.get("submissionMode") == "K8sJobMode"
    assert spec.get("shutdownAfterJobFinishes") is True
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl >= 0
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    _, overrides = entrypoint_args(job)
    assert f"tracking.tracking_uri={TRACKING_URI}" in overrides
    assert "output_dir=/runs" in overrides


def test_rayjob_cluster_spec_equals_the_raycluster_spec():
    cluster = one(load_docs(RAYCLUSTER), "RayCluster")
    assert rayjob()["spec"]["rayClusterSpec"] == cluster["spec"], (
        "rayjob.yaml spec.rayClusterSpec drifted from raycluster.yaml spec"
    )


def configmap() -> dict[str, Any]:
    return one(load_docs(CONFIGMAP), "ConfigMap")


def test_rayjob_files_come_from_the_configmap_mounted_in_every_pod():
    job = rayjob()
    cm = configmap()
    config, overrides = entrypoint_args(job)
    files = [config] + [v for k, _, v in (o.partition("=") for o in overrides) if k.startswith("data.")]
    for name, template in group_templates(job["spec"]["rayClusterSpec"]):
        by_path = mounts(template, name)
        for f in files:
            folder, key = f.rsplit("/", 1)
            volume = by_path.get(folder)
            assert volume is not None, f"{name}: nothing mounted at {folder} (for {f})"
            assert volume.get("configMap", {}).get("name") == cm["metadata"]["name"], f"{name}: {folder}"
            assert key in cm["data"], f"{f}: no key {key} in ConfigMap {cm['metadata']['name']}"
        assert "/runs" in by_path, f"{name}: output_dir /runs is not mounted"


def job_config() -> dict[str, Any]:
    """The config the RayJob runs: the ConfigMap's file plus the entrypoint's --set overrides."""
    config, overrides = entrypoint_args(rayjob())
    raw = yaml.safe_load(configmap()["data"][config.rsplit("/", 1)[1]])
    assert isinstance(raw, dict)
    return apply_overrides(raw, overrides)


def test_configmap_config_is_the_repo_config_and_validates():
    data = configmap()["data"]
    shipped = yaml.safe_load((ROOT / "configs" / "sd35_medium_dppo.yaml").read_text())
    assert yaml.safe_load(data["sd35_medium_dppo.yaml"]) == shipped, "configmap.yaml drifted from configs/"
    validate(yaml.safe_load(data["sd35_medium_dppo.yaml"]))
    cfg = validate(job_config())
    assert cfg.output_dir == "/runs"
    assert cfg.tracking.tracking_uri == TRACKING_URI


def test_a_cuda_job_puts_its_gpus_on_actors_that_fit_the_cluster():
    cfg = validate(job_config())
    assert cfg.model.device.startswith("cuda")
    assert cfg.ray.sampler.num_gpus > 0 and cfg.ray.learner.num_gpus > 0, "actors would load CUDA models on no GPU"
    assert rayjob()["spec"].get("entrypointNumGpus", 0) == 0, "the driver holds no model"
    need = plan(cfg.ray).total().get("GPU", 0.0) + cfg.reward.num_gpus * cfg.reward.replicas
    spec = rayjob()["spec"]["rayClusterSpec"]
    have = sum(
        int(g["maxReplicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["workerGroupSpecs"]
    )
    assert 0 < need <= have, f"the config needs {need} GPUs, the cluster has at most {have}"
    assert all(b.get("GPU", 0) <= 1 for b in plan(cfg.ray).bundles), "a bundle must fit one single-GPU pod"


# ----------------------------------------------------------------------------- MLflow


def mlflow_docs() -> list[dict[str, Any]]:
    return load_docs(MLFLOW)


def mlflow_container() -> dict[str, Any]:
    deploy = one(mlflow_docs(), "Deployment", "mlflow")
    return containers(deploy["spec"]["template"], "Deployment mlflow")[0]


def server_args() -> list[str]:
    c = mlflow_container()
    argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
    assert argv[:2] == ["mlflow", "server"], f"the mlflow container must run `mlflow server`, got {argv[:2]}"
    return argv


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"mlflow server without {name}"
    return argv[argv.index(name) + 1]


def test_mlflow_server_command():
    argv = server_args()
    uri = option(argv, "--backend-store-uri")
    assert uri.startswith("postgresql"), f"backend store must be PostgreSQL, got {uri}"
    assert "--serve-artifacts" in argv
    assert option(argv, "--host") == "0.0.0.0"
    assert option(argv, "--port") == "5000"
    assert option(argv, "--workers") == "2"
    assert option(argv, "--artifacts-destination")


def test_mlflow_backend_host_is_a_service_in_the_file():
    host = urlparse(option(server_args(), "--backend-store-uri"))
    svc = one(mlflow_docs(), "Service", host.hostname)
    assert host.port in {p["port"] for p in svc["spec"]["ports"]}


def test_mlflow_allowed_hosts_cover_the_tracking_uri_and_port_forward():
    allowed = option(server_args(), "--allowed-hosts").split(",")
    # MLflow compares the whole Host header, port included.
    assert urlparse(TRACKING_URI).netloc in allowed
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:5000" in allowed
    assert "localhost:*" in allowed


def test_mlflow_service_exposes_5000_to_the_deployment():
    docs = mlflow_docs()
    svc = one(docs, "Service", "mlflow")
    assert 5000 in {p["port"] for p in svc["spec"]["ports"]}
    pod_labels = one(docs, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items(), "Service mlflow selects no mlflow pod"
    ports = {p["containerPort"] for p in mlflow_container()["ports"]}
    assert all(p.get("targetPort", p["port"]) in ports for p in svc["spec"]["ports"])


def test_mlflow_secrets_and_claims_exist_in_the_file():
    docs = mlflow_docs()
    secrets = {
        s["metadata"]["name"]: {**s.get("data", {}), **s.get("stringData", {})} for s in find(docs, "Secret")
    }
    workloads = find(docs, "Deployment") + find(docs, "StatefulSet")
    refs = set().union(*(secret_refs(w["spec"]["template"]) for w in workloads))
    assert refs, "no secretKeyRef found: the DB password must come from a Secret"
    for name, key in refs:
        assert name in secrets, f"Secret {name} is referenced but not defined in {MLFLOW.name}"
        assert key in secrets[name], f"Secret {name} has no key {key}"
    claims = {p["metadata"]["name"] for p in find(docs, "PersistentVolumeClaim")}
    for w in workloads:
        for v in w["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("path", [MLFLOW], ids=["mlflow"])
def test_workload_selectors_match_their_pods(path):
    for w in find(load_docs(path), "Deployment") + find(load_docs(path), "StatefulSet"):
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{w['kind']} {w['metadata']['name']}: selector mismatch"


# ----------------------------------------------------------------------------- Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined; ARG defaults
    substituted into later lines (enough for these files)."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    out, args = [], {}
    for line in lines:
        word, _, rest = line.partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest.strip())
        if word.upper() == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v
        out.append((word.upper(), rest))
    return out


def runs(path: Path) -> str:
    return "\n".join(a for i, a in instructions(path) if i == "RUN")


DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
RLFLOW_IMAGES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]


def test_the_expected_dockerfiles_exist():
    assert set(RLFLOW_IMAGES) | {DOCKER / "Dockerfile.mlflow"} <= set(DOCKERFILES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_dockerfile_has_from_and_a_non_root_user(path):
    ins = instructions(path)
    froms = [a for i, a in ins if i == "FROM"]
    assert froms and re.fullmatch(r"\S+(\s+AS\s+\S+)?", froms[0], re.I), f"{path.name}: bad FROM {froms}"
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in {"root", "0"}, f"{path.name}: must end as a non-root user"
    assert any(i == "WORKDIR" for i, _ in ins), f"{path.name}: no WORKDIR"


@pytest.mark.parametrize("path", RLFLOW_IMAGES, ids=lambda p: p.name)
def test_rlflow_images_copy_only_the_package_sources(path):
    copied = set()
    for i, a in instructions(path):
        if i in {"COPY", "ADD"}:
            parts = [p for p in a.split() if not p.startswith("--")]
            copied |= {p.rstrip("/") for p in parts[:-1]}
    assert "pyproject.toml" in copied, f"{path.name}: does not copy pyproject.toml"
    assert copied == IMAGE_SOURCES, f"{path.name}: copies {sorted(copied)}"
    for p in copied:
        assert (ROOT / p).exists(), f"{path.name}: copies {p}, which is not in the repo"


@pytest.mark.parametrize("path", RLFLOW_IMAGES, ids=lambda p: p.name)
def test_rlflow_images_match_the_cluster_ray_and_python(path):
    image = next(a for i, a in instructions(path) if i == "FROM").split()[0]
    ray_version = one(load_docs(RAYCLUSTER), "RayCluster")["spec"]["rayVersion"]
    assert image.startswith(f"rayproject/ray:{ray_version}-py311"), (
        f"{path.name}: {image} vs Ray {ray_version}"
    )


def test_cpu_image_pins_cpu_torch_and_never_installs_vllm():
    run = runs(DOCKER / "Dockerfile.cpu")
    torch_lines = [line for line in run.splitlines() if re.search(r"\btorch==", line)]
    assert torch_lines, "Dockerfile.cpu does not install torch"
    for line in torch_lines:
        assert TORCH_PIN in line and f"--index-url {CPU_INDEX}" in line, line
    assert TORCH_PIN in (ROOT / "constraints-cpu.txt").read_text(), "constraints-cpu.txt moved off the pin"
    assert "-c constraints-cpu.txt" in run, "the rlflow install must keep the torch pin"
    assert "vllm" not in run, "the CPU image must never install the vllm extra"
    assert "whl/cu" not in run, "the CPU image must never use a CUDA index"


def test_gpu_image_installs_cuda_torch_and_the_vllm_extra():
    run = runs(DOCKER / "Dockerfile.gpu")
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ torch==2\.13\.0", run), run
    assert "whl/cpu" not in run
    assert '".[vllm]"' in run or " .[vllm]" in run, "the GPU image must install rlflow with the vllm extra"


def test_mlflow_image_has_the_postgres_driver():
    run = runs(DOCKER / "Dockerfile.mlflow")
    assert re.search(r"mlflow==3\.17", run) and "psycopg2-binary" in run
    image = mlflow_container()["image"]
    assert "rlflow-mlflow" in image, (
        f"the MLflow Deployment must use the Dockerfile.mlflow image, not {image}"
    )
