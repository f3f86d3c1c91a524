"""The long fuzzing campaign behind ``make fuzz``: many seeded cases over every reader, counted by outcome.

    python scripts/fuzz_campaign.py --cases 15000 --seed 0 --timeout 30 --out out/fuzz
    python scripts/fuzz_campaign.py --replay out/fuzz/findings/exit3/pt_zip-00042/spec.json

Cases come from the default suite's seeds, mutators and oracle (tests/fuzz/fuzz_*.py), drawn with a
seeded ``random.Random`` per case (case i of seed S is the same on every machine). They run in a
worker process that imports the CLI once; this process only hands out case numbers and watches the
worker, so a case that hangs in C code or kills the process with a signal is recorded (timeout,
signal) and the worker restarted. Every failing input is kept under OUT/findings/CLASS/KIND-NNNNN/
with its spec, a minimised spec (ops dropped one at a time while the class stays), the commands
and their output. The table and OUT/summary.json give the figures; the exit status is 1 if anything
was found, 0 if not.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
MINIMISED_PER_CLASS = 3  # findings minimised per (reader, class); the rest are saved as drawn


def _imports() -> None:
    for p in (str(ROOT), str(FUZZ)):
        if p not in sys.path:
            sys.path.insert(0, p)


# ---- the worker ----------------------------------------------------------------------------------

def _draw(kinds: list[str], seed: int, i: int, cache) -> dict:
    from fuzz_mutators import RandomChooser, draw_case, seed_files

    kind = kinds[i % len(kinds)]
    return draw_case(RandomChooser(f"{seed}:{i}"), kind, seed_files(cache.path(kind)))


def _judge(spec: dict, case: Path, cache, timeout: float):
    from fuzz_mutators import apply_case
    from fuzz_oracle import judge_case

    cache.copy(spec["kind"], case)
    (case / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    apply_case(case, spec)
    return judge_case(case, spec, seed_case=cache.path(spec["kind"]), timeout=timeout)


def _minimise(spec: dict, cls: str, work: Path, cache, timeout: float) -> dict:
    """Drop ops one at a time while the case still fails with ``cls``."""
    ops = list(spec["ops"])
    i = 0
    while i < len(ops) and len(ops) > 1:
        trial = dict(spec, ops=ops[:i] + ops[i + 1:])
        case = work / "minimise"
        shutil.rmtree(case, ignore_errors=True)
        try:
            same = _judge(trial, case, cache, timeout).cls == cls
        finally:
            shutil.rmtree(case, ignore_errors=True)
        if same:
            ops = trial["ops"]
        else:
            i += 1
    return dict(spec, ops=ops)


def worker(args: argparse.Namespace) -> int:
    """Read case numbers on stdin, answer one JSON line each on stdout."""
    _imports()
    import torch
    from fuzz_corpus import SeedCache
    from fuzz_mutators import describe
    from fuzz_oracle import warm_up

    torch.set_num_threads(1)
    work = Path(args.work)
    cache = SeedCache(work / "seeds")
    (work / "seeds").mkdir(parents=True, exist_ok=True)
    warm_up(work, cache)
    minimised: Counter[tuple[str, str]] = Counter()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # anything printed by the code under test must not corrupt the replies
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        i = int(line)
        spec = _draw(args.kinds, args.seed, i, cache)
        case = work / f"case-{i:06d}"
        t0 = time.perf_counter()
        try:
            outcome = _judge(spec, case, cache, args.timeout)
        except Exception:  # noqa: BLE001 - a bug of this harness: reported as such, the campaign goes on
            import traceback

            text = traceback.format_exc()
            reply.write(json.dumps({"i": i, "kind": spec["kind"], "cls": "harness-error", "spec": spec,
                                    "findings": [["harness-error", text.strip().splitlines()[-1]]],
                                    "seconds": time.perf_counter() - t0, "describe": describe(spec),
                                    "report": text}) + "\n")
            continue
        answer = {"i": i, "kind": spec["kind"], "cls": outcome.cls, "findings": outcome.findings,
                  "seconds": outcome.seconds, "describe": describe(spec)}
        if outcome.failed:
            answer["report"] = outcome.report()
            answer["spec"] = spec
            key = (spec["kind"], outcome.cls)
            if minimised[key] < MINIMISED_PER_CLASS:
                minimised[key] += 1
                small = _minimise(spec, outcome.cls, work, cache, args.timeout)
                answer["minimised"] = small
                answer["minimised_describe"] = describe(small)
        else:
            shutil.rmtree(case, ignore_errors=True)
        reply.write(json.dumps(answer) + "\n")
    return 0


# ---- the parent ----------------------------------------------------------------------------------

class Worker:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        cmd = [sys.executable, __file__, "--worker", "--seed", str(args.seed), "--timeout", str(args.timeout),
               "--work", str(work), "--kinds", *args.kinds]
        env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
        log = open(Path(args.out) / "worker.log", "a")  # noqa: SIM115 - the worker's stderr, for its lifetime
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     env=env, bufsize=1)
        log.close()
        ready = self.read(300)
        if not (ready and ready.get("ready")):
            raise SystemExit(f"fuzz worker did not start (exit {self.proc.poll()})")

    def read(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def send(self, i: int) -> None:
        self.proc.stdin.write(f"{i}\n")
        self.proc.stdin.flush()

    def kill(self) -> int | None:
        self.proc.kill()
        return self.proc.wait()


def _save(out: Path, work: Path, i: int, answer: dict) -> str:
    folder = Path("findings") / answer["cls"] / f"{answer['kind']}-{i:05d}"
    target = out / folder
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    case = work / f"case-{i:06d}"
    if case.exists():
        shutil.copytree(case, target / "input", symlinks=True, ignore=shutil.ignore_patterns("out"))
        shutil.rmtree(case, ignore_errors=True)
    else:
        target.mkdir(parents=True)
    (target / "spec.json").write_text(json.dumps(answer.get("spec", {}), indent=1), encoding="utf-8")
    if "minimised" in answer:
        (target / "minimised.json").write_text(json.dumps(answer["minimised"], indent=1), encoding="utf-8")
    replay = f"python scripts/fuzz_campaign.py --replay {target / 'spec.json'}"
    # The commands in the report name the saved copy of the input, so they can be rerun as they are.
    report = answer.get("report", "").replace(str(case), str(target / "input"))
    (target / "report.txt").write_text(
        f"case {i} ({answer['kind']}): {answer['describe']}\n"
        + (f"minimised: {answer['minimised_describe']}\n" if "minimised" in answer else "")
        + f"replay: {replay}\n\n{report}\n", encoding="utf-8")
    return str(folder)


def campaign(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "findings", ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="llmconv-fuzz-"))
    table: dict[str, Counter[str]] = defaultdict(Counter)
    findings: list[dict] = []
    examples: dict[str, dict] = {}
    seconds: list[float] = []
    t0 = time.perf_counter()
    budget = args.max_minutes * 60 if args.max_minutes else None
    done = 0
    try:
        w = Worker(args, work)
        print(f"fuzz: {args.cases} cases, seed {args.seed}, readers {', '.join(args.kinds)}; worker ready in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        for i in range(args.cases):
            if budget and time.perf_counter() - t0 > budget:
                print(f"fuzz: time budget of {args.max_minutes} min reached after {done} cases", flush=True)
                break
            w.send(i)
            started = time.perf_counter()
            answer = w.read(args.timeout * 4 + 30)
            if answer is None:  # hung past every alarm, or died
                try:
                    code = w.proc.wait(5)
                except subprocess.TimeoutExpired:
                    code = None
                # A signal (negative code) is a finding; any other death is this harness's own failure.
                cls = "timeout" if code is None else ("signal" if code < 0 else "harness-error")
                code = w.kill() if code is None else code
                _imports()
                from fuzz_corpus import SeedCache
                from fuzz_mutators import describe

                spec = _draw(args.kinds, args.seed, i, SeedCache(work / "seeds"))
                answer = {"i": i, "kind": spec["kind"], "cls": cls, "spec": spec, "describe": describe(spec),
                          "findings": [[cls, f"worker {'hung' if cls == 'timeout' else 'died'} (exit {code}; "
                                             f"see worker.log)"]],
                          "seconds": time.perf_counter() - started, "report": ""}
                w = Worker(args, work)
            elif (i + 1) % args.recycle == 0:
                w.proc.stdin.close()
                w.proc.wait(60)
                w = Worker(args, work)
            done += 1
            table[answer["kind"]][answer["cls"]] += 1
            seconds.append(answer["seconds"])
            if answer["findings"]:
                folder = _save(out, work, i, answer)
                findings.append({"case": i, "kind": answer["kind"], "class": answer["cls"], "folder": folder,
                                 "detail": answer["findings"][0][1], "describe": answer["describe"],
                                 "minimised": answer.get("minimised_describe")})
                examples.setdefault(answer["cls"], findings[-1])
            if args.progress and done % args.progress == 0:
                print(f"  {done} cases, {len(findings)} findings, {time.perf_counter() - t0:.0f} s", flush=True)
        w.proc.stdin.close()
        w.proc.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    summary = {"cases": done, "seed": args.seed, "seconds": round(total, 1),
               "seconds_per_case": round(sum(seconds) / max(1, len(seconds)), 4),
               "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(table.items())},
               "by_class": dict(sorted(sum(table.values(), Counter()).items())),
               "findings": findings, "examples": examples}
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _print_table(summary, table)
    return 1 if findings else 0


def _print_table(summary: dict, table: dict[str, Counter[str]]) -> None:
    classes = sorted({c for row in table.values() for c in row}, key=lambda c: (not c.startswith("ok"), c))
    width = max([len(k) for k in table] + [6])
    print(f"\n{'reader':<{width}} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in classes) + f" {'total':>6}")
    for kind, row in sorted(table.items()):
        print(f"{kind:<{width}} " + " ".join(f"{row.get(c, 0):>{max(len(c), 5)}}" for c in classes)
              + f" {sum(row.values()):>6}")
    by = summary["by_class"]
    print(f"{'all':<{width}} " + " ".join(f"{by.get(c, 0):>{max(len(c), 5)}}" for c in classes)
          + f" {summary['cases']:>6}")
    n = len(summary["findings"])
    print(f"\n{summary['cases']} cases in {summary['seconds']:.0f} s ({summary['seconds_per_case'] * 1000:.0f} ms "
          f"per case); {n} finding(s)" + (f" ({100 * n / max(1, summary['cases']):.2f} %)" if n else ""))
    for cls, ex in summary["examples"].items():
        print(f"  {cls}: e.g. {ex['kind']} case {ex['case']}: {ex['minimised'] or ex['describe']}\n"
              f"      {ex['detail'][:220]}\n      saved in {ex['folder']}")


def replay(args: argparse.Namespace) -> int:
    """Rebuild one saved case from its spec, run it, and print the report."""
    _imports()
    from fuzz_corpus import SeedCache
    from fuzz_oracle import warm_up

    spec = json.loads(Path(args.replay).read_text())
    with tempfile.TemporaryDirectory(prefix="llmconv-replay-") as tmp:
        cache = SeedCache(Path(tmp) / "seeds")
        (Path(tmp) / "seeds").mkdir()
        warm_up(Path(tmp), cache)
        outcome = _judge(spec, Path(tmp) / "case", cache, args.timeout)
        print(outcome.report())
        if args.keep:
            shutil.copytree(Path(tmp) / "case", args.keep, symlinks=True)
            print(f"input kept in {args.keep}")
    return 1 if outcome.failed else 0


def main(argv: list[str] | None = None) -> int:
    _imports()
    from fuzz_corpus import KINDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=3000, help="how many cases (default 3000)")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed: case i of seed S is always the same")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one command may run (default 30)")
    ap.add_argument("--out", default="out/fuzz", help="where summary.json and findings/ go (default out/fuzz)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="readers to fuzz (default all)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop drawing new cases after this long")
    ap.add_argument("--progress", type=int, default=500, help="print a progress line every N cases (0: never)")
    ap.add_argument("--recycle", type=int, default=2000, help="restart the worker every N cases")
    ap.add_argument("--replay", help="run one saved spec.json and print its report")
    ap.add_argument("--keep", help="with --replay: copy the rebuilt input here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.replay:
        return replay(args)
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())
