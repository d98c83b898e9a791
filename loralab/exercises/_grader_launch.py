"""Start a student's Jupyter kernel for the grader: ``python _grader_launch.py MEMORY_MB CMD...``.

Run as a script (it imports nothing from loralab). It stands between the grader and the kernel, so
the kernel's parent is this small process, never the grader: a notebook that kills its parent
stops only its own grading. On POSIX the kernel gets an address-space limit of MEMORY_MB (0: none),
and its output goes nowhere (the grader talks to it over Jupyter's channels). The exit status is
the kernel's: its exit code, or 128 + the signal that ended it.
"""

import os
import signal
import subprocess
import sys


def main() -> int:
    limit = int(sys.argv[1]) * 2**20

    def set_limits():
        import resource

        if limit > 0:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    child = subprocess.Popen(
        sys.argv[2:],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=set_limits if os.name == "posix" else None,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda n, _frame: child.send_signal(n))
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
