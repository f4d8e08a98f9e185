"""Release gates: rules written as short strings in the recipe, checked against evaluation results.

Grammar (parsed by hand, never ``eval``'d)::

    rule     := operand OP expr
              | operand ("not worse than" | "better than") VARIANT "(" "paired" ["," "p" "<" NUMBER] ")"
    operand  := [VARIANT "."] METRIC ["[" SLICE "]"]
    expr     := NUMBER | [NUMBER "*"] operand ["*" NUMBER] [("+" | "-") NUMBER]
    OP       := "<=" | ">=" | "<" | ">" | "=="

An operand without a variant is the variant under test (the *subject*); one with a slice reads the
metric on that slice. ``threshold = scale * operand + offset``. A paired rule compares the subject
with another variant on the same examples: the subject's per-example scores against the other's,
with McNemar's exact test when both are 0/1 (accuracy) and the paired bootstrap otherwise; its
value is the mean difference (subject - other), its interval the paired bootstrap interval of that
difference. "not worse than" fails only when the subject is worse with ``p < alpha`` (default
0.05); "better than" passes only when it is better with ``p < alpha``. Which way is better comes
from the metric's name (:func:`higher_is_better`).

Metrics come as ``{variant: {metric: value}, "slices": {slice: {variant: {metric: value}}}}``
where a value is a number or ``{"value": v, "interval": [low, high]}``; per-example scores for
paired rules have the same shape with a list (or an ``{id: score}`` dict) in place of each value.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from distillery.io import atomic_write_json

DEFAULT_ALPHA = 0.05
# metrics where less is better, by name prefix; every other metric is better higher
LOWER_IS_BETTER = ("perplexity", "nll", "kl", "ece", "mce", "latency", "ttft", "tpot", "time", "loss", "size",
                   "memory", "peak_", "cold_start", "bytes")
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


class RuleError(ValueError):
    """A rule that cannot be parsed or evaluated; the message quotes the rule."""


@dataclass(frozen=True)
class Operand:
    variant: str | None  # None: the variant under test
    metric: str
    slice: str | None = None

    def __str__(self) -> str:
        return (f"{self.variant}." if self.variant else "") + self.metric + (f"[{self.slice}]" if self.slice else "")


@dataclass(frozen=True)
class Rule:
    text: str
    left: Operand
    op: str  # one of OPS, or "not_worse" / "better" for a paired rule
    right: Operand | None = None  # the reference operand; None for a constant threshold
    scale: float = 1.0
    offset: float = 0.0
    against: str | None = None  # paired: the variant compared with
    alpha: float = DEFAULT_ALPHA

    @property
    def paired(self) -> bool:
        return self.op in ("not_worse", "better")

    def operands(self) -> list[Operand]:
        return [self.left] + ([self.right] if self.right else [])


def higher_is_better(metric: str) -> bool:
    return not metric.startswith(LOWER_IS_BETTER)


# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<op><=|>=|==|<|>)
  | (?P<slice>\[[^\]]*\])
  | (?P<name>[A-Za-z_]\w*(?:-[A-Za-z_]\w*)*)
  | (?P<punct>[.*+\-(),])
)""", re.VERBOSE)


