"""deploy/: the manifests parse, validate against the KubeRay CRD schemas (vendored extract) and Ray's own cluster
config validation, ask for what the docs say, and only use `kred` options that exist."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from kred.client.cli import app as cli

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents(name):
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def test_dockerfile_builds_the_server_with_cuda_on_a_cuda_base():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM nvidia/cuda:" in text
    assert " wget " in text                              # KubeRay's default probes call wget
    assert 'pip install ".[server,cuda]"' in text and 'CMD ["kred", "serve"]' in text
    assert "KRED_TOKEN_FILE" in text                     # listening on 0.0.0.0 only with a token


def test_ray_up_config_has_a_head_and_gpu_workers():
    (config,) = documents("ray-cluster.yaml")
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] == 1 and gpu["max_workers"] >= gpu["min_workers"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def test_kuberay_cluster_service_and_job():
    cluster, deployment, claim, service = documents("kuberay/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["headGroupSpec"]
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["kred", "serve"]
    assert f"ray://{cluster['metadata']['name']}-head-svc:10001" in command     # KubeRay's head service name
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert claim["metadata"]["name"] in str(deployment)
    data_claim, job = documents("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("kred run ")
    gpus = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpus["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_kred_option_in_the_manifests_exists():
    cluster, deployment, _, _ = documents("kuberay/raycluster.yaml")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    _, job = documents("kuberay/rayjob.yaml")
    runner = CliRunner()
    serve_help = runner.invoke(cli, ["serve", "--help"], terminal_width=200).output
    run_help = runner.invoke(cli, ["run", "--help"], terminal_width=200).output
    for option in (word for word in command if word.startswith("--")):
        assert option in serve_help, option
    for option in (word for word in job["spec"]["entrypoint"].split() if word.startswith("--")):
        assert option in run_help, option


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--executor", "local",
                                      "--store-dir", str(tmp_path)])
    assert result.exit_code == 1 and "without a token" in result.output


def test_kred_run_reports_a_bad_job_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("formula: Exp(-SqDist(x, y)) * b\naliases: [x = Vi(3), y = Vj(3), b = Vj(1)]\n"
                   "inputs: {x: x.npy, y: y.npy}\naxis: 1\noutput: out.npy\n")
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 1 and "no input for b" in result.output


# Validation against the schemas the tools themselves use ---------------------------------------------------------

KUBERAY = json.loads((DEPLOY / "kuberay" / "schemas" / "ray.io_v1.schema.json").read_text())


def ray_resources():
    return [d for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml") for d in documents(name)
            if d["apiVersion"] == "ray.io/v1"]


def pod_specs(document):
    """Every pod template's spec in a manifest (RayCluster head and workers, RayJob submitter, Deployment)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(document)
    return found


def test_kuberay_manifests_match_the_crd_schemas():
    resources = ray_resources()
    assert {r["kind"] for r in resources} == {"RayCluster", "RayJob"}
    for resource in resources:
        jsonschema.validate(resource, KUBERAY)


def test_the_crd_schema_catches_mistakes():
    cluster = next(r for r in ray_resources() if r["kind"] == "RayCluster")
    for mistake in (lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),  # not a string
                    lambda c: c["spec"].update({"workerGroupSpec": []}),                          # misspelt
                    lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName")):
        broken = copy.deepcopy(cluster)
        mistake(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, KUBERAY)


def test_every_volume_claim_is_defined_and_pods_can_write_their_volumes():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        docs = documents(name)
        claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for doc in docs:
            for spec in pod_specs(doc):
                used = {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                        if "persistentVolumeClaim" in v}
                assert used <= claims, (name, used - claims)
                assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] == 1000


def test_ray_up_config_passes_rays_own_validation_and_gpus_go_to_workers_only():
    from ray.autoscaler._private.util import prepare_config, validate_config
    (config,) = documents("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert not any("--gpus" in option for option in config["docker"]["run_options"])     # the head has no GPU
    broken = copy.deepcopy(config)
    broken["docker"]["worker_run_option"] = broken["docker"].pop("worker_run_options")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
