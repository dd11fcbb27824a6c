"""The manifests agree with the server they deploy.

Ports, health service names, drain timings and setting names come from the
server's code (service.config defaults, the `svertka serve` flags in
service.server_cli), never from literals repeated here; the settings the
manifests pass are parsed by the server's own config code.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys

import pytest
import yaml

from service import config as cfg
from service import server_cli, supervisor
from service.api.health import LIVENESS_SERVICE
from service.ipc.slab import SHM_DIR
from tests.deploy import manifests as m

ADAPTER = m.K8S / "prometheus-adapter"
RULES_DIR = m.ROOT / "deploy" / "prometheus"
K8S_WORKLOADS = [(t, w["kind"]) for t in (*m.WORKLOAD_TARGETS, *m.KSERVE_TARGETS) for w in m.workloads(t)]
IDS = [f"{t}:{k}" for t, k in K8S_WORKLOADS]
#: Memory a frontend process needs besides its slab, at least: about 75 MiB
#: resident when idle on the development host, more while decoding images.
FRONTEND_PROCESS_MIB = 128
#: Ephemeral storage the server container writes itself: its logs (the root
#: filesystem is read-only, and /tmp is an emptyDir counted on its own).
CONTAINER_WRITES_MIB = 128


def workload(target: str, kind: str) -> tuple[list[dict], dict, dict]:
    objects = m.rendered(target)
    obj = m.find(objects, kind)
    return objects, obj, m.pod_spec(obj)


def serve_flags() -> dict[str, str]:
    """`svertka serve` flag -> its environment variable, from the real parser."""
    parser = argparse.ArgumentParser()
    server_cli.add_serve_arguments(parser)
    flags = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-") and option != "--help":
                env = cfg.ENV_PREFIX + option[2:].replace("-", "_").upper()
                # The documented rule and the help text agree.
                assert f"[env {env}]" in action.help, (option, action.help)
                flags[option] = env
    return flags


def ports_by_name(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def grpc_port_name(kind: str) -> str:
    # KServe recognises gRPC (HTTP/2 cleartext) by the port name h2c.
    return "h2c" if kind == "InferenceService" else "grpc"


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def settings_names() -> list:
    names = set()
    for target, kind in K8S_WORKLOADS:
        objects, _, spec = workload(target, kind)
        names |= {
            n for n in m.container_env(objects, m.server_container(spec)) if n.startswith(cfg.ENV_PREFIX)
        }
    return sorted(names)


# -- settings ---------------------------------------------------------------


@pytest.mark.parametrize("name", settings_names())
def test_every_svertka_variable_is_a_serve_setting(name):
    """A misspelt or unsupported SVERTKA_* variable would be silently ignored by the server."""
    assert name in serve_flags().values(), f"{name} is not a `svertka serve` setting: {sorted(serve_flags())}"


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_settings_build_a_valid_server_config(target, kind):
    objects, _, spec = workload(target, kind)
    container = m.server_container(spec)
    config = m.server_config(objects, container)  # raises ConfigError on a bad value
    mounts = {v["mountPath"] for v in container.get("volumeMounts", [])}
    if "STORAGE_URI" in m.container_env(objects, container):
        # KServe mounts or downloads the storage URI's content at /mnt/models.
        assert kind == "InferenceService" and str(config.model_repository) == "/mnt/models"
        assert "/mnt/models" not in mounts, "KServe's own mount would clash with ours"
    else:
        assert str(config.model_repository) in mounts


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_ports_are_the_servers(target, kind):
    objects, _, spec = workload(target, kind)
    container = m.server_container(spec)
    config = m.server_config(objects, container)
    ports = ports_by_name(container)
    assert ports[grpc_port_name(kind)] == cfg.DEFAULT_GRPC_PORT == config.grpc_port
    assert ports["metrics"] == cfg.DEFAULT_METRICS_PORT == config.metrics_port
    assert config.host == cfg.DEFAULT_HOST


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_probes_are_native_grpc_health_checks(target, kind):
    objects, _, spec = workload(target, kind)
    container = m.server_container(spec)
    port = ports_by_name(container)[grpc_port_name(kind)]
    services = {
        "startupProbe": cfg.SERVER_HEALTH_SERVICE,
        "readinessProbe": cfg.SERVER_HEALTH_SERVICE,
        "livenessProbe": LIVENESS_SERVICE,
    }
    for probe, service in services.items():
        handler = container[probe]
        assert set(handler) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert handler["grpc"]["port"] == port and isinstance(handler["grpc"]["port"], int), probe
        assert handler["grpc"]["service"] == service, probe


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_drain_fits_in_the_termination_grace_period(target, kind):
    """preStop delay + the server's drain must end before the kubelet's SIGKILL."""
    objects, _, spec = workload(target, kind)
    container = m.server_container(spec)
    config = m.server_config(objects, container)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0, "without a preStop delay the drain starts while endpoints still route here"
    assert spec["terminationGracePeriodSeconds"] > pre_stop + config.grace_period_s
    # Liveness stays SERVING while draining; a probe held at the drain's very end must not cut it short.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > config.grace_period_s
    # A connection-age GOAWAY must not cut calls shorter than the drain allows.
    assert config.max_connection_age_s > 0, "the plain Service needs connection ageing to rebalance"


@pytest.mark.parametrize("target", m.WORKLOAD_TARGETS)
def test_rollout_and_scaling_keep_capacity(target):
    objects = m.rendered(target)
    deployment = m.find(objects, "Deployment")
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    hpa = m.find(objects, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "a fixed replica count fights the HPA on every apply"
    pdb = m.find(objects, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert m.selects(pdb["spec"]["selector"], labels)
    if target in m.CANARY_TARGETS:
        # A drain may take a canary's last replica: the stable track serves on.
        assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
    else:
        assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain could take every replica"
    startup = m.server_container(m.pod_spec(deployment))["startupProbe"]
    assert (
        deployment["spec"]["progressDeadlineSeconds"]
        >= startup["periodSeconds"] * startup["failureThreshold"]
    )


# -- pod hardening and resources ----------------------------------------------


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_pods_are_hardened(target, kind):
    _, _, spec = workload(target, kind)
    assert_hardened(spec)


def test_the_models_fill_job_is_hardened_like_the_servers():
    """It writes the claim (its purpose), and nothing else."""
    job = m.find(m.rendered("models-pvc"), "Job")
    assert_hardened(job["spec"]["template"]["spec"], writes={"models"})


def assert_hardened(spec: dict, writes: set[str] = frozenset()) -> None:
    """Non-root, no privileges, read-only root filesystems, writable scratch space only
    (and the volumes named in ``writes``)."""
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links inject SVERTKA_* variables of their own"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in all_containers(spec):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, container["name"]
        assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], container["name"]
        for mount in container.get("volumeMounts", []):
            if not mount.get("readOnly"):
                # The writable paths are scratch space, never the model or the image.
                assert "emptyDir" in volumes[mount["name"]] or mount["name"] in writes, (
                    container["name"],
                    mount,
                )


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_guaranteed_qos_and_thread_budget_from_the_cpu_limit(target, kind):
    objects, _, spec = workload(target, kind)
    for container in all_containers(spec):
        res = container["resources"]
        for resource in ("cpu", "memory"):
            # requests == limits on every container (init ones too): Guaranteed QoS.
            assert res["requests"][resource] == res["limits"][resource], (container["name"], resource)
    container = m.server_container(spec)
    ref = m.container_env(objects, container)["SVERTKA_INTRA_OP_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": container["name"], "resource": "limits.cpu", "divisor": "1"}
    assert m.container_env(objects, container)["HOME"]["value"] in {
        v["mountPath"] for v in container["volumeMounts"] if not v.get("readOnly")
    }, "HOME must be writable"


def shared_memory_problems(objects: list[dict], spec: dict) -> list[str]:
    """What keeps this pod's frontends from getting their slabs, if it runs several.

    The frontend count is the server's own (`auto` resolved by service.supervisor
    on this host: should `auto` ever pick more than one, the manifests that keep
    it need the volume too).
    Several frontends need /dev/shm to be a memory-backed emptyDir holding
    frontends x frontend_shm_mib (the server refuses to start otherwise), and
    its pages count against the container's memory limit, which must hold
    them and the processes besides.
    """
    container = m.server_container(spec)
    config = m.server_config(objects, container)
    frontends = supervisor.frontend_count(config)
    if frontends == 1:
        return []
    mounts = [v for v in container.get("volumeMounts", []) if v["mountPath"].rstrip("/") == SHM_DIR]
    if len(mounts) != 1:
        return [f"{frontends} frontends and no volume at {SHM_DIR} (the runtime's default is 64 MiB)"]
    volume = {v["name"]: v for v in spec.get("volumes", [])}[mounts[0]["name"]]
    empty_dir = volume.get("emptyDir")
    if empty_dir is None or empty_dir.get("medium") != "Memory":
        return [f"{SHM_DIR} must be an emptyDir with medium: Memory, got {volume}"]
    need = frontends * config.frontend_shm_mib << 20
    if "sizeLimit" not in empty_dir:
        return [f"{SHM_DIR} has no sizeLimit; it needs {need >> 20} MiB"]
    size = m.quantity_bytes(empty_dir["sizeLimit"])
    problems = []
    if size < need:
        problems.append(
            f"{SHM_DIR} sizeLimit {empty_dir['sizeLimit']} < {frontends} frontends x "
            f"{config.frontend_shm_mib} MiB"
        )
    limit = m.quantity_bytes(container["resources"]["limits"]["memory"])
    if limit - size < frontends * FRONTEND_PROCESS_MIB << 20:
        problems.append(
            f"memory limit {container['resources']['limits']['memory']} leaves less than "
            f"{FRONTEND_PROCESS_MIB} MiB per frontend beside {SHM_DIR}'s {empty_dir['sizeLimit']}"
        )
    return problems


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_dev_shm_holds_every_frontends_slab(target, kind):
    objects, _, spec = workload(target, kind)
    assert shared_memory_problems(objects, spec) == []


def test_gpu_overlay_runs_several_frontends():
    """The GPU overlay is the one that needs them (one process tops out near 1,000 requests/s)."""
    objects, _, spec = workload("gpu", "Deployment")
    assert supervisor.frontend_count(m.server_config(objects, m.server_container(spec))) > 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda shm, container, settings: shm.update(sizeLimit="2047Mi"),
        lambda shm, container, settings: settings.update(SVERTKA_FRONTENDS="10"),
        lambda shm, container, settings: settings.update(SVERTKA_FRONTEND_SHM_MIB="512"),
        lambda shm, container, settings: shm.pop("medium"),
        lambda shm, container, settings: shm.pop("sizeLimit"),
        lambda shm, container, settings: container["resources"]["limits"].update(memory="2304Mi"),
        lambda shm, container, settings: container.update(
            volumeMounts=[v for v in container["volumeMounts"] if v["mountPath"] != SHM_DIR]
        ),
    ],
    ids=[
        "size-below-slabs",
        "more-frontends",
        "larger-slabs",
        "not-memory",
        "no-size",
        "no-memory",
        "no-mount",
    ],
)
def test_dev_shm_check_catches_mistakes(mutate):
    """The check above fails on each way the GPU overlay's sizing could go wrong."""
    objects, _, spec = workload("gpu", "Deployment")
    assert shared_memory_problems(objects, spec) == []
    container = m.server_container(spec)
    (mount,) = [v for v in container["volumeMounts"] if v["mountPath"] == SHM_DIR]
    (shm,) = [v["emptyDir"] for v in spec["volumes"] if v["name"] == mount["name"]]
    (ref,) = container["envFrom"]
    settings = m.find(objects, "ConfigMap", ref["configMapRef"]["name"])["data"]
    mutate(shm, container, settings)
    assert shared_memory_problems(objects, spec)


