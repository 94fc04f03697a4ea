"""Deployment files, validated offline: structure and the settings the service depends on."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load(name):
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), name
    return docs[0]


def test_deployment_has_gpu_probes_drain_and_shared_store():
    dep = _load("deployment.yaml")
    assert dep["kind"] == "Deployment" and dep["apiVersion"] == "apps/v1"
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["containerPort"] for p in c["ports"]} == {9002, 9090}
    assert "preStop" in c["lifecycle"] and c["readinessProbe"]["tcpSocket"]["port"] == "mrd"
    assert spec["terminationGracePeriodSeconds"] >= 540 + 10  # drain time + preStop sleep
    assert spec["securityContext"]["runAsNonRoot"] is True
    vol = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    pvc = _load("storage.yaml")
    assert pvc["metadata"]["name"] == vol and "ReadWriteMany" in pvc["spec"]["accessModes"]
    assert dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]


def test_service_autoscaler_and_monitor_agree_with_the_deployment():
    dep = _load("deployment.yaml")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = _load("service.yaml")
    assert svc["spec"]["selector"] == labels
    assert any(p["port"] == 9002 and p["protocol"] == "TCP" for p in svc["spec"]["ports"])
    hpa = _load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "qmrkit_reconstructions_in_flight"
    mon = _load("servicemonitor.yaml")
    assert mon["spec"]["selector"]["matchLabels"] == labels


def test_metric_names_in_manifests_exist():
    from qmrkit.serve.metrics import Metrics

    text = Metrics().exposition().decode()
    assert "qmrkit_reconstructions_in_flight" in text


def test_dockerfile_runs_non_root_with_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "USER qmrkit" in text and "HEALTHCHECK" in text and "9002" in text
    assert '"torch==2.13.0"' in text
