"""Writes Kubernetes manifests for one impala run: keys, learner, actors.

    python scripts/kubernetes.py --name pong --image REGISTRY/impala:cpu --actors 48 \\
        --flagfile configs/pong.cfg > pong.yaml
    kubectl apply -f pong.yaml

Objects (docs/distributed.md walks through them):
  Secret      <name>-keys     CurveZMQ keys made here (python -m impala.security), or read
                              from --keys_dir; the file holds secret keys: keep it private.
  PVC         <name>-logs     the learner's --logdir (checkpoints, metrics, TensorBoard).
  Deployment  <name>-learner  one learner pod (--learner_gpus: GPUs it requests); with
                              --learner_ranks=N it runs N data-parallel learner ranks
                              under torchrun (one per GPU: give --learner_gpus=N).
  Service     <name>-learner  the learner's ports (--learner_address port P and P + 1, and
                              rank r's unroll port P + 1 + r, impala/address.py).
  Job         <name>-actors   an Indexed Job of --actors pods; pod index i runs --task=i.

The image runs `python -m impala.experiment` (the Dockerfile's ENTRYPOINT), so every
container's `args` are impala flags. tests/test_kubernetes.py validates every object
against the Kubernetes API schema and parses every container's flags.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # impala.security, when run from a checkout

from impala.address import params_port, unroll_port  # noqa: E402

PORT = 5555  # the learner's unroll port; the parameter port is PORT + 1
KEYS, LOGS = "/keys", "/logs"
TASK_ENV = "IMPALA_TASK"  # the pod's index in the Indexed Job, as --task
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# Secret keys may not contain '/': each names its file under /keys by `path`.
LEARNER_KEYS = {
    "learner.key_secret": "learner.key_secret",
    "authorized-actors.actor.key": "authorized_actors/actor.key",
}
ACTOR_KEYS = {"actor.key_secret": "actor.key_secret", "learner.key": "learner.key"}


def read_keys(keys_dir: str | None) -> dict[str, str]:
    """The key files the pods need, by Secret key; made afresh when keys_dir is None."""
    files = {**LEARNER_KEYS, **ACTOR_KEYS}
    if keys_dir is not None:
        return {key: (Path(keys_dir) / path).read_text() for key, path in files.items()}
    from impala import security

    with tempfile.TemporaryDirectory(prefix="impala-keys-") as fresh:  # gone once in the Secret
        security.generate(fresh)
        return read_keys(fresh)


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "impala",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def _keys_volume(name: str, items: dict[str, str]) -> dict:
    return {
        "name": "keys",
        "secret": {
            "secretName": f"{name}-keys",
            "defaultMode": 0o400,
            "items": [{"key": k, "path": p} for k, p in items.items()],
        },
    }


def _container(image: str, args: list[str], resources: dict, mounts: list[dict], **extra) -> dict:
    return {
        "name": "impala",
        "image": image,
        "args": args,
        "resources": resources,
        "volumeMounts": [{"name": "keys", "mountPath": KEYS, "readOnly": True}, *mounts],
        **extra,
    }


def _resources(cpus: float, memory: str, gpus: int = 0) -> dict:
    requests = {"cpu": str(cpus), "memory": memory}
    limits = {"memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"requests": requests, "limits": limits}


def learner_ports(ranks: int) -> list[tuple[str, int]]:
    """(name, port) of every port the learner's ranks bind (impala/address.py's rule)."""
    return [
        ("unrolls", PORT),
        ("params", params_port(PORT)),
        *((f"unrolls-r{r}", unroll_port(PORT, r)) for r in range(1, ranks)),
    ]


def learner_objects(args: argparse.Namespace) -> list[dict]:
    """The learner: a Deployment of one pod, its Service and its log volume.

    With --learner_ranks=N the pod runs N learner ranks on its N GPUs, started by torchrun
    (--standalone: the ranks meet on the pod's loopback; NCCL gets a memory-backed
    /dev/shm). All ranks run in one pod, so the Service's ports (one unroll port per
    rank) all lead to it, and the actors find their rank by the address rule."""
    name, labels = f"{args.name}-learner", _labels(args.name, "learner")
    flags = [
        f"--flagfile={args.flagfile}",
        "--job_name=learner",
        f"--learner_address=tcp://0.0.0.0:{PORT}",
        f"--keys_dir={KEYS}",
        f"--logdir={LOGS}/run",
        *_rank_flags(args),
        *args.flag,
    ]
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{args.name}-logs", "labels": labels},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": args.logs_size}},
            **({"storageClassName": args.storage_class} if args.storage_class else {}),
        },
    }
    ranks = args.learner_ranks
    mounts, volumes, extra = [{"name": "logs", "mountPath": LOGS}], [], {}
    if ranks > 1:
        extra["command"] = [
            "python",
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "impala.experiment",
        ]
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
    container = _container(
        args.learner_image or args.image,
        flags,
        _resources(args.learner_cpus, args.learner_memory, args.learner_gpus),
        mounts,
        ports=[{"name": n, "containerPort": p} for n, p in learner_ports(ranks)],
        **extra,
    )
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two learners on one logdir
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    # SIGTERM writes a checkpoint before exit; give it time.
                    "terminationGracePeriodSeconds": 120,
                    "containers": [container],
                    "volumes": [
                        _keys_volume(args.name, LEARNER_KEYS),
                        {"name": "logs", "persistentVolumeClaim": {"claimName": f"{args.name}-logs"}},
                        *volumes,
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [{"name": n, "port": p, "targetPort": p} for n, p in learner_ports(ranks)],
        },
    }
    return [pvc, deployment, service]


def actor_job(args: argparse.Namespace) -> dict:
    """The actors: an Indexed Job of --actors pods; pod i runs --task=i (distinct seeds, and
    for a multi-task --level_name such as dmlab30, level i mod n). Actors wait for the learner and reconnect after its
    restarts; a crashed actor pod restarts in place with the same index."""
    labels = _labels(args.name, "actors")
    flags = [
        f"--flagfile={args.flagfile}",
        "--job_name=actor",
        f"--task=$({TASK_ENV})",
        f"--num_envs_per_actor={args.envs_per_actor}",
        f"--learner_address=tcp://{args.name}-learner:{PORT}",
        f"--keys_dir={KEYS}",
        *_rank_flags(args),
        *args.flag,
    ]
    container = _container(
        args.image,
        flags,
        _resources(args.actor_cpus, args.actor_memory),
        [],
        env=[{"name": TASK_ENV, "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}}],
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{args.name}-actors", "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": args.actors,
            "parallelism": args.actors,
            "backoffLimit": 10 * args.actors,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "containers": [container],
                    "volumes": [_keys_volume(args.name, ACTOR_KEYS)],
                },
            },
        },
    }


def _rank_flags(args: argparse.Namespace) -> list[str]:
    """--learner_ranks for both jobs: the learner checks it against torchrun's ranks, the
    actors pick their rank's port by it."""
    return [f"--learner_ranks={args.learner_ranks}"] if args.learner_ranks > 1 else []