def test_gpu_overlay_keeps_tensorrt_engines_on_a_volume_of_their_own():
    """The server's --trt-cache-dir is a mounted emptyDir (it outlives container restarts), not the
    small /tmp volume (the ephemeral-storage limit holding it is checked below)."""
    objects, _, spec = workload("gpu", "Deployment")
    container = m.server_container(spec)
    cache = m.server_config(objects, container).trt_cache_dir
    assert cache is not None and not str(cache).startswith("/tmp")
    (mount,) = [v for v in container["volumeMounts"] if str(cache).startswith(v["mountPath"])]
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert "sizeLimit" in volume["emptyDir"] and "medium" not in volume["emptyDir"]


def ephemeral_storage_problems(spec: dict) -> list[str]:
    """What keeps the pod's disk-backed emptyDirs from fitting in its ephemeral-storage limit.

    The kubelet evicts a pod whose emptyDirs and containers' writes together
    exceed the sum of its containers' limits, so the limit must hold every
    disk-backed emptyDir at its sizeLimit (each needs one, or it is unbounded)
    plus the server's own writes (logs: its root filesystem is read-only).
    A pod without a limit (the KServe predictor) is bounded by the volumes'
    sizeLimits alone.
    """
    problems, volumes_bytes = [], 0
    for volume in spec.get("volumes", []):
        empty_dir = volume.get("emptyDir")
        if empty_dir is None or empty_dir.get("medium") == "Memory":
            continue
        if "sizeLimit" not in empty_dir:
            problems.append(f"emptyDir {volume['name']} has no sizeLimit")
            continue
        volumes_bytes += m.quantity_bytes(empty_dir["sizeLimit"])
    limits = [c["resources"].get("limits", {}).get("ephemeral-storage") for c in spec["containers"]]
    if any(limits):
        limit = sum(m.quantity_bytes(x) for x in limits if x)
        need = volumes_bytes + (CONTAINER_WRITES_MIB << 20)
        if limit < need:
            problems.append(
                f"ephemeral-storage limit {limit >> 20} MiB < {need >> 20} MiB (emptyDirs at their "
                f"size limits + {CONTAINER_WRITES_MIB} MiB of logs)"
            )
    return problems


