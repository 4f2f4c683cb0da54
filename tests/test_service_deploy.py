"""deploy/: the manifests parse, ask for what the docs say, and only use `kred` options that exist."""
from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from kred.client.cli import app as cli

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def documents(name):
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def test_dockerfile_builds_the_server_with_cuda_on_a_cuda_base():
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM nvidia/cuda:" in text
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
    (job,) = documents("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("kred run ")
    gpus = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpus["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_every_kred_option_in_the_manifests_exists():
    cluster, deployment, _, _ = documents("kuberay/raycluster.yaml")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    (job,) = documents("kuberay/rayjob.yaml")
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
