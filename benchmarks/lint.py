"""Precision and recall of ``floatscope lint`` and TorchFix on two labelled corpora, scored separately.

- the project's corpus (tests/fixtures/lint_corpus), written alongside the rules;
- the held-out corpus (tests/fixtures/lint_heldout), built by an independent tester from public code without
  reading floatscope's source or corpus (its LABELS.md says how); floatscope was fixed against it afterwards, so it
  is no longer held out.

Each corpus line is labelled ``# expect: FS1xx[,FS1yy]`` (or ``FS1xx|FS1yy``: either rule counts) for an unstable
line, or ``# safe`` (a look-alike); unlabelled lines must stay clean too. A line counts as flagged when a tool
reports anything on it.

floatscope is scored strictly: a flagged expected line is a true positive only when one of the expected rules
fired there, and a finding on any other line (or of a rule not expected there) is a false positive. TorchFix is
scored leniently: any TorchFix finding on an expected line is a true positive, whatever its code (its only
numerical checks are TOR106 log1p and TOR107 expm1).

    python benchmarks/lint.py            # needs torchfix for its column: pip install torchfix (in the test extra)

Without torchfix installed the TorchFix column says so and the floatscope numbers are still printed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "lint_corpus"
HELDOUT = ROOT / "tests" / "fixtures" / "lint_heldout"
CORPORA = {"project corpus (tests/fixtures/lint_corpus)": CORPUS,
           "held-out corpus (tests/fixtures/lint_heldout, independent tester)": HELDOUT}
_LABEL = re.compile(r"#\s*(?:expect:\s*(?P<rules>[A-Z0-9,| ]+)|(?P<safe>safe)\b)")


@dataclass(frozen=True)
class Score:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 1.0 when nothing was flagged."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 1.0 when nothing was expected."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def labels(corpus: Path = CORPUS) -> dict[tuple[str, int], frozenset[str]]:
    """(file, line) -> expected rules (empty for a ``# safe`` line)."""
    out: dict[tuple[str, int], frozenset[str]] = {}
    for path in sorted(corpus.glob("*.py")):
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            match = _LABEL.search(text)
            if match:
                rules = frozenset(r.strip() for r in re.split(r"[,|]", match["rules"] or "") if r.strip())
                out[(path.name, number)] = rules
    return out


def floatscope_findings(corpus: Path = CORPUS) -> dict[tuple[str, int], set[str]]:
    sys.path.insert(0, str(ROOT / "src"))
    from floatscope.lint import lint_paths

    out: dict[tuple[str, int], set[str]] = {}
    for f in lint_paths([str(p) for p in sorted(corpus.glob("*.py"))], config=False).findings:
        out.setdefault((Path(f.file).name, f.line), set()).add(f.rule)
    return out


def torchfix_findings(corpus: Path = CORPUS) -> dict[tuple[str, int], set[str]] | None:
    """TorchFix's findings through its flake8 checker (all its rules, its defaults), or None when not installed."""
    try:
        from torchfix.torchfix import TorchChecker
    except ImportError:
        return None
    out: dict[tuple[str, int], set[str]] = {}
    for path in sorted(corpus.glob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        for line, _col, message, _type in TorchChecker(None, lines).run():
            out.setdefault((path.name, line), set()).add(message.split()[0])
    return out


def score(expected: dict[tuple[str, int], frozenset[str]], found: dict[tuple[str, int], set[str]], *,
          strict: bool, rule: str | None = None) -> Score:
    tp = fp = fn = 0
    keys = set(expected) | set(found)
    for key in keys:
        want = expected.get(key, frozenset())
        got = found.get(key, set())
        if rule is not None:
            want = want & {rule}
            got = got & {rule}
        hit = bool(want & got) if strict else bool(want and got)
        if want and hit:
            tp += 1
        elif want:
            fn += 1
        if got and not hit:
            fp += 1
    return Score(tp, fp, fn)


def main() -> int:
    for i, (name, corpus) in enumerate(CORPORA.items()):
        if i:
            print()
        report(name, corpus)
    return 0


def report(name: str, corpus: Path) -> None:
    expected = labels(corpus)
    unstable = sum(1 for v in expected.values() if v)
    safe = len(expected) - unstable
    ours = floatscope_findings(corpus)
    theirs = torchfix_findings(corpus)
    print(f"{name}: {len(expected)} labelled lines in {len(list(corpus.glob('*.py')))} files "
          f"({unstable} unstable, {safe} safe look-alikes)")
    rules = sorted({r for v in expected.values() for r in v})
    print(f"\n{'rule':<8}{'lines':>6}   {'floatscope P':>12}{'R':>7}   {'TorchFix found':>14}")
    for rule in rules:
        n = sum(rule in v for v in expected.values())
        s = score(expected, ours, strict=True, rule=rule)
        t = "" if theirs is None else f"{sum(bool(theirs.get(k)) for k, v in expected.items() if rule in v):>8}/{n}"
        print(f"{rule:<8}{n:>6}   {s.precision:>12.2f}{s.recall:>7.2f}   {t}")
    s = score(expected, ours, strict=True)
    print(f"\nfloatscope lint: precision {s.precision:.3f}  recall {s.recall:.3f}  (TP {s.tp}, FP {s.fp}, FN {s.fn})")
    if theirs is None:
        print("TorchFix: not installed (pip install torchfix, or pip install -e '.[test]'); no comparison")
    else:
        t = score(expected, theirs, strict=False)
        codes = sorted({c for v in theirs.values() for c in v})
        print(f"TorchFix 0.7:    precision {t.precision:.3f}  recall {t.recall:.3f}  (TP {t.tp}, FP {t.fp}, FN {t.fn}; "
              f"codes seen: {', '.join(codes) or 'none'})")


if __name__ == "__main__":
    sys.exit(main())
