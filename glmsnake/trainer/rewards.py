"""Rule-based rewards, chosen by slime's `--rm-type` (pluggable: `register`).

- `deepscaler`: the final answer of a math response (the last `\\boxed{...}`, else the
  text after the last "answer is", else the last number) compared with the label after
  normalization; 1.0 or 0.0, like slime's deepscaler reward.
- `tiny`: the synthetic task of the tiny preset ("say c:" -> "c"). A freshly
  initialised tiny model almost never says the right letter, so an exact-match reward
  would give GRPO nothing to compare; this one is graded by how close the first
  character of the response is to the label in code points (1.0 when exact, 0 when
  more than `TINY_WIDTH` apart), which a tiny model can climb in a few dozen rollouts.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

RewardFn = Callable[[str, str], float]
_REGISTRY: dict[str, RewardFn] = {}

TINY_WIDTH = 16


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_reward(rm_type: str | None) -> RewardFn:
    if rm_type not in _REGISTRY:
        from glmsnake.errors import GlmsnakeError

        raise GlmsnakeError(f"the local trainer has no reward {rm_type!r}",
                            f"set rollout.rm_type to one of {sorted(_REGISTRY)}")
    return _REGISTRY[rm_type]


# --------------------------------------------------------------------------- tiny


@register("tiny")
def tiny_reward(response: str, label: str) -> float:
    text = response.lstrip(" ")
    if not text or not label:
        return 0.0
    return max(0.0, 1.0 - abs(ord(text[0]) - ord(label[0])) / TINY_WIDTH)


# --------------------------------------------------------------------------- math


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5": the token after a space
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut off


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def extract_answer(response: str) -> str | None:
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    m = list(re.finditer(r"answer is[:\s]*([^\n]+)", response, flags=re.IGNORECASE))
    if m:
        return m[-1].group(1).strip().rstrip(".")
    nums = _NUMBER.findall(response)
    return nums[-1] if nums else None


def normalize_answer(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    s = re.sub(r"\\frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\1/\2", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "").replace("%", "")
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: str, label: str) -> bool:
    a, b = normalize_answer(pred), normalize_answer(label)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


@register("deepscaler")
@register("math")
def math_reward(response: str, label: str) -> float:
    # deepscaler's rule: only the part after a reasoning block counts when there is one.
    if "</think>" in response:
        response = response.split("</think>")[-1]
    pred = extract_answer(response)
    return 1.0 if pred is not None and answers_match(pred, str(label)) else 0.0