def _lex(text: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise RuleError(f"gate rule {text!r}: cannot read {text[pos:].strip()[:20]!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text, self.tokens, self.i = text, _lex(text), 0

    def error(self, expected: str) -> RuleError:
        got = self.tokens[self.i][1] if self.i < len(self.tokens) else "the end"
        return RuleError(f"gate rule {self.text!r}: expected {expected}, found {got!r}")

    def peek(self, kind: str, value: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        k, v = self.tokens[self.i]
        return k == kind and (value is None or v == value)

    def take(self, kind: str, value: str | None = None, expected: str | None = None) -> str:
        if not self.peek(kind, value):
            raise self.error(expected or (repr(value) if value else kind))
        self.i += 1
        return self.tokens[self.i - 1][1]

    def skip(self, value: str) -> bool:
        """Take the punctuation ``value`` if it is next."""
        if self.peek("punct", value):
            self.i += 1
            return True
        return False

    def number(self) -> float:
        sign = -1.0 if self.skip("-") else 1.0
        return sign * float(self.take("num", expected="a number"))

    def operand(self) -> Operand:
        variant, metric = None, self.take("name", expected="a metric name")
        if self.skip("."):
            variant, metric = metric, self.take("name", expected="a metric name after '.'")
        slice_ = self.take("slice")[1:-1].strip() if self.peek("slice") else None
        if slice_ == "":
            raise RuleError(f"gate rule {self.text!r}: empty slice name in '[]'")
        return Operand(variant, metric, slice_)

    def rule(self) -> Rule:
        left = self.operand()
        if self.peek("name", "not") or self.peek("name", "better"):
            return self.paired(left)
        if not self.peek("op"):
            raise self.error("a comparison (<=, >=, <, >, ==), 'not worse than' or 'better than'")
        op = self.take("op")
        scale, right, offset = 1.0, None, 0.0
        if self.peek("num") or self.peek("punct", "-"):
            value = self.number()
            if not self.skip("*"):
                return self.end(Rule(self.text, left, op, offset=value))
            scale, right = value, self.operand()
        else:
            right = self.operand()
            if self.skip("*"):
                scale = self.number()
        if self.skip("+"):
            offset = self.number()
        elif self.skip("-"):
            offset = -self.number()
        return self.end(Rule(self.text, left, op, right, scale, offset))

    def paired(self, left: Operand) -> Rule:
        if self.peek("name", "not"):
            self.take("name")
            self.take("name", "worse", "'worse' after 'not'")
            kind = "not_worse"
        else:
            self.take("name", "better")
            kind = "better"
        self.take("name", "than", "'than'")
        against = self.take("name", expected="a variant name")
        self.take("punct", "(", "'(paired' (a paired rule needs its test)")
        self.take("name", "paired", "'paired'")
        alpha = DEFAULT_ALPHA
        if self.skip(","):
            self.take("name", "p", "'p'")
            self.take("op", "<", "'<'")
            alpha = self.number()
            if not 0 < alpha < 1:
                raise RuleError(f"gate rule {self.text!r}: p must be below a level in (0, 1), got {alpha}")
        self.take("punct", ")", "')'")
        return self.end(Rule(self.text, left, kind, against=against, alpha=alpha))

    def end(self, rule: Rule) -> Rule:
        if self.i != len(self.tokens):
            raise self.error("the end of the rule")
        return rule


def parse_rule(text: str) -> Rule:
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"gate rule {text!r}: empty")
    return _Parser(text.strip()).rule()


def check_rules(rules: list[str], metrics: Collection[str], variants: Collection[str],
                slices: Collection[str] = ()) -> list[str]:
    """Errors of ``rules`` against the known names, one string per problem, each naming its rule
    as ``rules[i] 'text'``; empty when every rule can be evaluated."""
    errors = []
    for i, text in enumerate(rules):
        where = f"rules[{i}] {text!r}"
        try:
            rule = parse_rule(text)
        except RuleError as e:
            errors.append(f"rules[{i}] {str(e).removeprefix('gate rule ')}")
            continue
        for operand in rule.operands():
            if operand.metric not in metrics:
                errors.append(f"{where}: unknown metric {operand.metric!r} (known: {', '.join(sorted(metrics))})")
            if operand.variant is not None and operand.variant not in variants:
                errors.append(f"{where}: unknown variant {operand.variant!r} (known: {', '.join(sorted(variants))})")
            if operand.slice is not None and operand.slice not in slices:
                known = ", ".join(sorted(slices)) or "none"
                errors.append(f"{where}: unknown slice {operand.slice!r} (known: {known})")
        if rule.against is not None and rule.against not in variants:
            errors.append(f"{where}: unknown variant {rule.against!r} (known: {', '.join(sorted(variants))})")
    return errors


# ---------------------------------------------------------------- evaluation


def _lookup(table: Mapping, operand: Operand, subject: str, what: str, text: str):
    variant = operand.variant or subject
    scope = table
    if operand.slice is not None:
        scope = table.get("slices", {}).get(operand.slice)
        if scope is None:
            raise RuleError(f"gate rule {text!r}: no {what} for slice {operand.slice!r}")
    if variant not in scope:
        raise RuleError(f"gate rule {text!r}: no {what} for variant {variant!r}")
    if operand.metric not in scope[variant]:
        raise RuleError(f"gate rule {text!r}: variant {variant!r} has no {what} {operand.metric!r}")
    return scope[variant][operand.metric]


def _value(metrics: Mapping, operand: Operand, subject: str, text: str) -> tuple[float, list[float] | None]:
    raw = _lookup(metrics, operand, subject, "metric", text)
    if isinstance(raw, Mapping):
        interval = raw.get("interval") or ([raw["low"], raw["high"]] if "low" in raw and "high" in raw else None)
        raw = raw.get("value")
    else:
        interval = None
    if not isinstance(raw, (int, float)) or isinstance(raw, bool) or math.isnan(raw):
        raise RuleError(f"gate rule {text!r}: {operand} is not a number ({raw!r})")
    return float(raw), interval


def _aligned(a, b, names: tuple[str, str], text: str) -> tuple[list[float], list[float]]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise RuleError(f"gate rule {text!r}: {names[0]} and {names[1]} were scored on different examples "
                            f"({len(set(a) ^ set(b))} ids not in both)")
        ids = sorted(a)
        return [a[k] for k in ids], [b[k] for k in ids]
    if isinstance(a, Mapping) or isinstance(b, Mapping) or len(a) != len(b):
        raise RuleError(f"gate rule {text!r}: {names[0]} and {names[1]} per-example scores do not line up")
    return list(a), list(b)


def _paired(rule: Rule, per_example: Mapping, subject: str, seed: int, n_resamples: int) -> dict:
    from distillery.evaluate.stats import mcnemar, paired_bootstrap

    if per_example is None:
        raise RuleError(f"gate rule {rule.text!r}: a paired rule needs per-example scores")
    mine = _lookup(per_example, rule.left, subject, "per-example scores of", rule.text)
    other = Operand(rule.against, rule.left.metric, rule.left.slice)
    theirs = _lookup(per_example, other, subject, "per-example scores of", rule.text)
    a, b = _aligned(mine, theirs, (rule.left.variant or subject, rule.against), rule.text)
    if not a:
        raise RuleError(f"gate rule {rule.text!r}: no examples to compare")
    boot = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
    binary = all(x in (0, 1) for x in a + b)
    p = mcnemar(a, b)["p_value"] if binary else boot["p_value"]
    diff = boot["difference"]
    better = diff > 0 if higher_is_better(rule.left.metric) else diff < 0
    worse = diff < 0 if higher_is_better(rule.left.metric) else diff > 0
    significant = p < rule.alpha
    passed = not (significant and worse) if rule.op == "not_worse" else significant and better
    return {"value": diff, "threshold": rule.alpha, "interval": [boot["low"], boot["high"]], "p_value": p,
            "test": "mcnemar" if binary else "paired_bootstrap", "n": len(a), "against": rule.against,
            "verdict": "pass" if passed else "fail"}


def evaluate_rule(rule: Rule, metrics: Mapping, subject: str, per_example: Mapping | None = None, *,
                  seed: int = 0, n_resamples: int = 1000) -> dict:
    """One rule's ``{value, threshold, interval, verdict, ...}``; raises RuleError if it cannot be read."""
    if rule.paired:
        return _paired(rule, per_example, subject, seed, n_resamples)
    value, interval = _value(metrics, rule.left, subject, rule.text)
    threshold = rule.offset
    if rule.right is not None:
        threshold += rule.scale * _value(metrics, rule.right, subject, rule.text)[0]
    passed = OPS[rule.op](value, threshold)
    return {"value": value, "threshold": threshold, "interval": interval, "op": rule.op,
            "verdict": "pass" if passed else "fail"}


def evaluate_rules(rules: list[str], metrics: Mapping, subject: str, per_example: Mapping | None = None, *,
                   seed: int = 0, n_resamples: int = 1000) -> list[dict]:
    """Every rule's result for the variant ``subject``; a rule that cannot be parsed or read gets
    ``verdict: "error"`` and its message, and the others are still evaluated."""
    results = []
    for text in rules:
        row = {"rule": text, "variant": subject}
        try:
            row.update(evaluate_rule(parse_rule(text), metrics, subject, per_example, seed=seed,
                                     n_resamples=n_resamples))
        except RuleError as e:
            row.update(verdict="error", error=str(e))
        results.append(row)
    return results


def exit_code(results: list[dict]) -> int:
    """0 when every rule passes, 1 when one fails, 2 when a rule is bad (a bad rule wins)."""
    verdicts = {r["verdict"] for r in results}
    return 2 if "error" in verdicts else 1 if "fail" in verdicts else 0


def write_gate(path: str | Path, results: list[dict]) -> Path:
    """``gate.json``: the verdict, the exit code and each rule's result, written atomically."""
    code = exit_code(results)
    return atomic_write_json(path, {"passed": code == 0, "exit_code": code, "rules": results})


def format_table(results: list[dict]) -> str:
    """A plain-text table of the results for the terminal."""
    def num(x):
        return "" if x is None else f"{x:.4g}"

    rows = [("verdict", "rule", "value", "threshold", "interval", "p")]
    for r in results:
        iv = r.get("interval")
        rows.append((r["verdict"].upper(), r["rule"] if r["verdict"] != "error" else f"{r['rule']}  ({r['error']})",
                     num(r.get("value")), num(r.get("threshold")), f"[{num(iv[0])}, {num(iv[1])}]" if iv else "",
                     num(r.get("p_value"))))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# ---------------------------------------------------------------- a recipe's rules


def known_metrics(e) -> list[str]:
    """The metric names an evaluation with these settings (``EvaluateConfig``) produces."""
    names = ["perplexity", "nll", "kl_to_teacher", "top1_agreement", "bits_per_byte", "word_perplexity"]
    if e.calibration:
        names += ["ece", "mce"]
    kinds = {t.name for t in e.tasks}
    if kinds & {"sentiment", "analogies"}:
        names += ["accuracy", "accuracy_norm", "answer_ece", "answer_mce"]
    if "arithmetic" in kinds:
        names += ["exact_match", "token_f1"]
    if e.speed is not None:
        from distillery.evaluate.speed import PERCENTILES, setting_name

        settings = [setting_name(c, d) for c in e.speed.concurrency for d in
                    (("greedy", "sampling") if e.speed.sampling else ("greedy",))]
        for suffix in ["", *(f"_{s}" for s in settings)]:
            names += [f"{w}_p{q}{suffix}" for w in ("ttft", "tpot", "latency") for q in PERCENTILES]
            names.append(f"tokens_per_s{suffix}")
        names += ["size_bytes", "weights_bytes"] + (["cold_start_s", "peak_rss_bytes"] if e.speed.cold_start else [])
    if getattr(e, "sequence", None) is not None:
        from distillery.evaluate.sequence import METRICS

        names += list(METRICS)
    if getattr(e, "robustness", None) is not None:
        task_metrics = [m for m in ("accuracy", "accuracy_norm", "exact_match", "token_f1") if m in names]
        names += [f"robust_delta_{m}" for m in ("perplexity", "nll", "kl_to_teacher", "top1_agreement",
                                                 *task_metrics)]
    if getattr(e, "review", None) is not None and e.review.ratings is not None:
        names.append("human_win_rate")
    return names


def known_slices(e) -> list[str]:
    """Slice names rules may use: the text slices, and each task's name and its examples' tags (the
    builders need no model, so the tags are known before anything runs)."""
    from distillery.evaluate.suite import task_size
    from distillery.evaluate.task_builders import BUILDERS

    out = list(e.slices)
    for t in e.tasks:
        rows = BUILDERS[t.name](None, seed=t.seed, **task_size(t))
        out += [t.name, *{tag for row in rows for tag in row.get("tags", [])}]
    if getattr(e, "robustness", None) is not None:
        out += ["perturbed", *(f"perturbation:{k}" for k in e.robustness.kinds)]
    return out


def recipe_problems(recipe) -> list[str]:
    """Every gate rule of a recipe checked against the metrics, variants and slices its evaluation will
    produce, one line per problem naming ``gate.rules[i]``."""
    if not recipe.gate.rules:
        return []
    slices = known_slices(recipe.evaluate)
    if recipe.data.source.kind == "mixture":  # evaluate scores each component's held-out text as a slice
        slices += [f"heldout:{c.label}" for c in recipe.data.source.components]
    return [f"gate.{p}" for p in check_rules(recipe.gate.rules, known_metrics(recipe.evaluate), recipe.evaluated(),
                                             slices)]
