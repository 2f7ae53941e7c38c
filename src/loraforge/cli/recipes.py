"""`loraforge recipes`: list the shipped recipes with their one-line descriptions."""
from loraforge.config import list_recipes, recipe_description


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(handler=run)


def run(args) -> int:
    names = list_recipes()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(name).splitlines()[0] if recipe_description(name) else ''}")
    print("\nRun one with: loraforge train <name>  (or a path to your own YAML; --set key=value overrides)")
    return 0
