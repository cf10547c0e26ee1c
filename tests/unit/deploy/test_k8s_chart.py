"""deploy/k8s: the rendered chart is valid Kubernetes and wires the mesh as designed."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import shutil
import subprocess
import sys

import pytest
import yaml
from chart_variants import CHART, KEYS_VALUES, VARIANTS, manifest, render_variant, require_helm
from tunemesh_common.security import tls as mesh_tls

from deploy import helm

KUBERNETES_VERSIONS = ["1.31.0", "1.37.0"]  # the chart's kubeVersion floor, and the newest schemas
MESH = {"scheduler", "trainer", "sampler", "checkpoint"}
SERVICES = MESH | {"gateway"}  # every tunemesh process (the gateway: HTTP, a client of the scheduler and etcd)
TLS_ROLES = ["scheduler", "checkpoint", "trainer", "sampler", "etcd", "admin", "gateway"]
PUBLIC = {("scheduler", "grpc"), ("gateway", "http")}  # the ports clients use
PLAINTEXT = ["tls.enabled=false"]
CERT_MANAGER = CHART / "cert-manager.yaml"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render_variant(request.param)


def workloads(docs: list[dict], release: str = "tm") -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix(f"{release}-"): d for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")}


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def flags(container: dict) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"])


@pytest.mark.parametrize("mode", ["cluster-ip", "load-balancer", "plaintext"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_document_passes_kubernetes_validate_strict(name, mode, tmp_path):
    """Each values file, with the default ClusterIP, with a LoadBalancer and its source ranges,
    and without TLS."""
    stream = manifest(name, {"load-balancer": LOAD_BALANCER, "plaintext": PLAINTEXT}.get(mode, []))
    path = tmp_path / f"{name}.yaml"
    path.write_text(stream)
    kinds = {d["kind"] for d in helm.documents(stream)}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    assert ("Job" in kinds) == (mode != "plaintext")  # the etcd-auth hook
    for version in KUBERNETES_VERSIONS:
        done = subprocess.run(
            [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path):
    """The check above can fail: strict validation catches a misspelt field."""
    path = tmp_path / "bad.yaml"
    doc = workloads(render_variant("default"))["scheduler"]
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    path.write_text(yaml.safe_dump(doc))
    done = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.31.0",
                           str(path)], capture_output=True, text=True)
    assert done.returncode != 0


def test_rendering_without_api_keys_fails_with_the_reason():
    require_helm()
    with pytest.raises(helm.HelmError, match=r"scheduler.yaml.*set apiKeys.existingSecret .* or apiKeys.file"):
        helm.template(CHART)
    with pytest.raises(helm.HelmError, match=r"apiKeys.keys \(plain-text api key -> tenant\) is no longer accepted"):
        helm.template(CHART, sets=["apiKeys.keys.KEY=acme", "apiKeys.existingSecret=tenant-keys"])


@pytest.mark.parametrize("replicas", [3, 5])
def test_etcd_members_and_initial_cluster_agree(replicas):
    sets = [] if replicas == 3 else [f"etcd.replicas={replicas}"]  # 3 is the default
    etcd = workloads(render_variant("default", sets))["etcd"]
    assert etcd["spec"]["replicas"] == replicas
    peer_service = etcd["spec"]["serviceName"]
    cluster = flags(etcd["spec"]["template"]["spec"]["containers"][0])["initial-cluster"].split(",")
    assert cluster == [f"tm-etcd-{i}=https://tm-etcd-{i}.{peer_service}.mesh.svc.cluster.local:2380"
                       for i in range(replicas)]
    headless = one(render_variant("default", sets), "Service", peer_service)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True


LB_RANGES = ["203.0.113.0/24", "2001:db8::/48"]
LOAD_BALANCER = ["scheduler.service.type=LoadBalancer",
                 f"scheduler.service.loadBalancerSourceRanges={{{','.join(LB_RANGES)}}}"]


def exposed(docs: list[dict]) -> list[str]:
    """Services reachable from beyond the cluster."""
    return [d["metadata"]["name"] for d in docs
            if d["kind"] == "Service" and d["spec"].get("type") in ("LoadBalancer", "NodePort")]


def test_nothing_is_exposed_beyond_the_cluster_by_default(variant):
    _, docs = variant
    scheduler = one(docs, "Service", "tm-scheduler")
    assert scheduler["spec"]["type"] == "ClusterIP" and "loadBalancerSourceRanges" not in scheduler["spec"]
    assert exposed(docs) == []
    assert not [d for d in docs if d["kind"] == "Ingress"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_load_balancer_is_opt_in_and_open_only_to_its_source_ranges(name):
    docs = render_variant(name, LOAD_BALANCER)
    assert exposed(docs) == ["tm-scheduler"]  # the only Service ever exposed
    scheduler = one(docs, "Service", "tm-scheduler")
    assert scheduler["spec"]["type"] == "LoadBalancer"
    assert scheduler["spec"]["loadBalancerSourceRanges"] == LB_RANGES
    assert scheduler["spec"]["selector"] == workloads(docs)["scheduler"]["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in scheduler["spec"]["ports"]] == ["grpc"]


def test_a_load_balancer_leaves_the_network_policies_as_they_are():
    """The source ranges filter at the load balancer; the policies (checked below) still
    select the same pods and ports."""
    policies = lambda docs: [d for d in docs if d["kind"] == "NetworkPolicy"]  # noqa: E731
    default = policies(render_variant("default"))
    assert default and policies(render_variant("default", LOAD_BALANCER)) == default


@pytest.mark.parametrize("explicit", [False, True])
def test_a_load_balancer_without_source_ranges_fails_with_the_reason(explicit, tmp_path):
    service = {"type": "LoadBalancer", **({"loadBalancerSourceRanges": []} if explicit else {})}
    values = tmp_path / "lb.yaml"
    values.write_text(yaml.safe_dump({"scheduler": {"service": service}}))
    require_helm()
    with pytest.raises(helm.HelmError, match=r"scheduler.yaml.*scheduler.service.type=LoadBalancer needs "
                                             r"scheduler.service.loadBalancerSourceRanges: the CIDRs allowed"):
        helm.template(CHART, [*VARIANTS["default"][0], values], VARIANTS["default"][1], namespace="mesh")


@pytest.mark.parametrize(("sets", "reason"), [
    (["scheduler.service.type=NodePort"], 'scheduler.service.type must be ClusterIP or LoadBalancer, not "NodePort"'),
    ([LOAD_BALANCER[0], "scheduler.service.loadBalancerSourceRanges={anywhere}"],
     'loadBalancerSourceRanges: "anywhere" is not a CIDR'),
])
def test_other_exposures_fail_with_the_reason(sets, reason):
    with pytest.raises(helm.HelmError, match=reason):
        render_variant("default", sets)


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) matches `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"In": present and value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod (labels, its namespace's labels) or outside the cluster."""

    labels: dict | None = None  # None: outside the cluster
    namespace: str = "mesh"

    def matches(self, peer: dict) -> bool:
        if self.labels is None:
            return "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0"
        if "ipBlock" in peer:
            return False
        in_namespace = (_selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": self.namespace})
                        if "namespaceSelector" in peer else self.namespace == "mesh")
        return in_namespace and _selects(peer.get("podSelector", {}), self.labels)


