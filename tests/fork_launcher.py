"""One-process training launches without paying the imports each time.

`python train/train_ldm.py ...` spends 15-20 s of a test's 20-30 s launch on 2 cores importing torch, diffusers,
transformers, accelerate and datasets. Here a server process imports them once (per pytest worker) and forks a
child per launch, which runs the script exactly as the interpreter would run it as `__main__`: its own session
(so that `os.killpg` reaches it), working directory, argv, environment and stdin/stdout/stderr, and its exit code.

Only a launch whose environment is the server's own goes through it: libraries read some variables once, at import
(OMP_NUM_THREADS, HF_HUB_OFFLINE, HF_ENDPOINT), so a launch given any other environment runs as a real subprocess.
Launches through `accelerate launch`, several processes and every `subprocess.run` of a test stay real processes.

Run as `python -m tests.fork_launcher` it is the server: JSON requests on stdin, JSON replies on stdout.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Differs between tests and changes nothing a script does.
IGNORED_VARIABLES = {"PYTEST_CURRENT_TEST"}


# ----------------------------------------------------------------------------- the server


def preload() -> None:
    """Import what the entry scripts import (their module-level imports, by loading each as a plain module)."""
    import importlib.util

    for script in sorted((ROOT / "train").glob("train_*.py")):
        spec = importlib.util.spec_from_file_location(f"_preload_{script.stem}", script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def run_child(job: dict) -> None:
    """In the forked child: become `python SCRIPT ARGS` run in `job["cwd"]`, and exit with its code."""
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        script, *args = job["argv"][1:]
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:  # sys.exit("message") prints it, as the interpreter does
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        # What the interpreter does on its way out (logging and tracker flushes are atexit hooks); then leave without
        # unwinding into the server's loop.
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """Read one job per line; fork it, reply with its pid, wait for it, reply with its exit code."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing a library prints can reach the replies
    preload()
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(job)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# ----------------------------------------------------------------------------- the client (in the pytest process)


class ForkLauncher:
    """A server started with `env`; `run` forks a launch from it."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.fork_launcher"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, cwd=ROOT, text=True, bufsize=1,
        )  # fmt: skip
        self.ready = False
        self.pending = b""  # read from the server, not yet a whole reply
        atexit.register(self.close)

    def alive(self) -> bool:
        """Whether the server still runs."""
        return self.server.poll() is None

    def fits(self, env: dict[str, str]) -> bool:
        """Whether a launch with `env` may be forked from this server (same environment, the server alive)."""

        def relevant(variables):
            return {k: v for k, v in variables.items() if k not in IGNORED_VARIABLES}

        return self.alive() and relevant(env) == relevant(self.env)

    def reply(self, timeout: float | None = None) -> dict | None:
        """The server's next reply, or None past `timeout` seconds."""
        # Read with os.read into a buffer of our own: a buffered readline could take in the next reply too, which
        # select() would then never see arrive.
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.server.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.server.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the launch server exited (code {self.server.poll()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(
        self, cmd: list[str], timeout: float, env: dict[str, str], cwd: Path
    ) -> subprocess.CompletedProcess:
        """`cmd` (`[python, script, *args]`) as `run_with_stack_dump` runs it: past `timeout` its session is sent
        SIGUSR1 (the script prints every thread's stack) and then killed, and TimeoutExpired carries its output."""
        if not self.ready:
            assert self.reply(timeout=300) == {"ready": True}
            self.ready = True
        with tempfile.TemporaryDirectory() as logs:
            stdout, stderr = Path(logs) / "stdout", Path(logs) / "stderr"
            job = {"argv": cmd, "env": env, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}
            self.server.stdin.write(json.dumps(job) + "\n")
            pid = self.reply()["pid"]
            done = self.reply(timeout)
            if done is None:
                for sig in (signal.SIGUSR1, signal.SIGKILL):
                    try:
                        os.killpg(pid, sig)
                    except ProcessLookupError:
                        pass
                    time.sleep(3 if sig == signal.SIGUSR1 else 0)
                self.reply()
                raise subprocess.TimeoutExpired(cmd, timeout, stdout.read_text(), stderr.read_text())
            return subprocess.CompletedProcess(
                cmd, done["returncode"], stdout.read_text(), stderr.read_text()
            )

    def close(self) -> None:
        """Stop the server (its stdin closed ends its loop)."""
        if self.server.poll() is None:
            self.server.stdin.close()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()


if __name__ == "__main__":
    serve()
