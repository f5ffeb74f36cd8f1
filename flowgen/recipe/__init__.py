"""The recipe layer: YAML recipe -> validated Recipe -> expanded Items. Public API: flowgen.recipe.api.

Kept import-free so that `flowgen.recipe.item` (the planner's contract) stays cheap to import.
"""
