"""scripts/kubernetes.py: every object valid against the Kubernetes API schema (the
kubernetes-validate package's published JSON schemas, strict: unknown fields fail),
every container's args parse as impala flags, and learner and actors agree on ports,
host and keys."""

from __future__ import annotations

import kubernetes_validate
import pytest
import zmq.auth
from absl import flags

from impala import address, security
from impala import config as config_lib
from tests import scripts
from tests.cli import ROOT

# The oldest Kubernetes release the schemas cover and the newest; Indexed Jobs are GA since 1.24.
VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


K8S = scripts.load("kubernetes")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys")
    security.generate(path)
    return path


def _objects(keys_dir, *argv: str) -> dict[str, dict]:
    args = K8S.parser().parse_args(["--name=pong", "--image=registry.example.org/impala:cpu", *argv])
    return {o["kind"]: o for o in K8S.manifests(args, K8S.read_keys(str(keys_dir)))}


def _config(args: list[str]) -> config_lib.Config:
    values = flags.FlagValues()
    config_lib.define_flags(values)
    values(["impala", *[a.replace("--flagfile=", f"--flagfile={ROOT}/") for a in args]])
    return config_lib.from_flags(values)


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "argv",
    [[], ["--learner_gpus=1", "--storage_class=fast", "--actors=200"], ["--learner_gpus=4", "--learner_ranks=4"]],
)
def test_every_object_is_valid_kubernetes(keys_dir, version, argv):
    objects = _objects(keys_dir, *argv)
    assert sorted(objects) == ["Deployment", "Job", "PersistentVolumeClaim", "Secret", "Service"]
    for obj in objects.values():
        kubernetes_validate.validate(obj, version, strict=True)


def test_a_broken_object_is_rejected(keys_dir):
    job = _objects(keys_dir)["Job"]
    _pod(job)["containers"][0]["ports"] = [{"containerPort": "5555"}]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    _pod(job)["containers"][0].pop("ports")
    _pod(job)["containers"][0]["argz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)


def test_learner_and_actors_parse_and_agree(keys_dir):
    objects = _objects(keys_dir, "--actors=5", "--flag=--batch_size=16")
    learner_pod, actor_pod = _pod(objects["Deployment"]), _pod(objects["Job"])
    (learner_container,), (actor_container,) = learner_pod["containers"], actor_pod["containers"]
    learner = _config(learner_container["args"])
    assert learner.job_name == "learner" and learner.batch_size == 16 and learner.level_name == "ALE/Pong-v5"
    port = int(learner.learner_address.rsplit(":", 1)[1])
    assert [p["containerPort"] for p in learner_container["ports"]] == [port, port + 1]
    service = objects["Service"]
    assert service["spec"]["selector"] == objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port), (port + 1, port + 1)]

    # The pod index becomes --task through an env var that Kubernetes expands in args.
    (env,) = actor_container["env"]
    assert (
        env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    job = objects["Job"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 5
    tasks = []
    for index in range(5):
        actor = _config([a.replace(f"$({env['name']})", str(index)) for a in actor_container["args"]])
        assert actor.job_name == "actor" and actor.batch_size == 16 and actor.level_name == learner.level_name
        assert actor.learner_address == f"tcp://{service['metadata']['name']}:{port}"
        assert actor.keys_dir == learner.keys_dir
        tasks.append(actor.task)
    assert tasks == list(range(5))

    # Keys: each pod gets the files impala.security reads, from the one Secret, at keys_dir.
    secret = objects["Secret"]["stringData"]
    for pod, config, needed in [
        (learner_pod, learner, {"learner.key_secret", "authorized_actors/actor.key"}),
        (actor_pod, actor, {"actor.key_secret", "learner.key"}),
    ]:
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "keys"]
        assert mount["mountPath"] == config.keys_dir
        (volume,) = [v for v in pod["volumes"] if v["name"] == "keys"]
        assert volume["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]
        items = {i["path"]: secret[i["key"]] for i in volume["secret"]["items"]}
        assert set(items) == needed
    for path, text in {
        "learner.key_secret": secret["learner.key_secret"],
        "learner.key": secret["learner.key"],
        "actor.key_secret": secret["actor.key_secret"],
        "authorized.key": secret["authorized-actors.actor.key"],
    }.items():
        (keys_dir.parent / f"check-{path}").write_text(text)
    public = {
        p: zmq.auth.load_certificate(str(keys_dir.parent / f"check-{p}"))[0]
        for p in ("learner.key_secret", "learner.key", "actor.key_secret", "authorized.key")
    }
    assert public["learner.key"] == public["learner.key_secret"]  # actors trust this learner
    assert public["authorized.key"] == public["actor.key_secret"]  # the learner accepts these actors

    # Logs: the learner's --logdir is on the claimed volume.
    (logs,) = [m for m in learner_container["volumeMounts"] if m["name"] == "logs"]
    assert learner.logdir.startswith(logs["mountPath"] + "/")
    (volume,) = [v for v in learner_pod["volumes"] if v["name"] == "logs"]
    assert volume["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"]["metadata"]["name"]


def test_gpu_request_only_when_asked(keys_dir):
    def limits(*argv):
        return _pod(_objects(keys_dir, *argv)["Deployment"])["containers"][0]["resources"]["limits"]

    assert "nvidia.com/gpu" not in limits()
    assert limits("--learner_gpus=2")["nvidia.com/gpu"] == "2"


def test_fresh_keys_when_none_are_given():
    keys = K8S.read_keys(None)
    assert set(keys) == set(K8S.LEARNER_KEYS) | set(K8S.ACTOR_KEYS)
    assert all("curve" in text for text in keys.values())


def test_data_parallel_learner_ranks_parse_and_agree_with_the_actors(keys_dir):
    """--learner_ranks=4: one pod runs torchrun with 4 ranks; every rank's unroll port is in
    the pod and the Service, and each actor's address (by the rule) leads to one of them."""
    objects = _objects(keys_dir, "--learner_ranks=4", "--learner_gpus=4", "--actors=8")
    learner_pod = _pod(objects["Deployment"])
    (container,), (actor_container,) = learner_pod["containers"], _pod(objects["Job"])["containers"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"] and "--nproc_per_node=4" in command
    assert command[-2:] == ["-m", "impala.experiment"]
    learner = _config(container["args"])
    assert learner.job_name == "learner" and learner.learner_ranks == 4
    assert learner.batch_size % learner.learner_ranks == 0
    port = int(learner.learner_address.rsplit(":", 1)[1])
    bound = {address.unroll_port(port, r) for r in range(4)} | {address.params_port(port)}
    assert {p["containerPort"] for p in container["ports"]} == bound
    service = objects["Service"]
    assert {p["port"] for p in service["spec"]["ports"]} == bound
    assert all(p["port"] == p["targetPort"] for p in service["spec"]["ports"])
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    (env,) = actor_container["env"]
    used = set()
    for index in range(8):
        actor = _config([a.replace(f"$({env['name']})", str(index)) for a in actor_container["args"]])
        assert actor.learner_ranks == 4
        unrolls, params = address.learner_addresses(actor.learner_address, actor.task, actor.learner_ranks)
        assert int(params.rsplit(":", 1)[1]) == address.params_port(port)
        used.add(int(unrolls.rsplit(":", 1)[1]))
    assert used == {address.unroll_port(port, r) for r in range(4)}  # every rank gets actors
