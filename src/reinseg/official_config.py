"""Reading mmengine Python config files (the official Rein configs) without executing them.

The files are ``name = <expression>`` assignments. Expressions are evaluated by walking their
syntax tree with a small whitelist: literals, ``dict(...)``, lists, tuples, names assigned
earlier, arithmetic, simple list comprehensions and the pure builtins ``range``, ``int``,
``float``, ``round``, ``min``, ``max``, ``len``, ``abs``. ``_base_`` files are read and merged as
mmengine does (later keys override, nested dicts merge, ``_delete_=True`` replaces), and
``{{_base_.name}}`` refers to a value of the bases. Anything else is refused with its line.

A config file is untrusted input, so the work it can ask for is bounded: at most
:data:`MAX_CONFIG_BYTES` per file and :data:`MAX_BASE_FILES` files in all, integers of at most
:data:`MAX_INT_BITS` bits, values of at most :data:`~reinseg.safe_load.MAX_NODES` items, and
:data:`MAX_WORK` evaluation steps; a ``_base_`` cycle is an error naming its files.
"""

from __future__ import annotations

import ast
import copy
import operator
import re
from pathlib import Path
from typing import Any

from .safe_load import MAX_NODES, count_nodes

__all__ = ["read_official_config", "MAX_CONFIG_BYTES", "MAX_BASE_FILES", "MAX_INT_BITS", "MAX_WORK"]

MAX_CONFIG_BYTES = 1 << 20
MAX_BASE_FILES = 64
MAX_INT_BITS = 4096
MAX_WORK = 5_000_000

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
    "round": lambda number, ndigits=None: round(number) if ndigits is None else round(number, _digits(ndigits)),
    "min": min,
    "max": max,
    "len": len,
    "abs": abs,
    "list": list,
    "tuple": tuple,
}
_UNSET = object()


def _digits(ndigits):
    """``round``'s ndigits, bounded: ``round(1, -10**9)`` would compute ``10**(10**9)``."""
    if isinstance(ndigits, int) and not isinstance(ndigits, bool) and abs(ndigits) > 400:
        raise ValueError(f"round's ndigits={ndigits} is out of [-400, 400]")
    return ndigits


_BASE_REF = re.compile(r"\{\{\s*_base_\.([A-Za-z_][\w.]*)\s*\}\}")


class _Budget:
    """Work left for reading one config and its bases (evaluation steps, items built, files read)."""

    def __init__(self) -> None:
        self.work = MAX_WORK
        self.files = MAX_BASE_FILES


class _Evaluator:
    def __init__(self, path: Path, names: dict[str, Any], base: dict[str, Any], budget: _Budget) -> None:
        self.path = path
        self.names = names
        self.base = base
        self.budget = budget

    def error(self, node: ast.AST, what: str) -> ValueError:
        return ValueError(f"{self.path}, line {getattr(node, 'lineno', '?')}: {what}")

    def spend(self, node: ast.AST, amount: int) -> None:
        self.budget.work -= amount
        if self.budget.work < 0:
            raise self.error(node, f"the config asks for more than {MAX_WORK:,} evaluation steps: refused")

    def bounded(self, node: ast.AST, value: Any) -> Any:
        """``value`` if it is within the size limits, else an error at ``node``."""
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise self.error(node, f"an integer of more than {MAX_INT_BITS} bits: refused")
        if isinstance(value, (str, bytes, list, tuple, dict, set)):
            size = count_nodes(value)
            self.spend(node, size)
            if size > MAX_NODES:
                raise self.error(node, f"a value of more than {MAX_NODES:,} items: refused")
        return value

    def binary(self, node: ast.BinOp) -> Any:
        left, right = self.eval(node.left), self.eval(node.right)
        op = type(node.op)
        ints = isinstance(left, int) and isinstance(right, int)
        # Check the size of the result before making it: 2 ** 2 ** 40 or [0] * 10 ** 9 would not finish.
        if op is ast.Pow and ints and right > 0 and max(left.bit_length() - 1, 1) * right > MAX_INT_BITS:
            raise self.error(node, f"an integer of more than {MAX_INT_BITS} bits: refused")
        if op is ast.Mult and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise self.error(node, f"an integer of more than {MAX_INT_BITS} bits: refused")
        if op is ast.Mult and not ints:
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and hasattr(sequence, "__len__") and len(sequence) * max(times, 0) > MAX_NODES:
                raise self.error(node, f"a value of more than {MAX_NODES:,} items: refused")
        if op is ast.Mod and isinstance(left, (str, bytes)):
            raise self.error(node, "'%' string formatting is not supported")
        try:
            result = _BINARY[op](left, right)
        except (ArithmeticError, TypeError, ValueError) as err:
            raise self.error(node, f"{type(err).__name__}: {err}") from None
        return self.bounded(node, result)

    def eval(self, node: ast.AST) -> Any:
        self.spend(node, 1)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return copy.deepcopy(self.bounded(node, self.names[node.id]))
            raise self.error(node, f"name {node.id!r} is not defined above")
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.eval(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.error(node, "'**' in a dict display is not supported")
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values, strict=False)}
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return self.binary(node)
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
            try:
                result = _FUNCTIONS[name](*args, **kwargs)
            except (ArithmeticError, TypeError, ValueError) as err:
                raise self.error(node, f"{type(err).__name__}: {err}") from None
            if isinstance(result, range):
                if len(result) > MAX_NODES:
                    raise self.error(node, f"a range of more than {MAX_NODES:,} items: refused")
                result = list(result)
            return self.bounded(node, result)
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
                    if len(results) > MAX_NODES:
                        raise self.error(node, f"a value of more than {MAX_NODES:,} items: refused")
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
    try:
        return _read_config(Path(path), (), _Budget())
    except (RecursionError, MemoryError):
        raise ValueError(f"{path}: nested too deeply to read") from None


def _read_config(path: Path, chain: tuple[Path, ...], budget: _Budget) -> dict[str, Any]:
    """Read ``path``; ``chain``: the files whose ``_base_`` led here (to name a cycle)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}" + (f" (a _base_ of {chain[-1]})" if chain else ""))
    resolved = path.resolve()
    if resolved in [p.resolve() for p in chain]:
        raise ValueError("_base_ cycle: " + " -> ".join(str(p) for p in (*chain, path)))
    budget.files -= 1
    if budget.files < 0:
        raise ValueError(f"{chain[0]}: more than {MAX_BASE_FILES} config files through _base_: refused")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    source = _BASE_REF.sub(lambda m: f'__base_ref__("{m.group(1)}")', path.read_text())
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"{path}, line {err.lineno}: not a Python config file ({err.msg})") from err

    base: dict[str, Any] = {}
    statements = list(tree.body)
    bases = [s for s in statements if isinstance(s, ast.Assign) and _target(s) == "_base_"]
    if bases:
        files = _Evaluator(path, {}, {}, budget).eval(bases[0].value)
        for name in [files] if isinstance(files, str) else files:
            if not isinstance(name, str):
                raise ValueError(f"{path}: _base_ must name files, got {name!r:.60}")
            base_config = _read_config(path.parent / name, (*chain, path), budget)
            duplicated = set(base_config) & set(base)
            if duplicated:
                raise ValueError(f"{path}: base files define {sorted(duplicated)} twice")
            base.update(base_config)

    names: dict[str, Any] = {}
    evaluator = _Evaluator(path, names, base, budget)
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
