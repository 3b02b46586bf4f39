"""The `glm41v` command as a whole: every subcommand registered (those of the converter and the trainer by entry
point), and the error contract of every subcommand: a `Glm41vError` is one `error:` line with exit code 2, a bug
keeps its traceback."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import glm41v_convert.main as convert_cmd
import glm41v_jax.cli as cli
import glm41v_jax.cli.chat as chat_cmd
import glm41v_jax.cli.generate as generate_cmd
import glm41v_jax.cli.plan as plan_cmd
import glm41v_jax.cli.verify as verify_cmd
import glm41v_train.cli as train_cmd
from glm41v_jax.cli.common import CliError

ALL_COMMANDS = {"convert", "export", "verify", "generate", "chat", "train", "loss", "plan"}

# subcommand -> (the module attribute that does its work, argv that reaches it)
WORKERS = {
    "generate": (generate_cmd, "_generate", ["generate", "--prompt", "hi"]),
    "chat": (chat_cmd, "_chat", ["chat"]),
    "verify": (verify_cmd, "_verify", ["verify", "some dir"]),
    "plan": (plan_cmd, "_plan", ["plan", "--tpu", "v5e-8", "generate"]),
    "convert": (convert_cmd, "_convert", ["convert", "src", "dst"]),
    "export": (convert_cmd, "_export", ["export", "src", "dst"]),
    "train": (train_cmd, "_train", ["train", "--config", "c.yaml"]),
    "loss": (train_cmd, "_loss", ["loss", "--model", "m", "--data", "d.jsonl"]),
}


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def test_every_subcommand_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == ALL_COMMANDS
    assert {ep.name for ep in cli.command_entry_points()} == {"convert", "export", "train", "loss"}, (
        "the converter's and the trainer's commands come from the installed entry points: pip install -e .")


def test_a_stale_egg_info_first_on_sys_path_hides_no_command(tmp_path, monkeypatch):
    """An editable install can leave an older `glm41v_jax.egg-info` (without the entry points) in the source folder,
    which `python -m ...` from there finds first: importlib's own entry_points() then sees no command (checked
    here first); the CLI reads every distribution's metadata and still registers them all."""
    egg = tmp_path / "glm41v_jax.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: glm41v-jax\nVersion: 0.1.0\n")
    (egg / "entry_points.txt").write_text("[console_scripts]\nglm41v = glm41v_jax.cli:main\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not importlib.metadata.entry_points(group=cli.COMMANDS_GROUP)
    assert {ep.name for ep in cli.command_entry_points()} == {"convert", "export", "train", "loss"}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == ALL_COMMANDS


def test_worker_table_covers_every_command():
    assert set(WORKERS) == ALL_COMMANDS


@pytest.mark.parametrize("command", sorted(WORKERS))
def test_a_glm41v_error_is_one_line_and_exit_2(command, monkeypatch, capsys):
    module, attr, argv = WORKERS[command]

    def fail(args):
        raise CliError(f"bad input for {args.command}:\n  the field   'x' is wrong")

    monkeypatch.setattr(module, attr, fail)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: bad input for {command}: the field 'x' is wrong\n"


@pytest.mark.parametrize("command", sorted(WORKERS))
@pytest.mark.parametrize("bug", [ZeroDivisionError, ValueError, RuntimeError, KeyError, TypeError])
def test_a_bug_is_not_swallowed(command, bug, monkeypatch, capsys):
    """A bug (here ValueError and RuntimeError too: they are not Glm41vErrors) propagates out of main, so the
    interpreter prints its traceback."""
    module, attr, argv = WORKERS[command]

    def fail(args):
        raise bug("a deliberate bug")

    monkeypatch.setattr(module, attr, fail)
    with pytest.raises(bug, match="a deliberate bug"):
        cli.main(argv)
    assert "error:" not in capsys.readouterr().err


def test_a_bug_shows_its_traceback_in_a_real_process(tmp_path):
    """The console command itself: a deliberate ZeroDivisionError deep in `generate` is a traceback (exit 1); a
    Glm41vError raised at the same place is one line (exit 2)."""
    code = ("import sys, glm41v_jax.cli.generate as g, glm41v_jax.pipeline as p\n"
            "def boom(args):\n"
            "    if sys.argv[1] == 'bug':\n"
            "        return 1 // 0\n"
            "    raise p.RequestError('the request is bad')\n"
            "g._generate = boom\n"
            "from glm41v_jax.cli import main\n"
            "sys.exit(main(['generate', '--prompt', 'hi']))\n")
    script = tmp_path / "run it.py"
    script.write_text(code)
    bug = subprocess.run([sys.executable, str(script), "bug"], capture_output=True, text=True, env=_env(),
                         timeout=300, cwd=tmp_path)
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr and "ZeroDivisionError" in bug.stderr
    assert "error:" not in bug.stderr
    user = subprocess.run([sys.executable, str(script), "user"], capture_output=True, text=True, env=_env(),
                          timeout=300, cwd=tmp_path)
    assert user.returncode == 2
    assert user.stderr == "error: the request is bad\n"


def test_registration_needs_no_train_extra():
    """Building the parser (on every `glm41v` call) imports no module of the train extra, so `glm41v generate`
    runs after a plain `pip install -e .` (pyyaml is left out: flax needs it, so it is always there)."""
    code = ("import sys, glm41v_jax.cli as c\n"
            "c.build_parser()\n"
            "print(sorted(m for m in ('grain', 'tensorboardX', 'tensorflow_datasets', 'array_record') "
            "if m in sys.modules))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_missing_train_extra_is_one_line(monkeypatch, capsys):
    """Without the train extra, `glm41v loss` says which extra to install (one line, exit 2) instead of a
    ModuleNotFoundError traceback; a missing module that is not part of the extra is still a bug."""
    def no_grain(args):
        raise ModuleNotFoundError("No module named 'grain'", name="grain")

    monkeypatch.setattr(train_cmd, "_loss", no_grain)
    assert cli.main(["loss", "--model", "m", "--data", "d.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err == "error: glm41v loss needs the train extra: pip install -e '.[train]' (no module named 'grain')\n"

    def no_other(args):
        raise ModuleNotFoundError("No module named 'numpyy'", name="numpyy")

    monkeypatch.setattr(train_cmd, "_train", no_other)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["train", "--config", "c.yaml"])


@pytest.mark.parametrize("argv", [["-m", "glm41v_jax.cli"], ["-m", "glm41v_jax"]])
def test_python_dash_m(argv, tmp_path):
    p = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, env=_env(), timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for name in ALL_COMMANDS:
        assert name in p.stdout


def test_empty_and_folder_paths_are_named(run_cli, tmp_path):
    """`glm41v verify ''` was read as the current folder, `glm41v generate --batch-file ''` as no batch file;
    `glm41v loss --data FOLDER` said 'no such file'."""
    rc, _, err = run_cli("verify", "")
    assert (rc, err) == (2, "error: the directory path is empty\n")
    folder = tmp_path / "my data"
    folder.mkdir()
    rc, _, err = run_cli("loss", "--model", "tiny", "--data", str(folder))
    assert (rc, err) == (2, f"error: --data {folder}: is a directory, expected a JSONL file\n")
    rc, _, err = run_cli("generate", "--batch-file", "")
    assert (rc, err) == (2, "error: --batch-file: the path is empty\n")
    rc, _, err = run_cli("generate", "--prompt", "hi", "--image", " ")
    assert (rc, err) == (2, "error: image path is empty\n")


@pytest.mark.parametrize("argv, flag", [
    (["plan", "--tpu", "v5e-8", "train", "--config", "c.yaml", "--step-time", "nan"], "--step-time"),
    (["plan", "--tpu", "v5e-8", "generate", "--max-context", "1e9"], "--max-context"),
    (["plan", "--tpu", "v5e-8", "generate", "--chunk-size", "0"], "--chunk-size"),
    (["train", "--config", "c.yaml", "--process-id", "-1"], "--process-id"),
    (["train", "--config", "c.yaml", "--num-processes", "0"], "--num-processes"),
])
def test_numbers_are_range_checked_by_the_parser(argv, flag, capsys):
    """Every number flag has a range-checked type (argtypes): one usage line naming the flag, before any work."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: argument {flag}: expected ") and err.count("\n") == 1, err
