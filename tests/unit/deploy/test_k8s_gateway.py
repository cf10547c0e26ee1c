"""deploy/k8s: the Tinker gateway as a service of the chart: wired to the scheduler's Service
and etcd, HTTPS with its role's certificate, probed over HTTP, exposed like the scheduler (a
ClusterIP; a LoadBalancer only with source ranges), and fenced by NetworkPolicies: its port
open to `networkPolicy.gatewaySources`, its egress only the scheduler, etcd and DNS."""

from __future__ import annotations

import subprocess
import sys

import pytest
from chart_variants import VARIANTS, manifest, render_variant
from test_k8s_chart import (
    PLAINTEXT, Source, _probe, _selects, cert_manager_certificates, default_secrets, exposed, flags, one, reachable,
    workloads,
)
from test_docker_images import IMAGE, entrypoint, stages

from deploy import helm
from tunemesh_common.membership import etcd_auth

DISABLED = ["gateway.enabled=false"]
GATEWAY_LB = ["gateway.service.type=LoadBalancer", "gateway.service.loadBalancerSourceRanges={198.51.100.0/24}"]
KUBE_DNS = Source({"k8s-app": "kube-dns"}, namespace="kube-system")


def gateway(docs: list[dict]) -> tuple[dict, dict]:
    """The gateway's pod spec and its container."""
    pod = workloads(docs)["gateway"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return pod, container


def labels(docs: list[dict], name: str) -> dict:
    return workloads(docs)[name]["spec"]["template"]["metadata"]["labels"]


def egress_allowed(policies: list[dict], source: dict, target: Source, port: int) -> bool:
    """NetworkPolicy egress semantics: a pod selected by an Egress policy sends only what one allows."""
    selecting = [p for p in policies if "Egress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], source)]
    if not selecting:
        return True
    return any(
        (not rule.get("ports") or port in {p["port"] for p in rule["ports"]})
        and (not rule.get("to") or any(target.matches(peer) for peer in rule["to"]))
        for policy in selecting for rule in policy["spec"].get("egress", [])
    )


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def docs(request) -> list[dict]:
    return render_variant(request.param)


def test_the_gateway_calls_the_scheduler_service_and_etcd_and_serves_its_own(docs):
    _, container = gateway(docs)
    expected = ["python", "-m", "tunemesh_gateway"]  # the gateway image's own entrypoint, named too
    assert container["command"] == expected == entrypoint(IMAGE.match(container["image"])["target"], stages())
    args = flags(container)
    [scheduler_port] = one(docs, "Service", "tm-scheduler")["spec"]["ports"]
    [etcd_port] = one(docs, "Service", "tm-etcd")["spec"]["ports"]
    assert args["scheduler"] == f"tm-scheduler:{scheduler_port['port']}"
    assert args["etcd"] == f"tm-etcd:{etcd_port['port']}"  # its durable tables
    service = one(docs, "Service", "tm-gateway")
    assert service["spec"]["type"] == "ClusterIP" and exposed(docs) == []
    assert service["spec"]["sessionAffinity"] == "ClientIP"  # a client's futures live on one replica
    assert service["spec"]["selector"] == workloads(docs)["gateway"]["spec"]["selector"]["matchLabels"]
    [port] = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] == "http" and ports["http"] == port["port"] == int(args["listen"].rpartition(":")[2])
    assert workloads(docs)["gateway"]["spec"]["replicas"] == 1


def test_it_verifies_api_keys_against_the_scheduler_s_keys_secret(docs):
    pod, container = gateway(docs)
    scheduler = workloads(docs)["scheduler"]["spec"]["template"]["spec"]
    [scheduler_container] = scheduler["containers"]
    assert flags(container)["api-keys-file"] == flags(scheduler_container)["api-keys-file"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] and flags(container)["api-keys-file"].startswith(mount["mountPath"] + "/")
    volumes = {v["name"]: v for v in pod["volumes"]}
    scheduler_volumes = {v["name"]: v for v in scheduler["volumes"]}
    assert volumes["api-keys"]["secret"] == scheduler_volumes["api-keys"]["secret"]  # the same Secret


def test_with_tls_it_serves_https_and_reaches_etcd_with_the_gateway_certificate(docs):
    _, container = gateway(docs)
    args = flags(container)
    assert "insecure" not in args
    assert args["tls-cert"] == args["etcd-tls-cert"] and args["tls-key"] == args["etcd-tls-key"]
    assert default_secrets()["gateway"] == "tunemesh-gateway-tls"
    assert etcd_auth.ACCESS["gateway"] == (b"/tunemesh/gateway/",)  # the etcd-auth Job's grant for its user


def test_the_gateway_may_call_only_the_scheduler_etcd_and_dns(docs):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    me = labels(docs, "gateway")
    [scheduler_port] = one(docs, "Service", "tm-scheduler")["spec"]["ports"]
    assert egress_allowed(policies, me, Source(labels(docs, "scheduler")), scheduler_port["port"])
    assert egress_allowed(policies, me, Source(labels(docs, "etcd")), 2379)
    assert egress_allowed(policies, me, KUBE_DNS, 53)
    assert not egress_allowed(policies, me, Source(labels(docs, "etcd")), 2380)  # not a peer
    for name in ("trainer", "sampler", "checkpoint"):
        [container] = workloads(docs)[name]["spec"]["template"]["spec"]["containers"]
        for port in {p["containerPort"] for p in container["ports"]}:
            assert not egress_allowed(policies, me, Source(labels(docs, name)), port), (name, port)
    assert not egress_allowed(policies, me, Source(), 443)  # nothing beyond the cluster
    # and the other side lets it in
    assert reachable(policies, labels(docs, "scheduler"), scheduler_port["port"], Source(me))
    assert reachable(policies, labels(docs, "etcd"), 2379, Source(me))
    for name in ("scheduler", "trainer"):  # other pods' egress is not fenced
        assert egress_allowed(policies, labels(docs, name), Source(), 443)


def test_narrowed_sources_keep_the_gateway_on_the_scheduler_and_narrow_its_own_port():
    ingress_namespace = "namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ingress"
    docs = render_variant("default", [f"networkPolicy.schedulerSources[0].{ingress_namespace}",
                                      f"networkPolicy.gatewaySources[0].{ingress_namespace}"])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ingress, outside = Source({"app": "ingress-controller"}, namespace="ingress"), Source()
    for target, port in ((labels(docs, "scheduler"), 50051), (labels(docs, "gateway"), 8000)):
        assert reachable(policies, target, port, ingress)
        assert not reachable(policies, target, port, outside)
    assert reachable(policies, labels(docs, "scheduler"), 50051, Source(labels(docs, "gateway")))
    assert not reachable(policies, labels(docs, "scheduler"), 50051, Source(labels(docs, "trainer")))


def test_dns_peers_narrow_its_name_lookups():
    docs = render_variant("default", ["networkPolicy.dnsPeers[0].namespaceSelector.matchLabels"
                                      ".kubernetes\\.io/metadata\\.name=kube-system",
                                      "networkPolicy.dnsPeers[0].podSelector.matchLabels.k8s-app=kube-dns"])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    me = labels(docs, "gateway")
    assert egress_allowed(policies, me, KUBE_DNS, 53)
    assert not egress_allowed(policies, me, Source({"app": "other"}, namespace="kube-system"), 53)


def test_probes_are_http_on_the_metrics_port_or_without_one_on_the_serving_port():
    _, container = gateway(render_variant("default", PLAINTEXT))
    assert {p: _probe(container, p) for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        "startupProbe": ("http", ("/healthz", 9400)), "livenessProbe": ("http", ("/healthz", 9400)),
        "readinessProbe": ("http", ("/readyz", 9400))}
    _, container = gateway(render_variant("default", [*PLAINTEXT, "metrics.enabled=false"]))
    assert flags(container)["insecure"] == "true" and flags(container)["metrics-listen"] == ""
    assert {p: _probe(container, p) for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
        "startupProbe": ("http", ("/api/v1/healthz", 8000)), "livenessProbe": ("http", ("/api/v1/healthz", 8000)),
        "readinessProbe": ("http", ("/healthz", 8000))}


def test_disabled_it_leaves_nothing_behind():
    docs = render_variant("default", DISABLED)
    assert not [d for d in docs if "gateway" in d["metadata"]["name"]]
    assert render_variant("default", [*DISABLED, "tls.secrets.gateway="])  # its Secret is not needed then
    scheduler_ingress = one(render_variant("default", [*DISABLED, "networkPolicy.schedulerSources[0].podSelector"
                                                       ".matchLabels.app=x"]), "NetworkPolicy", "tm-scheduler-ingress")
    assert scheduler_ingress["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "x"}}}]


def test_a_load_balancer_is_opt_in_with_source_ranges_and_validates(tmp_path):
    docs = render_variant("default", GATEWAY_LB)
    assert exposed(docs) == ["tm-gateway"]
    assert one(docs, "Service", "tm-gateway")["spec"]["loadBalancerSourceRanges"] == ["198.51.100.0/24"]
    path = tmp_path / "gateway-lb.yaml"
    path.write_text(manifest("default", GATEWAY_LB))
    done = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.31.0",
                           str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    with pytest.raises(helm.HelmError, match="gateway.service.type=LoadBalancer needs gateway.service."
                                             "loadBalancerSourceRanges"):
        render_variant("default", GATEWAY_LB[:1])
    with pytest.raises(helm.HelmError, match='gateway.service.type must be ClusterIP or LoadBalancer, not "NodePort"'):
        render_variant("default", ["gateway.service.type=NodePort"])


def test_the_cert_manager_example_names_the_gateway_s_service_for_release_tunemesh():
    docs = helm.documents(manifest("default", release="tunemesh"))
    names = cert_manager_certificates()[default_secrets()["gateway"]]["dnsNames"]
    service = one(docs, "Service", "tunemesh-gateway")["metadata"]["name"]
    for host in (service, f"{service}.mesh", f"{service}.mesh.svc", f"{service}.mesh.svc.cluster.local", "localhost"):
        assert host in names, host
