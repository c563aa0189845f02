"""buildspec.yml (CodeBuild) parses, has the phases and parameters it promises, and every
command it runs exists in this repository: scripts and Makefile targets, and each
``python -m s1_mini.deploy <step> ...`` line parses with the real CLI parser."""

from __future__ import annotations

import re
import shlex

import pytest

yaml = pytest.importorskip("yaml", reason="needs PyYAML (the test extra)")

from server_utils import ROOT  # noqa: E402

from s1_mini.deploy import cli  # noqa: E402

SPEC = yaml.safe_load((ROOT / "buildspec.yml").read_text())
COMMANDS = [(phase, command) for phase, body in SPEC["phases"].items() for command in body["commands"]]
PARAMETERS = {"ACCOUNT_ID", "AWS_REGION", "SAGEMAKER_ROLE_ARN", "ARTIFACT_BUCKET", "IMAGE_TAG"}


def _deploy_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for _, command in COMMANDS:
        words = shlex.split(command)
        for i, word in enumerate(words):
            if word.endswith("python") and words[i + 1:i + 3] == ["-m", "s1_mini.deploy"]:
                calls.append((command, words[i + 3:]))
    return calls


def test_structure():
    assert str(SPEC["version"]) == "0.2"
    assert list(SPEC["phases"]) == ["install", "pre_build", "build", "post_build"]
    for phase, body in SPEC["phases"].items():
        assert body["commands"] and all(isinstance(c, str) for c in body["commands"]), phase
    assert SPEC["phases"]["install"]["runtime-versions"]["python"]
    variables = set(SPEC["env"]["variables"])
    used = " ".join(command for _, command in COMMANDS)
    for name in PARAMETERS:
        assert name in variables or name == "AWS_REGION", name  # CodeBuild sets AWS_REGION itself
        assert f"${name}" in used, name


def test_required_parameters_are_checked_first():
    install = " ".join(SPEC["phases"]["install"]["commands"])
    for name in ("SAGEMAKER_ROLE_ARN", "ARTIFACT_BUCKET", "CHECKPOINT_S3_URI"):
        assert f'test -n "${name}"' in install


def test_steps_run_in_order():
    text = [command for _, command in COMMANDS]
    order = ["make install", "bash .ci/run", "docker login", "bash container/build.sh", "docker push",
             "deploy package", "deploy upload", "deploy register", "deploy deploy", "deploy invoke"]
    positions = [next(i for i, c in enumerate(text) if needle.replace("deploy ", "s1_mini.deploy ") in c)
                 for needle in order]
    assert positions == sorted(positions), dict(zip(order, positions))


def test_scripts_and_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for _, command in COMMANDS:
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word == "bash":
                assert (ROOT / words[i + 1]).is_file(), f"{words[i + 1]} (in {command!r}) is not in the repository"
            if word == "make":
                assert re.search(rf"^{re.escape(words[i + 1])}:", makefile, re.M), f"no make target {words[i + 1]}"
            if word.startswith(".venv/"):
                assert re.search(r"^VENV \?= \.venv$", makefile, re.M), "make install no longer makes .venv"


def test_image_built_is_the_image_pushed():
    build = SPEC["phases"]["build"]["commands"]
    built = shlex.split(build[0])[2]
    assert shlex.split(build[1]) == ["docker", "tag", built, "$IMAGE_URI"]
    assert "docker push" in build[2] and "$IMAGE_URI" in build[2]


@pytest.mark.parametrize("command, argv", _deploy_calls(), ids=[f"{argv[0]}-{i}" for i, (_, argv) in enumerate(_deploy_calls())])
def test_deploy_commands_exist_and_parse(command, argv):
    step = argv[0]
    module = ROOT / "s1_mini" / "deploy" / f"{step.replace('-', '_')}.py"
    assert module.is_file(), f"buildspec.yml runs `{step}` but s1_mini/deploy/{module.name} does not exist"
    assert step in cli.STEPS, f"`{step}` is not in s1_mini.deploy.cli.STEPS"
    parser = cli.build_parser()
    subparser = next(a for a in parser._actions if a.dest == "command").choices[step]
    for word in argv[1:]:
        if word.startswith("--"):  # whole option names only: argparse would also take an abbreviation
            assert word.split("=")[0] in subparser._option_string_actions, f"`{step}` has no option {word}"
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"`python -m s1_mini.deploy {' '.join(argv)}` does not parse (see the usage above)")
    assert args.command == step


def test_every_step_of_a_deployment_is_run():
    steps = [argv[0] for _, argv in _deploy_calls()]
    assert {"package", "upload", "register", "deploy", "invoke"} <= set(steps)


def test_artifacts_are_written_by_the_smoke_test():
    outputs = {argv[argv.index("--out") + 1] for _, argv in _deploy_calls() if "--out" in argv}
    assert set(SPEC["artifacts"]["files"]) <= outputs
