"""One render request as plain data: what a line of `pfx render --batch FILE` and a `pfx serve` POST /render body
hold, checked field by field with messages that name the field. No torch here.

Fields (JSON):
  prompt     string, required: concepts are found in it as `pfx render` finds them (<name> or the bare name)
  seed       integer >= 0 (default: the command's --seed, else 0)
  count      images of this prompt, seeds as `pfx render -n` (default 1)
  concepts   ["name", ...] bound to their superclass word when the prompt does not name them (like --with),
             or {"name": {"beta": 0.6, "tau": 0.15}} / {"name": 0.6} (a number is beta) with their gates
  beta, tau  {"name": number}: per-concept gates (as --beta/--tau)
  negative   negative prompt (string)
  output     where to write the PNG (batch files only; several images: stem-<i>.png as -n writes)
  steps, guidance    (pfx serve only; a batch file uses the command's)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_PROMPT = 2000
MAX_SEED = 2**63 - 1


class SpecError(ValueError):
    """A request that cannot be used; the message names the field."""


@dataclass
class RenderSpec:
    prompt: str
    seed: int = 0
    count: int = 1
    with_names: list[str] = field(default_factory=list)
    beta: dict[str, float] = field(default_factory=dict)
    tau: dict[str, float] = field(default_factory=dict)
    negative: str | None = None
    output: str | None = None
    steps: int | None = None
    guidance: float | None = None

    def request(self):
        """The engine's RenderRequest (perfusion_hub.batch; imported here, so the module stays torch-free)."""
        from perfusion_hub.batch import RenderRequest

        return RenderRequest(self.prompt, seed=self.seed, count=self.count, beta=dict(self.beta), tau=dict(self.tau),
                             with_names=list(self.with_names), negative_prompt=self.negative)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{what} must be a number, not {value!r}")
    return float(value)


def _integer(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{what} must be an integer, not {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{what} must be between {lo} and {hi}, not {value}")
    return value


def _name(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{what} must hold concept names (strings), not {value!r}")
    return value.strip()


def _gates(value, what: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise SpecError(f'{what} must be an object of concept name -> number, e.g. {{"cat-mittens": 0.6}}')
    return {_name(k, what): _number(v, f"{what}.{k}") for k, v in value.items()}


def parse_spec(obj, *, allowed: set[str] | frozenset[str], max_count: int = 64, max_steps: int = 1000,
               default_seed: int = 0) -> RenderSpec:
    """Check one request object; SpecError names what is wrong. `allowed`: the fields this caller takes."""
    if not isinstance(obj, dict):
        raise SpecError(f"expected a JSON object with at least a \"prompt\", not {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise SpecError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"(known: {', '.join(sorted(allowed))})")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError('"prompt" must be a non-empty string')
    if len(prompt) > MAX_PROMPT:
        raise SpecError(f'"prompt" is {len(prompt)} characters; at most {MAX_PROMPT}')
    spec = RenderSpec(prompt=prompt, seed=default_seed)
    if obj.get("seed") is not None:
        spec.seed = _integer(obj["seed"], '"seed"', 0, MAX_SEED)
    if obj.get("count") is not None:
        spec.count = _integer(obj["count"], '"count"', 1, max_count)
    concepts = obj.get("concepts")
    if isinstance(concepts, list):
        spec.with_names = [_name(v, '"concepts"') for v in concepts]
    elif isinstance(concepts, dict):
        for k, v in concepts.items():
            name = _name(k, '"concepts"')
            spec.with_names.append(name)
            if isinstance(v, dict):
                extra = sorted(set(v) - {"beta", "tau"})
                if extra:
                    raise SpecError(f'"concepts.{name}" takes "beta" and "tau", not {", ".join(map(repr, extra))}')
                if v.get("beta") is not None:
                    spec.beta[name] = _number(v["beta"], f'"concepts.{name}.beta"')
                if v.get("tau") is not None:
                    spec.tau[name] = _number(v["tau"], f'"concepts.{name}.tau"')
            elif v is not None:
                spec.beta[name] = _number(v, f'"concepts.{name}"')
    elif concepts is not None:
        raise SpecError('"concepts" must be a list of names or an object of name -> {"beta": ..., "tau": ...}')
    if obj.get("beta") is not None:
        spec.beta.update(_gates(obj["beta"], '"beta"'))
    if obj.get("tau") is not None:
        spec.tau.update(_gates(obj["tau"], '"tau"'))
    bad_tau = sorted(n for n, t in spec.tau.items() if t <= 0)
    if bad_tau:
        raise SpecError(f"tau must be positive ({', '.join(bad_tau)})")
    if obj.get("negative") is not None:
        if not isinstance(obj["negative"], str):
            raise SpecError('"negative" must be a string')
        spec.negative = obj["negative"]
    if "output" in allowed:
        out = obj.get("output")
        if out is not None and (not isinstance(out, str) or not out.strip()):
            raise SpecError('"output" must be a non-empty path string')
        spec.output = out
    if obj.get("steps") is not None:
        spec.steps = _integer(obj["steps"], '"steps"', 1, max_steps)
    if obj.get("guidance") is not None:
        spec.guidance = _number(obj["guidance"], '"guidance"')
        if not 0 <= spec.guidance <= 50:
            raise SpecError(f'"guidance" must be between 0 and 50, not {spec.guidance}')
    return spec


BATCH_FIELDS = frozenset({"prompt", "seed", "count", "concepts", "beta", "tau", "negative", "output"})


def outputs_of(spec: RenderSpec) -> list[str]:
    """The files RenderResult.save writes for this spec: `output`, or stem-<i>.png for several images."""
    from pathlib import PurePath

    p = PurePath(spec.output)
    if spec.count == 1:
        return [str(p)]
    return [str(p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}")) for i in range(spec.count)]


def read_batch_file(path, *, default_seed: int, default_negative: str | None, default_output, max_count: int = 64):
    """[(line number, RenderSpec)] from a JSON Lines file (blank lines skipped). Lines without "output" write
    `default_output(line number)`. Raises SpecError naming the file and line of the first bad line, and refuses
    two lines that would write the same file."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None
    out: list[tuple[int, RenderSpec]] = []
    written: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            spec = parse_spec(obj, allowed=BATCH_FIELDS, max_count=max_count, default_seed=default_seed)
        except SpecError as e:
            raise SpecError(f"{path}, line {n}: {e}") from None
        if spec.negative is None:
            spec.negative = default_negative
        spec.output = spec.output or str(default_output(n))
        for f in outputs_of(spec):
            if f in written:
                raise SpecError(f"{path}, line {n}: writes {f}, which line {written[f]} writes too; give each line "
                                "its own \"output\"")
            written[f] = n
        out.append((n, spec))
    if not out:
        raise SpecError(f"{path} holds no requests (one JSON object per line, e.g. {{\"prompt\": \"a photo of "
                        "cat-mittens\", \"seed\": 1, \"output\": \"mittens.png\"}})")
    return out
