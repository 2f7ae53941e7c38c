"""`loraforge config show [RECIPE] [--set ...]`: the resolved config, as training would use it, without training."""
from __future__ import annotations

import sys


def register(sub) -> None:
    from loraforge.cli import command_group
    from loraforge.cli.data import dataset_options, recipe_options

    show = command_group(sub, "config", "print the resolved config of a recipe (with --set overrides)").add_parser(
        "show", help="print the resolved config (every key, defaults filled in) without training",
        description="Load RECIPE (a shipped name or a YAML file; default: demo) with the --set overrides, validate "
        "it as `loraforge train` would, and print the result as YAML: a starting point for your own recipe. "
        "Secrets (model.hub_token) are left out.")
    recipe_options(show, "lora.r=8")
    dataset_options(show, "use")
    show.add_argument("--out", metavar="FILE.yaml", help="write the YAML to this file instead of printing it")
    show.add_argument("--force", action="store_true", help="replace an existing --out file")
    show.set_defaults(handler=run_show)


def run_show(args) -> int:
    import yaml

    from loraforge.cli.data import dataset_override
    from loraforge.config import load_config

    cfg = load_config(args.recipe, list(args.overrides) + dataset_override(args))
    text = yaml.safe_dump(cfg.saved_dict(), sort_keys=False, allow_unicode=True)
    if not args.out:
        sys.stdout.write(text)
        return 0
    from loraforge.atomic import write_text_whole
    from loraforge.export.paths import check_output

    path = check_output(args.out, args.force, command="loraforge config show")
    write_text_whole(path, text)
    print(f"config: {path}")
    return 0