@pytest.mark.parametrize("target, kind", K8S_WORKLOADS, ids=IDS)
def test_ephemeral_storage_limit_holds_every_disk_volume(target, kind):
    """The documented GPU recipe with image delivery once set the limit to 2304Mi beside 6272 MiB of volumes."""
    _, _, spec = workload(target, kind)
    assert ephemeral_storage_problems(spec) == []


def test_ephemeral_storage_check_catches_a_volume_outgrowing_the_limit():
    _, _, spec = workload("gpu", "Deployment")
    (trt,) = [v for v in spec["volumes"] if v["name"] == "trt-cache"]
    trt["emptyDir"]["sizeLimit"] = "5Gi"
    assert ephemeral_storage_problems(spec)
    trt["emptyDir"].pop("sizeLimit")
    assert ephemeral_storage_problems(spec) == ["emptyDir trt-cache has no sizeLimit"]


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes():
    deployment = m.find(m.rendered("gpu"), "Deployment")
    spec = m.pod_spec(deployment)
    container = m.server_container(spec)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu"), "the GPU overlay must run the Dockerfile.gpu image"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    cpu = m.server_container(m.pod_spec(m.find(m.rendered("cpu"), "Deployment")))
    assert not cpu["image"].endswith("-gpu") and "nvidia.com/gpu" not in cpu["resources"]["limits"]


