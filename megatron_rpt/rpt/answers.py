"""Math final-answer checking for RLVR (`--rl-reward math_answer`): extraction, normalisation, and
the three comparisons, cheapest first.

The answer of a response is the content of its last `\\boxed{...}` after `</think>`
(`rpt.reward.extract_prediction`). It is correct against the reference answer when

(a) the two normalised strings are equal. Normalising is light: surrounding whitespace, one pair
    of surrounding `$...$` (or `$$...$$`), a trailing period, runs of whitespace inside collapsed
    to one space; the Unicode minus sign is "-". Case is kept;
(b) both are plain numbers (`parse_number`) of equal value, compared exactly as fractions:
    integers, decimals, thousands separators in groups of three ("1,234.5"), a leading sign,
    e-notation ("1.5e-3", as reasoning-gym's power_function asks for), a/b fractions of integers,
    and a trailing "%" or leading "$" (or "\\$"). A unit sign is dropped; percent is not a factor of 1/100:
    "50%" equals "50" (GSM-style questions ask "what percent ..." and give the bare number) and does
    not equal "0.5". When both are numbers, (b) decides (no symbolic check);
(c) otherwise math-verify (`math_verify.parse` of "$...$", `verify`) says the prediction equals
    the reference: LaTeX fractions, roots, powers, sets, expressions, equations like `x=2` for 2.

math-verify times out with SIGALRM: in a thread other than the main one its parse and verify raise
ValueError ("signal only works in main thread") whatever `raise_on_error` says, and in the main
thread (of any process, forked workers included) the alarm replaces the process's SIGALRM handler
and can only interrupt Python bytecode, not a long C-level computation. So math-verify never runs in
the caller's process: a long-lived helper subprocess (plain `python -c`, it imports neither torch nor
this package) runs it in its main thread with math-verify's timeouts of 1 s (which end slow Python-level
parsing and simplification without losing the helper), under an address-space limit, and the caller
waits at most `VERIFY_TIMEOUT_S` per comparison: a helper stuck in C code or dead is killed and
restarted. A comparison that timed out counts as not equal. Callable from any thread (one lock) and any process.

Model output never raises here: anything not a string, unencodable text (lone surrogates), answers
longer than `MAX_ANSWER_CHARS`, numbers with more than `MAX_DIGITS` digits, or what math-verify
cannot parse is simply not correct.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Optional

from megatron_rpt.rpt.reward import extract_prediction

VERIFY_TIMEOUT_S = 5.0        # per symbolic comparison, the helper's hard deadline (then it is killed)
_INNER_TIMEOUT_S = 1          # math-verify's own SIGALRM timeouts in the helper (whole seconds), per parse/verify
START_TIMEOUT_S = 120.0       # the helper's start: importing math-verify and sympy (seconds on a busy machine)
MAX_ANSWER_CHARS = 512        # longer answers are not compared symbolically (nor is any final answer that long)
MAX_DIGITS = 100              # longer numbers are not parsed (exact string match still applies)
MAX_EXPONENT = 400            # nor are numbers beyond 10^+-400 in e-notation (their value would be huge)
_HELPER_MEMORY = 4 << 30      # RLIMIT_AS of the helper (bytes): a blow-up ends it with MemoryError, not the node

_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)?(?:\.(\d+))?(?:[eE]([+-]?\d{1,4}))?")
_WS = re.compile(r"\s+")
_CURRENCY = re.compile(r"^\\?\$\s*(?=[-+.\d])")    # a leading dollar sign ("$24", LaTeX "\$24") before a number

# The helper: JSON [gold, prediction] per line in, "1" or "0" per line out.
_HELPER = f"""
import json, logging, resource, sys
try:
    resource.setrlimit(resource.RLIMIT_AS, ({_HELPER_MEMORY}, {_HELPER_MEMORY}))
except (ValueError, OSError):
    pass
logging.disable(logging.CRITICAL)
from math_verify import parse, verify
sys.stdout.write("ready\\n"); sys.stdout.flush()
for line in sys.stdin:
    try:
        gold, pred = json.loads(line)
        ok = verify(parse("$" + gold + "$", parsing_timeout={_INNER_TIMEOUT_S}),
                    parse("$" + pred + "$", parsing_timeout={_INNER_TIMEOUT_S}), timeout_seconds={_INNER_TIMEOUT_S})
    except BaseException:
        ok = False
    sys.stdout.write("1\\n" if ok else "0\\n"); sys.stdout.flush()
