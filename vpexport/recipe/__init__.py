"""Strict recipes: one YAML file describes model, task, pruning, export, engine, validation, deploy.

    from vpexport.recipe import load_recipe
    r = load_recipe("recipes/llava7b_vqa.yaml")   # RecipeError (exit 2, one line) on any problem
    arch = r.resolve_arch(); layout = r.layout(arch); sched = r.schedule(arch)
"""

from vpexport.recipe.loader import Recipe, expand_env, load_recipe, recipe_from_dict, save_resolved
from vpexport.methods import auto_candidates
from vpexport.recipe.schema import methods_markdown, rules_markdown

__all__ = [
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "save_resolved",
    "expand_env",
    "auto_candidates",
    "methods_markdown",
    "rules_markdown",
]