def reachable(policies: list[dict], target: dict, port: int, source: Source) -> bool:
    """NetworkPolicy ingress semantics: an isolated pod takes what some selecting policy allows."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    return any(
        (not rule.get("ports") or port in {p["port"] for p in rule["ports"]})
        and (not rule.get("from") or any(source.matches(peer) for peer in rule["from"]))
        for policy in selecting for rule in policy["spec"].get("ingress", [])
    )


def test_network_policies_open_only_the_scheduler_and_the_gateway_beyond_the_mesh(variant):
    _, docs = variant
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads(docs).items()}
    ports = {name: {p["name"]: p["containerPort"] for p in w["spec"]["template"]["spec"]["containers"][0]["ports"]}
             for name, w in workloads(docs).items()}
    outside, stranger = Source(), Source({"app": "other"})
    scraper = Source({"app": "prometheus"}, namespace="monitoring")
    assert reachable(policies, pods["scheduler"], 50051, outside)
    assert reachable(policies, pods["scheduler"], 50051, stranger)
    assert reachable(policies, pods["gateway"], 8000, outside)
    for name, labels in pods.items():
        for port_name, port in ports[name].items():
            public = (name, port_name) in PUBLIC
            assert reachable(policies, labels, port, scraper) == (public or port_name == "metrics"), (name, port_name)
            if public:
                continue
            assert not reachable(policies, labels, port, outside), (name, port_name)
            assert not reachable(policies, labels, port, stranger), (name, port_name)
            if name not in ("scheduler", "gateway"):  # nothing in the mesh calls these
                assert all(reachable(policies, labels, port, Source(peer)) for peer in pods.values()), (name, port_name)


def _probe(container: dict, probe: str) -> tuple[str, object]:
    """("grpc", port) or ("http", (path, port number)) of one probe."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    spec = container[probe]
    if "grpc" in spec:
        return "grpc", spec["grpc"]["port"]
    port = spec["httpGet"]["port"]
    return "http", (spec["httpGet"]["path"], ports.get(port, port))


