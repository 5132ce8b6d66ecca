"""What a new user meets first: every script's --help, the program's --help, the
commands in README.md and docs/*.md (their flags must exist), one-line errors, and
output that says what happened."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from impala import config as config_lib
from tests import cli, scripts

ROOT = cli.ROOT
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _parser(script: Path, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser that `script` builds when run with --help."""
    built = []

    def capture(self, *args, **kwargs):
        built.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(script), run_name="__main__")
    assert len(built) == 1, f"{script.name} built no parser"
    return built[0]


def _options(script: Path, monkeypatch) -> set[str]:
    return {s for a in _parser(script, monkeypatch)._actions for s in a.option_strings}


def _experiment_flags() -> tuple[flags.FlagValues, set[str]]:
    """The real flag definitions of python -m impala.experiment: impala's (to parse
    values with) and the names of absl's own (flagfile, logtostderr, help, ...)."""
    import absl.logging  # noqa: F401  (defines absl's logging flags in flags.FLAGS)
    from absl import app

    app.define_help_flags()
    values = flags.FlagValues()
    config_lib.define_flags(values)
    return values, set(flags.FLAGS) | set(values) | {"flagfile"}  # absl reads --flagfile itself


# --- scripts -------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(script):
    result = _run(str(script), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and result.stderr == ""


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_help_is_complete(script, monkeypatch):
    parser = _parser(script, monkeypatch)
    description = " ".join((parser.description or "").split())
    assert description.endswith("."), f"{script.name}: description stops mid-sentence: {description!r}"
    for action in parser._actions:
        where = f"{script.name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help != argparse.SUPPRESS, f"{where} has no help"
        assert not action.help.rstrip().endswith((",", ":", ";", "(", " the", " a", " and", " or")), where


def test_security_help_is_complete():
    result = _run("-m", "impala.security", "--help")
    assert result.returncode == 0 and "--name" in result.stdout and "--keys_dir" in result.stdout


def test_run_summary_on_a_missing_path_is_one_line(tmp_path):
    for path in (tmp_path / "absent", tmp_path):  # no such file; a folder without metrics.jsonl
        result = _run(str(scripts.path("run_summary")), str(path), "--target", "18")
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("run_summary.py: error:") and str(path) in result.stderr


def test_plot_says_where_the_file_went(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(
            json.dumps({"frames": 100 * i, "wall_time": 10.0 * i, "mean_episode_return": i}) + "\n" for i in range(1, 4)
        )
    )
    output = tmp_path / "out" / "curve.png"
    result = _run(str(scripts.path("plot")), str(tmp_path), "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert output.is_file() and str(output) in result.stdout


# --- python -m impala.experiment --help ---------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort"])
def test_experiment_help_lists_the_flags_by_section_and_exits_0(flag):
    result = _run("-m", "impala.experiment", flag)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    sections = config_lib.sections()
    assert len(sections) > 3 and [t for t, _ in sections][0] == "What runs"
    positions = [out.index(f"\n{title}:\n") for title, _ in sections]
    assert positions == sorted(positions)
    for (title, names), start in zip(sections, positions):
        end = min([p for p in positions if p > start], default=len(out))
        for name in names:  # each flag in its own section, with its help
            assert f"  --{name} (default: " in out[start:end], f"--{name} not under {title}"
    listed = {name for _, names in sections for name in names}
    assert listed == {f.name for f in dataclasses.fields(config_lib.Config)}
    assert "logtostderr" not in out  # absl's own flags only with --helpfull


def test_experiment_helpfull_still_lists_everything():
    result = _run("-m", "impala.experiment", "--helpfull")
    assert result.returncode == 0
    assert "--level_name" in result.stdout and "--[no]logtostderr" in result.stdout


# --- the docs' commands use flags that exist ----------------------------------------

FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)(?:=(\"[^\"]*\"|'[^']*'|[^\s\"'`]*))?")
# Where a command's own arguments end.
COMMAND_END = re.compile(r"\s(?:&&|\|\||\||;|>|2>|&)(?:\s|$)|\s&$")
IMAGE = re.compile(r"docker run\b.*?\simpala:\w+\s")  # the images' entrypoint is impala.experiment


def _shell_commands(text: str) -> list[str]:
    """Commands in the shell blocks and inline code of a markdown file, with
    backslash-continued lines joined."""
    commands = []
    for language, body in FENCE.findall(text):
        if language in ("", "sh", "bash", "shell"):
            commands += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text).replace("\n", " ")
    commands += INLINE.findall(prose)
    return commands


def _arguments(command: str, program: re.Pattern) -> str | None:
    """The arguments given to `program` in `command`, or None if it does not run it."""
    match = program.search(command)
    if not match:
        return None
    rest = re.sub(r"(^|\s)#.*$", "", command[match.end() :])  # a trailing shell comment
    end = COMMAND_END.search(" " + rest)
    return rest[: end.start()] if end else rest


def _doc_commands() -> list[tuple[str, str, str]]:
    """(doc, program, arguments) for every command in the docs that runs impala.experiment
    (directly, in a Docker image, or through a shell variable) or a script."""
    found = []
    experiment = re.compile(r"impala\.experiment\b|" + IMAGE.pattern)
    for doc in DOCS:
        commands = _shell_commands(doc.read_text())
        uses_variable = {
            v for c in commands if (a := _arguments(c, experiment)) is not None for v in re.findall(r"\$\{?(\w+)", a)
        }
        for command in commands:
            if (args := _arguments(command, experiment)) is not None:
                found.append((doc.name, "impala.experiment", args))
            assignment = re.match(r"\s*(\w+)=[\"']?(--.*?)[\"']?\s*$", command)
            if assignment and assignment.group(1) in uses_variable:
                found.append((doc.name, "impala.experiment", assignment.group(2)))
            for script in SCRIPTS:
                if (args := _arguments(command, re.compile(rf"scripts/{script.name}\b"))) is not None:
                    found.append((doc.name, script.name, args))
    return found


def test_the_docs_show_commands():
    programs = {program for _, program, _ in _doc_commands()}
    assert {"impala.experiment", "bench.py", "plot.py", "run_summary.py"} <= programs


def test_every_flag_in_the_docs_commands_exists(monkeypatch):
    """Each --flag given to impala.experiment in README.md and docs/*.md is a real flag;
    values without shell variables must parse, and flagfiles must exist."""
    real, names = _experiment_flags()
    script_options = {s.name: _options(s, monkeypatch) for s in SCRIPTS}
    problems, checked = [], 0
    for doc, program, args in _doc_commands():
        for name, value in FLAG.findall(args):
            checked += 1
            option = f"--{name}"
            if program != "impala.experiment" and option in script_options[program]:
                continue
            if program not in ("impala.experiment", "bench.py", "load.py", "bench_dp.py"):  # these pass the rest on
                problems.append(f"{doc}: {program} has no option {option}")
                continue
            base = name[2:] if name.startswith("no") and name[2:] in names else name
            if base not in names:
                problems.append(f"{doc}: {program} {option} is not a flag of impala.experiment")
                continue
            value = value.strip("\"'")
            placeholder = re.fullmatch(r"[A-Z_]+", value) or any(c in value for c in ("$", "\\", "<", "..."))
            if base not in real or not value or placeholder:  # e.g. --seed=S, --task=$task
                continue
            if name == "flagfile":
                if not (ROOT / value).is_file() and not value.startswith("/"):
                    problems.append(f"{doc}: --flagfile={value} does not exist")
                continue
            try:
                real[base]._parse(value)
            except (flags.Error, ValueError) as e:
                problems.append(f"{doc}: {option}={value}: {e}")
    assert checked > 50
    assert not problems, "\n".join(problems)


def test_every_flag_named_in_the_docs_prose_exists(monkeypatch):
    """`--name` written alone in the docs' prose is a flag of impala.experiment or an
    option of a script or of impala.security (other tools' options are listed here)."""
    known = {f"--{name}" for name in _experiment_flags()[1]} | {"--name", "--keys_dir"}
    for script in SCRIPTS:
        known |= _options(script, monkeypatch)
    other_tools = {
        "--build",
        "--target",
        "--rm",
        "--gres",
        "--ntasks",
        "--time",
        "--nproc_per_node",
        "--standalone",
    }  # torchrun
    problems = []
    for doc in DOCS:
        prose = FENCE.sub("", doc.read_text()).replace("\n", " ")
        for span in INLINE.findall(prose):
            for name, _ in FLAG.findall(span):
                option = f"--{name[2:]}" if name.startswith("no") and f"--{name[2:]}" in known else f"--{name}"
                if option not in known | other_tools:
                    problems.append(f"{doc.name}: `{span}` names {option}, which nothing defines")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("flagfile", sorted((ROOT / "configs").glob("*.cfg")), ids=lambda p: p.name)
def test_every_shipped_flagfile_gives_a_valid_config(flagfile):
    """Each configs/*.cfg parses with impala.experiment's real flags (an unknown or
    misspelt flag fails here) and passes Config's own checks."""
    values = flags.FlagValues()
    config_lib.define_flags(values)
    values(["experiment", f"--flagfile={flagfile}"])
    given = {line.split("=", 1)[0][2:] for line in flagfile.read_text().splitlines() if line.startswith("--")}
    assert given - {"flagfile"} and all(values[name].present for name in given - {"flagfile"})
    config_lib.from_flags(values)  # raises ConfigError on a bad combination


# --- small promises -------------------------------------------------------------------


def test_the_dmlab_install_hint_names_the_image_the_docs_build():
    from impala.envs import dmlab

    tag = re.search(r"docker build --target dmlab -t (\S+) \.", dmlab.INSTALL_HINT).group(1)
    built = re.findall(r"docker build --target dmlab -t (\S+) \.", (ROOT / "docs" / "dmlab.md").read_text())
    assert built and set(built) == {tag}


def test_the_ale_banner_is_not_printed():
    result = _run(
        "-c",
        "from impala import envs; env = envs.make('ALE/Pong-v5', seed=1, num_action_repeats=4); "
        "env.initial(); env.close(); print('made')",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "made\n" and "A.L.E" not in result.stderr and "Stella" not in result.stderr


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_keys_made_in_the_checkout_are_ignored():
    for path in ("keys/learner.key_secret", "keys/box-7/actor.key_secret", "keys/authorized_actors/box-7.key"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
