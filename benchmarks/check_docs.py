"""Run every command of README.md and docs/ as written, in order, after `make demo` (the check issue 29 asks for).

    make demo && python benchmarks/check_docs.py        # from the repository root, the environment active or not

Each file's ```bash blocks run in one bash session per file (so `CACHE=$(...)` carries to the next block) with
`set -eo pipefail`, its ```python blocks with the environment's python; `make ...` lines are skipped (the demo and
the tests are run on their own). Prints each block and stops at the first that fails, with its exit status.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md", "docs/teacher.md", "docs/student.md", "docs/evaluate.md", "docs/cache_format.md"]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks(path: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, path)) as f:
        found = BLOCK.findall(f.read())
    bash = "\n".join(code for kind, code in found if kind == "bash")
    bash = "\n".join(line for line in bash.splitlines() if not line.startswith("make "))
    return [("bash", bash)] + [(kind, code) for kind, code in found if kind == "python"]


def main() -> int:
    python = os.path.join(ROOT, ".venv", "bin", "python")
    env = {**os.environ, "PATH": os.path.join(ROOT, ".venv", "bin") + os.pathsep + os.environ["PATH"]}
    for path in FILES:
        for kind, code in blocks(path):
            if not code.strip():
                continue
            print(f"=== {path} ({kind})\n{code}", flush=True)
            command = ["bash", "-c", "set -eo pipefail\n" + code] if kind == "bash" else [python, "-c", code]
            result = subprocess.run(command, cwd=ROOT, env=env)
            if result.returncode:
                print(f"FAILED: a {kind} block of {path} exited with {result.returncode}", flush=True)
                return result.returncode
    print("every command of README.md and docs/ ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