# -- services, policy, autoscaling, monitoring ---------------------------------


@pytest.mark.parametrize("target", [t for t in m.WORKLOAD_TARGETS if t not in m.CANARY_TARGETS])
def test_services_and_network_policy_reach_the_server(target):
    objects = m.rendered(target)
    deployment = m.find(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = m.server_container(m.pod_spec(deployment))
    ports = ports_by_name(container)
    services = m.find_all(objects, "Service")
    assert {s["spec"].get("clusterIP") for s in services} == {None, "None"}, "one ClusterIP and one headless"
    for service in services:
        assert m.selects({"matchLabels": service["spec"]["selector"]}, labels)
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]], port
    headless = next(s for s in services if s["spec"].get("clusterIP") == "None")
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    assert headless["spec"]["publishNotReadyAddresses"] is False

    policy = m.find(objects, "NetworkPolicy")
    assert m.selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    allowed = sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"])
    assert allowed == sorted(ports), "exactly the gRPC and metrics ports are reachable"


def test_kserve_predictor_gets_the_base_autoscaler_budget_and_policy():
    """KServe's own HPA scales on CPU or memory only, and it makes no budget or policy: the
    kserve target brings svertka's, equal to the base's, on the pods KServe makes."""
    objects = m.rendered("kserve")
    base = m.rendered("base")
    isvc = m.find(objects, "InferenceService")
    labels = m.pod_labels(isvc)
    # "external": KServe makes no HPA (two would fight over the replica count) and leaves the
    # Deployment's replicas to ours; its own scaling fields would be ignored, so none is set.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
    ignored = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"} & set(isvc["spec"]["predictor"])
    assert not ignored
    hpa = m.find(objects, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", m.kserve_deployment_name(isvc))
    assert hpa["metadata"]["name"] != ref["name"], "KServe takes an HPA named like its Deployment for its own"
    base_hpa = m.find(base, "HorizontalPodAutoscaler")["spec"]
    for key in ("minReplicas", "maxReplicas", "metrics", "behavior"):
        assert hpa["spec"][key] == base_hpa[key], key
    pdb = m.find(objects, "PodDisruptionBudget")
    assert m.selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["maxUnavailable"] == m.find(base, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a drain could take every replica"
    policy = m.find(objects, "NetworkPolicy")
    assert m.selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []
    ports = ports_by_name(m.server_container(m.pod_spec(isvc)))
    allowed = sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"])
    assert allowed == sorted(ports), "exactly the gRPC and metrics ports are reachable"
    base_peers = [rule["from"] for rule in m.find(base, "NetworkPolicy")["spec"]["ingress"]]
    assert [rule["from"] for rule in policy["spec"]["ingress"]] == base_peers


def adapter_rules() -> list[dict]:
    return yaml.safe_load((ADAPTER / "config.yaml").read_text())["rules"]


def fresh_metric_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    from service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry, process_metrics=False, gpu_metrics=False)
    return {metric.name for metric in registry.collect()} | {
        name for metric in registry.collect() for name in [metric.name + "_total"] if metric.type == "counter"
    }


def test_hpa_metric_comes_from_an_adapter_rule_on_a_server_metric():
    hpa = m.find(m.rendered("base"), "HorizontalPodAutoscaler")
    pods = [x["pods"]["metric"]["name"] for x in hpa["spec"]["metrics"] if x["type"] == "Pods"]
    cpu = [x for x in hpa["spec"]["metrics"] if x["type"] == "Resource" and x["resource"]["name"] == "cpu"]
    assert pods and cpu, "a per-pod load metric, with CPU as the fallback"
    served = {rule["name"]["as"]: rule for rule in adapter_rules()}
    exported = fresh_metric_names()
    for name in pods:
        rule = served[name]
        series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"].strip("'\"")).group(1)
        assert series in exported, f"{series} is not a metric the server exports"
        assert re.fullmatch(rule["name"]["matches"], series)
        # The adapter maps the scrape's namespace/pod labels to the HPA's pods.
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_adapter_helm_values_carry_the_same_rules():
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    assert values["rules"]["custom"] == adapter_rules()


def alert_jobs() -> set[str]:
    """The jobs the alert and recording rules select (their unit tests also feed another job's series)."""
    jobs = set()
    for path in (RULES_DIR / "rules").glob("*.yml"):
        jobs |= set(re.findall(r'job="([^"]+)"', path.read_text()))
    return jobs


def test_servicemonitor_scrapes_the_metrics_port_as_the_alerts_job():
    monitor = m.find(m.rendered("monitoring"), "ServiceMonitor")
    objects = m.rendered("cpu")
    (endpoint,) = monitor["spec"]["endpoints"]
    selected = [
        s
        for s in m.find_all(objects, "Service")
        if m.selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    scraped = [s for s in selected if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}]
    assert len(scraped) == 1, "exactly one Service yields scrape targets (no duplicate series)"
    (port,) = [p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["port"] == cfg.DEFAULT_METRICS_PORT
    job = scraped[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert alert_jobs() == {job}, "the alert rules select the job this scrape produces"


def test_kserve_podmonitor_scrapes_the_metrics_port_as_the_alerts_job():
    objects = m.rendered("kserve")
    monitor = m.find(objects, "PodMonitor")
    isvc = m.find(objects, "InferenceService")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports_by_name(m.server_container(m.pod_spec(isvc)))
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]
    }
    jobs = {r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"}
    assert jobs == alert_jobs()


def test_prometheusrule_is_generated_from_the_rule_files():
    spec = importlib.util.spec_from_file_location(
        "gen_prometheusrule", m.K8S / "tools" / "gen_prometheusrule.py"
    )
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_prometheusrule"] = gen
    spec.loader.exec_module(gen)
    assert gen.OUTPUT.read_text() == gen.render(), "stale: run python deploy/k8s/tools/gen_prometheusrule.py"
    rule = m.find(m.rendered("monitoring"), "PrometheusRule")
    files = gen.rule_files()
    assert files, "deploy/prometheus has no rule files"
    expected = [g for path in files for g in yaml.safe_load(path.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