"""


def normalize_answer(text: str) -> str:
    """The light normalisation of (a) (see the module docstring)."""
    s = _strip_period(_WS.sub(" ", text.replace("\u2212", "-")).strip())
    for fence in ("$$", "$"):
        if len(s) > 2 * len(fence) and s.startswith(fence) and s.endswith(fence):
            return _strip_period(s[len(fence):-len(fence)].strip())
    return s


def _strip_period(s: str) -> str:
    """Without one trailing sentence period ("3." and "$3$." end sentences; an ellipsis stays)."""
    return s[:-1].rstrip() if s.endswith(".") and not s.endswith("..") else s


def _decimal(text: str) -> Optional[Fraction]:
    m = _NUMBER.fullmatch(text)
    if m is None or (m.group(2) is None and m.group(3) is None):
        return None
    whole, frac = (m.group(2) or "0").replace(",", ""), m.group(3) or ""
    exponent = int(m.group(4) or 0) - len(frac)
    if len(whole) + len(frac) > MAX_DIGITS or abs(exponent) > MAX_EXPONENT:
        return None
    value = Fraction(int(whole + frac)) * Fraction(10) ** exponent
    return -value if m.group(1) == "-" else value


def parse_number(text: str) -> Optional[Fraction]:
    """The exact value of a normalised plain number of (b), or None when it is not one."""
    s = text[:-1].rstrip() if text.endswith("%") else text
    s = _CURRENCY.sub("", s, count=1)
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = _decimal(num.strip()), _decimal(den.strip())
        if a is None or b is None or b == 0 or a.denominator != 1 or b.denominator != 1:
            return None
        return a / b
    return _decimal(s)


def _format_number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def canonical_answer(text: Optional[str]) -> Optional[str]:
    """The normalised answer cons@k votes on: a plain number as its exact value ("0.50", "1/2" and
    "50%"... are "1/2", "1/2", "50"), anything else as normalised text; None for no answer."""
    if not isinstance(text, str):
        return None
    s = normalize_answer(text)
    if not s:
        return None
    value = parse_number(s)
    return s if value is None else _format_number(value)


class _Verifier:
    """The math-verify helper subprocess (see the module docstring); one per process, started lazily."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None
        self.pid = None     # the process that started the helper (a forked child starts its own)

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, encoding="utf-8", bufsize=1)
        self.pid = os.getpid()
        if self._read(START_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError("the math-verify helper did not start (is math-verify installed? pip install "
                               "math-verify)")

    def _read(self, timeout: float) -> Optional[str]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def close(self) -> None:
        if self.proc is not None and self.pid == os.getpid():
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def equal(self, gold: str, pred: str) -> bool:
        with self.lock:
            if self.proc is None or self.pid != os.getpid() or self.proc.poll() is not None:
                self.proc = None    # a forked child does not share its parent's pipes
                self._start()
            try:
                self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
                self.proc.stdin.flush()
                answer = self._read(VERIFY_TIMEOUT_S)
            except OSError:        # the helper died (memory limit)
                answer = None
            if answer is None:     # late or dead: restart it for the next comparison
                self.close()
            return answer == "1"


_VERIFIER = _Verifier()
atexit.register(_VERIFIER.close)


@lru_cache(maxsize=65536)
def symbolic_equal(reference: str, prediction: str) -> bool:
    """(c): math-verify's verdict, prediction against reference (normalised strings), in the helper."""
    return _VERIFIER.equal(reference, prediction)


def answers_match(prediction: Optional[str], reference: str) -> bool:
    """Whether an extracted answer equals the reference answer by (a), (b) or (c)."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        return False
    try:
        prediction.encode("utf-8")
        reference.encode("utf-8")
    except UnicodeEncodeError:      # lone surrogates
        return False
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    a, b = parse_number(pred), parse_number(ref)
    if a is not None and b is not None:
        return a == b
    if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
        return False
    return symbolic_equal(ref, pred)


def math_answer_reward(response: str, reference: str) -> float:
    """1.0 when the response's final answer (last `\\boxed{}` after `</think>`) equals `reference`."""
    return 1.0 if answers_match(extract_prediction(response), reference) else 0.0
