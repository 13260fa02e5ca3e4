"""The worker images and the nightly backfill, checked without Docker or Google Cloud.

Dataflow refuses workers whose Beam or Python differ from the launcher's, and a torch in the image
other than setup.py's is a different model runtime: every pin in launch/containers/ is compared
with setup.py and with the Beam installed here. The schedules in launch/schedule/ are parsed by
the real `medtwin` command line and dry-run as the image would run them.
"""

import ast
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import apache_beam
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from launch import engines
from pipelines.cli import main
from transforms.pseudonymise import KEY_ENV

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS = ROOT / "launch" / "containers"
SCHEDULE = ROOT / "launch" / "schedule"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
BOOT = "/opt/apache/beam/boot"


def _setup_py() -> dict:
    """setup.py's pins (name -> version), python_requires and package prefixes, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    required = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and any(getattr(target, "id", None) == "REQUIRED" for target in node.targets))
    pins = {}
    for requirement in ast.literal_eval(required):
        name, _, version = requirement.partition("==")
        if version:
            pins[re.sub(r"\[.*\]", "", name)] = version
    setup_call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                      and getattr(node.func, "attr", None) == "setup")
    keywords = {keyword.arg: keyword.value for keyword in setup_call.keywords}
    include = next(keyword.value for keyword in keywords["packages"].keywords if keyword.arg == "include")
    return {"pins": pins, "python_requires": ast.literal_eval(keywords["python_requires"]),
            "packages": {pattern.rstrip("*") for pattern in ast.literal_eval(include)}}


def _instructions(name: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in (CONTAINERS / name).read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    return instructions


def _arg_defaults(instructions) -> dict:
    return dict(arguments.split("=", 1) for keyword, arguments in instructions if keyword == "ARG" and "=" in arguments)


def _resolved(text: str, variables: dict) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def _froms(instructions) -> list[str]:
    """The images of the FROM lines, build arguments resolved, stage names dropped."""
    defaults = _arg_defaults(instructions)
    return [_resolved(arguments.split()[0], defaults) for keyword, arguments in instructions if keyword == "FROM"]


def _env(instructions) -> dict:
    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(arguments))
    return env


def _beam_sdk_image(python: str, beam: str) -> str:
    return f"apache/beam_python{python}_sdk:{beam}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_images_pin_what_setup_py_pins(name):
    instructions = _instructions(name)
    defaults = _arg_defaults(instructions)
    pins = _setup_py()["pins"]
    assert defaults["BEAM_VERSION"] == pins["apache-beam"]
    assert defaults["TORCH_VERSION"] == pins["torch"]
    assert defaults["TORCHVISION_VERSION"] == pins["torchvision"]
    # ...and the install step uses those arguments, and installs the package (which pins Beam).
    install = next(arguments for keyword, arguments in instructions
                   if keyword == "RUN" and "pip install" in arguments and "TORCH_INDEX" in arguments)
    for pinned in ('"torch==${TORCH_VERSION}"', '"torchvision==${TORCHVISION_VERSION}"', " . "):
        assert pinned in install
    assert f"apache_beam.__version__ == '${{BEAM_VERSION}}'" in install


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_beam_sdk_image_is_the_beam_and_python_that_launch(name):
    defaults = _arg_defaults(_instructions(name))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert defaults["PYTHON_VERSION"] == python, "Dataflow needs the launcher's Python in the workers"
    assert defaults["BEAM_VERSION"] == apache_beam.__version__
    assert python + ".0" in SpecifierSet(_setup_py()["python_requires"])
    assert _froms(_instructions(name))[0] == _beam_sdk_image(python, apache_beam.__version__)


def test_the_cpu_image_is_the_beam_sdk_image_with_cpu_torch():
    instructions = _instructions("Dockerfile")
    defaults = _arg_defaults(instructions)
    assert _froms(instructions) == [_beam_sdk_image(defaults["PYTHON_VERSION"], defaults["BEAM_VERSION"])]
    assert _arg_defaults(instructions)["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_both_images_start_through_beams_boot(name):
    instructions = _instructions(name)
    entrypoints = [json.loads(arguments) for keyword, arguments in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1] == [BOOT]
    assert not any(keyword == "CMD" for keyword, _ in instructions)


def test_the_gpu_image_copies_boot_from_the_sdk_image_of_the_same_beam():
    instructions = _instructions("Dockerfile.gpu")
    defaults = _arg_defaults(instructions)
    stages = {arguments.split()[-1]: _resolved(arguments.split()[0], defaults)
              for keyword, arguments in instructions if keyword == "FROM" and " AS " in arguments.upper()}
    copies = [arguments.split() for keyword, arguments in instructions
              if keyword == "COPY" and arguments.startswith("--from=")]
    assert [[stages[copy[0].removeprefix("--from=")], *copy[1:]] for copy in copies] == [
        [_beam_sdk_image(defaults["PYTHON_VERSION"], defaults["BEAM_VERSION"]), "/opt/apache/beam", "/opt/apache/beam"]]
    # The boot copy comes after the last FROM: it must be in the final image.
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    assert next(i for i, (keyword, arguments) in enumerate(instructions)
                if keyword == "COPY" and arguments.startswith("--from=")) > last_from


def test_the_gpu_image_uses_the_driver_dataflow_mounts_and_one_cuda():
    instructions = _instructions("Dockerfile.gpu")
    final = _froms(instructions)[-1]
    cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu[\d.]+", final)
    assert cuda, final
    assert _arg_defaults(instructions)["TORCH_INDEX"] == f"https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}"
    env = _env(instructions)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/usr/local/nvidia/lib64"
    assert "/usr/local/nvidia/bin" in env["PATH"].split(":")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    # Packages live in a venv that boot must run in, not wrap in a venv that cannot see them.
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert env["RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT"] == "1"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_images_copy_exactly_the_packages_setup_py_installs(name):
    sources = [arguments.split()[:-1] for keyword, arguments in _instructions(name)
               if keyword == "COPY" and not arguments.startswith("--")]
    copied = {source for group in sources for source in group}
    for source in copied:
        assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    assert copied == _setup_py()["packages"] | {"setup.py"}


def _build_sh(*args) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PROJECT", "REGION", "REPO", "TAG")}
    return subprocess.run(["bash", str(CONTAINERS / "build.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_build_sh_is_valid_bash():
    subprocess.run(["bash", "-n", str(CONTAINERS / "build.sh")], check=True)


def test_build_sh_builds_both_dockerfiles_into_artifact_registry():
    local = _build_sh("--project", "p", "--region", "europe-west4", "--tag", "abc123", "--local", "--dry-run")
    assert local.returncode == 0, local.stderr
    builds = [shlex.split(line) for line in local.stdout.splitlines() if " build " in line]
    assert [(Path(cmd[cmd.index("--file") + 1]).relative_to(ROOT).as_posix(), cmd[cmd.index("--tag") + 1])
            for cmd in builds] == [
        ("launch/containers/Dockerfile", "europe-west4-docker.pkg.dev/p/medtwin/medtwin-worker:abc123"),
        ("launch/containers/Dockerfile.gpu", "europe-west4-docker.pkg.dev/p/medtwin/medtwin-gpu:abc123")]
    assert all(cmd[-1] == str(ROOT) for cmd in builds)
    assert "docker push europe-west4-docker.pkg.dev/p/medtwin/medtwin-gpu:abc123" in local.stdout

    cloud = _build_sh("--project", "p", "--region", "europe-west4", "--tag", "abc123", "--only", "gpu", "--dry-run")
    assert cloud.returncode == 0, cloud.stderr
    (submit,) = [shlex.split(line) for line in cloud.stdout.splitlines()]
    substitutions = dict(pair.split("=", 1) for pair in submit[submit.index("--substitutions") + 1].split(","))
    assert substitutions == {"_DOCKERFILE": "launch/containers/Dockerfile.gpu",
                             "_IMAGE": "europe-west4-docker.pkg.dev/p/medtwin/medtwin-gpu:abc123"}
    config = yaml.safe_load(Path(submit[submit.index("--config") + 1]).read_text())
    assert config["images"] == ["${_IMAGE}"]
    assert "${_DOCKERFILE}" in config["steps"][0]["args"] and "${_IMAGE}" in config["steps"][0]["args"]


@pytest.mark.parametrize("args, message", [
    (["--region", "r", "--tag", "t"], "give --project"),
    (["--project", "p", "--tag", "t"], "give --region"),
    (["--project", "p", "--region", "r", "--tag", "latest"], "refusing the mutable tag 'latest'"),
    (["--project", "p", "--region", "r", "--tag", "t", "--only", "tpu"], "--only takes cpu or gpu"),
    (["--project", "p", "--region", "r", "--colour"], "unknown argument: --colour"),
])
def test_build_sh_refuses_what_it_cannot_build(args, message):
    result = _build_sh(*args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr and not result.stdout


def _crontab_job() -> tuple[str, list[str]]:
    """The image the crontab line runs and the `medtwin` arguments it gives it."""
    (line,) = [line for line in (SCHEDULE / "crontab").read_text().splitlines()
               if line.strip() and not line.startswith("#") and not re.match(r"^\w+=", line)]
    words = shlex.split(line)
    assert words[:5] == ["15", "2", "*", "*", "*"]
    command = words[5:words.index(">>")]
    assert command[:2] == ["docker", "run"]
    entrypoint = command.index("--entrypoint")
    assert command[entrypoint + 1] == "medtwin"
    return command[entrypoint + 2], command[entrypoint + 3:]


def _cloud_run_job() -> tuple[str, list[str], dict]:
    spec = yaml.safe_load((SCHEDULE / "backfill-job.yaml").read_text())
    (container,) = spec["spec"]["template"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["medtwin"]
    return container["image"], container["args"], {env["name"]: env for env in container["env"]}


def _dry_run_in_the_image(argv, monkeypatch, capsys) -> str:
    """`medtwin ARGV --dry_run` as the installed package in the image runs it: no setup.py beside it."""
    monkeypatch.setattr(engines, "SETUP_FILE", "/nonexistent/site-packages/setup.py")
    monkeypatch.setenv(KEY_ENV, "a-test-key-of-enough-length")
    before = dt.datetime.now(dt.timezone.utc).date()
    assert main([*argv, "--dry_run"]) == 0
    after = dt.datetime.now(dt.timezone.utc).date()
    out = capsys.readouterr().out
    assert any(f"--job_name=medtwin-backfill-{day - dt.timedelta(days=1)}" in out for day in (before, after))
    return out


@pytest.mark.parametrize("job", [_crontab_job, _cloud_run_job], ids=["crontab", "cloud-run"])
def test_the_nightly_backfill_is_a_real_medtwin_command(job, monkeypatch, capsys):
    image, argv = job()[:2]
    assert argv[:2] == ["backfill", "--yesterday"]
    assert re.fullmatch(r"[a-z0-9-]+-docker\.pkg\.dev/[\w-]+/medtwin/medtwin-worker:\w+", image), image
    # The launcher and its workers are one image: the same code, the same paths to the weights.
    assert argv[argv.index("--sdk_container_image") + 1] == image
    out = _dry_run_in_the_image(argv, monkeypatch, capsys)
    assert "--runner=DataflowRunner" in out and f"--sdk_container_image={image}" in out
    assert "--setup_file" not in out


def test_cron_and_cloud_run_schedule_the_same_job():
    assert _crontab_job() == _cloud_run_job()[:2]
    secret = _cloud_run_job()[2][KEY_ENV]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "medtwin-pseudonym-key", "key": "latest"}


def test_dataflow_from_an_installed_medtwin_needs_an_image(monkeypatch, capsys):
    monkeypatch.setattr(engines, "SETUP_FILE", "/nonexistent/site-packages/setup.py")
    argv = ["launch", "--input", "gs://landing", "--demo", "--engine", "dataflow", "--project", "p",
            "--region", "r", "--temp_location", "gs://b/tmp", "--dry_run"]
    assert main(argv) == 2
    assert "give --sdk_container_image" in capsys.readouterr().err


def test_dataflow_with_an_image_runs_the_images_medtwin_not_a_staged_checkout(capsys):
    image = "europe-west4-docker.pkg.dev/p/medtwin/medtwin-gpu:abc123"
    assert main(["launch", "--input", "gs://landing", "--demo", "--engine", "dataflow", "--project", "p",
                 "--region", "r", "--temp_location", "gs://b/tmp", "--sdk_container_image", image, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "--setup_file" not in out and f"--sdk_container_image={image}" in out