def manifests(args: argparse.Namespace, keys: dict[str, str]) -> list[dict]:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": f"{args.name}-keys", "labels": _labels(args.name, "keys")},
        "stringData": keys,
    }
    return [secret, *learner_objects(args), actor_job(args)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="impala", help="prefix of every object's name (a DNS label)")
    p.add_argument("--image", required=True, help="the impala image, pushed where the cluster pulls from")
    p.add_argument("--learner_image", default="", help="the learner's image (a CUDA build); default --image")
    p.add_argument("--flagfile", default="configs/pong.cfg", help="in the image, relative to its WORKDIR")
    p.add_argument("--flag", action="append", default=[], help="an impala flag for every job (repeatable)")
    p.add_argument("--actors", type=int, default=48, help="actor pods (the Indexed Job's completions and parallelism)")
    p.add_argument("--envs_per_actor", type=int, default=1, help="--num_envs_per_actor of each actor")
    p.add_argument("--actor_cpus", type=float, default=1, help="CPU cores each actor pod requests")
    p.add_argument("--actor_memory", default="2Gi", help="memory each actor pod requests")
    p.add_argument("--learner_cpus", type=float, default=4, help="CPU cores the learner pod requests")
    p.add_argument("--learner_memory", default="8Gi", help="memory the learner pod requests")
    p.add_argument("--learner_gpus", type=int, default=0, help="nvidia.com/gpu the learner requests")
    p.add_argument(
        "--learner_ranks",
        type=int,
        default=1,
        help="data-parallel learner ranks in the learner pod (torchrun; one per GPU)",
    )
    p.add_argument("--logs_size", default="10Gi", help="size of the PersistentVolumeClaim for --logdir")
    p.add_argument("--storage_class", default="", help="the PVC's storage class; default: the cluster's")
    p.add_argument("--keys_dir", default=None, help="existing keys (python -m impala.security); default: new")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.actors < 1 or args.learner_ranks < 1:
        parser().error("--actors and --learner_ranks must be at least 1")
    print(yaml.safe_dump_all(manifests(args, read_keys(args.keys_dir)), sort_keys=False), end="")


if __name__ == "__main__":
    sys.exit(main())
