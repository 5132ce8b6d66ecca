"""The DeepMind Lab image is pinned: the Dockerfile builds a fixed DMLab commit, and
docker/dmlab/WORKSPACE (copied over DMLab's own) fetches every archive at a fixed
release with its sha256, from hosts that still serve it. No Docker engine runs here,
so the image itself is not built by the tests."""

from __future__ import annotations

import ast
import re

import pytest

from tests.cli import ROOT

DOCKERFILE = ROOT / "Dockerfile"
WORKSPACE = ROOT / "docker" / "dmlab" / "WORKSPACE"
DMLAB_REF = "b1db91af5b4d2f3a24466f4632a3e5e1b0829cca"
# The names in DMLab's WORKSPACE at DMLAB_REF (its own and its repositories): the
# replacement must declare them all.
DMLAB_REPOSITORIES = {
    "com_google_googletest",
    "bazel_skylib",
    "com_google_absl",
    "com_google_absl_py",
    "enum34_archive",
    "funcsigs_archive",
    "eigen_archive",
    "glib_archive",
    "jpeg_archive",
    "libxml_archive",
    "png_archive",
    "zlib_archive",
    "six_archive",
    "lua_archive",
    "dm_env_archive",
    "tree_archive",
    "pybind11_archive",
    "sdl_system",
    "python_system",
    "org_deepmind_lab",
}
MOVING = re.compile(r"\b(master|main|HEAD|latest|nightly|trunk)\b")
# Hosts that no longer serve these archives (bitbucket dropped Mercurial in 2020; xmlsoft.org
# moved to GNOME; zlib.net keeps only the newest release outside /fossils/).
GONE = re.compile(r"bitbucket\.org|//xmlsoft\.org|//ftp\.gnome\.org|//zlib\.net/zlib-|//pypi\.python\.org")


def _code_lines(path) -> list[str]:
    """Lines without their comments (a comment is no reference)."""
    return [line.split("#", 1)[0] for line in path.read_text().splitlines()]


def _calls(path) -> list[tuple[str, dict]]:
    """(function, keyword arguments) of each top-level call of a WORKSPACE file."""
    calls = []
    for node in ast.parse(path.read_text()).body:
        assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Call), ast.dump(node)
        calls.append((node.value.func.id, {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}))
    return calls


@pytest.mark.parametrize("path", [DOCKERFILE, WORKSPACE], ids=lambda p: p.name)
def test_no_moving_reference(path):
    for number, line in enumerate(_code_lines(path), 1):
        assert not MOVING.search(line), f"{path.name}:{number}: {line.strip()}"
        assert "git clone" not in line, f"{path.name}:{number}: an unpinned clone: {line.strip()}"


def test_the_dockerfile_builds_the_pinned_commit_with_the_pinned_workspace():
    text = DOCKERFILE.read_text()
    assert re.findall(r"^ARG DMLAB_REF=(\S+)$", text, re.MULTILINE) == [DMLAB_REF]
    assert 'git fetch -q --depth 1 https://github.com/google-deepmind/lab.git "${DMLAB_REF}"' in text
    assert 'test "$(git log -1 --format=%H)" = "${DMLAB_REF}"' in text  # the build stops on any other commit
    copy = text.index("COPY docker/dmlab/WORKSPACE /lab/WORKSPACE")
    assert text.index("git checkout -q FETCH_HEAD") < copy < text.index("bazel build")
    assert re.search(r"^ARG BAZEL_VERSION=\d+\.\d+\.\d+$", text, re.MULTILINE)
    assert re.search(r"^ARG BAZELISK_VERSION=v\d+\.\d+\.\d+$", text, re.MULTILINE)


def test_every_archive_is_a_fixed_release_with_its_checksum():
    calls = _calls(WORKSPACE)
    names = {kw.get("name") for _, kw in calls if "name" in kw}
    assert names == DMLAB_REPOSITORIES
    archives = [kw for function, kw in calls if function == "http_archive"]
    assert len(archives) == 17
    for kw in archives:
        assert re.fullmatch(r"[0-9a-f]{64}", kw.get("sha256", "")), kw["name"]
        urls = kw.get("urls") or [kw["url"]]
        for url in urls:
            assert url.startswith("https://"), url
            assert not GONE.search(url), url
            # A version number or a commit id in every address.
            assert re.search(r"\d+\.\d+|[0-9a-f]{40}|jpegsrc\.v9d", url), url
        assert not MOVING.search(kw.get("strip_prefix", "")), kw["name"]


def test_docs_list_every_pin():
    docs = (ROOT / "docs" / "dmlab.md").read_text()
    assert DMLAB_REF in docs
    for function, kw in _calls(WORKSPACE):
        if function == "http_archive":
            assert f"`{kw['name']}`" in docs, kw["name"]
            assert kw["sha256"][:12] in docs, kw["name"]


def test_a_moving_reference_would_be_caught(tmp_path):
    broken = tmp_path / "WORKSPACE"
    broken.write_text(WORKSPACE.read_text().replace("googletest-release-1.12.1", "googletest-main"))
    with pytest.raises(AssertionError):
        test_no_moving_reference(broken)
