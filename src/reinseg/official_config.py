"""Reading mmengine Python config files (the official Rein configs) without executing them.

The files are ``name = <expression>`` assignments. Expressions are evaluated by walking their
syntax tree with a small whitelist: literals, ``dict(...)``, lists, tuples, names assigned
earlier, arithmetic, simple list comprehensions and the pure builtins ``range``, ``int``,
``float``, ``round``, ``min``, ``max``, ``len``, ``abs``. ``_base_`` files are read and merged as
mmengine does (later keys override, nested dicts merge, ``_delete_=True`` replaces), and
``{{_base_.name}}`` refers to a value of the bases. Anything else is refused with its line.
"""

from __future__ import annotations

import ast
import copy
import operator
import re
from pathlib import Path
from typing import Any

__all__ = ["read_official_config"]

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCTIONS = {
    "range": range,
    "int": int,
    "float": float,
    "round": round,
    "min": min,
    "max": max,
    "len": len,
    "abs": abs,
    "list": list,
    "tuple": tuple,
}
_UNSET = object()
_BASE_REF = re.compile(r"\{\{\s*_base_\.([A-Za-z_][\w.]*)\s*\}\}")


class _Evaluator:
    def __init__(self, path: Path, names: dict[str, Any], base: dict[str, Any]) -> None:
        self.path = path
        self.names = names
        self.base = base

    def error(self, node: ast.AST, what: str) -> ValueError:
        return ValueError(f"{self.path}, line {getattr(node, 'lineno', '?')}: {what}")

    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return copy.deepcopy(self.names[node.id])
            raise self.error(node, f"name {node.id!r} is not defined above")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.eval(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.error(node, "'**' in a dict display is not supported")
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self.eval(node.operand))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            return _COMPARE[type(node.ops[0])](self.eval(node.left), self.eval(node.comparators[0]))
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.ListComp):
            return self.list_comprehension(node)
        raise self.error(node, f"unsupported expression {ast.dump(node)[:60]}")

    def call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            raise self.error(node, "only calls of dict() and simple builtins are supported")
        name = node.func.id
        args = [self.eval(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.error(node, "'**' in a call is not supported")
            kwargs[kw.arg] = self.eval(kw.value)
        if name == "dict":
            return dict(*args, **kwargs)
        if name == "__base_ref__":
            return self.base_value(node, args[0])
        if name in _FUNCTIONS:
            result = _FUNCTIONS[name](*args, **kwargs)
            return list(result) if isinstance(result, range) else result
        raise self.error(node, f"call of {name!r} is not supported")

    def list_comprehension(self, node: ast.ListComp) -> list:
        if len(node.generators) != 1 or not isinstance(node.generators[0].target, ast.Name):
            raise self.error(node, "only single 'for name in ...' comprehensions are supported")
        generator = node.generators[0]
        name = generator.target.id
        results = []
        shadowed = self.names.get(name, _UNSET)
        try:
            for item in self.eval(generator.iter):
                self.names[name] = item
                if all(self.eval(condition) for condition in generator.ifs):
                    results.append(self.eval(node.elt))
        finally:
            if shadowed is _UNSET:
                self.names.pop(name, None)
            else:
                self.names[name] = shadowed
        return results

    def base_value(self, node: ast.AST, dotted: str) -> Any:
        value: Any = self.base
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise self.error(node, f"{{{{_base_.{dotted}}}}} is not defined in the base configs")
            value = value[part]
        return copy.deepcopy(value)


def merge_configs(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """mmengine's merge: nested dicts merge, other values (and ``_delete_=True`` dicts) replace."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not value.get("_delete_", False):
            merged[key] = merge_configs(merged[key], value)
        elif isinstance(value, dict):
            merged[key] = {k: v for k, v in value.items() if k != "_delete_"}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_official_config(path: str | Path) -> dict[str, Any]:
    """Read an mmengine/mmseg Python config file (with its ``_base_`` files) into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    source = _BASE_REF.sub(lambda m: f'__base_ref__("{m.group(1)}")', path.read_text())
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"{path}, line {err.lineno}: not a Python config file ({err.msg})") from err

    base: dict[str, Any] = {}
    statements = list(tree.body)
    bases = [s for s in statements if isinstance(s, ast.Assign) and _target(s) == "_base_"]
    if bases:
        files = _Evaluator(path, {}, {}).eval(bases[0].value)
        for name in [files] if isinstance(files, str) else files:
            base_config = read_official_config(path.parent / name)
            duplicated = set(base_config) & set(base)
            if duplicated:
                raise ValueError(f"{path}: base files define {sorted(duplicated)} twice")
            base.update(base_config)

    names: dict[str, Any] = {}
    evaluator = _Evaluator(path, names, base)
    for statement in statements:
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            continue  # a docstring
        if not isinstance(statement, ast.Assign) or _target(statement) is None:
            raise evaluator.error(statement, "only 'name = value' assignments are supported")
        name = _target(statement)
        if name == "_base_":
            continue
        names[name] = evaluator.eval(statement.value)
    return merge_configs(base, names)


def _target(statement: ast.Assign) -> str | None:
    if len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id
    return None