def test_with_tls_every_service_is_probed_on_its_plaintext_metrics_port(variant):
    """Kubelet's gRPC probe cannot speak TLS: /readyz (startup, readiness) and /healthz
    (liveness) on the port the service serves metrics on; a scheduler standby (no gRPC
    port, never ready) starts and lives by /healthz, and is ready only while leading."""
    _, docs = variant
    for name, workload in workloads(docs).items():
        [container] = workload["spec"]["template"]["spec"]["containers"]
        probes = {probe: _probe(container, probe) for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
        if name == "etcd":
            metrics_url = flags(container)["listen-metrics-urls"]
            assert metrics_url.startswith("http://"), metrics_url  # plaintext, unlike its client URLs
            port = int(metrics_url.rpartition(":")[2])
            assert probes == {"startupProbe": ("http", ("/health?exclude=NOSPACE&serializable=true", port)),
                              "livenessProbe": ("http", ("/health?exclude=NOSPACE&serializable=true", port)),
                              "readinessProbe": ("http", ("/health?exclude=NOSPACE", port))}
            continue
        port = int(flags(container)["metrics-listen"].rpartition(":")[2])
        # a scheduler standby, and a gateway whose scheduler is away, are alive but not ready
        startup = "/healthz" if name in ("scheduler", "gateway") else "/readyz"
        assert probes == {"startupProbe": ("http", (startup, port)), "livenessProbe": ("http", ("/healthz", port)),
                          "readinessProbe": ("http", ("/readyz", port))}, name


def test_without_tls_services_keep_grpc_probes_on_their_serving_port():
    for name, workload in workloads(render_variant("default", PLAINTEXT)).items():
        [container] = workload["spec"]["template"]["spec"]["containers"]
        if name not in MESH:
            continue
        serving = int(flags(container)["listen"].rpartition(":")[2])
        assert _probe(container, "readinessProbe") == ("grpc", serving), name
        for probe in ("startupProbe", "livenessProbe"):
            if name == "scheduler":  # a standby opens no gRPC port: alive is its metrics endpoint
                assert _probe(container, probe) == ("http", ("/healthz", 9400)), probe
            else:
                assert _probe(container, probe) == ("grpc", serving), (name, probe)


def test_the_scheduler_runs_a_leader_and_a_standby(variant):
    _, docs = variant
    scheduler = workloads(docs)["scheduler"]
    assert scheduler["spec"]["replicas"] == 2
    assert scheduler["spec"]["strategy"]["type"] == "RollingUpdate"  # never both replicas down on upgrade


def test_checkpoint_writes_to_its_persistent_volume_claim(variant):
    _, docs = variant
    checkpoint = workloads(docs)["checkpoint"]
    assert checkpoint["kind"] == "StatefulSet"
    claims = {c["metadata"]["name"]: c for c in checkpoint["spec"]["volumeClaimTemplates"]}
    [container] = checkpoint["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[flags(container)["root-dir"]] in claims


def test_scheduler_reads_api_keys_from_the_mounted_secret(variant):
    name, docs = variant
    scheduler = workloads(docs)["scheduler"]["spec"]["template"]["spec"]
    [container] = scheduler["containers"]
    keys_file = flags(container)["api-keys-file"]
    mount_dir, _, key = keys_file.rpartition("/")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == mount_dir]
    [volume] = [v for v in scheduler["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    if name == "gpu":  # an existing Secret: the chart makes none
        assert secret_name == "tenant-keys" and not [d for d in docs if d["kind"] == "Secret"]
    else:
        secret = one(docs, "Secret", secret_name)
        keys_file = yaml.safe_load(KEYS_VALUES.read_text())["apiKeys"]["file"]
        assert base64.b64decode(secret["data"][key]).decode() == keys_file
        assert [k["tenant"] for k in json.loads(keys_file)["keys"]] == ["acme", "globex"]


def test_gpu_variant_requests_a_gpu_per_rank_and_runs_a_rank_group():
    values = yaml.safe_load(open(CHART / "values-gpu.yaml"))
    docs = workloads(render_variant("gpu"))
    trainer = docs["trainer"]["spec"]["template"]["spec"]["containers"][0]
    want = values["trainer"]["ranks"] * values["trainer"]["gpusPerRank"]
    assert want > 1
    assert trainer["resources"]["requests"]["nvidia.com/gpu"] == want == trainer["resources"]["limits"]["nvidia.com/gpu"]
    assert flags(trainer)["ranks"] == str(values["trainer"]["ranks"])
    sampler = docs["sampler"]["spec"]["template"]["spec"]["containers"][0]
    assert sampler["resources"]["limits"]["nvidia.com/gpu"] == values["sampler"]["gpus"]
    cpu = workloads(render_variant("default"))["trainer"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["requests"]


def test_device_dtype_and_kv_cache_values_reach_trainer_and_sampler_as_flags():
    """Default values: auto devices, a float32 trainer, the sampler's auto dtype; the GPU values: cuda, bfloat16
    on both (so their logprobs agree), the GPU's share for vLLM."""
    def engine_flags(variant: str) -> dict[str, dict[str, str]]:
        docs = workloads(render_variant(variant))
        return {name: {k: v for k, v in flags(docs[name]["spec"]["template"]["spec"]["containers"][0]).items()
                       if k in ("device", "dtype", "kv-cache-bytes", "kv-cache-fraction", "batch-invariant",
                                "vllm-batch-invariant")}
                for name in ("trainer", "sampler")}

    assert engine_flags("default") == {
        "trainer": {"device": "auto", "dtype": "float32", "batch-invariant": "true"},
        "sampler": {"device": "auto", "dtype": "auto", "kv-cache-bytes": "1GiB", "kv-cache-fraction": "0.9",
                    "batch-invariant": "true", "vllm-batch-invariant": "false"}}
    gpu = yaml.safe_load(open(CHART / "values-gpu.yaml"))
    assert engine_flags("gpu") == {
        "trainer": {"device": "cuda", "dtype": "bfloat16", "batch-invariant": "true"},
        "sampler": {"device": "cuda", "dtype": "bfloat16", "kv-cache-bytes": "1GiB",
                    "kv-cache-fraction": str(gpu["sampler"]["kvCacheFraction"]), "batch-invariant": "true",
                    "vllm-batch-invariant": "false"}}


def test_torchrun_launcher_starts_the_rank_group_instead_of_ranks():
    trainer = workloads(render_variant("gpu", ["trainer.launcher=torchrun"]))["trainer"]
    [container] = trainer["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "torchrun"
    assert "--nproc-per-node=2" in container["command"] and container["command"][-2:] == ["-m", "tunemesh_trainer"]
    assert "ranks" not in flags(container)
    with pytest.raises(helm.HelmError, match="trainer.launcher must be ranks or torchrun"):
        render_variant("gpu", ["trainer.launcher=mpirun"])


def _settings_fields(service: str) -> set[str]:
    module = importlib.import_module(f"tunemesh_{service}.settings")
    [cls] = [c for c in vars(module).values()
             if isinstance(c, type) and hasattr(c, "model_fields") and c.__module__ == module.__name__]
    return {name.replace("_", "-") for name in cls.model_fields}


def test_every_service_flag_is_a_setting_of_that_service(variant):
    _, docs = variant
    for name, workload in workloads(docs).items():
        if name not in SERVICES:
            continue
        fields = _settings_fields(name)
        unknown = set(flags(workload["spec"]["template"]["spec"]["containers"][0])) - fields
        # --metrics-listen is being added to every service under issue 7; until it lands it is the one flag allowed
        # to be missing (remove this line once `metrics_listen` is a field of every settings class).
        unknown -= {"metrics-listen"}
        assert not unknown, (name, unknown)


def test_prometheus_scrapes_every_pod_on_a_declared_metrics_port(variant):
    _, docs = variant
    config = yaml.safe_load(one(docs, "ConfigMap", "tm-prometheus")["data"]["prometheus.yml"])
    [job] = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["mesh"]
    assert job["relabel_configs"][0]["regex"] == "tm"
    for name, workload in workloads(docs).items():
        template = workload["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"] if p["name"] == "metrics"}
        assert int(annotations["prometheus.io/port"]) in ports, name
        if name in SERVICES:
            assert flags(template["spec"]["containers"][0])["metrics-listen"].endswith(f":{min(ports)}")


@pytest.fixture
def chart_copy(tmp_path):
    """A copy of deploy/k8s beside an empty grafana folder (its dashboards link points there)
    and a copy of deploy/prometheus (its alert rules)."""
    shutil.copytree(CHART, tmp_path / "k8s", symlinks=True)
    shutil.copytree(CHART.parent / "prometheus", tmp_path / "prometheus")
    (tmp_path / "grafana").mkdir()
    return tmp_path


def test_one_configmap_per_dashboard_json(chart_copy):
    fleet = {"title": "Fleet overview", "panels": [{"id": 1, "expr": "sum(rate(x[5m]))"}]}
    (chart_copy / "grafana" / "fleet_overview.json").write_text(json.dumps(fleet, indent=2))
    (chart_copy / "grafana" / "trainer.json").write_text('{"title": "Trainer"}\n')
    (chart_copy / "grafana" / "rules.yml").write_text("groups: []\n")
    docs = render_variant("default", chart_dir=chart_copy / "k8s")
    maps = {d["metadata"]["name"]: d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    assert sorted(maps) == ["tm-dashboard-fleet-overview", "tm-dashboard-trainer"]
    assert json.loads(maps["tm-dashboard-fleet-overview"]["data"]["fleet_overview.json"]) == fleet
    assert json.loads(maps["tm-dashboard-trainer"]["data"]["trainer.json"]) == {"title": "Trainer"}


def test_no_dashboards_no_configmaps(chart_copy):
    docs = render_variant("default", chart_dir=chart_copy / "k8s")
    assert not [d for d in docs if "grafana_dashboard" in d["metadata"].get("labels", {})]
    shutil.rmtree(chart_copy / "grafana")  # Helm loads no chart with a dangling link: it names the link
    with pytest.raises(helm.HelmError, match="error evaluating symlink .*dashboards"):
        render_variant("default", chart_dir=chart_copy / "k8s")


@pytest.mark.parametrize("sets", [[], PLAINTEXT])
@pytest.mark.parametrize("values", ["values.yaml", "values-gpu.yaml"])
def test_helm_lint_passes_for_each_values_file(values, sets):
    require_helm()
    assert "0 chart(s) failed" in helm.lint(CHART, [CHART / values, KEYS_VALUES], sets, namespace="mesh")


def test_helm_lint_fails_on_a_broken_template(chart_copy):
    """The check above can fail. (Lint mode turns the chart's `fail` calls into log lines: `helm template` checks those.)"""
    require_helm()
    with open(chart_copy / "k8s" / "templates" / "models.yaml", "a") as template:
        template.write("broken: [\n")
    with pytest.raises(helm.HelmError, match="models.yaml"):
        helm.lint(chart_copy / "k8s", sets=["apiKeys.existingSecret=tenant-keys"])


def test_helm_template_prefixes_every_object_with_the_release_name():
    out = manifest("default", release="prod")
    docs = helm.documents(out)
    assert out.count("# Source: tunemesh/templates/") == len(docs)
    assert all(d["metadata"]["name"].startswith("prod-") for d in docs)


def test_metrics_disabled_turns_off_listeners_scrapes_and_their_policy():
    docs = render_variant("default", ["metrics.enabled=false", *PLAINTEXT])
    assert not [d for d in docs if d["metadata"]["name"] in ("tm-prometheus", "tm-metrics")]
    for name, workload in workloads(docs).items():
        assert "prometheus.io/scrape" not in workload["spec"]["template"]["metadata"].get("annotations", {}), name
        if name in SERVICES:
            assert flags(workload["spec"]["template"]["spec"]["containers"][0])["metrics-listen"] == "", name


def test_extra_models_reach_trainer_and_sampler_through_the_models_file():
    docs = render_variant("gpu", ["trainer.expertParallel=2"])
    listed = json.loads(one(docs, "ConfigMap", "tm-models")["data"]["models.json"])
    assert listed == yaml.safe_load(open(CHART / "values-gpu.yaml"))["models"]["extra"]
    for name in ("trainer", "sampler"):
        spec = workloads(docs)[name]["spec"]["template"]["spec"]
        [container] = spec["containers"]
        mount_dir = flags(container)["models-file"].rpartition("/")[0]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == mount_dir]
        assert {"name": mount["name"], "configMap": {"name": "tm-models"}} in spec["volumes"]
        assert flags(container)["model"] == listed[0]["name"]
        assert any(listed[0]["path"].startswith(m["mountPath"]) for m in container["volumeMounts"])
    assert flags(workloads(docs)["trainer"]["spec"]["template"]["spec"]["containers"][0])["expert-parallel"] == "2"
    assert "expert-parallel" not in flags(workloads(render_variant("gpu"))["trainer"]["spec"]["template"]["spec"]["containers"][0])


# ---- TLS -----------------------------------------------------------------------------


def default_secrets() -> dict[str, str]:
    """values.yaml's tls.secrets: role -> Secret name."""
    return yaml.safe_load((CHART / "values.yaml").read_text())["tls"]["secrets"]


def secret_of(pod: dict, container: dict, path: str) -> str:
    """The Secret whose key `path` is in `container`: mounted read-only, whole, and not
    world-readable."""
    directory, _, _ = path.rpartition("/")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly") is True, mount
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "items" not in volume["secret"] and volume["secret"]["defaultMode"] & 0o007 == 0, volume
    return volume["secret"]["secretName"]


TLS_FLAGS = {"mesh": ("tls-ca", "tls-cert", "tls-key"), "etcd": ("trusted-ca-file", "cert-file", "key-file"),
             "etcd-peer": ("peer-trusted-ca-file", "peer-cert-file", "peer-key-file"),
             "gateway": ("ca-bundle", "tls-cert", "tls-key"), "gateway-etcd": ("ca-bundle", "etcd-tls-cert", "etcd-tls-key")}


def test_every_process_reads_its_role_s_certificate_from_its_secret(variant):
    _, docs = variant
    secrets = default_secrets()
    for name, workload in workloads(docs).items():
        pod = workload["spec"]["template"]["spec"]
        [container] = pod["containers"]
        args = flags(container)
        kinds = ["mesh"] if name in MESH else ["gateway", "gateway-etcd"] if name == "gateway" else ["etcd", "etcd-peer"]
        for kind in kinds:
            files = [args[flag] for flag in TLS_FLAGS[kind]]
            assert [f.rpartition("/")[2] for f in files] == ["ca.crt", "tls.crt", "tls.key"], (name, files)
            assert {secret_of(pod, container, f) for f in files} == {secrets[name]}, name
        assert "insecure" not in args, name


def test_etcd_takes_clients_and_peers_over_mutual_tls_only():
    [container] = workloads(render_variant("default"))["etcd"]["spec"]["template"]["spec"]["containers"]
    args = flags(container)
    assert args["client-cert-auth"] == "true" and args["peer-client-cert-auth"] == "true"
    urls = [args[f] for f in ("listen-client-urls", "advertise-client-urls", "listen-peer-urls",
                              "initial-advertise-peer-urls")]
    urls += [member.split("=", 1)[1] for member in args["initial-cluster"].split(",")]
    assert all(url.startswith("https://") for url in urls), urls
    assert args["peer-cert-allowed-cn"] == mesh_tls.etcd_user("etcd")


def test_without_tls_every_hop_is_plaintext_and_no_certificate_is_mounted():
    docs = render_variant("default", PLAINTEXT)
    assert not [d for d in docs if d["kind"] == "Job"]
    for name, workload in workloads(docs).items():
        pod = workload["spec"]["template"]["spec"]
        [container] = pod["containers"]
        args = flags(container)
        assert not [m for m in container["volumeMounts"] if m["name"] == "tls"], name
        assert not [v for v in pod.get("volumes", []) if v["name"] == "tls"], name
        assert not set(args) & {flag for group in TLS_FLAGS.values() for flag in group}, name
        if name in SERVICES:
            assert args["insecure"] == "true", name
        else:
            assert "client-cert-auth" not in args
            assert all(args[f].startswith("http://") for f in ("listen-client-urls", "listen-peer-urls"))


@pytest.mark.parametrize("role", TLS_ROLES)
def test_a_missing_secret_name_fails_rendering_naming_the_value(role):
    with pytest.raises(helm.HelmError, match=rf"tls.enabled=true needs tls.secrets.{role}: the name of a "
                                             r"kubernetes.io/tls Secret \(ca.crt, tls.crt, tls.key\)"):
        render_variant("default", [f"tls.secrets.{role}="])
    assert render_variant("default", [f"tls.secrets.{role}=", *PLAINTEXT])  # without TLS no Secret is read


def test_tls_needs_the_metrics_port_for_its_probes():
    with pytest.raises(helm.HelmError, match="tls.enabled=true needs metrics.enabled=true: Kubernetes probes "
                                             "cannot speak TLS"):
        render_variant("default", ["metrics.enabled=false"])


def test_the_etcd_auth_job_runs_after_install_and_upgrade_as_etcd_root(variant):
    _, docs = variant
    job = one(docs, "Job", "tm-etcd-auth")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "tunemesh_common.membership.etcd_auth"]
    assert container["image"] == workloads(docs)["scheduler"]["spec"]["template"]["spec"]["containers"][0]["image"]
    args = flags(container)
    [client_port] = one(docs, "Service", "tm-etcd")["spec"]["ports"]
    assert args["endpoint"] == f"tm-etcd:{client_port['port']}"
    assert {secret_of(pod, container, args[flag]) for flag in TLS_FLAGS["mesh"]} == {default_secrets()["admin"]}
    # The NetworkPolicies let it reach etcd's client port.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    etcd = workloads(docs)["etcd"]["spec"]["template"]["metadata"]["labels"]
    assert reachable(policies, etcd, client_port["port"], Source(job["spec"]["template"]["metadata"]["labels"]))


def test_the_etcd_auth_job_passes_only_flags_the_command_takes():
    container = one(render_variant("default"), "Job", "tm-etcd-auth")["spec"]["template"]["spec"]["containers"][0]
    usage = subprocess.run([sys.executable, "-m", "tunemesh_common.membership.etcd_auth", "--help"],
                           capture_output=True, text=True, check=True).stdout
    assert all(f"--{flag} " in usage for flag in flags(container)), usage


def cert_manager_certificates() -> dict[str, dict]:
    """deploy/k8s/cert-manager.yaml's Certificates by Secret name (spec)."""
    docs = [d for d in yaml.safe_load_all(CERT_MANAGER.read_text()) if d]
    assert {d["apiVersion"] for d in docs} == {"cert-manager.io/v1"}
    return {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}


def test_the_cert_manager_example_makes_each_role_s_secret_from_one_ca():
    docs = [d for d in yaml.safe_load_all(CERT_MANAGER.read_text()) if d]
    [ca] = [d["spec"] for d in docs if d["kind"] == "Certificate" and d["spec"].get("isCA")]
    [ca_issuer] = [d for d in docs if d["kind"] == "Issuer" and "ca" in d["spec"]]
    assert ca_issuer["spec"]["ca"]["secretName"] == ca["secretName"]
    certificates = cert_manager_certificates()
    secrets = default_secrets()
    assert sorted(certificates) == sorted([*secrets.values(), ca["secretName"]])
    for role, secret in secrets.items():
        spec = certificates[secret]
        assert spec["issuerRef"] == {"kind": "Issuer", "name": ca_issuer["metadata"]["name"]}, role
        assert spec["commonName"] == mesh_tls.etcd_user(role), role
        identity = f"*.{role}.tunemesh" if role in mesh_tls.NODE_ROLES else mesh_tls.identity_name(role)
        assert identity in spec["dnsNames"], role
        assert {mesh_tls.role_of(name) for name in spec["dnsNames"]} - {None} == {role}  # proves its role only
        assert "client auth" in spec["usages"] and ("server auth" in spec["usages"]) == (role != "admin"), role


def _covers(names: list[str], host: str) -> bool:
    return host in names or f"*.{host.split('.', 1)[1]}" in names


def test_the_cert_manager_example_names_the_hosts_of_release_tunemesh_in_namespace_mesh():
    """Its header says: release tunemesh, namespace mesh. The scheduler's certificate names
    the Service clients dial; etcd's, every peer URL's host and the peer Service (etcd
    resolves it to check a connecting peer's address)."""
    docs = helm.documents(manifest("default", release="tunemesh"))
    certificates, secrets = cert_manager_certificates(), default_secrets()
    scheduler = certificates[secrets["scheduler"]]["dnsNames"]
    service = one(docs, "Service", "tunemesh-scheduler")["metadata"]["name"]
    for host in (service, f"{service}.mesh", f"{service}.mesh.svc", f"{service}.mesh.svc.cluster.local"):
        assert host in scheduler, host
    etcd = certificates[secrets["etcd"]]
    args = flags(workloads(docs, "tunemesh")["etcd"]["spec"]["template"]["spec"]["containers"][0])
    peer_hosts = [member.split("://", 1)[1].rsplit(":", 1)[0] for member in args["initial-cluster"].split(",")]
    assert peer_hosts and all(_covers(etcd["dnsNames"], host) for host in peer_hosts), peer_hosts
    assert peer_hosts[0].split(".", 1)[1] in etcd["dnsNames"]  # the peer Service
    assert etcd["commonName"] == args["peer-cert-allowed-cn"]
