"""compose.yaml: in sync with its generator, valid against the Compose
specification's JSON schema (no Docker engine runs here), and every service's
command is a valid impala command line."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from absl import flags

from impala import config as config_lib
from tests import scripts
from tests.cli import ROOT


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_is_what_the_generator_writes():
    assert (ROOT / "compose.yaml").read_text() == scripts.load("compose").render(48, "configs/pong.cfg")


def _validator() -> jsonschema.Draft201909Validator:
    # tests/data/compose_spec.json: the Compose specification schema shipped by
    # Debian's docker-compose 1.29.2 (compose/config/compose_spec.json), draft 2019-09.
    return jsonschema.Draft201909Validator(json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text()))


def test_compose_file_matches_the_compose_specification(compose):
    _validator().validate(compose)


def test_compose_bad_file_is_rejected_by_the_schema(compose):
    broken = {**compose, "services": {**compose["services"], "learner": {"command": 5}}}
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(broken)


def _config(command: list[str]) -> config_lib.Config:
    values = flags.FlagValues()
    config_lib.define_flags(values)
    command = [c.replace("--flagfile=", f"--flagfile={ROOT}/") for c in command]
    values(["impala", *command])
    return config_lib.from_flags(values)


def test_one_learner_and_48_actors_with_distinct_tasks(compose):
    services = compose["services"]
    learner = _config(services["learner"]["command"])
    assert learner.job_name == "learner" and learner.keys_dir
    port = int(learner.learner_address.rsplit(":", 1)[1])
    actors = [_config(s["command"]) for name, s in services.items() if re.fullmatch(r"actor-\d+", name)]
    assert len(actors) == 48
    assert sorted(a.task for a in actors) == list(range(48))
    for actor in actors:
        assert actor.job_name == "actor" and actor.keys_dir == learner.keys_dir
        assert actor.learner_address == f"tcp://learner:{port}"
        assert actor.level_name == learner.level_name
