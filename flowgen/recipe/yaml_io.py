"""Safe YAML reading: data only, with file:line:col in every syntax error.

yaml.safe_load already refuses `!!python/...` tags; on top of that this loader keeps dates as
strings (so the resolved recipe stays JSON-hashable) and treats duplicate keys as errors (PyYAML
would silently keep the last one, hiding typos like two `width:` lines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flowgen.errors import RecipeError

_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader without implicit timestamps and with duplicate-key detection."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, "mapping keys must be plain scalars", key_node.start_mark)
            if key in seen:
                first = seen[key].start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first defined at line {first.line + 1})", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _describe(err: yaml.YAMLError) -> str:
    """One-line description of a YAML error, without PyYAML's multi-line context dump."""
    if isinstance(err, yaml.constructor.ConstructorError) and "could not determine a constructor" in str(err.problem):
        tag = str(err.problem).split("tag ", 1)[-1].strip("'\"")
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        return f"YAML tag {tag!r} is not allowed: recipes are data only"
    if isinstance(err, yaml.MarkedYAMLError):
        parts = [p for p in (err.context, err.problem) if p]
        return "YAML syntax error: " + "; ".join(" ".join(str(p).split()) for p in parts)
    return "YAML error: " + " ".join(str(err).split())


def parse_yaml(text: str, shown_name: str) -> Any:
    """Parse one YAML document; raise RecipeError('<file>:<line>:<col>: ...') on any YAML problem."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - _RecipeLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{shown_name}:{mark.line + 1}:{mark.column + 1}" if mark else shown_name
        raise RecipeError(f"{where}: {_describe(err)}") from None


def read_yaml_file(path: Path, shown_name: str | None = None) -> Any:
    """Read and parse a YAML file, naming it in errors (missing file, not UTF-8, bad YAML)."""
    shown = shown_name or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{shown}: recipe file not found") from None
    except IsADirectoryError:
        raise RecipeError(f"{shown}: is a folder, expected a recipe file") from None
    except UnicodeDecodeError as err:
        raise RecipeError(f"{shown}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise RecipeError(f"{shown}: cannot read ({err.strerror})") from None
    return parse_yaml(text, shown)
