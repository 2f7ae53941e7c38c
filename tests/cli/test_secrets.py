"""A Hub token never reaches output, argv or saved files, however it was given: `--set model.hub_token=...`, a
whole section (`--set 'model={base: x, hub_token: ...}'`), a dataset entry, or a YAML file. (The interrupted run
and its printed resume command: tests/train/test_resume.py; the ranks of `--devices 2`:
tests/train/test_distributed.py.)"""
import pytest

SECRET = "hf_SECRETtoken0123456789abcdef"


def cli(capsys, *args) -> tuple[int, str]:
    from loraforge.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out + err


@pytest.mark.parametrize("overrides, shown", [
    ([f"model={{base: tiny, hub_token: {SECRET}, bogus: 1}}"],
     '- model.bogus: unknown key; allowed: base, revision, quantization, double_quant, compute_dtype, attention, '
     'trust_remote_code, hub_token (from --set model={"base": "tiny", "bogus": 1})'),
    ([f"model={{base: tiny, hub_token: {SECRET}, quantization: nf5}}"],
     "- model.quantization: Input should be 'nf4', 'fp4', 'int8' or 'none' (got 'nf5') (from --set "
     'model={"base": "tiny", "quantization": "nf5"})'),
    ([f"model={{base: tiny, hub_token: {SECRET}"], "- model: Input should be a valid dictionary"),  # not YAML
    ([f"data.datasets=[{{path: x.jsonl, hub_token: {SECRET}}}]"],
     '(from --set data.datasets=[{"path": "x.jsonl"}])'),
    ([f"model.hub_token:{SECRET}"], "error: --set (a value naming a secret, not shown): expected KEY=VALUE"),
    ([f"model.hub_token={SECRET}", "train.max_step=3"], "- train.max_step: unknown key; did you mean 'max_steps'?"),
])
def test_config_errors_never_echo_a_token(capsys, tmp_path, overrides, shown):
    argv = ["train", "tiny", *[x for o in overrides for x in ("--set", o)], "--output-dir", str(tmp_path / "run")]
    status, printed = cli(capsys, *argv)
    assert status == 2 and shown in printed, printed
    assert SECRET not in printed and "Traceback" not in printed
    assert not (tmp_path / "run").exists()


def test_a_token_in_a_yaml_file_is_never_echoed(capsys, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"model:\n  base: tiny\n  hub_token: {SECRET}\n  hub_tokn: {SECRET}\n  quantization: nf5\n")
    status, printed = cli(capsys, "train", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert status == 2 and "model.hub_tokn: unknown key; did you mean 'hub_token'?" in printed, printed
    assert SECRET not in printed
    status, printed = cli(capsys, "config", "show", str(recipe), "--set", "model.quantization=nf4",
                          "--set", "model.hub_tokn=null")
    assert status == 2 and SECRET not in printed


def test_the_resume_command_leaves_every_token_out():
    from loraforge.train.resume import resume_command

    command = resume_command("tiny", [f"model={{base: tiny, hub_token: {SECRET}}}", f"model.hub_token={SECRET}",
                                      f"data.datasets=[{{path: a.jsonl, columns: {{hub_token: {SECRET}}}}}]",
                                      "train.max_steps=3", "output_dir=x"], "runs/x")
    assert SECRET not in command and "hub_token" not in command
    assert command == ("loraforge train tiny --set 'model={\"base\": \"tiny\"}' --set 'data.datasets=[{\"path\": "
                       "\"a.jsonl\", \"columns\": {}}]' --set train.max_steps=3 --resume runs/x")


def test_devices_hands_the_token_to_the_ranks_in_the_environment_not_argv(monkeypatch):
    from loraforge.cli import build_parser
    from loraforge.cli.train import worker_command
    from loraforge.config import load_config
    from loraforge.train.launch import HUB_TOKEN_ENV, take_hub_token

    args = build_parser().parse_args(["train", "tiny", "--set", f"model={{base: tiny, hub_token: {SECRET}}}",
                                      "--set", "train.max_steps=2", "--devices", "2", "--trust-remote-code"])
    cfg = load_config(args.recipe, args.overrides)
    argv, env = worker_command(args, cfg, "runs/x", None)
    assert argv == ["tiny", "--set", 'model={"base": "tiny"}', "--set", "train.max_steps=2", "--output-dir", "runs/x",
                    "--trust-remote-code"]
    assert env == {HUB_TOKEN_ENV: SECRET}

    # Each rank reads its own argv back and takes the token from the environment (and leaves none behind).
    rank = build_parser().parse_args(["train", *argv])
    rank_cfg = load_config(rank.recipe, rank.overrides)
    assert rank_cfg.model.hub_token is None
    monkeypatch.setenv(HUB_TOKEN_ENV, SECRET)
    take_hub_token(rank_cfg)
    assert rank_cfg.model.hub_token == SECRET and HUB_TOKEN_ENV not in __import__("os").environ
    assert rank_cfg.saved_dict() == cfg.saved_dict() and SECRET not in str(rank_cfg.saved_dict())
