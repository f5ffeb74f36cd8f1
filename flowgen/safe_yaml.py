"""Safe YAML for recipes, `--set` values and model cards: data only, bounded, with file:line:col in
every error. (At the package's root, not in flowgen.recipe: the engine's catalog reads its model
cards through it too.)

yaml.safe_load already refuses `!!python/...` tags; on top of that this loader keeps dates as
strings (so the resolved recipe stays JSON-hashable) and treats duplicate keys as errors (PyYAML
would silently keep the last one, hiding typos like two `width:` lines).

Bounds, because a recipe (or a card) may come from someone else: the file is read only up to
MAX_RECIPE_BYTES (limits.py); nesting deeper than MAX_DEPTH levels is refused while the document is
composed (before Python's recursion limit could be reached); and the document as the rest of
flowgen sees it — every alias expanded — may hold at most MAX_VALUES values. An alias costs PyYAML
nothing (it shares the node), but everything after parsing (validation, hashing, copies) walks the
expanded tree, so a 634-byte "billion laughs" of nested aliases would otherwise run for minutes in
gigabytes. The expanded size and depth of each node are counted once as it is composed (aliases
reuse the count of the node they name), so the check costs one pass over the text as written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flowgen.errors import FlowgenError, RecipeError
from flowgen.limits import MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES, FileProblem, read_limited

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class LimitExceeded(yaml.MarkedYAMLError):
    """The document nests too deeply or expands to too many values; `problem` says which."""


class _DataLoader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps, with duplicate-key detection and the bounds above;
    its messages name the kind of document ("recipes", "model cards")."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: Any, kinds: str = "recipes"):
        super().__init__(stream)
        self.kinds = kinds
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), every alias expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node = super().compose_node(parent, index)
            if id(node) not in self._measured:  # the alias names a collection it is inside of
                raise LimitExceeded(
                    None,
                    None,
                    "an alias refers to the list or mapping that contains it, "
                    f"which never ends; {self.kinds} cannot be recursive",
                    mark,
                )
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LimitExceeded(
                    None,
                    None,
                    f"nests deeper than {MAX_DEPTH} levels; {self.kinds} are limited to {MAX_DEPTH}",
                    self.peek_event().start_mark,
                )
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        if isinstance(node, yaml.ScalarNode):
            values, depth = 1, 1
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
            counts = [self._measured[id(child)] for child in children]
            values = 1 + sum(count for count, _ in counts)
            depth = 1 + max((d for _, d in counts), default=0)
        if values > MAX_VALUES:
            hint = " (put long lists in a dataset file)" if self.kinds == "recipes" else ""
            raise LimitExceeded(
                None,
                None,
                f"holds more than {MAX_VALUES:,} values with its aliases expanded; "
                f"{self.kinds} are limited to {MAX_VALUES:,}{hint}",
                node.start_mark,
            )
        if depth > MAX_DEPTH:
            raise LimitExceeded(
                None,
                None,
                f"nests deeper than {MAX_DEPTH} levels with its aliases expanded; "
                f"{self.kinds} are limited to {MAX_DEPTH}",
                node.start_mark,
            )
        self._measured[id(node)] = (values, depth)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain scalars", key_node.start_mark
                )
            if key in seen:
                first = seen[key].start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined at line {first.line + 1})", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _describe(err: yaml.YAMLError, kinds: str) -> str:
    """One-line description of a YAML error, without PyYAML's multi-line context dump."""
    if isinstance(err, LimitExceeded):
        return str(err.problem)
    if isinstance(err, yaml.constructor.ConstructorError) and "could not determine a constructor" in str(err.problem):
        tag = str(err.problem).split("tag ", 1)[-1].strip("'\"")
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        return f"YAML tag {tag!r} is not allowed: {kinds} are data only"
    if isinstance(err, yaml.MarkedYAMLError):
        parts = [p for p in (err.context, err.problem) if p]
        return "YAML syntax error: " + "; ".join(" ".join(str(p).split()) for p in parts)
    return "YAML error: " + " ".join(str(err).split())


def parse_yaml(text: str, shown_name: str, kind: str = "recipe", error: type[FlowgenError] = RecipeError) -> Any:
    """Parse one YAML document of `kind` ("recipe", "model card"); raise `error`('<file>:<line>:<col>:
    ...') on any YAML problem."""
    try:
        return yaml.load(text, Loader=lambda stream: _DataLoader(stream, f"{kind}s"))  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{shown_name}:{mark.line + 1}:{mark.column + 1}" if mark else shown_name
        raise error(f"{where}: {_describe(err, f'{kind}s')}") from None


def read_yaml_file(
    path: Path, shown_name: str | None = None, kind: str = "recipe", error: type[FlowgenError] = RecipeError
) -> Any:
    """Read and parse a YAML file of `kind` (at most MAX_RECIPE_BYTES), naming it in errors (missing
    file, too large, not UTF-8, bad YAML), raised as `error`."""
    shown = shown_name or str(path)
    try:
        text = read_limited(path, MAX_RECIPE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise error(f"{shown}: {kind} file not found") from None
    except FileProblem as problem:
        hint = f" for a {kind}" + ("; put long lists in a dataset file" if kind == "recipe" else "")
        raise error(f"{shown}: {problem}{hint if problem.too_large else ''}") from None
    except UnicodeDecodeError as err:
        raise error(f"{shown}: not UTF-8 text (byte {err.start})") from None
    return parse_yaml(text, shown, kind, error)
